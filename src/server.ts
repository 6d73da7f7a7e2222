import cluster from 'node:cluster';
import type { Server as HttpServer } from 'node:http';
import type { Heartbeat } from './fleet/heartbeat.js';
import { LocalAsks, type Answerer, type Asker } from './cluster/ask.js';
import { answerAdminQuestions, startInstanceSide, type InstanceSide } from './cluster/instance.js';
import { plaintextAllowed, workerCount, type Config, type ListenerConfig } from './config.js';
import { listenerKey, listenerSettings, nextInForce, restartOnlyChanges } from './reload.js';
import { loadIdentities } from './auth/identity.js';
import { LdapPasswordChecker } from './auth/ldap.js';
import { ProxyTokenChecker } from './auth/oauth-check.js';
import { createLogger, type Logger } from './log.js';
import { FileSource } from './lookup/file.js';
import { RedisSource } from './lookup/redis.js';
import { Router, type AppliedEvent } from './lookup/router.js';
import { Meters } from './session/meters.js';
import type { RouteSource } from './lookup/source.js';
import { startLmtpListener, type LmtpListener } from './lmtp/server.js';
import { localState } from './fleet/state.js';
import { answerFleetQuestions } from './fleet/admin.js';
import { createMetrics } from './metrics.js';
import { describeRedisError, OutageLog } from './outage.js';
import { describeEndpoint } from './lookup/redis-endpoint.js';
import type { ListenerRuntime, LoginResult, ProxyContext } from './session/core.js';
import { reloadBackendTls } from './net/backend.js';
import { ClientGate, gateLimits } from './net/gate.js';
import { FailureDelay, LoginThrottle } from './session/throttle.js';
import { TcpListener, type FrontEnd } from './net/accept.js';
import { ListenerTls } from './net/tls.js';
import { imapFrontEnd } from './imap/imap.js';
import { pop3FrontEnd } from './pop3/pop3.js';
import { sieveFrontEnd } from './sieve/preauth.js';
import { OwnListeners } from './net/own-listeners.js';
import { SessionRegistry } from './session/registry.js';
import { Sweep } from './session/sweep.js';
import { drainSessions } from './session/drain.js';
import { SlotLogins, type SlotLoginLimits } from './session/slot-logins.js';

export interface RunningServer {
  ctx: ProxyContext;
  router: Router;
  proxies: TcpListener[];
  lmtp: LmtpListener[];
  admin: HttpServer | undefined;
  /**
   * Where this process registers what it answers to the admin side (askWorkers): in-process
   * with one process, the primary's questions in a worker.
   */
  asks: Answerer;
  /**
   * The whole instance's view (askWorkers), when this process is the whole instance (one
   * process: answered by its own handlers); undefined in a worker, where the primary asks.
   */
  asker: Asker | undefined;
  /** With a Redis lookup: the heartbeat record's writer. */
  heartbeat: Heartbeat | undefined;
  /** With a Redis lookup: the state of its current outage, if any. */
  lookupOutage: OutageLog | undefined;
  /**
   * SIGHUP: certificates, CA files and the routes file are read again; with `next` (the
   * config file read again and validated) its limits, log level, backend settings and
   * listeners are applied too. Changes to lookup, admin and auth are refused with a log line
   * each. No session is dropped.
   */
  reload(next?: Config): Promise<void>;
  /**
   * Stops listening, ends every session, closes the lookup. With `drainMs` (SIGTERM: the
   * config's shutdown.drain_ms, see drain()) the IMAP/POP3 sessions' BYEs are spread over
   * it and LMTP transactions under way may finish within it; without, all at once.
   */
  close(opts?: { drainMs?: number }): Promise<void>;
  /** SIGTERM: close() over the running config's shutdown.drain_ms. */
  drain(): Promise<void>;
  /** The config in force (the one started with, or the last one a reload applied). */
  config(): Config;
}

function zeroResults(): Record<LoginResult, number> {
  return { ok: 0, 'auth-failed': 0, unavailable: 0, locked: 0, throttled: 0 };
}

/** Where lookup errors go: for Redis, aggregated into outage lines (see OutageLog). */
function lookupErrors(cfg: Config, log: Logger): { onError(e: Error): void; onLive(live: boolean): void; outage?: OutageLog } {
  if (!cfg.lookup.redis) return { onError: (e) => log.warn('lookup', { error: e.message }), onLive() {} };
  const outage = new OutageLog(log, {
    what: `Redis at ${describeEndpoint(cfg.lookup.redis)}`,
    effect: 'logins get UNAVAILABLE for users not in the cache',
    describe: describeRedisError,
  });
  return { onError: (e) => outage.error(e), onLive: (live) => live && outage.ok(), outage };
}

