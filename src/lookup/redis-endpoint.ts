import { readFileSync } from 'node:fs';
import type { ConnectionOptions } from 'node:tls';
import { Redis, type RedisOptions } from 'ioredis';
import type { RedisLookupConfig } from '../config.js';

/**
 * Where Redis is: one URL, or Redis Sentinel (the sentinels and the master group's name),
 * with passwords and TLS. Every Redis client of the proxy (lookups, events, the login
 * throttle) and of ctl connects through `openRedis`, so a failover that Sentinel makes is
 * followed by all of them the same way: on each (re)connect ioredis asks the sentinels for
 * the current master and checks the role it finds there.
 */
export type RedisEndpoint = Pick<RedisLookupConfig, 'url' | 'sentinels' | 'name' | 'username' | 'password' | 'sentinel_password' | 'tls'>;

/** "10.0.0.5:26379" or "[::1]:26379" as ioredis wants it. */
export function parseHostPort(s: string): { host: string; port: number } {
  const i = s.lastIndexOf(':');
  return { host: s.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(s.slice(i + 1)) };
}

function tlsOptions(tls: NonNullable<RedisEndpoint['tls']>): ConnectionOptions {
  return {
    ...(tls.ca ? { ca: readFileSync(tls.ca) } : {}),
    ...(tls.servername ? { servername: tls.servername } : {}),
    rejectUnauthorized: tls.verify,
  };
}

/** The connection part of the ioredis options (no URL: that goes as the first argument). */
export function connectionOptions(ep: RedisEndpoint): RedisOptions {
  const auth: RedisOptions = {
    ...(ep.username ? { username: ep.username } : {}),
    ...(ep.password ? { password: ep.password } : {}),
  };
  if (!ep.sentinels) return { ...auth, ...(ep.tls ? { tls: tlsOptions(ep.tls) } : {}) };
  const tls = ep.tls && tlsOptions(ep.tls);
  return {
    ...auth,
    sentinels: ep.sentinels.map(parseHostPort),
    name: ep.name,
    role: 'master',
    ...(ep.sentinel_password ? { sentinelPassword: ep.sentinel_password } : {}),
    ...(tls ? { tls, enableTLSForSentinelMode: true } : {}),
    ...(tls && ep.tls?.sentinels ? { sentinelTLS: tls } : {}),
    // Subscribe to the sentinels' +switch-master: a master that is demoted while still up
    // (a manual SENTINEL FAILOVER, a partition) is left at once, not when it stops answering.
    failoverDetector: true,
    // Sentinels that one round finds all unreachable are asked again soon, not after seconds.
    sentinelRetryStrategy: (times: number) => Math.min(100 * times, 1000),
  };
}

/** A new client for the endpoint, with `options` (timeouts, queueing) on top. */
export function openRedis(ep: RedisEndpoint, options: RedisOptions): Redis {
  const merged: RedisOptions = { ...connectionOptions(ep), ...options };
  if (ep.sentinels) {
    // Sentinel queries are bounded like the commands (else one hung sentinel stalls a reconnect).
    if (options.commandTimeout !== undefined) merged.sentinelCommandTimeout = options.commandTimeout;
    return new Redis(merged);
  }
  return new Redis(ep.url ?? 'redis://127.0.0.1:6379', merged);
}

/** Where the endpoint is, without any password: safe to log. */
export function describeEndpoint(ep: RedisEndpoint): string {
  if (ep.sentinels) return `master ${ep.name} of sentinels ${ep.sentinels.join(',')}`;
  try {
    const u = new URL(ep.url ?? 'redis://127.0.0.1:6379');
    return `${u.hostname || '127.0.0.1'}:${u.port || '6379'}`;
  } catch {
    return 'Redis';
  }
}
