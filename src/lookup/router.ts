import {
  LookupFailure,
  MalformedRecord,
  normalizeLogin,
  routeFrom,
  staleReason,
  type Known,
  type Protocol,
  type Route,
  type SlotRecord,
  type StoreRecord,
  type UserRecord,
} from './model.js';
import type { ChangeEvent, KickEvent, ObjectKind, ReadResult, RouteEvent, RouteRecords, RouteSource } from './source.js';

/** Where the Router says what it did not expect (the process logger fits). */
export interface RouterLog {
  info(msg: string, fields?: Record<string, string | number | boolean | undefined>): void;
  warn(msg: string, fields?: Record<string, string | number | boolean | undefined>): void;
  error(msg: string, fields?: Record<string, string | number | boolean | undefined>): void;
}

export interface RouterOptions {
  defaultDomain?: string;
  /** Most users kept in the cache; the oldest entry goes first past this. */
  maxCachedUsers: number;
  /** How long a cache may still be used after its event stream broke (ms). */
  maxStaleMs: number;
  /**
   * A resync that finds more than this share (0-1) of the objects it knew gone, and at
   * least two, is a lookup failure (an emptied Redis), not a mass deletion. 1: never.
   */
  maxResyncRemoved?: number;
  /** Failed resyncs are retried after 0.5 s, doubling up to this (ms). */
  resyncRetryMaxMs?: number;
  log?: RouterLog;
  onError?: (err: Error) => void;
  /** Told when the event stream goes down, and when it is live again after a resync of `resynced` objects. */
  onLive?: (live: boolean, resynced: number) => void;
  /** Told of every event applied (not resyncs), with the sessions it ended: for the log and metrics. */
  onApplied?: (applied: AppliedEvent) => void;
}

/** One route event as applied, for the log and metrics. */
export interface AppliedEvent {
  event: RouteEvent;
  /** A store's epoch as re-read (store events). */
  epoch?: number;
  /** Sessions the event ended on this process. */
  ended: number;
}

/** Told of every object the Router re-read after an event or a resync. */
export interface ChangeListener {
  /**
   * `record`: the object as re-read; a `MalformedRecord` counts as locked; undefined: gone.
   * Returns how many sessions this ended (for the event's log line).
   */
  changed(ev: ChangeEvent, record: ReadResult): number;
  /** A kick: ends the sessions it names; returns how many. */
  kick?(ev: KickEvent): number;
  /** Objects the listener depends on, re-read on every resync even when not cached. */
  held(): ChangeEvent[];
}

export interface RouterStats {
  cacheHits: number;
  cacheMisses: number;
  events: number;
  resyncs: number;
  /** Resyncs that did not complete (source unreachable, or it looked emptied). */
  resyncFailures: number;
  /** Resyncs refused because most known routes had vanished (see maxResyncRemoved). */
  massRemovalsRefused: number;
  /** Store changes ignored because their epoch was lower than the one already known. */
  olderEpochsIgnored: number;
  /** Objects whose record is currently unreadable (each counts as locked). */
  malformed: number;
  live: boolean;
  /** The last event applied (not resyncs): what it named, and when (ms since epoch). */
  lastEvent: { kind: string; id: string; at: number } | undefined;
}

const RESYNC_BATCH = 1000;
const RESYNC_RETRY_FIRST_MS = 500;

/** What the cache holds of one object: its record, unusable, or known to be gone (null). */
type Cached<T> = T | MalformedRecord | null;

const refKey = (kind: ObjectKind, id: string) => `${kind}\0${id}`;

function isRecord<T>(v: Known<T>): v is T {
  return v !== undefined && v !== null && !(v instanceof MalformedRecord);
}

