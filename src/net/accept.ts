import { createServer, type Server, type Socket } from 'node:net';
import type { ListenerConfig } from '../config.js';
import type { Logger } from '../log.js';
import type { Expiring, Sweep } from '../session/sweep.js';
import { WindowCounts } from '../session/throttle.js';
import { clientFromSocket, tlsFacts, type ClientInfo } from './client-info.js';
import { TrustedNetworks } from './networks.js';
import { parseProxyHeader, type ProxyHeader } from './proxy-protocol.js';
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

/**
 * What became of a PROXY header a listener waited for: `proxied` (it named the client),
 * `local` (the balancer's own connection, e.g. a health check), or refused: `untrusted`
 * (a peer outside trusted_networks on a `required` listener), `invalid` (not a header,
 * broken, or too long), `timeout` (none in time).
 */
export type ProxyHeaderResult = 'proxied' | 'local' | 'untrusted' | 'invalid' | 'timeout';

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
  /** How long the stages before the dialogue (PROXY header, TLS handshake) may take together. */
  handshakeTimeoutMs: number;
  log: Logger;
  counters: { rejectedConnections: number; proxyHeaders: Record<ProxyHeaderResult, number> };
  front: FrontEnd;
}

/** The socket's admitted client address, so one shared 'close' handler can give it back. */
const ADMITTED = Symbol('admitted address');
type Accepted = Socket & { [ADMITTED]?: string };
/** The socket's pending PROXY header, so one shared 'data' handler finds it. */
const ARRIVAL = Symbol('arrival');

/** The client a PROXY header names; a LOCAL header (a health check) leaves the connection's own. */
function proxiedClient(c: ClientInfo, h: ProxyHeader): ClientInfo {
  if (h.command === 'local' || !h.source) return c;
  return {
    ...c,
    address: h.source.address,
    port: h.source.port,
    localAddress: h.destination?.address ?? c.localAddress,
    localPort: h.destination?.port ?? c.localPort,
    proxiedBy: c.address,
  };
}

/**
 * A connection between accept and its dialogue, under the shared sweep's deadline: one
 * object per arriving connection, gone once the dialogue starts (no timer of its own).
 * It covers the PROXY header and the TLS handshake together.
 */
class Arrival implements Expiring {
  /** Set while a PROXY header is awaited: its bytes so far. */
  header: Buffer | undefined;

  constructor(
    readonly socket: Socket,
    /** The client as accepted (before its header says who it is). */
    readonly client: ClientInfo,
    public deadline: number,
    private readonly pipeline: AcceptPipeline,
  ) {}

  expire(): void {
    if (this.header) this.pipeline.headerRefused(this, 'timeout', 'no complete PROXY header in time');
    this.socket.destroy();
  }

  /** Server shutdown: nothing to say before the dialogue; not a timeout either. */
  shutdown(): void {
    this.socket.destroy();
  }
}

const EMPTY = Buffer.alloc(0);

/**
 * The one way in for every listener (IMAP, POP3, LMTP, ManageSieve): the listener's
 * connection limit; then, on a PROXY protocol listener, the header from a trusted load
 * balancer (read before any other byte, bounded in size and by the shared deadline); then
 * the limit per client address (the header's, when there was one); then implicit TLS under
 * the shared sweep; then the protocol's dialogue, which gets the socket and one ClientInfo
 * that everything after reads.
 */
export class AcceptPipeline {
  private open = 0;
  private readonly name: string;
  /** Set on a PROXY protocol listener. */
  private readonly trusted: TrustedNetworks | undefined;
  /** PROXY refusals logged once per address and minute, not once each. */
  private readonly refusedHeaders: WindowCounts | undefined;

  constructor(readonly s: PipelineSettings) {
    const { cfg } = s;
    const pipeline = this;
    this.closed = function (this: Accepted) {
      pipeline.open--;
      const address = this[ADMITTED];
      if (address !== undefined) s.gate.release(address);
    };
    this.name = cfg.name ?? (cfg.port !== undefined ? `${cfg.protocol}:${cfg.port}` : `${cfg.protocol}:${cfg.path ?? ''}`);
    if (cfg.proxy_protocol !== 'off') {
      this.trusted = new TrustedNetworks(cfg.trusted_networks);
      this.refusedHeaders = new WindowCounts(60_000, s.sweep);
    }
    const onHeaderData = function (this: Socket & { [ARRIVAL]?: Arrival }, chunk: Buffer) {
      const arrival = this[ARRIVAL];
      if (arrival) pipeline.headerData(arrival, chunk);
    };
    this.onHeaderData = onHeaderData;
    this.onHeaderEnd = function (this: Socket & { [ARRIVAL]?: Arrival }) {
      const arrival = this[ARRIVAL];
      if (!arrival) return;
      pipeline.headerRefused(arrival, 'invalid', 'connection ended before a complete PROXY header');
      pipeline.s.sweep.delete(arrival);
      this.destroy();
    };
  }

