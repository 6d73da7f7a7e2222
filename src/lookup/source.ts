import type { Known, MalformedRecord, ObjectRecord, SlotRecord, StoreRecord, UserRecord } from './model.js';

export type { ObjectRecord } from './model.js';

export type ObjectKind = 'user' | 'store' | 'slot';

/** What a failover tool publishes after it changed one object. */
export interface ChangeEvent {
  kind: ObjectKind;
  id: string;
}

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
  watch(onChange: (ev: ChangeEvent) => void, live: (up: boolean) => void): void;
  /**
   * Resolves once the source can answer, or after `timeoutMs` in any case (false then): a
   * proxy starts even with its lookup down, and answers UNAVAILABLE until it is back.
   */
  ready(timeoutMs: number): Promise<boolean>;
  close(): Promise<void>;
}

/** Parses the JSON message of the events channel; undefined for anything malformed (never throws). */
export function parseEvent(text: string): ChangeEvent | undefined {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof v !== 'object' || v === null) return undefined;
  const { kind, id } = v as { kind?: unknown; id?: unknown };
  if ((kind !== 'user' && kind !== 'store' && kind !== 'slot') || typeof id !== 'string' || id === '') return undefined;
  return { kind, id };
}
