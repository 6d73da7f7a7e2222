import { createServer, type Server, type Socket } from 'node:net';
import type { ListenerConfig } from '../config.js';
import { plaintextAllowed } from '../config.js';
import type { ListenerRuntime, ProxyContext } from '../session/core.js';
import { ImapPreauth } from '../imap/imap.js';
import { Pop3Preauth } from '../pop3/pop3.js';
import { ListenerTls } from './tls.js';

/** What a protocol says to a connection it turns away before any dialogue. */
const BUSY: Record<string, string> = {
  imap: '* BYE [UNAVAILABLE] Too many connections, try again later\r\n',
  pop3: '-ERR [SYS/TEMP] Too many connections, try again later\r\n',
};

/** Starts the pre-auth dialogue of a protocol on an accepted (and, for implicit TLS, secured) socket. */
export type ProtocolHandler = (rt: ListenerRuntime, socket: Socket, ip: string, port: number) => void;

const handlers: Record<string, ProtocolHandler> = {
  imap: (rt, socket, ip, port) => void new ImapPreauth(rt, socket, ip, port).run(),
  pop3: (rt, socket, ip, port) => void new Pop3Preauth(rt, socket, ip, port).run(),
};

/** Lets another front end (POP3) plug into the same accept path. */
export function registerProtocol(protocol: 'imap' | 'pop3', handler: ProtocolHandler): void {
  handlers[protocol] = handler;
}

/**
 * One TCP listener for IMAP or POP3: connection limits (per listener and per client IP),
 * implicit TLS, then the protocol's pre-auth dialogue.
 */
export class ProxyListener {
  readonly server: Server;
  readonly tls: ListenerTls | undefined;
  private open = 0;
  private readonly rt: ListenerRuntime;

  constructor(
    readonly cfg: ListenerConfig,
    ctx: ProxyContext,
  ) {
    this.tls = cfg.tls === 'none' ? undefined : new ListenerTls(cfg);
    this.rt = { cfg, tls: this.tls, plaintextAllowed: plaintextAllowed(cfg), ctx };
    this.server = createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (s) => this.accept(s));
    const listener = this;
    this.released = function (this: Socket) {
      listener.open--;
      ctx.gate.release(this.remoteAddress ?? 'unknown');
    };
  }

  /**
   * One handler per listener, not a closure per socket. The socket's address is still known
   * at 'close': Node keeps the peer name it looked up when we read remoteAddress at accept.
   */
  private readonly released: (this: Socket) => void;

  private accept(socket: Socket): void {
    const { ctx, cfg } = this.rt;
    const ip = socket.remoteAddress ?? 'unknown';
    const port = socket.remotePort ?? 0;
    socket.on('error', destroyOnError);
    if (this.open >= cfg.max_connections || !ctx.gate.admit(ip)) {
      ctx.counters.rejectedConnections++;
      // For implicit TLS there is no cleartext way to say why: just close. Otherwise say why
      // and close our side without waiting for the client's (this socket is never read).
      if (cfg.tls !== 'implicit') socket.write(BUSY[cfg.protocol] ?? '');
      socket.destroySoon();
      return;
    }
    this.open++;
    socket.on('close', this.released);
    socket.setKeepAlive(true, 60_000);
    const handler = handlers[cfg.protocol];
    if (!handler) {
      socket.destroy();
      return;
    }
    if (cfg.tls !== 'implicit') {
      handler(this.rt, socket, ip, port);
      return;
    }
    // The handshake is bounded by the sweep like any other pre-auth wait.
    const pending = { deadline: Date.now() + ctx.limits.login_timeout_ms, expire: () => socket.destroy() };
    ctx.sweep.add(pending);
    this.tls!.accept(socket).then(
      (secure) => {
        ctx.sweep.delete(pending);
        handler(this.rt, secure, ip, port);
      },
      (e: Error) => {
        ctx.sweep.delete(pending);
        socket.destroy();
        // Debug only: scanners make these by the thousand; a client that cannot connect
        // (too old a TLS version, a name not covered) shows up here when asked for.
        ctx.log.debug('tls handshake failed', { listener: cfg.name ?? cfg.protocol, ip, error: e.message });
      },
    );
  }

  get connections(): number {
    return this.open;
  }

  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen({ host: this.cfg.address, port: this.cfg.port, backlog: 4096 }, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
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

function destroyOnError(this: Socket): void {
  this.destroy();
}
