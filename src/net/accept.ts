import { createServer, type Server, type Socket } from 'node:net';
import type { ListenerConfig } from '../config.js';
import type { Logger } from '../log.js';
import type { Expiring, Sweep } from '../session/sweep.js';
import { clientFromSocket, tlsFacts, type ClientInfo } from './client-info.js';
import type { ListenerTls } from './tls.js';

/** Why a connection was turned away before its dialogue. */
export type Refusal = 'listener-full' | 'address-full';

/** What a protocol plugs into the accept pipeline. */
export interface FrontEnd {
  /**
   * The cleartext words for a connection turned away by a limit, or undefined to just close.
   * Never asked on an implicit-TLS listener (there is no cleartext way to say it there).
   */
  refused(why: Refusal, client: ClientInfo): string | undefined;
  /** Starts the protocol's dialogue on a connection that passed every stage. */
  start(socket: Socket, client: ClientInfo): void;
}

/** Per-address connection counting, shared by whatever listeners share a limit. */
export interface ConnectionGate {
  admit(address: string): boolean;
  release(address: string): void;
}

export interface PipelineSettings {
  cfg: ListenerConfig;
  /** The listener's certificates; the handshake runs at accept when `cfg.tls` is implicit. */
  tls: ListenerTls | undefined;
  sweep: Sweep;
  /** Connections per client address (TCP only: unix socket clients have none). */
  gate: ConnectionGate;
  /** How long the stages before the dialogue (the TLS handshake) may take together. */
  handshakeTimeoutMs: number;
  log: Logger;
  counters: { rejectedConnections: number };
  front: FrontEnd;
}

/** The socket's admitted client address, so one shared 'close' handler can give it back. */
const ADMITTED = Symbol('admitted address');
type Accepted = Socket & { [ADMITTED]?: string };

/**
 * A connection between accept and its dialogue, under the shared sweep's deadline: one
 * object per arriving connection, gone once the dialogue starts (no timer of its own).
 */
class Arrival implements Expiring {
  constructor(
    readonly socket: Socket,
    public deadline: number,
  ) {}

  expire(): void {
    this.socket.destroy();
  }
}

/**
 * The one way in for every listener (IMAP, POP3, LMTP, ManageSieve): the listener's
 * connection limit, then the limit per client address, then implicit TLS under the shared
 * sweep, then the protocol's dialogue, which gets the socket and one ClientInfo that
 * everything after reads.
 */
export class AcceptPipeline {
  private open = 0;
  private readonly name: string;

  constructor(private readonly s: PipelineSettings) {
    const { cfg } = s;
    const pipeline = this;
    this.closed = function (this: Accepted) {
      pipeline.open--;
      const address = this[ADMITTED];
      if (address !== undefined) s.gate.release(address);
    };
    this.name = cfg.name ?? (cfg.port !== undefined ? `${cfg.protocol}:${cfg.port}` : `${cfg.protocol}:${cfg.path ?? ''}`);
  }

  get connections(): number {
    return this.open;
  }

  /** Connection handler for a TCP server (`tcp`) or a unix socket server (`unix`). */
  handler(transport: 'tcp' | 'unix'): (socket: Socket) => void {
    return (socket) => this.accept(socket, transport);
  }

  /** One 'close' handler per pipeline, not a closure per socket. */
  private readonly closed: (this: Accepted) => void;

  private accept(socket: Accepted, transport: 'tcp' | 'unix'): void {
    socket.on('error', destroyOnError);
    const client = clientFromSocket(socket, this.name, transport);
    if (this.open >= this.s.cfg.max_connections) return this.refuse(socket, 'listener-full', client);
    this.open++;
    socket.once('close', this.closed);
    if (transport === 'tcp') socket.setKeepAlive(true, 60_000);
    this.admitted(socket, client);
  }

  /** The client's address is final here: count it, then secure the connection. */
  private admitted(socket: Accepted, client: ClientInfo): void {
    const { s } = this;
    if (client.transport === 'tcp') {
      if (!s.gate.admit(client.address)) return this.refuse(socket, 'address-full', client);
      socket[ADMITTED] = client.address;
    }
    if (s.cfg.tls !== 'implicit' || !s.tls) {
      s.front.start(socket, client);
      return;
    }
    const arrival = new Arrival(socket, Date.now() + s.handshakeTimeoutMs);
    s.sweep.add(arrival);
    s.tls.accept(socket).then(
      (secure) => {
        s.sweep.delete(arrival);
        client.tls = tlsFacts(secure);
        s.front.start(secure, client);
      },
      (e: Error) => {
        s.sweep.delete(arrival);
        socket.destroy();
        // Debug only: scanners make these by the thousand; a client that cannot connect
        // (too old a TLS version, a name not covered) shows up here when asked for.
        s.log.debug('tls handshake failed', { listener: client.listener, ip: client.address, error: e.message });
      },
    );
  }

  private refuse(socket: Socket, why: Refusal, client: ClientInfo): void {
    this.s.counters.rejectedConnections++;
    // Say why where there is a cleartext way to, and close our side without waiting for the
    // client's (this socket is never read).
    const words = this.s.cfg.tls === 'implicit' ? undefined : this.s.front.refused(why, client);
    if (words) socket.write(words);
    socket.destroySoon();
  }
}

/**
 * One TCP listener (IMAP, POP3, ManageSieve) on the accept pipeline. LMTP, which also listens
 * on a unix socket, drives its servers itself (src/lmtp/server.ts) with the same pipeline.
 */
export class TcpListener {
  readonly server: Server;
  readonly pipeline: AcceptPipeline;

  constructor(
    readonly cfg: ListenerConfig,
    readonly tls: ListenerTls | undefined,
    settings: Omit<PipelineSettings, 'cfg' | 'tls'>,
  ) {
    this.pipeline = new AcceptPipeline({ ...settings, cfg, tls });
    this.server = createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, this.pipeline.handler('tcp'));
  }

  get connections(): number {
    return this.pipeline.connections;
  }

  listen(): Promise<void> {
    return listenOn(this.server, { host: this.cfg.address, port: this.cfg.port! });
  }

  /** Bound address, for tests that ask for port 0. */
  address(): { address: string; port: number } {
    const a = this.server.address();
    if (a === null || typeof a === 'string') throw new Error('not listening');
    return { address: a.address, port: a.port };
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

export function listenOn(server: Server, opts: { host: string; port: number } | { path: string }, backlog = 4096): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ ...opts, backlog }, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

function destroyOnError(this: Socket): void {
  this.destroy();
}
