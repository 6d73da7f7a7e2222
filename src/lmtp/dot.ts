// The DATA transparency procedure (RFC 5321 section 4.5.2), both ways, on a stream: chunks in,
// chunks out, a few bytes of state carried between chunks, nothing ever held whole.
//
// The two directions are deliberately asymmetric, because that is what makes SMTP smuggling
// impossible through us:
// - From the client we accept only CR LF "." CR LF as the end of the message. A bare
//   LF "." LF (or any mix) is message content. Postfix never sends bare LFs, so a lone LF
//   can only come from a message someone crafted to end the DATA early on a laxer server.
// - To the backend we stuff a dot at the start of every line, where a line starts after ANY
//   LF. Dovecot 2.3 (checked: 2.3.19, istream-dot) ends DATA on LF "." LF too, and strips a
//   leading dot after a bare LF, so this is exactly what keeps a crafted "\n.\n" inside the
//   message there, and it costs a strict-CRLF server nothing it would see as a line start.

const CR = 13;
const LF = 10;
const DOT = 0x2e;
const CRBUF = Buffer.from('\r');

const enum St {
  /** At the start of a line (the first byte of the message, or after CR LF). */
  LineStart,
  /** Inside a line. */
  Mid,
  /** A "." at the start of a line was read (and dropped). */
  Dot,
  /** "." CR at the start of a line: the terminator if LF follows. */
  DotCr,
}

/**
 * Undoes dot-stuffing on what a client sends after DATA and finds the terminator. The
 * output includes the CR LF that ends the last line (as smtp-server's does); a message
 * that was empty yields nothing.
 */
export class DotDecoder {
  private st = St.LineStart;
  /** Whether the last byte consumed was CR (a line ending may straddle two chunks). */
  private lastCr = false;
  /** Content bytes produced so far. */
  bytes = 0;

  /**
   * Consumes `chunk`, handing content to `emit` (slices of `chunk`, or a one-byte CR).
   * Returns the bytes that follow the terminator (maybe empty) once it was seen, or
   * undefined while the message goes on. Must not be called again after the terminator.
   */
  push(chunk: Buffer, emit: (content: Buffer) => void): Buffer | undefined {
    const out = (b: Buffer) => {
      if (b.length) {
        this.bytes += b.length;
        emit(b);
      }
    };
    const len = chunk.length;
    let start = 0; // first byte not yet emitted
    let i = 0;
    while (i < len) {
      switch (this.st) {
        case St.LineStart:
          if (chunk[i] === DOT) {
            out(chunk.subarray(start, i));
            i++;
            start = i;
            this.st = St.Dot;
          } else {
            this.st = St.Mid;
          }
          break;
        case St.Mid: {
          const nl = chunk.indexOf(LF, i);
          if (nl < 0) {
            i = len;
            break;
          }
          const crBefore = nl > 0 ? chunk[nl - 1] === CR : this.lastCr;
          i = nl + 1;
          this.st = crBefore ? St.LineStart : St.Mid;
          break;
        }
        case St.Dot:
          if (chunk[i] === CR) {
            // Hold the CR back: it is either part of the terminator or content.
            i++;
            start = i;
            this.st = St.DotCr;
          } else {
            // "." followed by other text: the dot was stuffing (or stray) and stays dropped.
            this.st = St.Mid;
          }
          break;
        case St.DotCr:
          if (chunk[i] === LF) {
            return chunk.subarray(i + 1);
          }
          out(CRBUF);
          this.lastCr = true;
          this.st = St.Mid;
          // `chunk[i]` is not LF, so the Mid scan cannot mistake the held CR for its line end.
          break;
      }
    }
    out(chunk.subarray(start, len));
    if (len > 0 && this.st !== St.DotCr) this.lastCr = chunk[len - 1] === CR && this.st === St.Mid;
    return undefined;
  }
}

/**
 * Dot-stuffs a message for a backend: a "." is put before every "." that starts a line,
 * a line starting after any LF. `terminator()` ends the message with CR LF "." CR LF,
 * adding a CR LF first when the content did not end with one.
 */
export class DotEncoder {
  private atLineStart = true;
  /** The last two content bytes (-1: none yet); numbers, so no chunk is kept alive. */
  private prev = -1;
  private last = -1;
  bytes = 0;

  /** The stuffed form of `chunk` as slices (no copy of the content). */
  encode(chunk: Buffer): Buffer[] {
    const parts: Buffer[] = [];
    const len = chunk.length;
    if (len === 0) return parts;
    let start = 0;
    if (this.atLineStart && chunk[0] === DOT) parts.push(DOTBUF);
    let nl = chunk.indexOf(LF);
    while (nl >= 0 && nl + 1 < len) {
      if (chunk[nl + 1] === DOT) {
        parts.push(chunk.subarray(start, nl + 1), DOTBUF);
        start = nl + 1;
      }
      nl = chunk.indexOf(LF, nl + 1);
    }
    parts.push(start === 0 ? chunk : chunk.subarray(start));
    this.atLineStart = chunk[len - 1] === LF;
    this.prev = len >= 2 ? chunk[len - 2]! : this.last;
    this.last = chunk[len - 1]!;
    for (const p of parts) this.bytes += p.length;
    return parts;
  }

  terminator(): Buffer {
    const endsWithCrlf = this.last === -1 || (this.prev === CR && this.last === LF);
    return endsWithCrlf ? END : CRLF_END;
  }
}

const DOTBUF = Buffer.from('.');
const END = Buffer.from('.\r\n');
const CRLF_END = Buffer.from('\r\n.\r\n');
