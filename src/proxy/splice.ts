import type { Socket } from 'node:net';
import type { Protocol, Route } from '../lookup/model.js';
import type { LiveSession, SessionRegistry } from './registry.js';

/** Bytes through all splices, for metrics (one add per chunk, no per-session counters). */
export const spliceTotals = { clientToBackend: 0, backendToClient: 0 };

/**
 * A logged-in session: bytes both ways, no parsing, backpressure by pausing the faster side.
 * This object is all the state a session keeps after login.
 */
export class SplicedSession implements LiveSession {
  /** Whether the last byte sent to the client ended a line, so a BYE may be put in. */
  private atLineStart = true;
  private closed = false;

  constructor(
    readonly protocol: Protocol,
    readonly route: Route,
    private readonly client: Socket,
    private readonly backend: Socket,
    private readonly registry: SessionRegistry,
    /** The line to send the client when an event ends the session, if the protocol has one. */
    private readonly farewell: ((reason: string) => string) | undefined,
  ) {}

  /** Starts the splice; `toBackend` and `toClient` are bytes already read past the login. */
  start(toBackend: Buffer, toClient: Buffer): void {
    const { client, backend } = this;
    // After end() nothing may reach the old backend, even in the moment before it is closed.
    client.on('data', (c: Buffer) => {
      if (this.closed) return;
      spliceTotals.clientToBackend += c.length;
      if (!backend.write(c)) client.pause();
    });
    backend.on('data', (c: Buffer) => {
      if (this.closed) return;
      spliceTotals.backendToClient += c.length;
      this.atLineStart = c[c.length - 1] === 10;
      if (!client.write(c)) backend.pause();
    });
    client.on('drain', () => this.closed || backend.resume());
    backend.on('drain', () => this.closed || client.resume());
    // Half-closes are passed on so a pipelined LOGOUT still gets its answer.
    client.on('end', () => endOnce(backend));
    backend.on('end', () => endOnce(client));
    client.on('error', () => this.close());
    backend.on('error', () => this.close());
    client.on('close', () => this.close());
    backend.on('close', () => this.closeSoon());
    this.registry.add(this);
    if (toBackend.length) backend.write(toBackend);
    if (toClient.length) {
      this.atLineStart = toClient[toClient.length - 1] === 10;
      client.write(toClient);
    }
    client.resume();
    backend.resume();
  }

  /** An event made this session wrong: say so where the protocol allows, then close both sides. */
  end(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.registry.remove(this);
    // Nothing moves either way from here on. The old backend connection is closed once the
    // current batch of ended sessions has had its BYEs: an event ends thousands of sessions
    // in one loop, and closing each backend first (a close is as dear as the BYE's write)
    // made the last client wait for all those closes too.
    this.client.pause();
    this.backend.pause();
    closeLater(this.backend);
    // Mid-response (inside a literal) a BYE would corrupt what the client is parsing: then
    // the connection is just closed, which every client handles as a lost connection.
    if (this.farewell && this.atLineStart) this.client.write(this.farewell(reason));
    this.client.destroySoon();
  }

  private close(): void {
    if (this.closed) return;
    this.closed = true;
    this.registry.remove(this);
    this.client.destroy();
    this.backend.destroy();
  }

  /** The backend went away: let what it sent reach the client, then close. */
  private closeSoon(): void {
    if (this.closed) return;
    this.closed = true;
    this.registry.remove(this);
    endOnce(this.client);
  }
}

let toClose: Socket[] = [];

/** Destroys `s` after the current macrotask (one setImmediate for the whole batch). */
function closeLater(s: Socket): void {
  if (toClose.push(s) > 1) return;
  setImmediate(() => {
    const batch = toClose;
    toClose = [];
    for (const b of batch) b.destroy();
  });
}

/**
 * Ends our side unless that already happened: `end()` on a finished or destroyed socket
 * builds an error object (with a stack trace) only to drop it, and every LOGOUT got here
 * two or three times.
 */
function endOnce(s: Socket): void {
  if (!s.writableEnded && !s.destroyed) s.end();
}
