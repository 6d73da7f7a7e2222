import {
  LookupFailure,
  normalizeLogin,
  routeFrom,
  type Route,
  type SlotRecord,
  type StoreRecord,
  type UserRecord,
} from './model.js';
import type { ChangeEvent, ObjectRecord, RouteRecords, RouteSource } from './source.js';

export interface RouterOptions {
  defaultDomain?: string;
  /** Most users kept in the cache; the oldest entry goes first past this. */
  maxCachedUsers: number;
  /** How long a cache may still be used after its event stream broke (ms). */
  maxStaleMs: number;
  onError?: (err: Error) => void;
  /** Told when the event stream goes down, and when it is live again after a resync of `resynced` objects. */
  onLive?: (live: boolean, resynced: number) => void;
}

/** Told of every object the Router re-read after an event or a resync. */
export interface ChangeListener {
  changed(ev: ChangeEvent, record: ObjectRecord | undefined): void;
  /** Objects the listener depends on, re-read on every resync even when not cached. */
  held(): ChangeEvent[];
}

export interface RouterStats {
  cacheHits: number;
  cacheMisses: number;
  events: number;
  resyncs: number;
  live: boolean;
}

const RESYNC_BATCH = 1000;

/**
 * Login -> route, with an in-process cache that events keep true.
 *
 * A known user resolves without any I/O. The cache is only trusted while the source's event
 * stream is live; once it breaks, the cache serves for at most `maxStaleMs` more and then
 * every login reads through. When events flow again every cached object, and every object a
 * listener holds sessions for, is re-read and treated as changed, because whatever was
 * published in the gap is lost.
 */
export class Router {
  private readonly users = new Map<string, UserRecord>();
  private readonly stores = new Map<string, StoreRecord>();
  private readonly slots = new Map<string, SlotRecord>();
  private readonly listeners: ChangeListener[] = [];
  private live = false;
  private staleUntil = 0;
  /** Raised by every applied change: a read that overlapped one is not cached. */
  private generation = 0;
  private resyncTimer: NodeJS.Timeout | undefined;
  readonly stats: RouterStats = { cacheHits: 0, cacheMisses: 0, events: 0, resyncs: 0, live: false };

  constructor(
    private readonly source: RouteSource,
    private readonly opts: RouterOptions,
  ) {}

  start(): void {
    this.source.watch(
      (ev) => void this.refresh([ev]),
      (up) => (up ? void this.resync() : this.lost()),
    );
  }

  addListener(l: ChangeListener): void {
    this.listeners.push(l);
  }

  normalize(login: string): string {
    return normalizeLogin(login, this.opts.defaultDomain);
  }

  private cacheUsable(): boolean {
    return this.live || Date.now() < this.staleUntil;
  }

  async resolve(rawLogin: string): Promise<Route> {
    const login = this.normalize(rawLogin);
    if (login === '') throw new LookupFailure('unknown-user', 'empty login');
    if (this.cacheUsable()) {
      const user = this.users.get(login);
      const store = user && this.stores.get(user.store);
      const slot = store && this.slots.get(store.master);
      if (user && store && slot) {
        this.stats.cacheHits++;
        return routeFrom(login, user, store, slot);
      }
    }
    this.stats.cacheMisses++;
    const recs = await this.readThrough(login);
    // A source that went back in time (Redis failed over to a lagging replica) must not
    // undo a newer store state we already know: prefer the higher epoch.
    const known = recs.user && this.stores.get(recs.user.store);
    if (known && recs.store && known.epoch > recs.store.epoch) {
      const slot = known.master === recs.store.master ? recs.slot : this.slots.get(known.master);
      return routeFrom(login, recs.user, known, slot);
    }
    return routeFrom(login, recs.user, recs.store, recs.slot);
  }

  private async readThrough(login: string): Promise<RouteRecords> {
    // A change applied while this read was in flight may be newer than what we read: read
    // again (a couple of times at most), and cache only a read that no change overlapped.
    for (let attempt = 0; ; attempt++) {
      const gen = this.generation;
      let recs: RouteRecords;
      try {
        recs = await this.source.readRoute(login);
      } catch (e) {
        throw new LookupFailure('unavailable', `lookup unavailable: ${(e as Error).message}`);
      }
      if (gen === this.generation) {
        if (this.live) this.remember(login, recs);
        return recs;
      }
      if (attempt >= 2) return recs;
    }
  }

  private remember(login: string, r: RouteRecords): void {
    if (r.user) this.putUser(login, r.user);
    if (r.user && r.store) this.putStore(r.user.store, r.store);
    if (r.store && r.slot) this.putSlot(r.store.master, r.slot);
  }

  private putUser(login: string, u: UserRecord): void {
    this.users.delete(login); // re-insert: Map order is our eviction order
    this.users.set(login, u);
    if (this.users.size > this.opts.maxCachedUsers) {
      const oldest = this.users.keys().next().value;
      if (oldest !== undefined) this.users.delete(oldest);
    }
  }

  /** Epochs only go forward: an older state never overwrites a newer one. */
  private putStore(id: string, s: StoreRecord): boolean {
    const cur = this.stores.get(id);
    if (cur && cur.epoch > s.epoch) return false;
    this.stores.set(id, s);
    return true;
  }

