// `ctl user|store|slot set`: create or change one object, checking what it points at in the
// same atomic step that writes it.

import type { RecordOf, RouteAdmin } from '../lookup/admin.js';
import type { Protocol } from '../lookup/model.js';
import type { ObjectKind } from '../lookup/source.js';
import { usageError } from './errors.js';

/** Ports a slot gets when it is created without them: the protocols' standard ports. */
export const DEFAULT_PORTS: Record<Exclude<Protocol, 'sieve'>, number> = { imap: 143, pop3: 110, lmtp: 24 };

/**
 * Store and slot ids end up in Redis keys, comma lists (replicas) and production.dat lines,
 * so they may not hold whitespace or commas.
 */
export function checkId(kind: ObjectKind, id: string): string {
  if (id === '' || /[\s,]/.test(id) || id.length > 256) throw usageError(`bad ${kind} id ${JSON.stringify(id)}: no spaces or commas, at most 256 characters`);
  return id;
}

export interface SetResult<K extends ObjectKind> {
  kind: K;
  id: string;
  created: boolean;
  changed: boolean;
  record: RecordOf[K];
}

export interface UserChanges {
  store?: string;
  /** '' removes it (the backend then gets the normalised login). */
  backendLogin?: string;
}

export async function setUser(admin: RouteAdmin, login: string, ch: UserChanges): Promise<SetResult<'user'>> {
  if (ch.store === undefined && ch.backendLogin === undefined) throw usageError('nothing to set: give --store and/or --backend-login');
  if (ch.store !== undefined) checkId('store', ch.store);
  const refs = [{ kind: 'user', id: login } as const, ...(ch.store !== undefined ? [{ kind: 'store', id: ch.store } as const] : [])];
  const { result } = await admin.update(refs, (tx) => {
    const cur = tx.get('user', login);
    if (ch.store !== undefined && !tx.get('store', ch.store)) throw usageError(`unknown store ${ch.store}`);
    const store = ch.store ?? cur?.store;
    if (!store) throw usageError(`user ${login} does not exist yet: give --store`);
    const next: RecordOf['user'] = { store, status: cur?.status ?? 'active' };
    const backendLogin = ch.backendLogin ?? cur?.backendLogin;
    if (backendLogin) next.backendLogin = backendLogin;
    return { created: !cur, changed: tx.put('user', login, next), record: tx.get('user', login) ?? next };
  });
  return { kind: 'user', id: login, ...result };
}

export interface StoreChanges {
  master?: string;
  replicas?: string[];
}

export async function setStore(admin: RouteAdmin, id: string, ch: StoreChanges): Promise<SetResult<'store'>> {
  checkId('store', id);
  if (ch.master === undefined && ch.replicas === undefined) throw usageError('nothing to set: give --master and/or --replicas');
  const named = [...(ch.master !== undefined ? [ch.master] : []), ...(ch.replicas ?? [])];
  for (const s of named) checkId('slot', s);
  const dup = (ch.replicas ?? []).find((r, i, all) => all.indexOf(r) !== i);
  if (dup) throw usageError(`slot ${dup} is listed twice in --replicas`);
  const refs = [{ kind: 'store', id } as const, ...[...new Set(named)].map((s) => ({ kind: 'slot', id: s }) as const)];
  const { result } = await admin.update(refs, (tx) => {
    const cur = tx.get('store', id);
    const master = ch.master ?? cur?.master ?? '';
    if (!master) throw usageError(`store ${id} needs a master: give --master SLOT`);
    const replicas = ch.replicas ?? cur?.replicas ?? [];
    for (const s of named) if (!tx.get('slot', s)) throw usageError(`unknown slot ${s}`);
    if (replicas.includes(master)) throw usageError(`slot ${master} cannot be both master and replica of ${id} (to promote a replica use: mailsplice ctl failover ${id} --to ${master})`);
    const next: RecordOf['store'] = { master, replicas, status: cur?.status ?? 'active', epoch: 0 };
    return { created: !cur, changed: tx.put('store', id, next), record: tx.get('store', id) ?? next };
  });
  return { kind: 'store', id, ...result };
}

export interface SlotChanges {
  host?: string;
  /** null removes the port: the slot does not serve that protocol. */
  ports?: Partial<Record<Protocol, number | null>>;
  status?: 'up' | 'down';
}

export async function setSlot(admin: RouteAdmin, id: string, ch: SlotChanges): Promise<SetResult<'slot'>> {
  checkId('slot', id);
  const portChanges = Object.entries(ch.ports ?? {}) as [Protocol, number | null][];
  if (ch.host === undefined && ch.status === undefined && portChanges.length === 0) throw usageError('nothing to set: give --host, --imap, --pop3, --lmtp, --sieve or --status');
  if (ch.host !== undefined && (ch.host === '' || /\s/.test(ch.host))) throw usageError(`bad host ${JSON.stringify(ch.host)}`);
  const { result } = await admin.update([{ kind: 'slot', id }], (tx) => {
    const cur = tx.get('slot', id);
    const host = ch.host ?? cur?.host;
    if (!host) throw usageError(`slot ${id} does not exist yet: give --host`);
    const ports: Partial<Record<Protocol, number>> = { ...(cur ? cur.ports : DEFAULT_PORTS) };
    for (const [p, n] of portChanges) {
      if (n === null) delete ports[p];
      else ports[p] = n;
    }
    const next: RecordOf['slot'] = { host, ports, status: ch.status ?? cur?.status ?? 'up' };
    return { created: !cur, changed: tx.put('slot', id, next), record: tx.get('slot', id) ?? next };
  });
  return { kind: 'slot', id, ...result };
}
