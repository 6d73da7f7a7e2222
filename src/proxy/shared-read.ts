import type { Socket } from 'node:net';

// Reads from plain-TCP backend sockets land in one buffer shared by all of them (Node's
// `onread` option) instead of a fresh 64 KiB Buffer per read. Backend-to-client is where
// the bulk goes (FETCH, RETR); a large reused buffer means fewer, bigger reads and no
// allocation per read, which roughly halves the proxy's CPU per byte spliced. An idle
// session holds no read buffer at all.
//
// The rule that makes sharing safe: a chunk is a view into the shared buffer, valid only
// during the call. Whoever writes it on must check that the write completed synchronously
// (`writableLength === 0`); if not, the pending write still points into the buffer, and
// `retireSharedReadBuffer()` gives future reads a new one (the old one is freed once that
// write is done).

const READ_SIZE = 256 * 1024;
let shared = Buffer.allocUnsafe(READ_SIZE);

/** Receives a chunk (a view, valid during the call); returns false to pause the socket. */
export type ReadSink = (chunk: Buffer) => boolean;

const kSink = Symbol('mailsplice.readSink');
type SharedReadSocket = Socket & { [kSink]?: ReadSink };

export function retireSharedReadBuffer(): void {
  shared = Buffer.allocUnsafe(READ_SIZE);
}

/** `onread` options for net.connect that read into the shared buffer. */
export const sharedReadOptions = {
  buffer: (): Buffer => shared,
  callback(this: Socket, n: number, buf: Buffer): boolean {
    const sink = (this as SharedReadSocket)[kSink];
    if (sink) return sink(buf.subarray(0, n));
    // No sink yet (the login dialogue): hand a copy to the ordinary 'data' listeners.
    this.emit('data', Buffer.from(buf.subarray(0, n)));
    return true;
  },
};

/** Whether `sock` reads into the shared buffer (plain TCP backends), so a sink can be set. */
export function readsShared(sock: Socket): boolean {
  return kSink in sock;
}

export function markSharedRead(sock: Socket): void {
  (sock as SharedReadSocket)[kSink] = undefined;
}

/** Routes the socket's reads to `sink` from now on. */
export function setReadSink(sock: Socket, sink: ReadSink): void {
  (sock as SharedReadSocket)[kSink] = sink;
}
