import type { Socket } from 'node:net';
import type { Protocol, Route } from '../lookup/model.js';
import type { Logger } from '../log.js';
import { ClientCommands, trackCommands, Verdict, Wait, watchAnswers } from '../imap/imap-commands.js';
import { atResponseBoundary, initialFraming, Mark, trackFraming, type FramingState } from '../imap/imap-framing.js';
import { outgoing, outgoingWritten, readsLanding, setReadSink, type ReadSink } from '../net/read-buffer.js';
import type { Meters } from './meters.js';
import type { LiveSession, SessionRegistry } from './registry.js';
import type { EndCause, SessionInfo } from './session-info.js';
import type { Expiring, Sweep } from './sweep.js';

/** What every splice shares (one object per process, one pointer per session). */
export interface SpliceEnv {
  registry: SessionRegistry;
  sweep: Sweep;
  /** half_close_timeout_ms: how long a client may keep its side open after the backend closed. */
  limits: { half_close_timeout_ms: number };
  log: Logger;
  meters: Meters;
}

/** Bytes through all splices, for metrics (one add per chunk, no per-session counters). */
export const spliceTotals = { clientToBackend: 0, backendToClient: 0 };

const kSession = Symbol('mailsplice.session');
type SplicedSocket = Socket & { [kSession]?: SplicedSession };

function sessionOf(s: Socket): SplicedSession {
  return (s as SplicedSocket)[kSession]!;
}

// The event handlers are shared by every session: each finds its session through the socket
// (`this`), so an idle session holds no closures of its own (ten fewer objects per session;
// at tens of thousands of idle IMAP sessions that is what the memory per session is made of).
function onClientData(this: Socket, c: Buffer): void {
  sessionOf(this).fromClient(c);
}
function onBackendData(this: Socket, c: Buffer): void {
  sessionOf(this).fromBackend(c);
}
function onClientDrain(this: Socket): void {
  const s = sessionOf(this);
  if (!s.closed) s.backend.resume();
}
function onBackendDrain(this: Socket): void {
  const s = sessionOf(this);
  if (!s.closed && !s.held) s.client.resume();
}
// Half-closes are passed on so a pipelined LOGOUT still gets its answer.
function onClientEnd(this: Socket): void {
  endOnce(sessionOf(this).backend);
}
function onBackendEnd(this: Socket): void {
  sessionOf(this).backendEnded();
}
function onClientFailure(this: Socket): void {
  sessionOf(this).close('client');
}
function onBackendFailure(this: Socket): void {
  sessionOf(this).close('backend');
}
function onBackendClose(this: Socket): void {
  sessionOf(this).closeSoon();
}

/**
 * A logged-in session: bytes both ways, backpressure by pausing the faster side. This object
 * (and a pointer to it on each socket) is all the state a session keeps. For IMAP it follows
 * the server's response framing (three numbers, see imap-framing.ts) so that an event's BYE
 * goes only between two responses.
 */
export class SplicedSession implements LiveSession, FramingState, Expiring, ReadSink {
  /** Framing of the backend-to-client stream (IMAP only): literal bytes still to come. */
  litLeft = 0;
  /** Framing: how the current response line ends so far. */
  mark: number = Mark.START;
  /** Framing: the literal count being read. */
  markValue = 0;
  /** Set while the backend has closed and the client's FIN is awaited (the shared sweep enforces it). */
  deadline = 0;
  /** Set once the session is over: after that nothing is forwarded either way. */
  closed = false;
  /** IMAP: where the client's commands are (see imap-commands.ts). */
  private readonly commands: ClientCommands | undefined;
  /** IMAP: client bytes held while the client must wait for the server's answer (rare, short). */
  held: Buffer | undefined;
  /** Bytes client to backend, backend to client (for the session's end line and /sessions). */
  bytesUp = 0;
  bytesDown = 0;
  /** POP3: the client's last command was QUIT (IMAP's LOGOUT is seen by the command tracker). */
  private quit = false;

  constructor(
    readonly protocol: Protocol,
    readonly route: Route,
    readonly client: Socket,
    readonly backend: Socket,
    readonly info: SessionInfo,
    private readonly env: SpliceEnv,
    /** The line to send the client when an event ends the session, if the protocol has one. */
    private readonly farewell: ((reason: string) => string) | undefined,
    refuseCompress = false,
  ) {
    this.commands = protocol === 'imap' ? new ClientCommands(refuseCompress) : undefined;
  }