  /** And one 'end' handler: a peer that stops sending mid-header is refused at once, not at the deadline. */
  private readonly onHeaderEnd: (this: Socket) => void;

  /** One 'data' handler per pipeline for the PROXY header, not a closure per socket. */
  private readonly onHeaderData: (this: Socket, chunk: Buffer) => void;

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
    if (this.trusted && transport === 'tcp') {
      if (this.trusted.has(client.address)) return this.awaitHeader(socket, client);
      if (this.s.cfg.proxy_protocol === 'required') {
        this.s.counters.proxyHeaders.untrusted++;
        this.logRefusal(client, 'untrusted', 'not in trusted_networks');
        socket.destroy();
        return;
      }
      // from_trusted: a client connecting directly; nothing of its bytes is taken as a header.
    }
    this.admitted(socket, client);
  }

  /** A trusted balancer's connection: its first bytes must be a PROXY header. */
  private awaitHeader(socket: Socket & { [ARRIVAL]?: Arrival }, client: ClientInfo): void {
    const arrival = new Arrival(socket, client, Date.now() + this.s.handshakeTimeoutMs, this);
    arrival.header = EMPTY;
    socket[ARRIVAL] = arrival;
    this.s.sweep.add(arrival);
    socket.on('data', this.onHeaderData);
    socket.on('end', this.onHeaderEnd);
    socket.resume();
  }

  /** Bytes of a header so far: decide as soon as they allow, and never take a byte past it. */
  headerData(arrival: Arrival, chunk: Buffer): void {
    const buf = arrival.header!.length === 0 ? chunk : Buffer.concat([arrival.header!, chunk]);
    const parsed = parseProxyHeader(buf);
    if (parsed.kind === 'incomplete') {
      arrival.header = buf;
      return;
    }
    const socket = arrival.socket as Socket & { [ARRIVAL]?: Arrival };
    socket.off('data', this.onHeaderData);
    socket.off('end', this.onHeaderEnd);
    socket.pause();
    socket[ARRIVAL] = undefined;
    arrival.header = undefined;
    if (parsed.kind === 'invalid') {
      this.headerRefused(arrival, 'invalid', parsed.reason);
      this.s.sweep.delete(arrival);
      socket.destroy();
      return;
    }
    // What follows the header is the client's (a TLS hello, an LMTP command): back it goes.
    if (buf.length > parsed.length) socket.unshift(buf.subarray(parsed.length));
    this.s.counters.proxyHeaders[parsed.command === 'local' ? 'local' : 'proxied']++;
    this.admitted(socket, proxiedClient(arrival.client, parsed), arrival);
  }

  /** A header refused (also by the sweep, for a timeout): counted, and logged once per address and minute. */
  headerRefused(arrival: Arrival, result: 'invalid' | 'timeout', why: string): void {
    this.s.counters.proxyHeaders[result]++;
    this.logRefusal(arrival.client, result, why);
  }

  private logRefusal(client: ClientInfo, result: ProxyHeaderResult, why: string): void {
    if (this.refusedHeaders!.add(client.address) === 1) this.s.log.warn('proxy header refused', { listener: client.listener, ip: client.address, result, why });
  }

  /** The client's address is final here: count it, then secure the connection. */
  private admitted(socket: Accepted, client: ClientInfo, arrival?: Arrival): void {
    const { s } = this;
    if (client.transport === 'tcp') {
      if (!s.gate.admit(client.address)) {
        if (arrival) s.sweep.delete(arrival);
        return this.refuse(socket, 'address-full', client);
      }
      socket[ADMITTED] = client.address;
    }
    if (s.cfg.tls !== 'implicit' || !s.tls) {
      if (arrival) s.sweep.delete(arrival);
      s.front.start(socket, client);
      return;
    }
    // The handshake shares the header's deadline: one bound for everything before the dialogue.
    if (!arrival) {
      arrival = new Arrival(socket, client, Date.now() + s.handshakeTimeoutMs, this);
      s.sweep.add(arrival);
    }
    s.tls.accept(socket).then(
      (secure) => {
        s.sweep.delete(arrival!);
        client.tls = tlsFacts(secure);
        s.front.start(secure, client);
      },
      (e: Error) => {
        s.sweep.delete(arrival!);
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
