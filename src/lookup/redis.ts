import { ReplyError, type Redis, type RedisOptions } from 'ioredis';
import { MalformedRecord, parseOrMalformed, parseSlot, parseStore, parseUser, type ObjectRecord } from './model.js';
import { openRedis, type RedisEndpoint } from './redis-endpoint.js';
import { RedisKeys } from './redis-keys.js';
import { parseEvent, type ChangeEvent, type ReadResult, type RouteEvent, type RouteRecords, type RouteSource } from './source.js';

export interface RedisSourceOptions {
  /** One Redis URL, or Sentinel (the current master is asked of the sentinels on every connect). */
  endpoint: RedisEndpoint;
  prefix: string;
  /** A lookup that takes longer than this fails as "unavailable" instead of hanging a login. */
  commandTimeoutMs: number;
  /** How often the subscriber connection is PINGed (ms). */
  heartbeatMs?: number;
  /**
   * Silence on the subscriber connection (no PONG, no message) longer than this counts as
   * "events lost": the connection is dropped and made again, and the Router resyncs (ms).
   */
  heartbeatTimeoutMs?: number;
  onError?: (err: Error) => void;
}

// One round trip per uncached login: the script follows user -> store -> master slot on the
// server. Keys are built inside the script, so this is for a single Redis (or Sentinel
// pair), not Redis Cluster, which is what the contract's small data set wants anyway.
const READ_ROUTE = `
local p = ARGV[1]
local u = redis.call('HGETALL', p .. 'user:' .. ARGV[2])
local store = nil
for i = 1, #u, 2 do if u[i] == 'store' then store = u[i + 1] end end
if not store then return {u, {}, {}} end
local s = redis.call('HGETALL', p .. 'store:' .. store)
local master = nil
for i = 1, #s, 2 do if s[i] == 'master' then master = s[i + 1] end end
if not master or master == '' then return {u, s, {}} end
return {u, s, redis.call('HGETALL', p .. 'slot:' .. master)}
`;

type Hash = Record<string, string>;

function pairs(list: unknown): Hash {
  const h: Hash = {};
  if (!Array.isArray(list)) return h;
  for (let i = 0; i + 1 < list.length; i += 2) h[String(list[i])] = String(list[i + 1]);
  return h;
}

export function parseRecord(kind: ChangeEvent['kind'], h: Hash, id: string): ObjectRecord | undefined {
  if (kind === 'user') return parseUser(h, id);
  if (kind === 'store') return parseStore(h, id);
  return parseSlot(h, id);
}

/**
 * Options for a Redis connection on the login path (lookups, the failed-login throttle):
 * fail fast while Redis is away, so a login gets its answer in bounded time instead of
 * waiting in ioredis' offline queue through twenty reconnect attempts; reconnect on a short
 * backoff.
 */
export function failFastRedisOptions(commandTimeoutMs: number): RedisOptions {
  return {
    lazyConnect: false,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    commandTimeout: commandTimeoutMs,
    connectTimeout: commandTimeoutMs,
    keepAlive: 10_000,
    retryStrategy: (times) => Math.min(50 * 2 ** times, 1000),
  };
}

export class RedisSource implements RouteSource {
  private readonly cmd: Redis;
  private sub: Redis | undefined;
  private readonly prefix: string;
  private readonly keys: RedisKeys;
  private heartbeat: NodeJS.Timeout | undefined;

  constructor(private readonly opts: RedisSourceOptions) {
    this.prefix = opts.prefix;
    this.keys = new RedisKeys(opts.prefix);
    this.cmd = openRedis(opts.endpoint, this.clientOptions());
    this.cmd.on('error', (e: Error) => opts.onError?.(e));
  }

  private clientOptions(): RedisOptions {
    return failFastRedisOptions(this.opts.commandTimeoutMs);
  }

  private key(kind: ChangeEvent['kind'], id: string): string {
    return this.keys.object(kind, id);
  }

  ready(timeoutMs: number): Promise<boolean> {
    if (this.cmd.status === 'ready') return Promise.resolve(true);
    return new Promise((resolve) => {
      const done = (ok: boolean) => {
        clearTimeout(timer);
        this.cmd.off('ready', onReady);
        resolve(ok);
      };
      const onReady = () => done(true);
      const timer = setTimeout(() => done(false), timeoutMs);
      this.cmd.on('ready', onReady);
    });
  }

  reachable(): boolean {
    return this.cmd.status === 'ready';
  }

