import { afterEach, describe, expect, it, vi } from 'vitest';
import { LookupFailure, MalformedRecord, type SlotRecord, type StoreRecord, type UserRecord } from '../src/lookup/model.js';
import { Router, type ChangeListener } from '../src/lookup/router.js';
import type { ChangeEvent, ReadResult, RouteRecords, RouteSource } from '../src/lookup/source.js';

// The routing cache's rules, against an in-memory source (pure logic: the real sources are
// exercised against Redis and files in the integration suites).

class MemorySource implements RouteSource {
  users = new Map<string, UserRecord>();
  stores = new Map<string, StoreRecord>();
  slots = new Map<string, SlotRecord>();
  /** Objects that exist but do not parse, by `kind:id`. */
  bad = new Map<string, MalformedRecord>();
  reads = 0;
  objectReads = 0;
  down = false;
  /** When set, readRoute waits for this before answering (to interleave an event). */
  gate: Promise<void> | undefined;
  private onChange: (ev: ChangeEvent) => void = () => {};
  private live: (up: boolean) => void = () => {};
  connected = false;

  async readRoute(login: string): Promise<RouteRecords> {
    this.reads++;
    if (this.down) throw new Error('connection refused');
    const snapshot = { user: this.users.get(login) };
    const store = snapshot.user && this.stores.get(snapshot.user.store);
    const slot = store && this.slots.get(store.master);
    if (this.gate) await this.gate;
    return { ...snapshot, store, slot };
  }
  async readObjects(objs: readonly ChangeEvent[]): Promise<ReadResult[]> {
    this.objectReads++;
    if (this.down) throw new Error('connection refused');
    return objs.map((o) => this.bad.get(`${o.kind}:${o.id}`) ?? (o.kind === 'user' ? this.users : o.kind === 'store' ? this.stores : this.slots).get(o.id));
  }
  watch(onChange: (ev: ChangeEvent) => void, live: (up: boolean) => void): void {
    this.onChange = onChange;
    this.live = live;
  }
  /** Publishes an event; it is lost when the subscription is down, as in Redis pub/sub. */
  publish(ev: ChangeEvent): void {
    if (this.connected) this.onChange(ev);
  }
  setLive(up: boolean): void {
    this.connected = up;
    this.live(up);
  }
  async ready(): Promise<boolean> {
    return true;
  }
  async close(): Promise<void> {}
}

function setup(maxStaleMs = 0, extra: Partial<ConstructorParameters<typeof Router>[1]> = {}) {
  const src = new MemorySource();
  src.users.set('alice@example.com', { store: 's1', status: 'active' });
  src.stores.set('s1', { master: 'A', replicas: ['B'], status: 'active', epoch: 1 });
  src.slots.set('A', { host: '127.0.0.11', ports: { imap: 143 }, status: 'up' });
  src.slots.set('B', { host: '127.0.0.12', ports: { imap: 143 }, status: 'up' });
  const changes: [ChangeEvent, ReadResult][] = [];
  const listener: ChangeListener = { changed: (ev, rec) => changes.push([ev, rec]), held: () => [] };
  const router = new Router(src, { maxCachedUsers: 2, maxStaleMs, ...extra });
  router.addListener(listener);
  router.start();
  return { src, router, changes };
}

const tick = () => new Promise((r) => setTimeout(r, 5));

