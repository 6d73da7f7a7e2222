import type { LineReader } from '../net/lines.js';

// ManageSieve (RFC 5804 section 4) as the proxy reads it before login: a command is atoms
// and strings, a string is quoted ("..." with \" and \\ only) or a literal. Clients send
// non-synchronising literals `{n+}` CRLF followed by n octets (RFC 5804 literal-c2s); a
// synchronising `{n}` is accepted too (nothing is waited for: a client that sends one
// expects no continuation in ManageSieve). Every literal is bounded by literal_size, and a
// command by MAX_TOKENS: pre-auth input is hostile.

export type SieveToken = { kind: 'atom'; text: string } | { kind: 'string'; value: Buffer };

export type SieveRead =
  | { kind: 'command'; tokens: SieveToken[] }
  /** A syntax error: answer NO and go on reading. */
  | { kind: 'bad'; why: string }
  /** A literal over the limit is on its way: answer BYE and close. */
  | { kind: 'fatal'; why: string };

/** AUTHENTICATE takes two strings, PUTSCRIPT (after login, not ours) two; past this a command is refused. */
const MAX_TOKENS = 8;

const ATOM = /^[A-Za-z]+/;
const LITERAL_AT_END = /\{(\d{1,10})(\+?)\}$/;

/** Parses `text` (latin1, one char per byte) into tokens; a trailing literal header is returned apart. */
function scan(text: string, into: SieveToken[]): { literal?: number } | { error: string } {
  let i = 0;
  for (;;) {
    while (text[i] === ' ') i++;
    if (i >= text.length) return {};
    if (into.length >= MAX_TOKENS) return { error: 'Too many arguments' };
    const c = text[i]!;
    if (c === '"') {
      let out = '';
      for (i++; ; i++) {
        if (i >= text.length) return { error: 'Unterminated quoted string' };
        const d = text[i]!;
        if (d === '"') break;
        if (d === '\\') {
          const e = text[++i];
          if (e !== '"' && e !== '\\') return { error: 'Bad escape in quoted string' };
          out += e;
        } else {
          out += d;
        }
      }
      i++;
      into.push({ kind: 'string', value: Buffer.from(out, 'latin1') });
    } else if (c === '{') {
      const m = LITERAL_AT_END.exec(text.slice(i));
      if (!m || m.index !== 0) return { error: 'Bad literal' };
      return { literal: Number(m[1]) };
    } else {
      const m = ATOM.exec(text.slice(i));
      if (!m) return { error: 'Bad command syntax' };
      into.push({ kind: 'atom', text: m[0] });
      i += m[0].length;
    }
    if (i < text.length && text[i] !== ' ') return { error: 'Bad command syntax' };
  }
}

/** Reads one command with its literals (the reader bounds the line length and the sweep the time). */
export async function readSieveCommand(reader: LineReader, literalSize: number): Promise<SieveRead> {
  const tokens: SieveToken[] = [];
  for (;;) {
    const line = await reader.line('latin1');
    const r = scan(line, tokens);
    if ('error' in r) return { kind: 'bad', why: r.error };
    if (r.literal === undefined) return { kind: 'command', tokens };
    // The octets are on their way whatever we answer: too many of them cannot be skipped safely.
    if (r.literal > literalSize) return { kind: 'fatal', why: 'Literal too large' };
    tokens.push({ kind: 'string', value: await reader.bytes(r.literal) });
  }
}

/** A string as a ManageSieve quoted string, or undefined when it needs a literal (CR, LF, NUL, or long). */
export function quoted(s: string): string | undefined {
  if (/[\r\n\0]/.test(s) || s.length > 1024) return undefined;
  return `"${s.replace(/[\\"]/g, (m) => `\\${m}`)}"`;
}

/** A string for the wire, quoted when it can be, else a server literal `{n}` CRLF octets. */
export function sieveString(s: string): string {
  return quoted(s) ?? `{${Buffer.byteLength(s, 'utf8')}}\r\n${s}`;
}