/** How many processes share the instance's per-slot bounds: the workers, or this one alone. */
function processesSharingSlots(cfg: Config): number {
  return cluster.isWorker ? workerCount(cfg.workers) : 1;
}

/**
 * The per-slot login bound is the instance's: with N workers each takes a share (rounded up,
 * so a bound below N still lets every worker log in), else N workers would let N times the
 * bound at a slot in the minute after a failover, which is what the bound is there to stop.
 */
export function slotLoginLimits(cfg: Config, workers: number): SlotLoginLimits {
  const share = (n: number) => Math.ceil(n / workers);
  return { concurrent: share(cfg.backend.logins_per_slot), queue: share(cfg.backend.login_queue_per_slot), queueTimeoutMs: cfg.backend.login_queue_timeout_ms };
}

/** One line per applied route event (the failover, lock or kick an operator looks for), and its metrics. */
function logApplied(a: AppliedEvent, log: Logger, meters: Meters): void {
  const ev = a.event;
  const lagMs = ev.ts === undefined ? undefined : Math.max(0, Date.now() - ev.ts);
  meters.routeEvents.inc({ kind: ev.kind });
  if (lagMs !== undefined) meters.eventLag.observe({ kind: ev.kind }, lagMs / 1000);
  log.info('route event', {
    kind: ev.kind,
    ...(ev.kind === 'kick' ? { scope: ev.scope } : {}),
    id: ev.id,
    ...(a.epoch === undefined ? {} : { epoch: a.epoch }),
    ended: a.ended,
    ...(lagMs === undefined ? {} : { lag_ms: lagMs }),
  });
}

export function createSource(cfg: Config, log: Logger, onError: (e: Error) => void = lookupErrors(cfg, log).onError): RouteSource {
  if (cfg.lookup.redis) {
    const r = cfg.lookup.redis;
    return new RedisSource({ endpoint: r, prefix: r.prefix, commandTimeoutMs: r.command_timeout_ms, heartbeatMs: r.heartbeat_ms, heartbeatTimeoutMs: r.heartbeat_timeout_ms, onError });
  }
  return new FileSource(cfg.lookup.file!, cfg.lookup.default_domain, onError);
}

/** The pre-auth dialogue of each protocol that listens on TCP alone (LMTP: src/lmtp/server.ts). */
const frontEnds: Record<string, (rt: ListenerRuntime) => FrontEnd> = { imap: imapFrontEnd, pop3: pop3FrontEnd, sieve: sieveFrontEnd };

/** An IMAP or POP3 listener on the accept pipeline: the process-wide per-address limit, the login deadline for TLS. */
function tcpListener(l: ListenerConfig, ctx: ProxyContext): TcpListener {
  const tls = l.tls === 'none' ? undefined : new ListenerTls(l);
  const front = frontEnds[l.protocol];
  if (!front) throw new Error(`no front end for protocol ${l.protocol}`);
  const rt: ListenerRuntime = { cfg: l, tls, plaintextAllowed: plaintextAllowed(l), ctx };
  return new TcpListener(l, tls, { sweep: ctx.sweep, gate: ctx.gate, handshakeTimeoutMs: ctx.limits.login_timeout_ms, log: ctx.log, counters: ctx.counters, front: front(rt) });
}

export interface ServerRole {
  /**
   * In a cluster worker: the primary's questions are answered through this, and the admin
   * listener is the primary's. Absent: this process is the whole instance and serves admin
   * itself, asking its own handlers.
   */
  worker?: Answerer;
  /** In a cluster worker: per-address limits shared with the other workers (src/cluster/ip-limits.ts). */
  gate?: ClientGate;
}

