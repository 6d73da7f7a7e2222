import { readFileSync, watch, type FSWatcher } from 'node:fs';
import { basename, dirname } from 'node:path';
import { parse as parseYaml } from 'yaml';
import {
  MalformedRecord,
  normalizeLogin,
  parseOrMalformed,
  parseSlot,
  parseStore,
  parseUser,
  type SlotRecord,
  type StoreRecord,
  type UserRecord,
} from './model.js';
import type { ChangeEvent, KickEvent, ReadResult, RouteEvent, RouteRecords, RouteSource } from './source.js';

/**
 * The embedded default: the same model as the Redis contract, in one YAML (or JSON) file:
 *
 *   users:  { alice@example.com: { store: store1 } }
 *   stores: { store1: { master: slotA, replicas: [slotB], epoch: 1 } }
 *   slots:  { slotA: { host: 127.0.0.11, imap: 143, pop3: 110, lmtp: 24 } }
 *
 * Field names are those of the Redis hashes. The file is re-read when it changes; every
 * object that differs from the last good read becomes a change event, exactly as if a
 * tool had published it. A file that fails to parse as a whole (YAML syntax, a section
 * that is not a mapping) is reported and the last good model stays in force (a
 * half-written file must not drop every route). One entry that does not parse is that
 * object alone: it is held as a `MalformedRecord` (its sessions end, its logins get a
 * temporary error) and every other entry applies.
 */
export interface FileModel {
  users: Map<string, UserRecord | MalformedRecord>;
  stores: Map<string, StoreRecord | MalformedRecord>;
  slots: Map<string, SlotRecord | MalformedRecord>;
  /**
   * `kicks:` (what `ctl kick --file` appends): `{ user: LOGIN | store: ID | slot: ID, at: TIME }`.
   * A kick that appears in a new read of the file ends the sessions it names that began
   * before `at`; the ones already there at start are history. Keyed by their text.
   */
  kicks: Map<string, KickEvent>;
}

type RawSection = Record<string, unknown>;

/** An entry's fields, or a non-mapping entry as one that cannot parse. */
function entry(v: unknown): Record<string, unknown> | undefined {
  if (v === null || v === undefined) return undefined;
  if (typeof v !== 'object' || Array.isArray(v)) return { '': v }; // parsers refuse: no store/host
  return v as Record<string, unknown>;
}

function section(doc: Record<string, unknown>, name: string): RawSection {
  const v = doc[name];
  if (v === undefined || v === null) return {};
  if (typeof v !== 'object' || Array.isArray(v)) throw new Error(`"${name}" must be a mapping`);
  return v as RawSection;
}

export function parseModel(text: string, defaultDomain?: string): FileModel {
  const doc = (parseYaml(text) ?? {}) as Record<string, unknown>;
  if (typeof doc !== 'object' || Array.isArray(doc)) throw new Error('top level must be a mapping');
  for (const k of Object.keys(doc)) {
    if (!['users', 'stores', 'slots', 'kicks'].includes(k)) throw new Error(`unknown top-level key "${k}"`);
  }
  const model: FileModel = { users: new Map(), stores: new Map(), slots: new Map(), kicks: parseKicks(doc.kicks, defaultDomain) };
  for (const [id, f] of Object.entries(section(doc, 'users'))) {
    const login = normalizeLogin(id, defaultDomain);
    const u = parseOrMalformed(`users.${id}`, () => parseUser(entry(f), login));
    if (u) model.users.set(login, u);
  }
  for (const [id, f] of Object.entries(section(doc, 'stores'))) {
    const s = parseOrMalformed(`stores.${id}`, () => parseStore(entry(f), id));
    if (s) model.stores.set(id, s);
  }
  for (const [id, f] of Object.entries(section(doc, 'slots'))) {
    const s = parseOrMalformed(`slots.${id}`, () => parseSlot(entry(f), id));
    if (s) model.slots.set(id, s);
  }
  return model;
}

/**
 * The `kicks:` list. A bad entry is skipped (a kick is an action, not a route: nothing to
 * hold as locked); a `kicks` that is not a list fails the file like any bad section.
 */
