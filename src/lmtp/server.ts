import cluster from 'node:cluster';
import { chmodSync, chownSync, lstatSync, unlinkSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import type { Config, ListenerConfig } from '../config.js';
import type { ProxyContext } from '../session/core.js';
import { ListenerTls } from '../net/tls.js';
import { AcceptPipeline, listenOn, type FrontEnd } from '../net/accept.js';
import { ConnectionsPerAddress } from '../net/gate.js';
import { resolveId } from '../preflight.js';
import { WindowCounts } from '../session/throttle.js';
import { lmtpTotals, type LmtpTotals } from './metrics.js';
import { BackendPool } from './pool.js';
import { formatReply, reply } from './reply.js';
import { LmtpSession, type LmtpEnv } from './session.js';

/**
 * The LMTP front end: what Postfix delivers to (RFC 2033), on TCP and/or a unix socket.
 *
 * Why not smtp-server's LMTP mode (checked in smtp-server 3.21.6, dist/esm/smtp-connection.js):
 * - Every reply's enhanced status code is derived from the three-digit code by a fixed table
 *   (ENHANCED_STATUS_CODES), so a backend's own code cannot pass through: Dovecot's
 *   "552 5.2.2 quota" survives, but "554 5.7.1" (a Sieve reject) becomes 5.6.0, and our 451s
 *   for a locked mailbox (4.2.1) or an unreachable store (4.4.1) all become 4.3.0. Issue #4
 *   asks for each recipient's real result from its backend.
 * - A repeated RCPT replaces the earlier entry in envelope.rcptTo although both got 250, and
 *   its error and size-limit paths answer once per *deduplicated* recipient: the client then
 *   waits for a reply that never comes (RFC 2033 wants one per successful RCPT).
 * - It offers AUTH, STARTTLS and DSN by default, delays every greeting by 100 ms (early-talker
 *   check) and does a reverse DNS lookup per connection: all to be switched off for a local
 *   MTA link, and none of it is what an LMTP proxy needs.
 * The dialogue LMTP needs is small (LHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT), so it lives in
 * src/lmtp/session.ts, with the DATA transparency code in src/lmtp/dot.ts, all unit-tested.
 */

export interface LmtpListener {
  /** TCP address, when listening on TCP. */
  address(): { address: string; port: number } | undefined;
  /** Unix socket path, when listening on one. */
  readonly path: string | undefined;
  readonly cfg: ListenerConfig;
  /** Its certificates (implicit TLS), read again on SIGHUP. */
  readonly tls: ListenerTls | undefined;
  readonly connections: number;
  /** Reads the certificate files again (SIGHUP); the next handshake uses them. Throws, keeping the old ones, if they do not load. */
  reloadTls(): void;
  /** Stops accepting; idle connections get 421 now, transactions under way may finish (within `withinMs`, else lmtp.timeout_ms). */
  close(withinMs?: number): Promise<void>;
}

export async function startLmtpListener(l: ListenerConfig, lmtp: Config['lmtp'], ctx: ProxyContext, totals: LmtpTotals = lmtpTotals): Promise<LmtpListener> {
  if (l.tls === 'starttls') throw new Error(`lmtp listener ${l.name ?? ''}: tls: starttls is not supported for LMTP (use implicit, or none on loopback/unix sockets)`);
  const tls = l.tls === 'implicit' ? new ListenerTls(l) : undefined;
  const pool = new BackendPool(lmtp.backend_idle_ms);
  const perIp = { rcpts: new WindowCounts(60_000, ctx.sweep), unknown: new WindowCounts(60_000, ctx.sweep) };
  const refusedFrom = new WindowCounts(60_000, ctx.sweep);
  const env: LmtpEnv = { ctx, cfg: lmtp, totals, pool, perIp };
  const sessions = new Set<LmtpSession>();

  // Transaction deadlines, on the shared sweep's tick: one pass over this listener's sessions.
  ctx.sweep.every(() => {
    const now = Date.now();
    for (const s of sessions) if (s.deadline <= now) s.expire();
  });

  const front: FrontEnd = {
    refused(why, client) {
      const words = why === 'listener-full' ? 'Too many connections' : 'Too many connections from your address';
      // One line per address and minute, not one per refused connection.
      if (refusedFrom.add(client.address) === 1) ctx.log.warn('lmtp connections refused', { ip: client.address, why: words });
      return formatReply(reply(421, '4.7.0', `${lmtp.hostname} ${words}, try again later`));
    },
    start(socket, client) {
      socket.setNoDelay(true);
      const s = new LmtpSession(socket, env, client);
      sessions.add(s);
      void s.done.finally(() => sessions.delete(s));
    },
  };
  // Per TCP client address (unix socket clients have none), this listener's own limit.
  const pipeline = new AcceptPipeline({
    cfg: l,
    tls,
    sweep: ctx.sweep,
    gate: new ConnectionsPerAddress(lmtp.connections_per_ip),
    handshakeTimeoutMs: lmtp.timeout_ms,
    log: ctx.log,
    counters: ctx.counters,
    front,
  });

  // allowHalfOpen: a client that sends its last command and FIN still gets the replies.
  const servers: Server[] = [];
  const make = (transport: 'tcp' | 'unix') => {
    const s = createServer({ allowHalfOpen: true, noDelay: true }, pipeline.handler(transport));
    servers.push(s);
    return s;
  };
  const listen = (s: Server, opts: { host: string; port: number } | { path: string }) => listenOn(s, opts, 1024);

  let tcp: Server | undefined;
  try {
    if (l.port !== undefined) {
      tcp = make('tcp');
      await listen(tcp, { host: l.address, port: l.port });
      const a = tcp.address();
      ctx.log.info('listening', { protocol: 'lmtp', address: l.address, port: typeof a === 'object' && a ? a.port : l.port, tls: l.tls });
    }
    if (l.path !== undefined) {
      // With workers the primary removed it before forking them: here it would be the live one.
      if (!cluster.isWorker) removeStaleSocket(l.path);
      await listen(make('unix'), { path: l.path });
      // Whoever can connect can deliver as anyone: the socket is for the MTA's user only
      // (socket_group: postfix, mode 0660), never for every local user (0666).
      const uid = l.socket_owner === undefined ? -1 : resolveId('passwd', l.socket_owner);
      const gid = l.socket_group === undefined ? -1 : resolveId('group', l.socket_group);
      if (uid !== -1 || gid !== -1) chownSync(l.path, uid, gid);
      chmodSync(l.path, Number.parseInt(l.socket_mode, 8));
      ctx.log.info('listening', { protocol: 'lmtp', path: l.path, mode: l.socket_mode, owner: l.socket_owner, group: l.socket_group });
    }
  } catch (e) {
    for (const s of servers) s.close();
    throw e;
  }

  return {
    cfg: l,
    path: l.path,
    tls,
    address() {
      const a = tcp?.address();
      return a && typeof a === 'object' ? { address: a.address, port: a.port } : undefined;
    },
    get connections() {
      return pipeline.connections;
    },
    reloadTls() {
      tls?.reload();
    },
    async close(withinMs?: number) {
      const closed = servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
      for (const s of sessions) s.shutdown();
      // A transaction under way is allowed to finish: its recipients got 250 at RCPT and
      // the message may already be at a backend. Every wait inside it is bounded by timeout_ms;
      // a drain (SIGTERM) bounds the whole by its own deadline.
      const deadline = new Promise<void>((resolve) => setTimeout(resolve, withinMs ?? lmtp.timeout_ms + 1000).unref());
      await Promise.race([Promise.all([...sessions].map((s) => s.done)), deadline]);
      for (const s of sessions) s.destroy();
      pool.close();
      await Promise.all(closed);
    },
  };
}

/** A socket file left by a previous run would make listen() fail with EADDRINUSE. */
export function removeStaleSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
}
