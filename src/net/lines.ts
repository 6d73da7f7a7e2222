import type { Duplex } from 'node:stream';

export class LineTooLong extends Error {}
export class ConnectionClosed extends Error {}

const EMPTY = Buffer.alloc(0);

/**
 * Reads CRLF-terminated lines (a bare LF is accepted) and exact byte counts from a socket,
 * for the short pre-auth dialogues on both sides of the proxy. Every wait is bounded: a line
 * longer than `maxLine` fails the read, and input that nobody asked for yet pauses the socket
 * once it passes `maxLine` bytes, so a stranger's pipelining is held back by TCP rather than
 * by our memory. Timeouts come from outside (the shared sweep calls `fail`).
 */
export class LineReader {
  private buf: Buffer = EMPTY;
  private want: { bytes: number } | 'line' | undefined;
  private resolve: ((v: Buffer) => void) | undefined;
  private reject: ((e: Error) => void) | undefined;
  private failure: Error | undefined;

  constructor(
    readonly socket: Duplex,
    private readonly maxLine: number,
  ) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onError);
  }

  private readonly onData = (chunk: Buffer): void => {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    this.pump();
  };
  private readonly onEnd = (): void => this.fail(new ConnectionClosed('connection closed'));
  private readonly onError = (e: Error): void => this.fail(e);

  /**
   * The next line, without its line ending, decoded as UTF-8; `latin1` gives one character
   * per byte, so that credentials that are not UTF-8 reach the backend unchanged.
   */
  async line(encoding: 'utf8' | 'latin1' = 'utf8'): Promise<string> {
    return (await this.request('line')).toString(encoding);
  }

  /** Exactly `n` bytes (an IMAP literal). The caller has checked `n` against its limit. */
  bytes(n: number): Promise<Buffer> {
    return this.request({ bytes: n });
  }

  private request(want: 'line' | { bytes: number }): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.want = want;
      this.resolve = resolve;
      this.reject = reject;
      this.pump();
      if (this.want) this.socket.resume();
    });
  }

  private pump(): void {
    const want = this.want;
    if (want === undefined) {
      if (this.buf.length > this.maxLine) this.socket.pause();
      return;
    }
    let out: Buffer;
    if (want === 'line') {
      const nl = this.buf.indexOf(10);
      if (nl < 0 || nl > this.maxLine) {
        if (nl > this.maxLine || this.buf.length > this.maxLine) this.fail(new LineTooLong('line too long'));
        return;
      }
      out = this.buf.subarray(0, nl > 0 && this.buf[nl - 1] === 13 ? nl - 1 : nl);
      this.buf = this.buf.subarray(nl + 1);
    } else {
      if (this.buf.length < want.bytes) return;
      out = this.buf.subarray(0, want.bytes);
      this.buf = this.buf.subarray(want.bytes);
    }
    const resolve = this.resolve!;
    this.want = this.resolve = this.reject = undefined;
    resolve(out);
  }

  /** Fails the pending read and every later one (timeout, peer gone, protocol abuse). */
  fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    const reject = this.reject;
    this.want = this.resolve = this.reject = undefined;
    reject?.(e);
  }

  /** Drops buffered input: after STARTTLS nothing sent in the clear may be acted on. */
  discard(): void {
    this.buf = EMPTY;
  }

  /** Stops reading and hands back whatever arrived beyond the last read (to be spliced on). */
  detach(): Buffer {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onError);
    this.socket.pause();
    const rest = this.buf;
    this.buf = EMPTY;
    return rest;
  }
}
