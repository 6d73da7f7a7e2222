import type { Known, MalformedRecord, ObjectRecord, SlotRecord, StoreRecord, UserRecord } from './model.js';

export type { ObjectRecord } from './model.js';

export type ObjectKind = 'user' | 'store' | 'slot';

/** What a failover tool publishes after it changed one object. */
export interface ChangeEvent {
  kind: ObjectKind;
  id: string;
  /** When it was published (ms since the epoch), if the publisher said: for the apply-lag metric. */
  ts?: number;
}

/**
 * End sessions without changing a route (a kick is not a lock: the next login works).
 * On the wire: `{"kind":"kick","id":"<login>"}`, `{"kind":"kick","store":"<id>"}` or
 * `{"kind":"kick","slot":"<id>"}`. From the routes file, `before` spares sessions that
 * started after the kick was written (the file is read some time after).
 */
export interface KickEvent {
  kind: 'kick';
  scope: ObjectKind;
  id: string;
  ts?: number;
  before?: number;
}

/** Everything the events channel (or the routes file) can say. */
export type RouteEvent = ChangeEvent | KickEvent;

/**
 * The three records a login needs, read together. Each is absent, a record, or a
 * `MalformedRecord` when the object exists but does not parse (that object only).
 */
export interface RouteRecords {
  user?: UserRecord | MalformedRecord;
  store?: StoreRecord | MalformedRecord;
  slot?: SlotRecord | MalformedRecord;
}

/** One object as a source read it: its record, `MalformedRecord`, or undefined when absent. */
export type ReadResult = Exclude<Known<ObjectRecord>, null>;

/**
 * Where routing data lives (Redis, or the embedded file). A source only reads and tells of
 * changes; caching and deciding what a change means is the Router's job.
 */
export interface RouteSource {
  /**
   * User, its store and the store's master slot, in one round trip. Rejects only when the
   * source is unreachable: a record that does not parse is returned as `MalformedRecord`.
   */
  readRoute(login: string): Promise<RouteRecords>;
  /**
   * Several objects in one round trip (resync after a lost subscription, and events).
   * Each object is parsed on its own: one bad record never fails the others. Rejects only
   * when the source is unreachable.
   */
  readObjects(objs: readonly ChangeEvent[]): Promise<ReadResult[]>;
  /**
   * Starts delivering change events. `live(true)` is called once events are flowing (again),
   * `live(false)` as soon as they may be missed; the Router resyncs after every `live(true)`.
   */
  watch(onChange: (ev: RouteEvent) => void, live: (up: boolean) => void): void;
  /**
   * Resolves once the source can answer, or after `timeoutMs` in any case (false then): a
   * proxy starts even with its lookup down, and answers UNAVAILABLE until it is back.
   */
  ready(timeoutMs: number): Promise<boolean>;
  /** Whether the source answers now (for /readyz); absent: always. */
  reachable?(): boolean;
  close(): Promise<void>;
}

const KICK_SCOPES = { id: 'user', store: 'store', slot: 'slot' } as const;

/** Parses the JSON message of the events channel; undefined for anything malformed (never throws). */
export function parseEvent(text: string): RouteEvent | undefined {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return undefined;
  const o = v as Record<string, unknown>;
  let ts: number | undefined;
  if (o.ts !== undefined) {
    // A bad timestamp only loses the lag measurement, never the event.
    if (typeof o.ts === 'number' && Number.isFinite(o.ts) && o.ts > 0) ts = o.ts;
  }
  const withTs = <E extends RouteEvent>(e: E): E => (ts === undefined ? e : { ...e, ts });
  if (o.kind === 'kick') {
    const named = (Object.keys(KICK_SCOPES) as (keyof typeof KICK_SCOPES)[]).filter((k) => o[k] !== undefined);
    if (named.length !== 1) return undefined; // exactly one of id, store, slot
    const field = named[0]!;
    const id = o[field];
    if (typeof id !== 'string' || id === '') return undefined;
    return withTs({ kind: 'kick', scope: KICK_SCOPES[field], id });
  }
  const { kind, id } = o;
  if ((kind !== 'user' && kind !== 'store' && kind !== 'slot') || typeof id !== 'string' || id === '') return undefined;
  return withTs({ kind, id });
}