/**
 * Login -> route, with an in-process cache that events keep true.
 *
 * Invariants (each has a test in test/router.test.ts or test/lookup-faults.test.ts):
 * - A known user resolves without any I/O, and only while the cache is trusted: the
 *   source's event stream is live, or it broke less than `maxStaleMs` ago. Past that,
 *   every login reads through (and a source that cannot answer is UNAVAILABLE).
 * - Whatever was published while the stream was down is lost, so when events flow again
 *   every cached object, and every object a listener holds sessions for, is re-read and
 *   treated as changed (a resync). Only a complete resync makes the cache trusted again.
 * - Each object stands alone: a record that does not parse is that object "unreadable"
 *   (held as `MalformedRecord`, counted as locked: its sessions end, its logins get a
 *   temporary error, the log names its key), never a failure of the batch it came in.
 * - A resync that finds most of what it knew gone is not believed (an emptied Redis looks
 *   exactly like that): nothing is applied, the cache serves within `maxStaleMs`, then
 *   logins are UNAVAILABLE (never "unknown user") until a resync sees the routes again.
 * - A resync that fails is retried with exponential backoff, capped.
 * - Store epochs only go forward, except in a resync (after which the source is the
 *   truth again); an older epoch that is ignored is logged. A read that an event
 *   overtook is read again, not cached.
 * - Whether a session still matches its route is decided by `staleReason` in the model,
 *   for the event path, the resync and the login re-check (`stillValid`) alike.
 */
export class Router {
  private readonly users = new Map<string, Cached<UserRecord>>();
  private readonly stores = new Map<string, Cached<StoreRecord>>();
  private readonly slots = new Map<string, Cached<SlotRecord>>();
  private readonly listeners: ChangeListener[] = [];
  private live = false;
  private staleUntil = 0;
  /** Set while the last resync looked like an emptied source: no read-through then. */
  private suspect = false;
  /** Raised by every applied change: a read that overlapped one is not cached. */
  private generation = 0;
  private resyncTimer: NodeJS.Timeout | undefined;
  private resyncDelay = RESYNC_RETRY_FIRST_MS;
  private resyncing = false;
  private resyncAgain = false;
  /** Objects changed by events while a resync was reading: its older reads must not win. */
  private touchedDuringResync: Set<string> | undefined;
  /** Unreadable objects by kind and id, with the problem last logged (logged once per problem). */
  private readonly malformed = new Map<string, string>();
  /** Per store, the epoch pair last warned about (a lagging source is logged once, not per login). */
  private readonly epochWarned = new Map<string, string>();
  readonly stats: RouterStats = {
    cacheHits: 0,
    cacheMisses: 0,
    events: 0,
    resyncs: 0,
    resyncFailures: 0,
    massRemovalsRefused: 0,
    olderEpochsIgnored: 0,
    malformed: 0,
    live: false,
    lastEvent: undefined,
  };

  constructor(
    readonly source: RouteSource,
    private readonly opts: RouterOptions,
  ) {}

  start(): void {
    this.source.watch(
      (ev) => (ev.kind === 'kick' ? this.kick(ev) : void this.refresh([ev])),
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
      const hit = this.fromCache(login);
      if (hit) {
        this.stats.cacheHits++;
        return hit();
      }
    }
    this.stats.cacheMisses++;
    if (this.suspect) {
      // The source answered "gone" for most of what we knew: its "no such user" cannot be
      // believed either, and must not make clients ask their users for a new password.
      throw new LookupFailure('unavailable', 'lookup unavailable: the route source looks emptied (see the log)');
    }
    const recs = await this.readThrough(login);
    // A source that went back in time (Redis failed over to a lagging replica) must not
    // undo a newer store state we already know: prefer the higher epoch.
    const user = recs.user;
    const known = isRecord(user) ? this.stores.get(user.store) : undefined;
    if (isRecord(known) && isRecord(recs.store) && known.epoch > recs.store.epoch) {
      const slot = known.master === recs.store.master ? recs.slot : this.slots.get(known.master);
      return routeFrom(login, user, known, slot);
    }
    return routeFrom(login, user, recs.store, recs.slot);
  }