  /**
   * Starts the splice; the pending buffers are bytes already read past the login. When the
   * client's end of stream was already read (it half-closed, or left, during the backend
   * login), it is passed on now: the backend answers what was pipelined and then closes,
   * and with it the session. Nothing of it may be left behind logged in.
   */
  start(pendingToBackend: Buffer, pendingToClient: Buffer, clientEnded = false): void {
    const { client, backend } = this;
    (client as SplicedSocket)[kSession] = this;
    (backend as SplicedSocket)[kSession] = this;
    client.on('data', onClientData).on('drain', onClientDrain).on('end', onClientEnd).on('error', onClientFailure).on('close', onClientFailure);
    // A plain backend socket reads into the shared landing buffer (read-buffer.ts) and hands
    // each read to `landed`; others (TLS) emit 'data' as usual.
    if (readsLanding(backend)) setReadSink(backend, this);
    backend.on('data', onBackendData).on('drain', onBackendDrain).on('end', onBackendEnd).on('error', onBackendFailure).on('close', onBackendClose);
    this.env.registry.add(this);
    if (this.farewell) initialFraming(this);
    if (pendingToClient.length) {
      if (this.farewell) trackFraming(this, pendingToClient);
      client.write(pendingToClient);
    }
    // What the client pipelined behind its login goes through the command tracker too.
    if (pendingToBackend.length) this.fromClient(pendingToBackend);
    if (this.closed) return;
    if (clientEnded) endOnce(backend);
    if (!this.held) client.resume();
    backend.resume();
  }

  fromClient(c: Buffer): void {
    if (this.closed) return; // after end() nothing may reach the old backend
    const t = this.commands;
    if (t && !t.compressed) {
      if (t.wait !== Wait.NONE) return this.hold(c);
      const stop = trackCommands(t, c);
      if (stop < c.length || t.verdict !== Verdict.NONE) return this.stopped(t, c, stop);
    } else if (!t && c.length <= 6) {
      this.quit = isQuit(c);
    }
    spliceTotals.clientToBackend += c.length;
    this.bytesUp += c.length;
    if (!this.backend.write(c)) this.client.pause();
  }

  fromBackend(c: Buffer): void {
    if (!this.toClient(c)) this.backend.pause();
  }

  /**
   * A read from the backend in the shared landing buffer: forwarded as a copy (see
   * read-buffer.ts: nothing may point into the landing buffer once this returns). False
   * stops the backend's reads until the client drains (onClientDrain resumes them).
   */
  landed(landing: Buffer, n: number): boolean {
    if (this.closed) return false;
    const out = outgoing();
    landing.copy(out, 0, 0, n);
    const more = this.toClient(n === out.length ? out : out.subarray(0, n));
    outgoingWritten(this.client);
    return more;
  }

  /** Server bytes on to the client, through the trackers; false when the client's buffer is full. */
  private toClient(c: Buffer): boolean {
    if (this.closed) return true;
    spliceTotals.backendToClient += c.length;
    this.bytesDown += c.length;
    const t = this.commands;
    if (t && t.wait !== Wait.NONE) watchAnswers(t, this, c);
    else if (this.farewell && !t?.compressed) trackFraming(this, c);
    const more = this.client.write(c);
    if (t && t.wait === Wait.NONE && this.held) this.release();
    return more;
  }

  /** The client tracker stopped inside `c`: a refused command, or the client must wait for the server. */
  private stopped(t: ClientCommands, c: Buffer, stop: number): void {
    if (t.verdict !== Verdict.NONE) {
      const what = t.verdict === Verdict.UNAUTHENTICATE ? 'UNAUTHENTICATE' : t.verdict === Verdict.COMPRESS ? 'COMPRESS' : 'a literal count no client sends';
      this.env.log.info('session ended: the client used what the proxy does not pass on', { login: this.route.login, slot: this.route.slot, what });
      this.end(t.verdict === Verdict.LOST ? 'Protocol error' : `${what} is not available through this proxy`, 'refused');
      return;
    }
    if (stop > 0) {
      spliceTotals.clientToBackend += stop;
      this.bytesUp += stop;
      this.backend.write(c.subarray(0, stop));
    }
    if (stop < c.length) this.hold(c.subarray(stop));
  }