describe('Router', () => {
  it('answers a known user from the cache without reading the source', async () => {
    const { src, router } = setup();
    src.setLive(true);
    await tick();
    expect((await router.resolve('Alice@Example.com')).slot).toBe('A');
    expect((await router.resolve('alice@example.com')).slot).toBe('A');
    expect(src.reads).toBe(1);
    expect(router.stats.cacheHits).toBe(1);
  });

  it('reads through while events are not live, and caches nothing then', async () => {
    const { src, router } = setup();
    await router.resolve('alice@example.com');
    await router.resolve('alice@example.com');
    expect(src.reads).toBe(2);
  });

  it('applies an event: the next login follows and the listener hears of it', async () => {
    const { src, router, changes } = setup();
    src.setLive(true);
    await router.resolve('alice@example.com');
    src.stores.set('s1', { master: 'B', replicas: ['A'], status: 'active', epoch: 2 });
    src.publish({ kind: 'store', id: 's1' });
    await tick();
    expect((await router.resolve('alice@example.com')).slot).toBe('B');
    expect(changes.map(([ev]) => ev)).toContainEqual({ kind: 'store', id: 's1' });
  });

  it('catches a change published while the stream was down, by resyncing', async () => {
    const { src, router, changes } = setup(60_000);
    src.setLive(true);
    await tick();
    await router.resolve('alice@example.com');
    src.setLive(false);
    src.stores.set('s1', { master: 'B', replicas: ['A'], status: 'active', epoch: 2 });
    src.publish({ kind: 'store', id: 's1' }); // lost
    expect(changes).toHaveLength(0);
    expect((await router.resolve('alice@example.com')).slot).toBe('A'); // stale, within max_stale_ms
    src.setLive(true);
    await tick();
    expect(changes.some(([ev, rec]) => ev.kind === 'store' && (rec as StoreRecord).master === 'B')).toBe(true);
    expect((await router.resolve('alice@example.com')).slot).toBe('B');
  });

  it('stops trusting the cache once max_stale_ms has passed without events', async () => {
    const { src, router } = setup(0);
    src.setLive(true);
    await tick();
    await router.resolve('alice@example.com');
    src.setLive(false);
    src.down = true;
    await expect(router.resolve('alice@example.com')).rejects.toMatchObject({ kind: 'unavailable' });
  });

  it('never lets an older store epoch overwrite a newer one (a lagging Redis replica)', async () => {
    const { src, router } = setup();
    src.users.set('bob@example.com', { store: 's2', status: 'active' });
    src.stores.set('s2', { master: 'B', replicas: [], status: 'active', epoch: 1 });
    src.setLive(true);
    await tick();
    await router.resolve('bob@example.com'); // caches slot B
    await router.resolve('alice@example.com');
    src.stores.set('s1', { master: 'B', replicas: ['A'], status: 'active', epoch: 5 });
    src.publish({ kind: 'store', id: 's1' });
    await tick();
    src.stores.set('s1', { master: 'A', replicas: ['B'], status: 'active', epoch: 4 }); // the source went back in time
    src.publish({ kind: 'store', id: 's1' });
    await tick();
    expect((await router.resolve('alice@example.com')).slot).toBe('B');
    src.users.delete('alice@example.com'); // and on a cache miss too
    src.users.set('alice@example.com', { store: 's1', status: 'active' });
    router['users'].clear();
    expect((await router.resolve('alice@example.com')).slot).toBe('B');
  });

  it('does not cache a read that an event overtook', async () => {
    const { src, router } = setup();
    src.setLive(true);
    await tick();
    let release!: () => void;
    src.gate = new Promise((r) => (release = r));
    const pending = router.resolve('alice@example.com'); // reads master A, then waits
    await tick();
    src.stores.set('s1', { master: 'B', replicas: ['A'], status: 'active', epoch: 2 });
    src.publish({ kind: 'store', id: 's1' });
    await tick();
    src.gate = undefined;
    release();
    // The overtaken read is retried and sees B.
    expect((await pending).slot).toBe('B');
    expect((await router.resolve('alice@example.com')).slot).toBe('B');
  });

  it('gives typed failures', async () => {
    const { src, router } = setup();
    await expect(router.resolve('nobody@example.com')).rejects.toMatchObject({ kind: 'unknown-user' });
    src.stores.set('s1', { master: 'A', replicas: [], status: 'locked', epoch: 3 });
    await expect(router.resolve('alice@example.com')).rejects.toMatchObject({ kind: 'locked' });
    src.stores.set('s1', { master: 'A', replicas: [], status: 'active', epoch: 3 });
    src.slots.set('A', { host: '127.0.0.11', ports: { imap: 143 }, status: 'down' });
    await expect(router.resolve('alice@example.com')).rejects.toBeInstanceOf(LookupFailure);
  });

  it('keeps at most cache_users users, dropping the oldest', async () => {
    const { src, router } = setup();
    src.setLive(true);
    await tick();
    for (const u of ['u1', 'u2', 'u3']) src.users.set(`${u}@example.com`, { store: 's1', status: 'active' });
    for (const u of ['u1', 'u2', 'u3']) await router.resolve(`${u}@example.com`);
    const before = src.reads;
    await router.resolve('u3@example.com'); // cached
    await router.resolve('u1@example.com'); // evicted (limit 2)
    expect(src.reads - before).toBe(1);
  });

  it('applies the rest of a resync around one unreadable object, which then counts as locked', async () => {
    const { src, router, changes } = setup(0, { maxCachedUsers: 10 });
    src.users.set('bob@example.com', { store: 's2', status: 'active' });
    src.stores.set('s2', { master: 'B', replicas: [], status: 'active', epoch: 1 });
    src.setLive(true);
    await tick();
    await router.resolve('alice@example.com');
    await router.resolve('bob@example.com');
    src.setLive(false);
    src.bad.set('store:s2', new MalformedRecord('ms:store:s2', 'store s2: bad epoch "abc"'));
    src.stores.set('s1', { master: 'B', replicas: ['A'], status: 'active', epoch: 2 });
    src.setLive(true);
    await tick();
    expect(router.stats.live).toBe(true);
    expect(router.stats.malformed).toBe(1);
    expect((await router.resolve('alice@example.com')).slot).toBe('B');
    await expect(router.resolve('bob@example.com')).rejects.toMatchObject({ kind: 'unavailable' });
    expect(changes.some(([ev, rec]) => ev.id === 's2' && rec instanceof MalformedRecord)).toBe(true);
    const route = { login: 'bob@example.com', backendLogin: 'bob@example.com', store: 's2', slot: 'B', host: '127.0.0.12', ports: { imap: 143 } };
    expect(router.stillValid(route, 'imap')).toBe(false);
  });

  describe('retries of a failed resync', () => {
    afterEach(() => {
      vi.useRealTimers();
    });
    it('back off exponentially up to the cap', async () => {
      vi.useFakeTimers();
      const { src, router } = setup(0, { resyncRetryMaxMs: 4000 });
      src.setLive(true);
      await vi.advanceTimersByTimeAsync(0);
      await router.resolve('alice@example.com'); // something to re-read
      src.setLive(false);
      src.down = true;
      const before = src.objectReads;
      src.setLive(true); // this resync fails at once
      await vi.advanceTimersByTimeAsync(0);
      const at = (ms: number) => vi.advanceTimersByTimeAsync(ms).then(() => src.objectReads - before);
      // Waits of 0.5, 1, 2, 4, 4, 4 s: retries at 0.5, 1.5, 3.5, 7.5, 11.5 and 15.5 s, so
      // 7 reads in 19 s (the old fixed 1 s retry made 20).
      expect(await at(19_000)).toBe(7);
      src.down = false;
      await vi.advanceTimersByTimeAsync(4000);
      expect(router.stats.live).toBe(true);
    });
  });

  it('does not believe a resync that finds most known routes gone: cache within max_stale_ms, then UNAVAILABLE', async () => {
    const { src, router, changes } = setup(0, { maxCachedUsers: 10 });
    src.setLive(true);
    await tick();
    await router.resolve('alice@example.com');
    src.setLive(false);
    src.users.clear();
    src.stores.clear();
    src.slots.clear();
    src.setLive(true);
    await tick();
    expect(router.stats.massRemovalsRefused).toBe(1);
    expect(router.stats.live).toBe(false);
    expect(changes).toHaveLength(0); // no session told "account removed"
    await expect(router.resolve('alice@example.com')).rejects.toMatchObject({ kind: 'unavailable' }); // max_stale_ms 0
    await expect(router.resolve('nobody@example.com')).rejects.toMatchObject({ kind: 'unavailable' });
  });

  it('applies a resync that finds a minority gone', async () => {
    const { src, router, changes } = setup(0, { maxCachedUsers: 10 });
    src.users.set('bob@example.com', { store: 's1', status: 'active' });
    src.setLive(true);
    await tick();
    await router.resolve('alice@example.com');
    await router.resolve('bob@example.com');
    src.setLive(false);
    src.users.delete('bob@example.com');
    src.setLive(true);
    await tick();
    expect(router.stats.live).toBe(true);
    expect(changes.some(([ev, rec]) => ev.id === 'bob@example.com' && rec === undefined)).toBe(true);
    await expect(router.resolve('bob@example.com')).rejects.toMatchObject({ kind: 'unknown-user' });
  });

  it('re-checks a login with the same rule as the event path: rename, removal, lock', async () => {
    const { src, router } = setup();
    src.setLive(true);
    await tick();
    const route = await router.resolve('alice@example.com');
    expect(router.stillValid(route, 'imap')).toBe(true);
    src.users.set('alice@example.com', { store: 's1', status: 'active', backendLogin: 'alice2' });
    src.publish({ kind: 'user', id: 'alice@example.com' });
    await tick();
    expect(router.stillValid(route, 'imap')).toBe(false);
    src.users.delete('alice@example.com');
    src.publish({ kind: 'user', id: 'alice@example.com' });
    await tick();
    expect(router.stillValid(route, 'imap')).toBe(false); // gone: a tombstone, not "not cached"
  });
});
