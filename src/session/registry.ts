import { staleReason, type Protocol, type Route } from '../lookup/model.js';
import type { ChangeListener } from '../lookup/router.js';
import type { ChangeEvent, KickEvent, ReadResult } from '../lookup/source.js';
import { causeOfStale, KICK_REASON, type EndCause, type SessionInfo } from './session-info.js';

/** A logged-in, spliced session, as the registry sees it. */
export interface LiveSession {
  readonly protocol: Protocol;
  readonly route: Route;
  readonly info: SessionInfo;
  /** Bytes so far, client to backend and backend to client. */
  readonly bytesUp: number;
  readonly bytesDown: number;
  /** Ends the session, telling the client why where the protocol has a way to; `cause` is for the log. */
  end(reason: string, cause: EndCause): void;
}

type Index = Map<string, Set<LiveSession>>;

function put(index: Index, key: string, s: LiveSession): void {
  let set = index.get(key);
  if (!set) index.set(key, (set = new Set()));
  set.add(s);
}

function drop(index: Index, key: string, s: LiveSession): void {
  const set = index.get(key);
  if (set && set.delete(s) && set.size === 0) index.delete(key);
}

/**
 * Every live session, indexed by store, slot and login, so that an event about one object
 * finds exactly the sessions it concerns without a scan. It listens to the Router and ends
 * the sessions a change made wrong.
 */
export class SessionRegistry implements ChangeListener {
  private readonly byStore: Index = new Map();
  private readonly bySlot: Index = new Map();
  private readonly byLogin: Index = new Map();
  private total = 0;
  endedByEvents = 0;

  add(s: LiveSession): void {
    put(this.byStore, s.route.store, s);
    put(this.bySlot, s.route.slot, s);
    put(this.byLogin, s.route.login, s);
    this.total++;
  }

  remove(s: LiveSession): void {
    const had = this.byLogin.get(s.route.login)?.has(s);
    drop(this.byStore, s.route.store, s);
    drop(this.bySlot, s.route.slot, s);
    drop(this.byLogin, s.route.login, s);
    if (had) this.total--;
  }

  get size(): number {
    return this.total;
  }

  /** Sessions per protocol, for metrics. */
  countByProtocol(): Record<Protocol, number> {
    const out: Record<Protocol, number> = { imap: 0, pop3: 0, lmtp: 0, sieve: 0 };
    for (const set of this.byLogin.values()) for (const s of set) out[s.protocol]++;
    return out;
  }

  /** Sessions per slot (or per store): one number per key of the index, no scan of sessions. */
  countBy(what: 'slot' | 'store'): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [id, set] of what === 'slot' ? this.bySlot : this.byStore) out[id] = set.size;
    return out;
  }

  sessionsOf(kind: ChangeEvent['kind'], id: string): LiveSession[] {
    const index = kind === 'user' ? this.byLogin : kind === 'store' ? this.byStore : this.bySlot;
    return [...(index.get(id) ?? [])];
  }

  /** An object was re-read (event or resync): end the sessions the model's rule says are stale. */
  changed(ev: ChangeEvent, rec: ReadResult): number {
    let ended = 0;
    for (const s of this.sessionsOf(ev.kind, ev.id)) {
      const reason = staleReason(ev.kind, rec, s.route, s.protocol);
      if (reason) {
        this.remove(s);
        this.endedByEvents++;
        ended++;
        s.end(reason, causeOfStale(reason));
      }
    }
    return ended;
  }

  /** Ends every session the kick names (from the routes file: only those that began before it). */
  kick(ev: KickEvent): number {
    let ended = 0;
    for (const s of this.sessionsOf(ev.scope, ev.id)) {
      // A delivery under way is not a session to end: its recipients already got 250.
      if (s.protocol === 'lmtp') continue;
      if (ev.before !== undefined && s.info.started > ev.before) continue;
      this.remove(s);
      this.endedByEvents++;
      ended++;
      s.end(KICK_REASON, 'kick');
    }
    return ended;
  }

  /** Every IMAP and POP3 session matching the filter (for /sessions), from the index the filter names. */
  list(filter: { user?: string; store?: string; slot?: string } = {}): LiveSession[] {
    const from = filter.user !== undefined ? this.byLogin.get(filter.user) : filter.store !== undefined ? this.byStore.get(filter.store) : filter.slot !== undefined ? this.bySlot.get(filter.slot) : undefined;
    const all = filter.user === undefined && filter.store === undefined && filter.slot === undefined;
    const out: LiveSession[] = [];
    const pass = (s: LiveSession) =>
      s.protocol !== 'lmtp' &&
      (filter.user === undefined || s.route.login === filter.user) &&
      (filter.store === undefined || s.route.store === filter.store) &&
      (filter.slot === undefined || s.route.slot === filter.slot);
    if (all) {
      for (const set of this.byLogin.values()) for (const s of set) if (s.protocol !== 'lmtp') out.push(s);
    } else {
      for (const s of from ?? []) if (pass(s)) out.push(s);
    }
    return out;
  }

  held(): ChangeEvent[] {
    const out: ChangeEvent[] = [];
    for (const id of this.byStore.keys()) out.push({ kind: 'store', id });
    for (const id of this.bySlot.keys()) out.push({ kind: 'slot', id });
    for (const id of this.byLogin.keys()) out.push({ kind: 'user', id });
    return out;
  }

  /** Visits every session (a scan: for the heartbeat and shutdown, not for the hot path). */
  forEach(fn: (s: LiveSession) => void): void {
    for (const set of this.byLogin.values()) for (const s of set) fn(s);
  }

  /** Sessions of these protocols (a scan: for shutdown, not for the hot path). */
  count(protocols: readonly Protocol[]): number {
    let n = 0;
    for (const set of this.byLogin.values()) for (const s of set) if (protocols.includes(s.protocol)) n++;
    return n;
  }

  /** Ends up to `max` sessions of these protocols; how many it ended. */
  endSome(reason: string, max: number, protocols: readonly Protocol[]): number {
    const picked: LiveSession[] = [];
    outer: for (const set of this.byLogin.values()) {
      for (const s of set) {
        if (picked.length >= max) break outer;
        if (protocols.includes(s.protocol)) picked.push(s);
      }
    }
    for (const s of picked) {
      this.remove(s);
      s.end(reason, 'shutdown');
    }
    return picked.length;
  }

  /** Ends everything (shutdown), or every session of the given protocols. */
  endAll(reason: string, protocols?: readonly Protocol[]): void {
    for (const set of [...this.byLogin.values()]) for (const s of [...set]) {
      if (protocols && !protocols.includes(s.protocol)) continue;
      this.remove(s);
      s.end(reason, 'shutdown');
    }
  }
}
