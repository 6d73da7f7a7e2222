// `ctl import` and `ctl export`: production.dat layouts and whole routes files in, store
// lines and full dumps out. Imports are additive (nothing is deleted) and idempotent (an
// object that already holds the imported values is not written, so it raises no event).

import { Document, isMap, parse as parseYaml } from 'yaml';
import { extraFields, fromDoc, parseAs, toDoc, type Hash, type HashWrite, type RecordOf, type RouteAdmin, type Tx } from '../lookup/admin.js';
import { normalizeLogin, type Protocol } from '../lookup/model.js';
import { formatStoreLine, parseProductionDat, type DatLayout } from '../lookup/proddat.js';
import type { ChangeEvent, ObjectKind } from '../lookup/source.js';
import { usageError } from './errors.js';
import { checkId } from './setters.js';

/** Objects per transaction: big enough to be quick, small enough not to hold Redis up. */
const BATCH = 200;

export interface Counts {
  created: number;
  changed: number;
  unchanged: number;
}

export interface ImportResult {
  format: 'dat' | 'routes';
  dryRun: boolean;
  slots: Counts;
  stores: Counts;
  users: Counts;
  /** What was (or, with dryRun, would be) written. */
  writes: HashWrite[];
}

export interface ImportOptions {
  ports: Partial<Record<Protocol, number>>;
  dryRun: boolean;
  /** production.dat: take each store's first slot as master even when it has failed over since. */
  mastersFromFile: boolean;
  defaultDomain?: string;
}

/** One object to import, written inside a batch's transaction; says what it did. */
interface Item {
  kind: ObjectKind;
  id: string;
  apply: (tx: Tx) => keyof Counts;
}

/** An item whose record `build` makes from the current one (which may be absent). */
function item<K extends ObjectKind>(kind: K, id: string, build: (cur: RecordOf[K] | undefined) => RecordOf[K], extra?: Hash): Item {
  return {
    kind,
    id,
    apply: (tx) => {
      const cur = tx.get(kind, id);
      const changed = tx.put(kind, id, build(cur), extra);
      return !cur ? 'created' : changed ? 'changed' : 'unchanged';
    },
  };
}

const zero = (): Counts => ({ created: 0, changed: 0, unchanged: 0 });

async function writeItems(admin: RouteAdmin, items: readonly Item[], res: ImportResult): Promise<void> {
  for (let i = 0; i < items.length; i += BATCH) {
    const batch = items.slice(i, i + BATCH);
    const { result: counts, writes } = await admin.update(
      batch.map((it) => ({ kind: it.kind, id: it.id })),
      (tx) => {
        // Counted inside the plan: a retried batch counts again from scratch.
        const c = { slot: zero(), store: zero(), user: zero() };
        for (const it of batch) c[it.kind][it.apply(tx)]++;
        return c;
      },
      { dryRun: res.dryRun },
    );
    for (const [kind, key] of [['slot', 'slots'], ['store', 'stores'], ['user', 'users']] as const) {
      for (const f of ['created', 'changed', 'unchanged'] as const) res[key][f] += counts[kind][f];
    }
    res.writes.push(...writes);
  }
}

/** Ids named in `wanted` that are neither in `known` nor in the target. */
async function missing(admin: RouteAdmin, kind: ObjectKind, wanted: Iterable<string>, known: Set<string>): Promise<string[]> {
  const ask = [...new Set(wanted)].filter((id) => !known.has(id));
  const found = await admin.store.read(ask.map((id) => ({ kind, id })));
  return ask.filter((_, i) => found[i] === undefined);
}

function refuseMissing(what: string, ids: string[]): void {
  if (ids.length === 0) return;
  const shown = ids.slice(0, 10).join(', ') + (ids.length > 10 ? `, and ${ids.length - 10} more` : '');
  throw usageError(`unknown ${what} (neither in the file nor already defined): ${shown}`);
}

/** A production.dat layout: slot lines become slots, store lines stores. */
export async function importDat(admin: RouteAdmin, text: string, opts: ImportOptions): Promise<ImportResult> {
  let layout: DatLayout;
  try {
    layout = parseProductionDat(text);
  } catch (e) {
    throw usageError((e as Error).message);
  }
  for (const s of layout.slots) checkId('slot', s.id);
  for (const s of layout.stores) checkId('store', s.id);
  const fileSlots = new Set(layout.slots.map((s) => s.id));
  refuseMissing('slots', await missing(admin, 'slot', layout.stores.flatMap((s) => s.slots), fileSlots));

  const res: ImportResult = { format: 'dat', dryRun: opts.dryRun, slots: zero(), stores: zero(), users: zero(), writes: [] };
  const items: Item[] = [
    // Up/down is run-time state a failover tool set; a layout import does not undo it.
    ...layout.slots.map((s) => item('slot', s.id, (cur) => ({ host: s.host, ports: { ...opts.ports }, status: cur?.status ?? 'up' }))),
    ...layout.stores.map((s) =>
      item(
        'store',
        s.id,
        (cur) => {
          // The file lists the master first, but the master moves with every failover and
          // the file is not rewritten: re-importing must not move every store back.
          const keep = !opts.mastersFromFile && cur && cur.master && s.slots.includes(cur.master);
          const master = keep ? cur.master : s.slots[0]!;
          return { master, replicas: s.slots.filter((x) => x !== master), status: cur?.status ?? 'active', epoch: 0 };
        },
        { location: s.location, branch: s.branch, disk_target: s.diskTarget },
      ),
    ),
  ];
  await writeItems(admin, items, res);
  return res;
}

type Section = Record<string, Hash>;