export async function startServer(startCfg: Config, log: Logger = createLogger(startCfg.log.level), role: ServerRole = {}): Promise<RunningServer> {
  /** The config in force: the one started with, then whatever reload() applied. */
  let cfg = startCfg;
  // Secret files are read now: a missing one stops the start, not the first login.
  loadIdentities(cfg.backend);
  const passwords = cfg.auth.ldap ? new LdapPasswordChecker(cfg.auth.ldap, log) : undefined;
  const oauth = cfg.auth.oauth;
  const tokens = oauth && (oauth.introspection || oauth.jwt) ? new ProxyTokenChecker(oauth, log) : undefined;
  const lookupLog = lookupErrors(cfg, log);
  const meters = new Meters();
  const source = createSource(cfg, log, lookupLog.onError);
  const router = new Router(source, {
    defaultDomain: cfg.lookup.default_domain,
    maxCachedUsers: cfg.lookup.cache_users,
    maxStaleMs: cfg.lookup.max_stale_ms,
    maxResyncRemoved: cfg.lookup.max_resync_removed,
    resyncRetryMaxMs: cfg.lookup.resync_retry_max_ms,
    log,
    onError: cfg.lookup.redis ? lookupLog.onError : (e) => log.warn('router', { error: e.message }),
    onLive: (live, resynced) => {
      lookupLog.onLive(live);
      if (live) log.info('route events live', { resynced });
      else log.warn('route events lost; cache trusted for max_stale_ms more', { max_stale_ms: cfg.lookup.max_stale_ms });
    },
    onApplied: (a) => logApplied(a, log, meters),
  });
  const registry = new SessionRegistry();
  router.addListener(registry);
  const sweep = new Sweep();
  const redis = cfg.lookup.redis;
  const throttle = new LoginThrottle(
    {
      failuresPerWindow: cfg.limits.auth_failures_per_ip_per_minute,
      windowMs: 60_000,
      ...(redis ? { redis: { endpoint: redis, prefix: redis.prefix, commandTimeoutMs: redis.command_timeout_ms } } : {}),
      log,
    },
    sweep,
  );
  const ctx: ProxyContext = {
    router,
    registry,
    sweep,
    gate: role.gate ?? new ClientGate(gateLimits(cfg)),
    throttle,
    failureDelay: new FailureDelay(cfg.limits.auth_failure_delay_ms, sweep),
    limits: cfg.limits,
    backend: cfg.backend,
    log,
    counters: { logins: { imap: zeroResults(), pop3: zeroResults(), lmtp: zeroResults(), sieve: zeroResults() }, rejectedConnections: 0, proxyHeaders: { proxied: 0, local: 0, untrusted: 0, invalid: 0, timeout: 0 } },
    ownListeners: new OwnListeners(),
    slotLogins: new SlotLogins(slotLoginLimits(cfg, processesSharingSlots(cfg)), sweep),
    meters,
    lmtpTransactions: new Set(),
    ...(passwords ? { passwords } : {}),
    ...(oauth ? { oauth } : {}),
    ...(tokens ? { tokens } : {}),
    ...(cfg.lookup.default_domain ? { defaultDomain: cfg.lookup.default_domain } : {}),
  };
  router.start();
  // Logins that arrive before the lookup is connected would all fail: give it a moment.
  const lookupTimeout = cfg.lookup.redis?.command_timeout_ms ?? 0;
  if (!(await source.ready(lookupTimeout))) log.warn('lookup not reachable at start; logins get UNAVAILABLE until it is', { waited_ms: lookupTimeout });

  const local = role.worker ? undefined : new LocalAsks();
  const asks: Answerer = role.worker ?? local!;
  const proxies: TcpListener[] = [];
  const lmtp: LmtpListener[] = [];
  let instance: InstanceSide | undefined;
  let closing: Promise<void> | undefined;
  const close = (opts: { drainMs?: number } = {}): Promise<void> => (closing ??= shutDown(opts.drainMs ?? 0));
  const shutDown = async (drainMs: number) => {
    await instance?.stopping();
    for (const p of proxies) p.server.close();
    // Every connection still before login is told so now (BYE / -ERR), rather than left to
    // its login timeout: a stop must fit in systemd's TimeoutStopSec.
    sweep.shutdownAll();
    // LMTP transactions under way are let finish (their recipients already got 250):
    // the LMTP listeners end those sessions themselves, within the drain if there is one.
    const lmtpClosed = Promise.all(lmtp.map((l) => l.close(drainMs > 0 ? drainMs : undefined)));
    await drainSessions(registry, ['imap', 'pop3'], drainMs, 'server shutting down');
    await Promise.all([lmtpClosed, ...retiring, ...proxies.map((p) => p.close())]);
    registry.endAll('server shutting down');
    await instance?.close();
    sweep.stop();
    throttle.close();
    await passwords?.close();
    await router.close();
  };
  // Listeners by where they listen, with the settings each was started with (reload() diffs these).
  const running = new Map<string, { settings: string; proxy?: TcpListener; lmtp?: LmtpListener }>();
  /** Listeners a reload removed or replaced: no longer accepting, their LMTP transactions finishing. */
  const retiring: Promise<void>[] = [];
  const startListener = async (l: ListenerConfig, c: Config): Promise<void> => {
    if (l.protocol === 'lmtp') {
      const ll = await startLmtpListener(l, c.lmtp, ctx);
      lmtp.push(ll);
      const at = ll.address();
      if (at) ctx.ownListeners.add(at.address, at.port);
      running.set(listenerKey(l), { settings: listenerSettings(l, c), lmtp: ll });
      return;
    }
    const p = tcpListener(l, ctx);
    await p.listen();
    proxies.push(p);
    ctx.ownListeners.add(p.address().address, p.address().port);
    running.set(listenerKey(l), { settings: listenerSettings(l, c), proxy: p });
    log.info('listening', { protocol: l.protocol, address: l.address, port: p.address().port, tls: l.tls });
  };
  /** Stops accepting on a listener; its sessions go on (LMTP: idle ones get 421, transactions finish). */
  const retire = (key: string): void => {
    const r = running.get(key);
    if (!r) return;
    running.delete(key);
    if (r.proxy) {
      proxies.splice(proxies.indexOf(r.proxy), 1);
      r.proxy.server.close();
    }
    if (r.lmtp) {
      lmtp.splice(lmtp.indexOf(r.lmtp), 1);
      retiring.push(r.lmtp.close());
    }
  };
  let listening = false;
  asks.onAsk('state', () => localState(registry, router, ctx.lmtpTransactions));
  answerFleetQuestions(asks, { registry, router, source, listening: () => listening });
  try {
    for (const l of cfg.listeners) await startListener(l, cfg);
    listening = true;
    if (cfg.admin) answerAdminQuestions(asks, createMetrics(ctx), () => ({ lookupLive: router.stats.live, sessions: registry.size, preauth: sweep.size }));
    // This process is the whole instance: the instance side (admin listener, heartbeat) runs here, asking its own handlers.
    if (local) {
      instance = await startInstanceSide(cfg, log, local, { workers: 1 });
      instance.serving();
    }
  } catch (e) {
    await close();
    throw e;
  }

  /** Certificates and CA files are read again; with `next`, its settings are applied (see reload.ts). */
  const reload = async (next?: Config): Promise<void> => {
    if (next) {
      for (const key of restartOnlyChanges(cfg, next)) log.warn('config change needs a restart; the running setting stays', { key });
      const prev = cfg;
      cfg = nextInForce(cfg, next);
      log.setLevel?.(cfg.log.level);
      ctx.limits = cfg.limits;
      ctx.gate.setLimits({ connectionsPerIp: cfg.limits.connections_per_ip, concurrentLoginsPerIp: cfg.limits.concurrent_logins_per_ip });
      throttle.setFailuresPerWindow(cfg.limits.auth_failures_per_ip_per_minute);
      ctx.failureDelay.setDelay(cfg.limits.auth_failure_delay_ms);
      loadIdentities(cfg.backend);
      ctx.backend = cfg.backend;
      ctx.slotLogins.setLimits(slotLoginLimits(cfg, processesSharingSlots(cfg)));
      // Listeners: gone or changed ones stop accepting (their sessions stay), new ones start.
      const wanted = new Map(cfg.listeners.map((l) => [listenerKey(l), l]));
      for (const [key, r] of [...running]) {
        const l = wanted.get(key);
        if (!l || listenerSettings(l, cfg) !== r.settings) {
          retire(key);
          log.info(l ? 'listener settings changed; replaced (open sessions stay)' : 'listener removed (open sessions stay)', { listener: key });
        }
      }
      for (const [key, l] of wanted) {
        if (running.has(key)) continue;
        try {
          await startListener(l, cfg);
          if (prev.listeners.every((o) => listenerKey(o) !== key)) log.info('listener added', { listener: key });
        } catch (e) {
          log.error('listener could not start; the others run', { listener: key, error: (e as Error).message });
        }
      }
    }
    for (const [key, r] of running) {
      try {
        r.proxy?.tls?.reload();
        r.lmtp?.reloadTls();
      } catch (e) {
        log.error('certificate reload failed; old certificates stay in force', { listener: key, error: (e as Error).message });
      }
    }
    reloadBackendTls(); // backend CA files are read again on the next login
    if (source instanceof FileSource) source.reload();
    log.info('reloaded', { config: next ? 'applied' : 'unchanged' });
  };

  return {
    ctx,
    router,
    proxies,
    lmtp,
    admin: instance?.admin,
    asks,
    asker: local,
    heartbeat: instance?.heartbeat,
    lookupOutage: lookupLog.outage,
    reload: (next?: Config) => reload(next),
    close,
    drain: () => close({ drainMs: cfg.shutdown.drain_ms }),
    config: () => cfg,
  };
}
