// SMTP/LMTP replies as data: parsing what a backend says, formatting what we say. Pure
// functions only, shared by the front end (src/lmtp/session.ts) and our backend client.

/** One complete reply: a three-digit code, an optional RFC 3463 enhanced code, its text lines. */
export interface Reply {
  code: number;
  /** e.g. "5.1.1"; absent when the peer did not send one. */
  enhanced?: string;
  /** Text of each line, without the code and enhanced code. At least one (maybe empty). */
  lines: string[];
}

export const isPositive = (r: Reply): boolean => r.code >= 200 && r.code < 300;
export const isTemporary = (r: Reply): boolean => r.code >= 400 && r.code < 500;
export const isPermanent = (r: Reply): boolean => r.code >= 500;

// Control characters in a reply line would let a peer's text split our reply stream.
// eslint-disable-next-line no-control-regex
const CONTROL = /[\x00-\x1f\x7f]/g;

/** Longest reply text line we emit; longer backend text is cut (RFC 5321 allows 512 octets). */
const MAX_TEXT = 480;

function clean(text: string): string {
  const t = text.replace(CONTROL, ' ');
  return t.length > MAX_TEXT ? `${t.slice(0, MAX_TEXT)}...` : t;
}

/** The enhanced code a reply should carry when the peer gave none: the class and "0.0". */
export function defaultEnhanced(code: number): string {
  return `${Math.floor(code / 100)}.0.0`;
}

export function reply(code: number, enhanced: string | undefined, ...lines: string[]): Reply {
  return enhanced === undefined ? { code, lines: lines.length ? lines : [''] } : { code, enhanced, lines: lines.length ? lines : [''] };
}

/**
 * Wire form of a reply. `withEnhanced` follows RFC 2034: once ENHANCEDSTATUSCODES is
 * advertised every reply except the greeting and the LHLO reply carries one, on every line.
 * Every line gets the reply's one code (the backend's own, wherever it was): Postfix's
 * LMTP client reads the enhanced code from the first line of a multi-line reply.
 */
export function formatReply(r: Reply, withEnhanced = true): string {
  const enhanced = withEnhanced && r.code >= 200 && r.code !== 354 ? `${r.enhanced ?? defaultEnhanced(r.code)} ` : '';
  const lines = r.lines.length ? r.lines : [''];
  let out = '';
  lines.forEach((line, i) => {
    const sep = i < lines.length - 1 ? '-' : ' ';
    const text = `${enhanced}${clean(line)}`;
    out += text === '' && sep === ' ' ? `${r.code}\r\n` : `${r.code}${sep}${text}\r\n`;
  });
  return out;
}

/** Text of a reply on one line, for logs and error messages. */
export function replyText(r: Reply): string {
  return `${r.code}${r.enhanced ? ` ${r.enhanced}` : ''} ${r.lines.join(' / ')}`.trim();
}

export class ReplySyntaxError extends Error {}

const LINE = /^(\d{3})(?:([ -])(.*))?$/s;
const ENHANCED = /^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)/;

/**
 * Accumulates reply lines into replies. A multi-line reply ("250-a", "250 b") is one reply;
 * every line must carry the same code. The enhanced code is taken from the first line that
 * carries one whose class matches the reply code (RFC 3463 section 2), whichever line that
 * is: Cyrus puts it on the last line only ("550-Mailbox unknown..." then "550 5.1.1 User
 * unknown"). Each line's own code is taken off its text, so formatReply() writes the one
 * real code and never a second one.
 */
export class ReplyAssembler {
  private code: number | undefined;
  private enhanced: string | undefined;
  private lines: string[] = [];

  constructor(private readonly maxLines = 100) {}

  /** Feeds one line (without CRLF); returns the reply it completes, if any. */
  push(line: string): Reply | undefined {
    const m = LINE.exec(line);
    if (!m) throw new ReplySyntaxError(`malformed reply line: ${clean(line).slice(0, 80)}`);
    const code = Number(m[1]);
    if (code < 200 || code > 599) throw new ReplySyntaxError(`reply code out of range: ${code}`);
    if (this.code !== undefined && code !== this.code) throw new ReplySyntaxError(`reply code changed within a multi-line reply: ${this.code} then ${code}`);
    this.code = code;
    let text = m[3] ?? '';
    const e = ENHANCED.exec(text);
    if (e && Number(e[1]) === Math.floor(code / 100)) {
      this.enhanced ??= `${e[1]}.${e[2]}.${e[3]}`;
      text = text.slice(e[0].length);
    }
    this.lines.push(text);
    if (this.lines.length > this.maxLines) throw new ReplySyntaxError(`reply longer than ${this.maxLines} lines`);
    if (m[2] === '-') return undefined;
    const done = reply(code, this.enhanced, ...this.lines);
    this.code = this.enhanced = undefined;
    this.lines = [];
    return done;
  }
}
