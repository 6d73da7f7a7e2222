import type { Socket } from 'node:net';

// Plain-TCP backend sockets of IMAP and POP3 read into one landing buffer shared by all of
// them (net's `onread`), instead of Node's fresh 64 KiB buffer per read. Under FETCH the
// per-read buffers cost a malloc, page faults on fresh pages (glibc hands the freed ones
// back to the kernel), an ArrayBuffer for the GC to sweep and the Readable push machinery:
// profiled, about a quarter of the proxy's CPU per byte.
//
// The rule that keeps sharing safe: nothing may still point into the landing buffer when the
// read callback returns. Node keeps a per-handle pointer to the buffer each socket reads into
// next, so every idle backend socket points at the landing buffer between reads; a write left
// pending on it would be overwritten by the next read of any socket (commit 62739b9 reverted
// a shared buffer for exactly that). So the sink copies what it forwards into an outgoing
// buffer of its own (`outgoing()`), and gives that back only when the write finished at once;
// a write left pending keeps its outgoing buffer, and the next chunk gets a fresh one.

/** Bytes per read: 4x Node's own 64 KiB, fewer read and write calls per byte (two such buffers per process). */
export const READ_SIZE = 256 * 1024;

const landing = Buffer.allocUnsafeSlow(READ_SIZE);
let out = Buffer.allocUnsafeSlow(READ_SIZE);

/** Receives each read (valid during the call only); false stops reading until `resume()`. */
export interface ReadSink {
  landed(landing: Buffer, n: number): boolean;
}

const kSink = Symbol('mailsplice.readSink');
type LandingSocket = Socket & { [kSink]?: ReadSink | null };

function onLanded(this: Socket, n: number, buf: Buffer): boolean {
  const sink = (this as LandingSocket)[kSink];
  if (sink) return sink.landed(buf, n);
  // No sink yet (the login dialogue reads lines): the ordinary 'data' listeners get a copy.
  this.emit('data', Buffer.from(buf.subarray(0, n)));
  return true;
}

/** `onread` for net.connect: reads land in the shared buffer. Only for sockets no TLS will wrap. */
export const landingReads = { buffer: landing, callback: onLanded };

/** Marks a socket opened with `landingReads`, so that a sink may be set on it. */
export function markLanding(sock: Socket): void {
  (sock as LandingSocket)[kSink] = null;
}

/** Whether `sock` reads into the landing buffer. */
export function readsLanding(sock: Socket): boolean {
  return (sock as LandingSocket)[kSink] !== undefined;
}

/** Routes the socket's reads to `sink` from now on (no 'data' events any more). */
export function setReadSink(sock: Socket, sink: ReadSink): void {
  (sock as LandingSocket)[kSink] = sink;
}

/**
 * The buffer to copy a chunk of `n` bytes into before writing it; after the write, call
 * `outgoingWritten(dest)`. Chunks come from the landing buffer, so `n` <= READ_SIZE.
 */
export function outgoing(): Buffer {
  return out;
}

/** After writing from `outgoing()`: if the write is still pending, that buffer is its own now. */
export function outgoingWritten(dest: Socket): void {
  if (dest.writableLength !== 0) out = Buffer.allocUnsafeSlow(READ_SIZE);
}
