// The few bits of IMAP syntax the proxy needs before login (RFC 9051 section 9): astrings
// (atoms, quoted strings with \" and \\ escapes, literals), parenthesised lists for ID, and
// the literal marker at the end of a line. Nothing after login is parsed.
//
// Command lines are handled as latin1 strings, one character per byte: a password that is
// not UTF-8 (latin-1 from an old client) must reach the backend byte for byte.

export type Token =
  | { kind: 'atom'; text: string }
  | { kind: 'string'; data: Buffer }
  | { kind: 'open' }
  | { kind: 'close' };

export class ImapSyntaxError extends Error {}

/**
 * RFC 9051 tag: 1*<any ASTRING-CHAR except "+">, i.e. printable ASCII without the atom
 * specials. Anything else (control characters above all) is never echoed to the client.
 */
const TAG = /^[^\x00-\x20\x7f-\uffff(){%*"\\+]+$/;

export function validTag(tag: string): boolean {
  return TAG.test(tag);
}

/** The tag to answer a line with: its first word when that is a valid tag, else `*`. */
export function replyTag(line: string): string {
  const word = line.split(' ', 1)[0]!;
  return validTag(word) ? word : '*';
}

/** `{123}` or `{123+}` at the end of a line: a literal of that size follows. */
export function literalAtEnd(line: string): { size: number; nonSync: boolean; prefix: string } | undefined {
  const m = /\{(\d{1,10})(\+?)\}$/.exec(line);
  if (!m) return undefined;
  return { size: Number(m[1]), nonSync: m[2] === '+', prefix: line.slice(0, m.index) };
}

/**
 * Tokens of a command whose line parts are `segments` with `literals[i]` standing between
 * `segments[i]` and `segments[i + 1]` (the reader took the literal markers off already).
 */
export function tokenize(segments: readonly string[], literals: readonly Buffer[]): Token[] {
  const out: Token[] = [];
  segments.forEach((s, k) => {
    let i = 0;
    while (i < s.length) {
      const c = s[i]!;
      if (c === ' ') {
        i++;
      } else if (c === '(') {
        out.push({ kind: 'open' });
        i++;
      } else if (c === ')') {
        out.push({ kind: 'close' });
        i++;
      } else if (c === '"') {
        let text = '';
        i++;
        for (;;) {
          if (i >= s.length) throw new ImapSyntaxError('unterminated quoted string');
          const d = s[i]!;
          if (d === '"') break;
          // RFC 9051 QUOTED-CHAR: no CR, LF or NUL; 8-bit bytes pass (see the top of the file).
          if (d === '\r' || d === '\n' || d === '\0') throw new ImapSyntaxError('bad character in quoted string');
          if (d === '\\') {
            const e = s[i + 1];
            if (e !== '"' && e !== '\\') throw new ImapSyntaxError('bad escape in quoted string');
            text += e;
            i += 2;
          } else {
            text += d;
            i++;
          }
        }
        i++;
        out.push({ kind: 'string', data: Buffer.from(text, 'latin1') });
      } else {
        const start = i;
        while (i < s.length && s[i] !== ' ' && s[i] !== '(' && s[i] !== ')') {
          const code = s.charCodeAt(i);
          if (s[i] === '"' || s[i] === '{' || s[i] === '\\' || code < 0x20 || code === 0x7f) throw new ImapSyntaxError('bad character in atom');
          i++;
        }
        out.push({ kind: 'atom', text: s.slice(start, i) });
      }
    }
    const lit = literals[k];
    if (lit) out.push({ kind: 'string', data: lit });
  });
  return out;
}

/** An astring argument (atom or string) as bytes; undefined if the token is not one. */
export function astring(t: Token | undefined): Buffer | undefined {
  if (!t) return undefined;
  if (t.kind === 'atom') return t.text.toUpperCase() === 'NIL' ? undefined : Buffer.from(t.text, 'latin1');
  if (t.kind === 'string') return t.data;
  return undefined;
}

const ATOM_SAFE = /^[!#$&'+-[^-z|}~]+$/; // ASCII atom-chars without the specials

/**
 * Encodes a value for the backend: an atom or quoted string where that is exact, else a
 * literal (non-synchronising when the backend has LITERAL+; else the caller must wait for
 * the continuation, which is why the literal is returned as its own part).
 */
export function encodeAstring(v: Buffer, literalPlus: boolean): { head: string; literal?: Buffer } {
  const s = v.toString('latin1');
  if (s.length > 0 && ATOM_SAFE.test(s)) return { head: s };
  if (/^[\x20-\x7e]*$/.test(s)) return { head: `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"` };
  return { head: `{${v.length}${literalPlus ? '+' : ''}}`, literal: v };
}

/** Quotes a string for our own responses (ID values, texts). */
export function quoted(s: string): string {
  return `"${s.replace(/[\\"]/g, (c) => `\\${c}`).replace(/[\r\n]/g, ' ')}"`;
}

/** The capability list inside a `[CAPABILITY ...]` response code or a `* CAPABILITY` line. */
export function capabilitiesIn(line: string): Set<string> | undefined {
  const m = /\[CAPABILITY ([^\]]*)\]/i.exec(line) ?? /^\* CAPABILITY (.*)$/i.exec(line);
  if (!m) return undefined;
  return new Set(m[1]!.trim().toUpperCase().split(/\s+/));
}