  /** Keeps client bytes until the server has answered the command the client must wait for. */
  private hold(c: Buffer): void {
    this.held = this.held ? Buffer.concat([this.held, c]) : c;
    this.client.pause();
  }

  /** The server answered: what the client sent meanwhile goes through the tracker now. */
  private release(): void {
    const held = this.held!;
    this.held = undefined;
    if (!this.backend.writableNeedDrain) this.client.resume();
    this.fromClient(held);
  }

  /** An event made this session wrong: say so where the protocol allows, then close both sides. */
  end(reason: string, cause: EndCause): void {
    if (this.closed) return;
    this.closed = true;
    this.env.registry.remove(this);
    this.finished(cause, reason);
    // Nothing moves either way from here on. The old backend connection is closed once the
    // current batch of ended sessions has had its BYEs: an event ends thousands of sessions
    // in one loop, and closing each backend first (a close is as dear as the BYE's write)
    // made the last client wait for all those closes too.
    this.client.pause();
    this.backend.pause();
    closeLater(this.backend);
    // Mid-response (inside a literal, or a line half sent) a BYE would corrupt what the
    // client is parsing: then the connection is just closed, which every client handles as
    // a lost connection.
    // After COMPRESS (or while its answer is awaited) the stream is deflate: plaintext would
    // corrupt it, so the connection is just closed.
    const deflating = this.commands !== undefined && (this.commands.compressed || this.commands.wait === Wait.COMPRESS);
    if (this.farewell && !deflating && atResponseBoundary(this) && !this.client.writableEnded) this.client.write(this.farewell(reason));
    this.client.destroySoon();
  }

  /** The backend finished sending (e.g. after LOGOUT): pass it on, and bound the wait for the client's FIN. */
  backendEnded(): void {
    endOnce(this.client);
    if (this.client.readableEnded || this.client.destroyed || this.deadline) return;
    this.deadline = Date.now() + this.env.limits.half_close_timeout_ms;
    this.env.sweep.add(this);
  }

  /** The client kept its side open too long after the backend closed. */
  expire(): void {
    this.deadline = 0;
    this.close('limit');
  }

  /** Either side failed, or the client went away: close both at once. */
  close(cause: EndCause): void {
    if (this.deadline) {
      this.env.sweep.delete(this);
      this.deadline = 0;
    }
    if (!this.closed) {
      this.closed = true;
      this.env.registry.remove(this);
      this.finished(cause);
    }
    this.client.destroy();
    this.backend.destroy();
  }

  /** The backend went away: let what it sent reach the client, then close. */
  closeSoon(): void {
    if (this.closed) return;
    this.closed = true;
    this.env.registry.remove(this);
    // The backend closes after a LOGOUT or QUIT too: then it was the client's doing.
    const byClient = this.quit || this.commands?.loggedOut === true || this.client.readableEnded;
    this.finished(byClient ? 'client' : 'backend');
    this.backendEnded();
  }

  /** The session's end line and metric: once, when it stops moving bytes. */
  private finished(cause: EndCause, why?: string): void {
    const { route, info } = this;
    this.env.meters.sessionsEnded.inc({ protocol: this.protocol, reason: cause });
    this.env.log.info('session end', {
      session: info.id,
      protocol: this.protocol,
      login: route.login,
      ip: info.ip,
      port: info.port,
      store: route.store,
      slot: route.slot,
      duration_ms: Date.now() - info.started,
      bytes_in: this.bytesUp,
      bytes_out: this.bytesDown,
      ended_by: cause,
      ...(why === undefined ? {} : { why }),
    });
  }
}

/** `QUIT` and a line end, any case: a POP3 client saying goodbye (read without allocating). */
function isQuit(c: Buffer): boolean {
  if (c.length < 5) return false;
  const w = (c[0]! | 0x20) === 0x71 && (c[1]! | 0x20) === 0x75 && (c[2]! | 0x20) === 0x69 && (c[3]! | 0x20) === 0x74;
  return w && (c[4] === 13 || c[4] === 10);
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
