import { hostname } from 'node:os';
import type { Redis } from 'ioredis';
import type { Asker } from '../cluster/ask.js';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';
import { failFastRedisOptions } from '../lookup/redis.js';
import { openRedis, type RedisEndpoint } from '../lookup/redis-endpoint.js';
import { RedisKeys } from '../lookup/redis-keys.js';
import { packageVersion } from '../version.js';
import type { HeartbeatRecord } from './records.js';
import { mergeStates, type ProcessState } from './state.js';

/** Index entries whose record is gone are dropped this long after their last heartbeat. */
const INDEX_KEEP_MS = 3_600_000;

export interface HeartbeatOptions {
  endpoint: RedisEndpoint;
  keys: RedisKeys;
  commandTimeoutMs: number;
  /** How often the record is written; it expires after three times this. */
  intervalMs: number;
  /** The parts of the record that do not change while the proxy runs. */
  header: Omit<HeartbeatRecord, keyof ProcessState | 'updated' | 'ttl_ms'>;
  /** The whole proxy's state now (with workers: every worker's answer, merged). */
  state: () => Promise<ProcessState>;
  log: Logger;
}

/**
 * Keeps this proxy's heartbeat record in Redis: written at start and every `intervalMs`,
 * with a TTL of three intervals, so a proxy that dies (kill -9, a lost host) drops out of
 * `ctl proxies` within that TTL without anyone cleaning up; a clean stop deletes it at once.
 * Its own connection, failing fast: a Redis outage costs a skipped beat, never a login.
 */
export class Heartbeat {
  private readonly redis: Redis;
  private timer: NodeJS.Timeout | undefined;
  private writing = false;
  private failing = false;

  constructor(private readonly opts: HeartbeatOptions) {
    this.redis = openRedis(opts.endpoint, failFastRedisOptions(opts.commandTimeoutMs));
    this.redis.on('error', () => undefined); // the lookup logs Redis outages; a beat failing is logged below, once
  }

  get ttlMs(): number {
    return 3 * this.opts.intervalMs;
  }

  start(): void {
    this.redis.once('ready', () => void this.beat());
    this.timer = setInterval(() => void this.beat(), this.opts.intervalMs);
    this.timer.unref();
  }

  /** Writes the record now (also used by tests that need it current). */
  async beat(): Promise<void> {
    if (this.writing || this.redis.status !== 'ready') return;
    this.writing = true;
    try {
      const now = Date.now();
      const record: HeartbeatRecord = { ...this.opts.header, ...(await this.opts.state()), updated: new Date(now).toISOString(), ttl_ms: this.ttlMs };
      const { keys } = this.opts;
      await this.redis
        .multi()
        .set(keys.proxy(record.id), JSON.stringify(record), 'PX', this.ttlMs)
        .zadd(keys.proxies, now, record.id)
        .zremrangebyscore(keys.proxies, '-inf', now - INDEX_KEEP_MS)
        .exec();
      if (this.failing) this.opts.log.info('heartbeat record written again', { id: record.id });
      this.failing = false;
    } catch (e) {
      if (!this.failing) this.opts.log.warn('heartbeat record not written', { error: (e as Error).message });
      this.failing = true;
    } finally {
      this.writing = false;
    }
  }

  /** A clean stop: the record goes now, not at its TTL. */
  async close(): Promise<void> {
    clearInterval(this.timer);
    const { keys, header } = this.opts;
    if (this.redis.status === 'ready') {
      await this.redis.multi().del(keys.proxy(header.id)).zrem(keys.proxies, header.id).exec().catch(() => undefined);
    }
    this.redis.disconnect();
  }
}

/**
 * The heartbeat of one instance (a single process, or the primary of several workers): the
 * state comes from every serving process through askWorkers ('state'), merged. A worker that
 * does not answer makes the record say events are not live: its part is unknown.
 */
export function startHeartbeat(cfg: Config, asker: Asker, log: Logger, workers: number): Heartbeat | undefined {
  const redis = cfg.lookup.redis;
  if (!redis) return undefined; // the routes-file lookup has no Redis to write to
  const hb = new Heartbeat({
    endpoint: redis,
    keys: new RedisKeys(redis.prefix),
    commandTimeoutMs: redis.command_timeout_ms,
    intervalMs: redis.proxy_heartbeat_ms,
    header: {
      id: redis.proxy_id ?? `${hostname()}:${process.pid}`,
      host: hostname(),
      pid: process.pid,
      version: packageVersion(),
      admin: cfg.admin ? `${cfg.admin.address}:${cfg.admin.port}` : null,
      started: new Date().toISOString(),
      workers,
    },
    state: async () => {
      const answers = await asker.askWorkers('state', null);
      const merged = mergeStates(answers.flatMap((a) => (a.ok ? [a.value] : [])));
      if (answers.some((a) => !a.ok)) {
        merged.events.live = false;
        merged.fencing.partial = true; // a worker's sessions are unknown: no fence may count on this record
      }
      return merged;
    },
    log,
  });
  hb.start();
  return hb;
}