function section(doc: Record<string, unknown>, name: string): Section {
  const v = doc[name];
  if (v === undefined || v === null) return {};
  if (typeof v !== 'object' || Array.isArray(v)) throw usageError(`"${name}" must be a mapping`);
  const out: Section = {};
  for (const [id, entry] of Object.entries(v as Record<string, unknown>)) out[id] = fromDoc(entry);
  return out;
}

/** A whole routes file (YAML or JSON, as `ctl export --format yaml|json` writes). */
export async function importRoutes(admin: RouteAdmin, text: string, opts: ImportOptions): Promise<ImportResult> {
  let doc: unknown;
  try {
    doc = parseYaml(text) ?? {};
  } catch (e) {
    throw usageError(`not valid YAML/JSON: ${(e as Error).message}`);
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw usageError('top level must be a mapping');
  const top = doc as Record<string, unknown>;
  for (const k of Object.keys(top)) if (!['users', 'stores', 'slots'].includes(k)) throw usageError(`unknown top-level key "${k}"`);
  const items: Item[] = [];
  const parsed = <K extends ObjectKind>(kind: K, id: string, h: Hash): RecordOf[K] => {
    try {
      const r = parseAs(kind, h, id);
      if (!r) throw new Error(`${kind} ${id}: empty`);
      return r;
    } catch (e) {
      throw usageError((e as Error).message);
    }
  };
  const slots = section(top, 'slots');
  const stores = section(top, 'stores');
  const users = section(top, 'users');
  for (const [id, h] of Object.entries(slots)) {
    const rec = parsed('slot', checkId('slot', id), h);
    items.push(item('slot', id, (cur) => ({ ...rec, status: h.status ? rec.status : (cur?.status ?? rec.status) }), extraFields('slot', h)));
  }
  for (const [id, h] of Object.entries(stores)) {
    const rec = parsed('store', checkId('store', id), h);
    if (!rec.master) throw usageError(`store ${id} has no master`);
    items.push(item('store', id, (cur) => ({ ...rec, status: h.status ? rec.status : (cur?.status ?? rec.status) }), extraFields('store', h)));
  }
  for (const [raw, h] of Object.entries(users)) {
    const id = normalizeLogin(raw, opts.defaultDomain);
    if (id === '') throw usageError(`empty login in users`);
    const rec = parsed('user', id, h);
    items.push(item('user', id, (cur) => ({ ...rec, status: h.status ? rec.status : (cur?.status ?? rec.status) }), extraFields('user', h)));
  }
  const storeList = Object.values(stores).flatMap((h) => [h.master ?? '', ...(h.replicas ?? '').split(',')].map((s) => s.trim()).filter(Boolean));
  refuseMissing('slots', await missing(admin, 'slot', storeList, new Set(Object.keys(slots))));
  refuseMissing('stores', await missing(admin, 'store', Object.values(users).map((h) => h.store ?? ''), new Set(Object.keys(stores))));

  const res: ImportResult = { format: 'routes', dryRun: opts.dryRun, slots: zero(), stores: zero(), users: zero(), writes: [] };
  await writeItems(admin, items, res);
  return res;
}

// ---- export ---------------------------------------------------------------------------------

export interface Dump {
  users: Map<string, Hash>;
  stores: Map<string, Hash>;
  slots: Map<string, Hash>;
}

export async function dumpAll(admin: RouteAdmin): Promise<Dump> {
  const read = async (kind: ObjectKind) => {
    const ids = await admin.list(kind);
    const refs: ChangeEvent[] = ids.map((id) => ({ kind, id }));
    const hashes = await admin.store.read(refs);
    const m = new Map<string, Hash>();
    ids.forEach((id, i) => {
      const h = hashes[i];
      if (h) m.set(id, h); // deleted between SCAN and read: not part of the dump
    });
    return m;
  };
  return { slots: await read('slot'), stores: await read('store'), users: await read('user') };
}

/** Store lines in production.dat form (master first), with the slots as comments. */
export function formatDat(d: Dump, where: string): string {
  const out = [`# store lines exported by mailsplice ctl from ${where}; master first`];
  out.push('# slots (as stored; production.dat slot lines cannot be rebuilt from them):');
  for (const [id, h] of d.slots) {
    const ports = (['imap', 'pop3', 'lmtp', 'sieve'] as const).filter((p) => p !== 'sieve' || h[p] !== undefined).map((p) => `${p}=${h[p] ?? '-'}`).join(' ');
    out.push(`#   ${id} ${h.host ?? '?'} ${ports} ${h.status ?? 'up'}`);
  }
  for (const [id, h] of d.stores) {
    if (!h.master) {
      out.push(`# ${id}: no master`);
      continue;
    }
    const replicas = (h.replicas ?? '').split(',').map((s) => s.trim()).filter(Boolean);
    out.push(formatStoreLine({ id, location: h.location, branch: h.branch, diskTarget: h.disk_target, slots: [h.master, ...replicas] }));
  }
  return `${out.join('\n')}\n`;
}

/** Everything, as a routes file: `--format yaml` output is a valid lookup.file. */
export function formatRoutes(d: Dump, format: 'yaml' | 'json'): string {
  const obj = (m: Map<string, Hash>) => Object.fromEntries([...m].map(([id, h]) => [id, toDoc(h)]));
  const doc = { users: obj(d.users), stores: obj(d.stores), slots: obj(d.slots) };
  if (format === 'json') return `${JSON.stringify(doc, null, 2)}\n`;
  // One line per object, as in deploy/routes.example.yaml: easy to read, grep and diff.
  const yaml = new Document(doc);
  for (const name of ['users', 'stores', 'slots']) {
    const m = yaml.get(name);
    if (isMap(m)) for (const p of m.items) if (isMap(p.value)) p.value.flow = true;
  }
  return yaml.toString({ lineWidth: 0 });
}
