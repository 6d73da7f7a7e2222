// The write side of the lookup contract, written once for every backend. A backend (Redis,
// the routes file) only implements `HashStore`: read hashes, and apply a batch of writes
// together with their change events in one atomic step, retrying when what it read changed
// underneath. Everything that knows what a user, store or slot is (validation, the epoch
// rule, "unchanged means no write") lives in `RouteAdmin` and `Tx` here, so the commands
// behave the same whichever backend they drive.

import {
  RecordError,
  parseSlot,
  parseStore,
  parseUser,
  slotFields,
  storeFields,
  userFields,
  type SlotRecord,
  type StoreRecord,
  type UserRecord,
} from './model.js';
import type { ChangeEvent, ObjectKind } from './source.js';

/** An object in its wire form: a Redis hash, or one entry of the routes file as strings. */
export type Hash = Record<string, string>;

export interface RecordOf {
  user: UserRecord;
  store: StoreRecord;
  slot: SlotRecord;
}

/**
 * The fields the contract defines for each kind. A write replaces exactly these; any other
 * field in the hash (a tool's own notes, `location` from production.dat) is left alone.
 */
export const MODEL_FIELDS: { readonly [K in ObjectKind]: readonly string[] } = {
  user: ['store', 'status', 'backend_login'],
  store: ['master', 'replicas', 'status', 'epoch'],
  slot: ['host', 'imap', 'pop3', 'lmtp', 'sieve', 'status'],
};

/**
 * One object to write. With `fields`, the contract's fields become exactly those given
 * (contract fields not given are removed) and extra fields given are set; without
 * `fields` the object is deleted. Every write is announced with one change event.
 */
export interface HashWrite {
  kind: ObjectKind;
  id: string;
  fields?: Hash;
}

export interface Plan<T> {
  writes: HashWrite[];
  result: T;
}

/** The storage primitive each backend implements. */
export interface HashStore {
  /** Where the routes live, for messages: `redis://host:6379 (prefix ms:)`, `file /etc/routes.yaml`. */
  readonly where: string;
  read(objs: readonly ChangeEvent[]): Promise<(Hash | undefined)[]>;
  /**
   * Reads `objs`, hands them to `plan`, and applies the planned writes and their events in
   * one atomic step. If any of `objs` changed before the writes landed, the whole thing runs
   * again on fresh reads, so `plan` must be a pure function of what it is given. An error
   * thrown by `plan` aborts without writing. `dryRun` plans but never writes.
   */
  transact<T>(objs: readonly ChangeEvent[], plan: (current: (Hash | undefined)[]) => Plan<T>, opts?: { dryRun?: boolean }): Promise<T>;
  /** Every id of one kind (Redis: SCAN, never KEYS). Sorted. */
  list(kind: ObjectKind): Promise<string[]>;
  /**
   * Ends every session of a login, store or slot on every proxy, changing no route: Redis
   * publishes a kick event (the answer: how many subscriptions heard it), the routes file
   * gets an entry under `kicks:` (the answer: undefined; the proxies read it when it changes).
   */
  kick(scope: ObjectKind, id: string): Promise<number | undefined>;
  close(): Promise<void>;
}

export function parseAs<K extends ObjectKind>(kind: K, h: Hash | undefined, id: string): RecordOf[K] | undefined {
  // The three parsers are selected by `kind`, so the result has the kind's record type.
  if (kind === 'user') return parseUser(h, id) as RecordOf[K] | undefined;
  if (kind === 'store') return parseStore(h, id) as RecordOf[K] | undefined;
  return parseSlot(h, id) as RecordOf[K] | undefined;
}

export function fieldsOf<K extends ObjectKind>(kind: K, rec: RecordOf[K]): Hash {
  if (kind === 'user') return userFields(rec as UserRecord);
  if (kind === 'store') return storeFields(rec as StoreRecord);
  return slotFields(rec as SlotRecord);
}

/** The fields of a hash that the contract does not define. */
export function extraFields(kind: ObjectKind, h: Hash | undefined): Hash {
  const out: Hash = {};
  for (const [k, v] of Object.entries(h ?? {})) if (!MODEL_FIELDS[kind].includes(k)) out[k] = v;
  return out;
}

// ---- The document form: the same fields, typed for YAML and JSON -------------------------

export type DocValue = string | number | string[];
export type DocEntry = Record<string, DocValue>;

const NUMERIC = new Set(['epoch', 'imap', 'pop3', 'lmtp', 'sieve']);

/**
 * A hash as the routes file (and `--json`) writes it: ports and epoch as numbers, replicas
 * as a list. `parseUser`/`parseStore`/`parseSlot` read both this and the wire form.
 */
export function toDoc(h: Hash): DocEntry {
  const out: DocEntry = {};
  for (const [k, v] of Object.entries(h)) {
    if (k === 'replicas') {
      const list = v.split(',').map((s) => s.trim()).filter(Boolean);
      if (list.length > 0) out[k] = list;
    } else if (NUMERIC.has(k) && /^\d+$/.test(v)) out[k] = Number(v);
    else out[k] = v;
  }
  return out;
}

/** The reverse of `toDoc`, for whatever a hand-edited file holds. Nulls are absent fields. */
export function fromDoc(v: unknown): Hash {
  const out: Hash = {};
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return out;
  for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
    if (x === null || x === undefined) continue;
    out[k] = Array.isArray(x) ? x.map(String).join(',') : String(x);
  }
  return out;
}

// ---- Transactions ---------------------------------------------------------------------------