  /**
   * The answer the cache alone gives for `login`, as a thunk (it may be a failure to
   * throw), or undefined when something it needs is not cached.
   */
  private fromCache(login: string): (() => Route) | undefined {
    const user = this.users.get(login);
    if (user === undefined) return undefined;
    if (!isRecord(user)) return () => routeFrom(login, user, undefined, undefined);
    const store = this.stores.get(user.store);
    if (store === undefined) return undefined;
    // A locked user's failure carries the master slot (the proxy checks the password there
    // before it tells of the lock), so it needs the slot too, as an active user does.
    if (user.status !== 'active' || (isRecord(store) && store.status !== 'active' && store.master)) {
      const slot = isRecord(store) && store.master ? this.slots.get(store.master) : null;
      if (slot === undefined) return undefined;
      return () => routeFrom(login, user, store, slot);
    }
    if (!isRecord(store) || store.status !== 'active' || !store.master) return () => routeFrom(login, user, store, undefined);
    const slot = this.slots.get(store.master);
    if (slot === undefined) return undefined;
    return () => routeFrom(login, user, store, slot);
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
      const user = recs.user;
      this.noteRead('user', login, user);
      if (isRecord(user)) {
        this.noteRead('store', user.store, recs.store);
        if (isRecord(recs.store) && recs.store.master) this.noteRead('slot', recs.store.master, recs.slot);
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
    if (isRecord(r.user) && r.store) this.putStore(r.user.store, r.store, false, 'a login read');
    if (isRecord(r.store) && r.store.master && r.slot) this.slots.set(r.store.master, r.slot);
  }

  private putUser(login: string, u: Cached<UserRecord>): void {
    this.users.delete(login); // re-insert: Map order is our eviction order
    this.users.set(login, u);
    if (this.users.size > this.opts.maxCachedUsers) {
      const oldest = this.users.keys().next().value;
      if (oldest !== undefined) this.users.delete(oldest);
    }
  }

  /**
   * Epochs only go forward: an older state never overwrites a newer one, unless `force`
   * (a resync: the source is the truth again). An unreadable record always wins (it only
   * ever refuses), and any readable one replaces it.
   */
  private putStore(id: string, s: Cached<StoreRecord>, force: boolean, from: string): boolean {
    const cur = this.stores.get(id);
    if (!force && isRecord(cur) && isRecord(s) && cur.epoch > s.epoch) {
      this.stats.olderEpochsIgnored++;
      const pair = `${cur.epoch}>${s.epoch}`;
      if (this.epochWarned.get(id) !== pair) {
        this.epochWarned.set(id, pair);
        this.opts.log?.warn('store change with a lower epoch ignored (a failover tool that does not raise epochs, or a lagging Redis?)', {
          store: id,
          known_epoch: cur.epoch,
          read_epoch: s.epoch,
          from,
        });
      }
      return false;
    }
    this.stores.set(id, s);
    return true;
  }

  /** Logs an unreadable record once per problem, and notes when it is readable again. */
  private noteRead(kind: ObjectKind, id: string, rec: ReadResult | null): void {
    const k = refKey(kind, id);
    if (rec instanceof MalformedRecord) {
      if (this.malformed.get(k) !== rec.problem) {
        this.malformed.set(k, rec.problem);
        this.opts.log?.error('route record unreadable; treated as locked until it is written right', { key: rec.key, problem: rec.problem });
      }
    } else if (this.malformed.delete(k)) {
      this.opts.log?.info('route record readable again', { kind, id });
    }
    this.stats.malformed = this.malformed.size;
  }

  /** Re-reads the objects named by events, updates the cache and tells the listeners. */
  private async refresh(evs: ChangeEvent[]): Promise<boolean> {
    this.generation++;
    if (this.touchedDuringResync) for (const ev of evs) this.touchedDuringResync.add(refKey(ev.kind, ev.id));
    let records: ReadResult[];
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
    evs.forEach((ev, i) => {
      const rec = records[i];
      const ended = this.apply(ev, rec, false);
      this.noteApplied({ event: ev, ended, ...(ev.kind === 'store' && isRecord(rec) ? { epoch: (rec as StoreRecord).epoch } : {}) });
    });
    return true;
  }

  private noteApplied(a: AppliedEvent): void {
    const ev = a.event;
    this.stats.lastEvent = { kind: ev.kind, id: ev.kind === 'kick' && ev.scope !== 'user' ? `${ev.scope}:${ev.id}` : ev.id, at: Date.now() };
    this.opts.onApplied?.(a);
  }

  /**
   * A kick changes no route: nothing is re-read or cached, the listeners end the sessions it
   * names. A login is named in its normal form, whatever the publisher wrote.
   */
  private kick(ev: KickEvent): void {
    const k = ev.scope === 'user' ? { ...ev, id: this.normalize(ev.id) } : ev;
    this.stats.events++;
    let ended = 0;
    for (const l of this.listeners) ended += l.kick?.(k) ?? 0;
    this.noteApplied({ event: k, ended });
  }

  private forget(ev: ChangeEvent): void {
    if (ev.kind === 'user') this.users.delete(ev.id);
    else if (ev.kind === 'store') this.stores.delete(ev.id);
    else this.slots.delete(ev.id);
  }

  /**
   * Puts one re-read object into the cache and tells the listeners. An object an event says
   * is gone stays as a tombstone (null) where it was cached, so that a login that raced the
   * event fails its re-check; a resync drops tombstones (it re-reads everything anyway).
   */
  private apply(ev: ChangeEvent, rec: ReadResult, resync: boolean): number {
    this.stats.events++;
    this.noteRead(ev.kind, ev.id, rec);
    const value: Cached<UserRecord | StoreRecord | SlotRecord> = rec ?? null;
    if (ev.kind === 'user') {
      if (this.users.has(ev.id)) {
        if (value === null && resync) this.users.delete(ev.id);
        else this.putUser(ev.id, value as Cached<UserRecord>);
      }
    } else if (ev.kind === 'store') {
      if (value === null) {
        if (resync || !this.stores.has(ev.id)) this.stores.delete(ev.id);
        else this.stores.set(ev.id, null);
      } else if (!this.putStore(ev.id, value as Cached<StoreRecord>, resync, 'an event')) return 0; // older: nothing changed
    } else if (value === null) {
      if (resync || !this.slots.has(ev.id)) this.slots.delete(ev.id);
      else this.slots.set(ev.id, null);
    } else this.slots.set(ev.id, value as Cached<SlotRecord>);
    let ended = 0;
    for (const l of this.listeners) ended += l.changed(ev, rec);
    return ended;
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
    const delay = this.resyncDelay;
    this.resyncDelay = Math.min(delay * 2, this.opts.resyncRetryMaxMs ?? 30_000);
    this.resyncTimer = setTimeout(() => {
      this.resyncTimer = undefined;
      void this.resync();
    }, delay);
    this.resyncTimer.unref();
  }

  /** Events may have been missed: re-read everything we rely on, then trust the cache again. */
  async resync(): Promise<void> {
    if (this.resyncing) {
      this.resyncAgain = true; // one more pass once this one ends: it may predate the news
      return;
    }
    this.resyncing = true;
    try {
      do {
        this.resyncAgain = false;
        await this.resyncOnce();
      } while (this.resyncAgain);
    } finally {
      this.resyncing = false;
    }
  }

  private async resyncOnce(): Promise<void> {
    this.stats.resyncs++;
    const all: ChangeEvent[] = [];
    const seen = new Set<string>();
    const held = new Set<string>();
    const add = (ev: ChangeEvent) => {
      const key = refKey(ev.kind, ev.id);
      if (!seen.has(key)) {
        seen.add(key);
        all.push(ev);
      }
    };
    for (const id of this.users.keys()) add({ kind: 'user', id });
    for (const id of this.stores.keys()) add({ kind: 'store', id });
    for (const id of this.slots.keys()) add({ kind: 'slot', id });
    for (const l of this.listeners) {
      for (const ev of l.held()) {
        held.add(refKey(ev.kind, ev.id));
        add(ev);
      }
    }
    // Read everything first, apply after: whether to believe the answer depends on all of it.
    this.touchedDuringResync = new Set();
    const records: ReadResult[] = [];
    try {
      for (let i = 0; i < all.length; i += RESYNC_BATCH) records.push(...(await this.source.readObjects(all.slice(i, i + RESYNC_BATCH))));
    } catch (e) {
      this.touchedDuringResync = undefined;
      this.stats.resyncFailures++;
      this.opts.onError?.(new Error(`resync failed, retried in ${this.resyncDelay} ms: ${(e as Error).message}`));
      this.scheduleResync();
      return;
    }
    const touched = this.touchedDuringResync;
    this.touchedDuringResync = undefined;

    let known = 0;
    let gone = 0;
    all.forEach((ev, i) => {
      const key = refKey(ev.kind, ev.id);
      const cached = this.cached(ev);
      if (!held.has(key) && (cached === undefined || cached === null)) return;
      known++;
      if (records[i] === undefined) gone++;
    });
    const limit = this.opts.maxResyncRemoved ?? 0.5;
    if (gone >= 2 && gone > limit * known) {
      this.suspect = true;
      this.stats.resyncFailures++;
      this.stats.massRemovalsRefused++;
      this.lost();
      this.opts.log?.error(
        'route source answered that most known routes are gone: treated as a lookup failure, not as deletions (a Redis restarted without persistence, or an empty replica promoted?). Serving from cache for max_stale_ms, then UNAVAILABLE, until the routes are back',
        { gone, known, max_resync_removed: limit, retry_ms: this.resyncDelay },
      );
      this.scheduleResync();
      return;
    }
    if (this.suspect) this.opts.log?.warn('route source has its routes again; resync applied', { gone, known });
    this.suspect = false;
    this.generation++;
    all.forEach((ev, i) => {
      if (!touched.has(refKey(ev.kind, ev.id))) this.apply(ev, records[i], true);
    });
    this.resyncDelay = RESYNC_RETRY_FIRST_MS;
    this.live = true;
    this.stats.live = true;
    this.opts.onLive?.(true, all.length);
  }

  /**
   * The epoch of every store in the cache: the highest this process has applied (a store's
   * epoch only goes forward here). For the heartbeat's fencing record.
   */
  *appliedEpochs(): IterableIterator<[string, number]> {
    for (const [id, s] of this.stores) if (isRecord(s)) yield [id, s.epoch];
  }

  private cached(ev: ChangeEvent): Cached<UserRecord | StoreRecord | SlotRecord> | undefined {
    if (ev.kind === 'user') return this.users.get(ev.id);
    if (ev.kind === 'store') return this.stores.get(ev.id);
    return this.slots.get(ev.id);
  }

  /**
   * Whether a route handed out earlier still holds, judged by the cache with the model's
   * one rule. A login that raced an event checks this once its session is registered, so
   * no session escapes an event. An object that is not cached cannot be judged: true.
   * One rule for every protocol: the session's own protocol says which port matters.
   */
  stillValid(route: Route, protocol: Protocol): boolean {
    const user = this.users.get(route.login);
    if (user !== undefined && staleReason('user', user, route, protocol)) return false;
    const store = this.stores.get(route.store);
    if (store !== undefined && staleReason('store', store, route, protocol)) return false;
    const slot = this.slots.get(route.slot);
    if (slot !== undefined && staleReason('slot', slot, route, protocol)) return false;
    return true;
  }

  async close(): Promise<void> {
    clearTimeout(this.resyncTimer);
    await this.source.close();
  }
}