  private putSlot(id: string, s: SlotRecord): void {
    this.slots.set(id, s);
  }

  /** Re-reads the named objects, updates the cache and tells the listeners. */
  private async refresh(evs: ChangeEvent[]): Promise<boolean> {
    this.generation++;
    let records: (ObjectRecord | undefined)[];
    try {
      records = await this.source.readObjects(evs);
    } catch (e) {
      // We know these objects changed but not how: forget them so that logins read through,
      // and ask for a full resync once the source answers again.
      for (const ev of evs) this.forget(ev);
      this.opts.onError?.(new Error(`could not re-read changed objects: ${(e as Error).message}`));
      this.scheduleResync();
      return false;
    }
    this.generation++;
    evs.forEach((ev, i) => this.apply(ev, records[i]));
    return true;
  }

  private forget(ev: ChangeEvent): void {
    if (ev.kind === 'user') this.users.delete(ev.id);
    else if (ev.kind === 'store') this.stores.delete(ev.id);
    else this.slots.delete(ev.id);
  }

  private apply(ev: ChangeEvent, rec: ObjectRecord | undefined): void {
    this.stats.events++;
    if (rec === undefined) this.forget(ev);
    else if (ev.kind === 'user') {
      if (this.users.has(ev.id)) this.putUser(ev.id, rec as UserRecord);
    } else if (ev.kind === 'store') {
      if (!this.putStore(ev.id, rec as StoreRecord)) return; // stale read: nothing changed
    } else this.putSlot(ev.id, rec as SlotRecord);
    for (const l of this.listeners) l.changed(ev, rec);
  }

  private lost(): void {
    if (this.live) {
      this.staleUntil = Date.now() + this.opts.maxStaleMs;
      this.opts.onLive?.(false, 0);
    }
    this.live = false;
    this.stats.live = false;
  }

  private scheduleResync(): void {
    if (this.resyncTimer) return;
    this.resyncTimer = setTimeout(() => {
      this.resyncTimer = undefined;
      void this.resync();
    }, 1000);
    this.resyncTimer.unref();
  }

  /** Events may have been missed: re-read everything we rely on, then trust the cache again. */
  async resync(): Promise<void> {
    this.stats.resyncs++;
    const seen = new Set<string>();
    const all: ChangeEvent[] = [];
    const add = (ev: ChangeEvent) => {
      const key = `${ev.kind}\0${ev.id}`;
      if (!seen.has(key)) {
        seen.add(key);
        all.push(ev);
      }
    };
    for (const id of this.users.keys()) add({ kind: 'user', id });
    for (const id of this.stores.keys()) add({ kind: 'store', id });
    for (const id of this.slots.keys()) add({ kind: 'slot', id });
    for (const l of this.listeners) l.held().forEach(add);
    // A resync re-reads the store whatever its epoch: drop the epoch guard for it.
    for (const ev of all) if (ev.kind === 'store') this.stores.delete(ev.id);
    for (let i = 0; i < all.length; i += RESYNC_BATCH) {
      if (!(await this.refresh(all.slice(i, i + RESYNC_BATCH)))) return; // retried later
    }
    this.live = true;
    this.stats.live = true;
    this.opts.onLive?.(true, all.length);
  }

  /**
   * Whether a route handed out earlier still holds, judged by the cache. A login that raced
   * an event checks this once its session is registered, so no session escapes an event.
   */
  stillValid(route: Route): boolean {
    const user = this.users.get(route.login);
    if (user && (user.status !== 'active' || user.store !== route.store)) return false;
    const store = this.stores.get(route.store);
    if (store && (store.status !== 'active' || store.master !== route.slot)) return false;
    const slot = this.slots.get(route.slot);
    if (slot && staleSlot(slot, route)) return false;
    return true;
  }

  async close(): Promise<void> {
    clearTimeout(this.resyncTimer);
    await this.source.close();
  }
}

function staleSlot(slot: SlotRecord, route: Route): boolean {
  return (
    slot.status !== 'up' ||
    slot.host !== route.host ||
    slot.ports.imap !== route.ports.imap ||
    slot.ports.pop3 !== route.ports.pop3 ||
    slot.ports.lmtp !== route.ports.lmtp
  );
}

/** Why a session on `route` must end after `ev` re-read as `rec`; undefined if it may stay. */
export function staleReason(ev: ChangeEvent, rec: ObjectRecord | undefined, route: Route): string | undefined {
  if (ev.kind === 'user') {
    const u = rec as UserRecord | undefined;
    if (!u) return 'account removed';
    if (u.status !== 'active') return 'account locked';
    if (u.store !== route.store) return 'account moved';
    if ((u.backendLogin ?? route.login) !== route.backendLogin) return 'account renamed';
  } else if (ev.kind === 'store') {
    const s = rec as StoreRecord | undefined;
    if (!s) return 'store removed';
    if (s.status !== 'active') return 'store locked for maintenance';
    if (s.master !== route.slot) return 'store moved to another server';
  } else {
    const s = rec as SlotRecord | undefined;
    if (!s) return 'server removed';
    if (s.status !== 'up') return 'server down';
    if (staleSlot(s, route)) return 'server address changed';
  }
  return undefined;
}
