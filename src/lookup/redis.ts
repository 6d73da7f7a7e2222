import { Redis, type RedisOptions } from 'ioredis';
import { parseSlot, parseStore, parseUser } from './model.js';
import { parseEvent, type ChangeEvent, type ObjectRecord, type RouteRecords, type RouteSource } from './source.js';

export interface RedisSourceOptions {
  url: string;
  prefix: string;
  /** A lookup that takes longer than this fails as "unavailable" instead of hanging a login. */
  commandTimeoutMs: number;
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

export class RedisSource implements RouteSource {
  private readonly cmd: Redis;
  private sub: Redis | undefined;
  private readonly prefix: string;

  constructor(private readonly opts: RedisSourceOptions) {
    this.prefix = opts.prefix;
    this.cmd = new Redis(opts.url, this.clientOptions());
    this.cmd.on('error', (e: Error) => opts.onError?.(e));
  }

  // Fail fast while Redis is away: a login must get NO [UNAVAILABLE] in bounded time, not
  // wait in ioredis' offline queue through twenty reconnect attempts.
  private clientOptions(): RedisOptions {
    return {
      lazyConnect: false,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      commandTimeout: this.opts.commandTimeoutMs,
      connectTimeout: this.opts.commandTimeoutMs,
      keepAlive: 10_000,
      retryStrategy: (times) => Math.min(50 * 2 ** times, 1000),
    };
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

  async readRoute(login: string): Promise<RouteRecords> {
    const reply = (await this.cmd.eval(READ_ROUTE, 0, this.prefix, login)) as unknown[];
    const [u, s, sl] = reply.map(pairs) as [Hash, Hash, Hash];
    const user = parseUser(u, login);
    const store = user ? parseStore(s, user.store) : undefined;
    const slot = store ? parseSlot(sl, store.master) : undefined;
    return { user, store, slot };
  }

  async readObjects(objs: readonly ChangeEvent[]): Promise<(ObjectRecord | undefined)[]> {
    if (objs.length === 0) return [];
    const pipe = this.cmd.pipeline();
    for (const o of objs) pipe.hgetall(`${this.prefix}${o.kind}:${o.id}`);
    const results = (await pipe.exec()) ?? [];
    return objs.map((o, i) => {
      const [err, h] = results[i] ?? [new Error('no reply'), undefined];
      if (err) throw err;
      return parseRecord(o.kind, h as Hash, o.id);
    });
  }

  watch(onChange: (ev: ChangeEvent) => void, live: (up: boolean) => void): void {
    const channel = `${this.prefix}events`;
    // The subscriber keeps retrying forever (offline queue on), but we subscribe ourselves
    // on every 'ready' so that we know the moment events flow again and can resync.
    const sub = new Redis(this.opts.url, {
      ...this.clientOptions(),
      enableOfflineQueue: true,
      maxRetriesPerRequest: null,
      commandTimeout: undefined,
      autoResubscribe: false,
    });
    this.sub = sub;
    sub.on('error', (e: Error) => this.opts.onError?.(e));
    sub.on('close', () => live(false));
    sub.on('ready', () => {
      sub.subscribe(channel).then(
        () => live(true),
        (e: Error) => {
          this.opts.onError?.(e);
          sub.disconnect(true);
        },
      );
    });
    sub.on('message', (ch: string, text: string) => {
      if (ch !== channel) return;
      const ev = parseEvent(text);
      if (ev) onChange(ev);
      else this.opts.onError?.(new Error(`ignored malformed event on ${channel}: ${text.slice(0, 200)}`));
    });
  }

  async close(): Promise<void> {
    this.sub?.disconnect();
    this.cmd.disconnect();
  }
}
