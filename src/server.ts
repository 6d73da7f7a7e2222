import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import type { Config } from './config.js';
import { createLogger, type Logger } from './log.js';
import { FileSource } from './lookup/file.js';
import { RedisSource } from './lookup/redis.js';
import { Router } from './lookup/router.js';
import type { RouteSource } from './lookup/source.js';
import { startLmtpListener, type LmtpListener } from './lmtp/server.js';
import { createMetrics } from './metrics.js';
import type { LoginResult, ProxyContext } from './proxy/core.js';
import { reloadBackendTls } from './proxy/backend.js';
import { ClientGate } from './proxy/gate.js';
import { ProxyListener } from './proxy/listener.js';
import { SessionRegistry } from './proxy/registry.js';
import { Sweep } from './proxy/sweep.js';

export interface RunningServer {
  ctx: ProxyContext;
  router: Router;
  proxies: ProxyListener[];
  lmtp: LmtpListener[];
  admin: HttpServer | undefined;
  /** SIGHUP: certificates and the routes file are read again; no session is dropped. */
  reload(): void;
  /** Stops listening, ends every session, closes the lookup. */
  close(): Promise<void>;
}

function zeroResults(): Record<LoginResult, number> {
  return { ok: 0, 'auth-failed': 0, unavailable: 0, locked: 0 };
}

export function createSource(cfg: Config, log: Logger): RouteSource {
  const onError = (e: Error) => log.warn('lookup', { error: e.message });
  if (cfg.lookup.redis) {
    const r = cfg.lookup.redis;
    return new RedisSource({ url: r.url, prefix: r.prefix, commandTimeoutMs: r.command_timeout_ms, onError });
  }
  return new FileSource(cfg.lookup.file!, cfg.lookup.default_domain, onError);
}

export async function startServer(cfg: Config, log: Logger = createLogger(cfg.log.level)): Promise<RunningServer> {
  const source = createSource(cfg, log);
  const router = new Router(source, {
    defaultDomain: cfg.lookup.default_domain,
    maxCachedUsers: cfg.lookup.cache_users,
    maxStaleMs: cfg.lookup.max_stale_ms,
    onError: (e) => log.warn('router', { error: e.message }),
    onLive: (live, resynced) =>
      live ? log.info('route events live', { resynced }) : log.warn('route events lost; cache trusted for max_stale_ms more', { max_stale_ms: cfg.lookup.max_stale_ms }),
  });
  const registry = new SessionRegistry();
  router.addListener(registry);
  const sweep = new Sweep();
  const ctx: ProxyContext = {
    router,
    registry,
    sweep,
    gate: new ClientGate({ connectionsPerIp: cfg.limits.connections_per_ip, authFailuresPerIpPerMinute: cfg.limits.auth_failures_per_ip_per_minute }, sweep),
    limits: cfg.limits,
    backend: cfg.backend,
    log,
    counters: { logins: { imap: zeroResults(), pop3: zeroResults(), lmtp: zeroResults() }, rejectedConnections: 0 },
  };
  router.start();
  // Logins that arrive before the lookup is connected would all fail: give it a moment.
  const lookupTimeout = cfg.lookup.redis?.command_timeout_ms ?? 0;
  if (!(await source.ready(lookupTimeout))) log.warn('lookup not reachable at start; logins get UNAVAILABLE until it is', { waited_ms: lookupTimeout });

  const proxies: ProxyListener[] = [];
  const lmtp: LmtpListener[] = [];
  let admin: HttpServer | undefined;
  const close = async () => {
    for (const p of proxies) p.server.close();
    await Promise.all(lmtp.map((l) => l.close()));
    registry.endAll('server shutting down');
    await Promise.all(proxies.map((p) => p.close()));
    admin?.close();
    sweep.stop();
    await router.close();
  };
  try {
    for (const l of cfg.listeners) {
      if (l.protocol === 'lmtp') {
        lmtp.push(await startLmtpListener(l, cfg.lmtp, ctx));
        continue;
      }
      const p = new ProxyListener(l, ctx);
      await p.listen();
      proxies.push(p);
      log.info('listening', { protocol: l.protocol, address: l.address, port: p.address().port, tls: l.tls });
    }
    if (cfg.admin) {
      const metrics = createMetrics(ctx);
      admin = createHttpServer((req, res) => {
        if (req.url === '/metrics') {
          metrics.metrics().then((text) => {
            res.writeHead(200, { 'content-type': metrics.contentType });
            res.end(text);
          });
        } else if (req.url === '/healthz') {
          const live = router.stats.live;
          res.writeHead(live ? 200 : 503, { 'content-type': 'application/json' });
          res.end(JSON.stringify({ lookupLive: live, sessions: registry.size, preauth: sweep.size }));
        } else {
          res.writeHead(404).end();
        }
      });
      await new Promise<void>((resolve) => admin!.listen(cfg.admin!.port, cfg.admin!.address, resolve));
    }
  } catch (e) {
    await close();
    throw e;
  }

  return {
    ctx,
    router,
    proxies,
    lmtp,
    admin,
    reload() {
      for (const p of proxies) {
        try {
          p.tls?.reload();
        } catch (e) {
          log.error('certificate reload failed; old certificates stay in force', { listener: p.cfg.name ?? p.cfg.protocol, error: (e as Error).message });
        }
      }
      reloadBackendTls(); // backend CA files are read again on the next login
      if (source instanceof FileSource) source.reload();
      log.info('reloaded');
    },
    close,
  };
}