  async readRoute(login: string): Promise<RouteRecords> {
    const reply = (await this.cmd.eval(READ_ROUTE, 0, this.prefix, login)) as unknown[];
    const [u, s, sl] = reply.map(pairs) as [Hash, Hash, Hash];
    // Each record parsed on its own: a bad one is reported as such, not as "Redis down".
    const user = parseOrMalformed(this.key('user', login), () => parseUser(u, login));
    if (!user || user instanceof MalformedRecord) return { user };
    const store = parseOrMalformed(this.key('store', user.store), () => parseStore(s, user.store));
    if (!store || store instanceof MalformedRecord || !store.master) return { user, store };
    const slot = parseOrMalformed(this.key('slot', store.master), () => parseSlot(sl, store.master));
    return { user, store, slot };
  }

  async readObjects(objs: readonly ChangeEvent[]): Promise<ReadResult[]> {
    if (objs.length === 0) return [];
    const pipe = this.cmd.pipeline();
    for (const o of objs) pipe.hgetall(this.key(o.kind, o.id));
    const results = (await pipe.exec()) ?? [];
    return objs.map((o, i) => {
      const [err, h] = results[i] ?? [new Error('no reply'), undefined];
      const key = this.key(o.kind, o.id);
      // Redis answered for this key, with an error (WRONGTYPE: not a hash): that object is
      // unusable, the others are not. Anything else (connection lost) fails the batch.
      if (err instanceof ReplyError) return new MalformedRecord(key, `${key}: ${(err as Error).message}`);
      if (err) throw err;
      return parseOrMalformed(key, () => parseRecord(o.kind, h as Hash, o.id));
    });
  }

  watch(onChange: (ev: RouteEvent) => void, live: (up: boolean) => void): void {
    const channel = this.keys.events;
    // The subscriber keeps retrying forever (offline queue on), but we subscribe ourselves
    // on every 'ready' so that we know the moment events flow again and can resync.
    const sub = openRedis(this.opts.endpoint, {
      ...this.clientOptions(),
      enableOfflineQueue: true,
      maxRetriesPerRequest: null,
      commandTimeout: undefined,
      autoResubscribe: false,
      autoResendUnfulfilledCommands: false,
    });
    this.sub = sub;
    // A connection can stay up and deliver nothing (a hung relay, a half-dead path): TCP
    // will not tell for minutes. So the subscriber is PINGed (allowed in subscribed mode)
    // and anything heard from it (PONG, message, the SUBSCRIBE reply) counts as alive;
    // silence past heartbeatTimeoutMs is treated like a lost connection. One timer for
    // the process, whatever the number of sessions.
    let subscribed = false;
    let lastHeard = Date.now();
    let pinging = false;
    const heard = () => (lastHeard = Date.now());
    sub.on('error', (e: Error) => this.opts.onError?.(e));
    sub.on('connect', heard); // the silence of a new connection counts from here
    sub.on('close', () => {
      subscribed = false;
      pinging = false;
      live(false);
    });
    sub.on('ready', () => {
      heard();
      sub.subscribe(channel).then(
        () => {
          heard();
          subscribed = true;
          live(true);
        },
        (e: Error) => {
          this.opts.onError?.(e);
          sub.disconnect(true);
        },
      );
    });
    sub.on('message', (ch: string, text: string) => {
      heard();
      if (ch !== channel) return;
      const ev = parseEvent(text);
      if (ev) onChange(ev);
      else this.opts.onError?.(new Error(`ignored malformed event on ${channel}: ${text.slice(0, 200)}`));
    });
    const every = this.opts.heartbeatMs ?? 1000;
    const bound = this.opts.heartbeatTimeoutMs ?? 3000;
    this.heartbeat = setInterval(() => {
      const silent = Date.now() - lastHeard;
      if (silent > bound && (sub.status === 'connect' || sub.status === 'ready')) {
        // Counted from the last thing heard, or from the TCP connect: a ready check or a
        // SUBSCRIBE that never comes back is the same silence as a PING that does not.
        this.opts.onError?.(new Error(`no answer on the event subscription for ${silent} ms; reconnecting`));
        subscribed = false;
        pinging = false;
        lastHeard = Date.now();
        live(false);
        // disconnect() only half-closes (FIN), which a stalled peer never answers: destroy
        // the socket so that 'close' fires and ioredis reconnects now.
        sub.stream?.destroy();
        return;
      }
      if (subscribed && !pinging) {
        pinging = true;
        sub.ping().then(
          () => {
            pinging = false;
            heard();
          },
          () => (pinging = false),
        );
      }
    }, every);
    this.heartbeat.unref();
  }

  async close(): Promise<void> {
    clearInterval(this.heartbeat);
    this.sub?.disconnect();
    this.cmd.disconnect();
  }
}