/** A write refused because the record it would store does not parse (ctl: exit 2). */
export class RefusedRecord extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RefusedRecord';
  }
}

const refKey = (kind: ObjectKind, id: string) => `${kind}\0${id}`;

function tryParse<T>(f: () => T): T | undefined {
  try {
    return f();
  } catch {
    return undefined;
  }
}

function sameFields(a: Hash, b: Hash): boolean {
  const ka = Object.keys(a);
  return ka.length === Object.keys(b).length && ka.every((k) => a[k] === b[k]);
}

/**
 * The view a plan works on: the objects read at the start, and the writes so far. Only
 * objects that were read may be written, because only those are watched for conflicts
 * (and a store's new epoch is its read epoch plus one).
 */
export class Tx {
  private readonly base = new Map<string, Hash | undefined>();
  private readonly now = new Map<string, Hash | undefined>();
  private readonly pending = new Map<string, HashWrite>();

  constructor(refs: readonly ChangeEvent[], hashes: readonly (Hash | undefined)[]) {
    refs.forEach((r, i) => {
      const h = hashes[i];
      const present = h && Object.keys(h).length > 0 ? h : undefined;
      this.base.set(refKey(r.kind, r.id), present);
      this.now.set(refKey(r.kind, r.id), present);
    });
  }

  private hash(kind: ObjectKind, id: string): Hash | undefined {
    const k = refKey(kind, id);
    if (!this.now.has(k)) throw new Error(`internal: ${kind} ${id} used in a transaction that did not read it`);
    return this.now.get(k);
  }

  get<K extends ObjectKind>(kind: K, id: string): RecordOf[K] | undefined {
    return parseAs(kind, this.hash(kind, id), id);
  }

  extra(kind: ObjectKind, id: string): Hash {
    return extraFields(kind, this.hash(kind, id));
  }

  /**
   * Writes `rec` (plus `extra` fields) unless that is what the object already holds;
   * returns whether it wrote. A store's epoch is set here, never by the caller: one more
   * than the epoch read, so every change raises it and racing writers cannot both win.
   */
  put<K extends ObjectKind>(kind: K, id: string, rec: RecordOf[K], extra: Hash = {}): boolean {
    // Never write what the proxies would read as unusable (a port like 53143.0, a slot at
    // 0.0.0.0): the same parsers decide, so ctl and the proxies cannot disagree.
    try {
      parseAs(kind, fieldsOf(kind, rec), id);
    } catch (e) {
      if (e instanceof RecordError) throw new RefusedRecord(e.message);
      throw e;
    }
    const cur = this.hash(kind, id);
    // A malformed object is overwritten, not an obstacle: `set` is how an operator repairs it.
    const curRec = tryParse(() => parseAs(kind, cur, id));
    const old = curRec ? { ...fieldsOf(kind, curRec), ...extraFields(kind, cur) } : undefined;
    const next = { ...fieldsOf(kind, rec), ...extraFields(kind, cur), ...extra };
    if (kind === 'store') {
      const baseEpoch = tryParse(() => parseStore(this.base.get(refKey(kind, id)), id))?.epoch ?? 0;
      if (old) next.epoch = old.epoch ?? '0'; // compare everything but the epoch
      if (old && sameFields(old, next)) return false;
      next.epoch = String(baseEpoch + 1);
    } else if (old && sameFields(old, next)) return false;
    this.now.set(refKey(kind, id), next);
    this.pending.set(refKey(kind, id), { kind, id, fields: next });
    return true;
  }

  /** Deletes the object; returns false when it did not exist. */
  del(kind: ObjectKind, id: string): boolean {
    if (this.hash(kind, id) === undefined) return false;
    this.now.set(refKey(kind, id), undefined);
    this.pending.set(refKey(kind, id), { kind, id });
    return true;
  }

  get writes(): HashWrite[] {
    return [...this.pending.values()];
  }
}

export interface Updated<T> {
  result: T;
  writes: HashWrite[];
}

/** Typed reads and read-modify-write transactions over any `HashStore`. */
export class RouteAdmin {
  constructor(readonly store: HashStore) {}

  get where(): string {
    return this.store.where;
  }

  kick(scope: ObjectKind, id: string): Promise<number | undefined> {
    return this.store.kick(scope, id);
  }

  async get<K extends ObjectKind>(kind: K, id: string): Promise<RecordOf[K] | undefined> {
    const [h] = await this.store.read([{ kind, id }]);
    return parseAs(kind, h, id);
  }

  /** The object's contract fields and any extra fields, as stored; undefined when absent. */
  async getHash(kind: ObjectKind, id: string): Promise<Hash | undefined> {
    const [h] = await this.store.read([{ kind, id }]);
    return h && Object.keys(h).length > 0 ? h : undefined;
  }

  /**
   * Runs `fn` on a consistent view of `refs` and applies its writes with their events in
   * one atomic step (retried from scratch when one of `refs` changed meanwhile).
   */
  update<T>(refs: readonly ChangeEvent[], fn: (tx: Tx) => T, opts: { dryRun?: boolean } = {}): Promise<Updated<T>> {
    return this.store.transact(
      refs,
      (hashes) => {
        const tx = new Tx(refs, hashes);
        const result = fn(tx);
        const writes = tx.writes;
        return { writes, result: { result, writes } };
      },
      opts,
    );
  }

  list(kind: ObjectKind): Promise<string[]> {
    return this.store.list(kind);
  }

  close(): Promise<void> {
    return this.store.close();
  }
}