function parseKicks(v: unknown, defaultDomain: string | undefined): Map<string, KickEvent> {
  const out = new Map<string, KickEvent>();
  if (v === undefined || v === null) return out;
  if (!Array.isArray(v)) throw new Error('"kicks" must be a list');
  for (const e of v) {
    if (typeof e !== 'object' || e === null || Array.isArray(e)) continue;
    const o = e as Record<string, unknown>;
    const scopes = (['user', 'store', 'slot'] as const).filter((k) => typeof o[k] === 'string' && o[k] !== '');
    const at = typeof o.at === 'number' ? o.at : typeof o.at === 'string' ? Date.parse(o.at) : o.at instanceof Date ? o.at.getTime() : NaN;
    if (scopes.length !== 1 || !Number.isFinite(at)) continue;
    const scope = scopes[0]!;
    const raw = o[scope] as string;
    const id = scope === 'user' ? normalizeLogin(raw, defaultDomain) : raw;
    out.set(`${scope}\0${id}\0${at}`, { kind: 'kick', scope, id, before: at });
  }
  return out;
}

/** The entries of a model that do not parse. */
export function malformedEntries(model: FileModel): MalformedRecord[] {
  return [...model.users.values(), ...model.stores.values(), ...model.slots.values()].filter((r) => r instanceof MalformedRecord);
}

function lookup(model: FileModel, o: ChangeEvent): ReadResult {
  if (o.kind === 'user') return model.users.get(o.id);
  if (o.kind === 'store') return model.stores.get(o.id);
  return model.slots.get(o.id);
}

/** Every object added, removed or changed between two models. */
export function diffModels(a: FileModel, b: FileModel): ChangeEvent[] {
  const out: ChangeEvent[] = [];
  const kinds = [
    ['user', a.users, b.users],
    ['store', a.stores, b.stores],
    ['slot', a.slots, b.slots],
  ] as const;
  for (const [kind, before, after] of kinds) {
    const ids = new Set<string>([...before.keys(), ...after.keys()]);
    for (const id of ids) {
      if (JSON.stringify(before.get(id)) !== JSON.stringify(after.get(id))) out.push({ kind, id });
    }
  }
  return out;
}

export class FileSource implements RouteSource {
  private model: FileModel;
  private watcher: FSWatcher | undefined;
  private debounce: NodeJS.Timeout | undefined;
  private onChange: (ev: RouteEvent) => void = () => {};
  /** Reads of the file after the first: how many applied, how many were refused as a whole. */
  readonly stats = { reloads: 0, reloadFailures: 0 };

  constructor(
    private readonly path: string,
    private readonly defaultDomain: string | undefined,
    private readonly onError: (err: Error) => void = () => {},
  ) {
    // A bad file at start-up is fatal (the operator is watching); later it is only logged.
    this.model = parseModel(readFileSync(path, 'utf8'), defaultDomain);
    this.reportMalformed(this.model);
  }

  private reportMalformed(model: FileModel): void {
    for (const m of malformedEntries(model)) this.onError(new Error(`routes file ${this.path}: ${m.key} is unreadable, treated as locked: ${m.problem}`));
  }

  async ready(): Promise<boolean> {
    return true; // read at construction
  }

  async readRoute(login: string): Promise<RouteRecords> {
    const user = this.model.users.get(login);
    if (!user || user instanceof MalformedRecord) return { user };
    const store = this.model.stores.get(user.store);
    if (!store || store instanceof MalformedRecord) return { user, store };
    return { user, store, slot: this.model.slots.get(store.master) };
  }

  async readObjects(objs: readonly ChangeEvent[]): Promise<ReadResult[]> {
    return objs.map((o) => lookup(this.model, o));
  }

  watch(onChange: (ev: RouteEvent) => void, live: (up: boolean) => void): void {
    // Watch the directory, not the file: editors and `mv` replace the file (new inode), and
    // a watch on the old inode would go quiet after the first save.
    this.onChange = onChange;
    const name = basename(this.path);
    this.watcher = watch(dirname(this.path), (_event, file) => {
      if (file !== null && file !== name) return;
      clearTimeout(this.debounce);
      this.debounce = setTimeout(() => this.reload(), 50);
    });
    live(true);
  }

  /** Re-reads the file now (also on SIGHUP); returns the changes it passed on. */
  reload(): ChangeEvent[] {
    let next: FileModel;
    try {
      next = parseModel(readFileSync(this.path, 'utf8'), this.defaultDomain);
    } catch (e) {
      this.stats.reloadFailures++;
      this.onError(new Error(`routes file ${this.path} not reloaded: ${(e as Error).message}`));
      return [];
    }
    this.stats.reloads++;
    this.reportMalformed(next);
    const changes = diffModels(this.model, next);
    const kicks = [...next.kicks].filter(([key]) => !this.model.kicks.has(key)).map(([, k]) => k);
    this.model = next;
    for (const ev of changes) this.onChange(ev);
    for (const k of kicks) this.onChange(k);
    return changes;
  }

  async close(): Promise<void> {
    clearTimeout(this.debounce);
    this.watcher?.close();
  }
}
