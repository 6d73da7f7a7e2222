import { setTimeout as sleep } from 'node:timers/promises';
import type { Redis } from 'ioredis';
import { MODEL_FIELDS, type Hash, type HashStore, type HashWrite, type Plan } from '../lookup/admin.js';
import { readHeartbeats, type HeartbeatRecord } from '../fleet/records.js';
import { RedisKeys } from '../lookup/redis-keys.js';
import type { ChangeEvent, ObjectKind } from '../lookup/source.js';
import { describeEndpoint, openRedis, type RedisEndpoint } from '../lookup/redis-endpoint.js';
import type { Fleet } from './fleet.js';

/** Conflicting writers this many times in a row means something is badly wrong: stop. */
const MAX_ATTEMPTS = 50;
const BATCH = 1000;

/** SCAN MATCH is a glob: a prefix like `ms[1]:` must match itself, not a character class. */
function globEscape(s: string): string {
  return s.replace(/[*?[\]\\]/g, (c) => `\\${c}`);
}

/** The endpoint for messages, never with a password. */
function where(ep: RedisEndpoint): string {
  return ep.url && !ep.sentinels ? ep.url.replace(/\/\/[^@/]*@/, '//') : describeEndpoint(ep);
}

/**
 * The lookup contract in Redis. Every transaction WATCHes the keys it read, then writes and
 * PUBLISHes in one MULTI/EXEC: a proxy either sees the change and its event or neither, and
 * of two tools racing on one store the second one's EXEC fails and it starts again on the
 * first one's result (so no epoch is ever handed out twice).
 */
export class RedisHashStore implements HashStore, Fleet {
  readonly where: string;
  readonly keys: RedisKeys;
  /** WATCH state belongs to the connection: one transaction at a time per instance. */
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly redis: Redis,
    prefix: string,
    endpoint: RedisEndpoint,
  ) {
    this.keys = new RedisKeys(prefix);
    this.where = `${where(endpoint)} (prefix ${prefix})`;
  }

  /** Connects now, so that "Redis is down" is one clear error, not a hang per command. */
  static async connect(endpoint: RedisEndpoint, prefix: string, timeoutMs = 3000): Promise<RedisHashStore> {
    const redis = openRedis(endpoint, {
      lazyConnect: true,
      connectTimeout: timeoutMs,
      commandTimeout: timeoutMs * 3,
      maxRetriesPerRequest: 0,
      enableOfflineQueue: false,
      // A CLI run is short: a lost connection fails the command (exit 1), it is not retried
      // behind the operator's back.
      retryStrategy: () => null,
      // With Sentinel: a few rounds over the sentinels (one may be restarting), then exit 1.
      sentinelRetryStrategy: (times: number) => (times > 3 ? null : 200),
      failoverDetector: false,
    });
    let lastError: Error | undefined;
    redis.on('error', (e: Error) => (lastError = e));
    try {
      await redis.connect();
    } catch (e) {
      redis.disconnect();
      throw new Error(`cannot reach Redis at ${where(endpoint)}: ${(lastError ?? (e as Error)).message}`);
    }
    return new RedisHashStore(redis, prefix, endpoint);
  }

  private key(kind: ObjectKind, id: string): string {
    return this.keys.object(kind, id);
  }

  private get channel(): string {
    return this.keys.events;
  }

  async read(objs: readonly ChangeEvent[]): Promise<(Hash | undefined)[]> {
    const out: (Hash | undefined)[] = [];
    for (let i = 0; i < objs.length; i += BATCH) {
      const pipe = this.redis.pipeline();
      for (const o of objs.slice(i, i + BATCH)) pipe.hgetall(this.key(o.kind, o.id));
      for (const [err, h] of (await pipe.exec()) ?? []) {
        if (err) throw err;
        const hash = h as Hash;
        out.push(Object.keys(hash).length > 0 ? hash : undefined);
      }
    }
    return out;
  }

  transact<T>(objs: readonly ChangeEvent[], plan: (current: (Hash | undefined)[]) => Plan<T>, opts: { dryRun?: boolean } = {}): Promise<T> {
    const run = this.queue.then(() => this.attempt(objs, plan, opts.dryRun ?? false));
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async attempt<T>(objs: readonly ChangeEvent[], plan: (current: (Hash | undefined)[]) => Plan<T>, dryRun: boolean): Promise<T> {
    const keys = [...new Set(objs.map((o) => this.key(o.kind, o.id)))];
    for (let attempt = 1; ; attempt++) {
      if (keys.length > 0) await this.redis.watch(keys);
      let p: Plan<T>;
      try {
        p = plan(await this.read(objs));
      } catch (e) {
        await this.redis.unwatch();
        throw e;
      }
      if (dryRun || p.writes.length === 0) {
        if (keys.length > 0) await this.redis.unwatch();
        return p.result;
      }
      const m = this.redis.multi();
      for (const w of p.writes) this.queueWrite(m, w);
      // The events go last, inside the same MULTI: a proxy that hears one re-reads a state
      // that already holds every write of this step.
      for (const w of p.writes) m.publish(this.channel, JSON.stringify({ kind: w.kind, id: w.id }));
      const replies = await m.exec();
      if (replies !== null) {
        for (const [err] of replies) if (err) throw err;
        return p.result;
      }
      // EXEC returned nil: a watched key changed after we read it. Plan again on fresh data.
      if (attempt >= MAX_ATTEMPTS) throw new Error(`gave up after ${attempt} attempts: other writers keep changing the same objects`);
      await sleep(Math.random() * Math.min(100, 2 ** attempt));
    }
  }

  private queueWrite(m: ReturnType<Redis['multi']>, w: HashWrite): void {
    const key = this.key(w.kind, w.id);
    if (!w.fields) {
      m.del(key);
      return;
    }
    const gone = MODEL_FIELDS[w.kind].filter((f) => !(f in (w.fields ?? {})));
    if (gone.length > 0) m.hdel(key, ...gone);
    m.hset(key, w.fields);
  }

  async list(kind: ObjectKind): Promise<string[]> {
    const lead = this.keys.objectLead(kind);
    const ids = new Set<string>();
    let cursor = '0';
    do {
      const [next, keys] = await this.redis.scan(cursor, 'MATCH', `${globEscape(lead)}*`, 'COUNT', 1000);
      cursor = next;
      for (const k of keys) ids.add(k.slice(lead.length)); // SCAN may return a key twice
    } while (cursor !== '0');
    return [...ids].sort();
  }

  async kick(scope: ObjectKind, id: string): Promise<number> {
    const ev = { kind: 'kick', [scope === 'user' ? 'id' : scope]: id, ts: Date.now() };
    return this.redis.publish(this.keys.events, JSON.stringify(ev));
  }

  /** The live proxies' heartbeat records (see src/fleet/records.ts). */
  proxies(): Promise<HeartbeatRecord[]> {
    return readHeartbeats(this.redis, this.keys);
  }

  async stopped(): Promise<{ id: string; agoMs: number }[]> {
    const flat = await this.redis.zrange(this.keys.proxies, '0', '-1', 'WITHSCORES');
    if (flat.length === 0) return [];
    const ids = flat.filter((_, i) => i % 2 === 0);
    const exists = await this.redis.mget(ids.map((id) => this.keys.proxy(id)));
    const now = Date.now();
    return ids.flatMap((id, i) => (exists[i] === null ? [{ id, agoMs: now - Number(flat[2 * i + 1]) }] : []));
  }

  async close(): Promise<void> {
    await this.redis.quit().catch(() => this.redis.disconnect());
  }
}
