// The route changes ctl makes, each as a short sequence of atomic steps on a RouteAdmin.
// They return plain result objects; printing them is the command layer's job. Checks run
// inside the step that writes, on the state that step read, so a check cannot be made
// stale by another tool between "check" and "write".

import { performance } from 'node:perf_hooks';
import type { RecordOf, RouteAdmin, Tx } from '../lookup/admin.js';
import type { ObjectKind } from '../lookup/source.js';
import { CtlError, EXIT, notFound, runtimeError, usageError } from './errors.js';

const ms = (t0: number) => Math.round((performance.now() - t0) * 10) / 10;

/** Replicas after `to` takes over from `from`: `to` leaves the list, `from` takes its place. */
export function swapReplicas(replicas: readonly string[], from: string, to: string): string[] {
  const out = replicas.includes(to) ? replicas.map((r) => (r === to ? from : r)) : [...replicas, from];
  return out.filter((r, i) => r !== '' && r !== to && out.indexOf(r) === i);
}

function needStore(tx: Tx, id: string): RecordOf['store'] {
  const s = tx.get('store', id);
  if (!s) throw notFound(`unknown store ${id}`);
  return s;
}

// ---- failover -------------------------------------------------------------------------------

export interface FailoverOptions {
  /** Host death: any defined slot, no checks on the target's status or the old master, one step. */
  force?: boolean;
  /** The caller locked the store itself (`ctl lock store`) and did its own work; switch and unlock. */
  alreadyLocked?: boolean;
  /**
   * Runs between the lock and the switch (the fence wait, the final replication sync). If it
   * throws, the store is left locked on the old master and the error says how to finish.
   */
  between?: (locked: { from: string; epoch: number }) => Promise<void>;
}

export interface FailoverResult {
  store: string;
  from: string;
  to: string;
  replicas: string[];
  epochBefore: number;
  epochAfter: number;
  forced: boolean;
  /** Nothing to do: `to` already is the master of an active store. */
  unchanged: boolean;
  /** How long new logins were refused (lock to unlock), ms. */
  lockedMs: number;
  ms: number;
}

export async function failover(admin: RouteAdmin, storeId: string, to: string, opts: FailoverOptions = {}): Promise<FailoverResult> {
  const t0 = performance.now();
  const refs = [
    { kind: 'store', id: storeId },
    { kind: 'slot', id: to },
  ] as const;
  const done = (r: Omit<FailoverResult, 'store' | 'to' | 'ms' | 'forced'>): FailoverResult => ({
    store: storeId,
    to,
    forced: opts.force === true,
    ...r,
    ms: ms(t0),
  });

  if (opts.force) {
    const { result } = await admin.update(refs, (tx) => {
      const s = needStore(tx, storeId);
      if (!tx.get('slot', to)) throw usageError(`unknown slot ${to}`);
      const next = { ...s, master: to, replicas: swapReplicas(s.replicas, s.master, to), status: 'active' as const };
      const changed = tx.put('store', storeId, next);
      return { from: s.master, replicas: next.replicas, epochBefore: s.epoch, epochAfter: tx.get('store', storeId)?.epoch ?? s.epoch, changed };
    });
    return done({ ...result, unchanged: !result.changed, lockedMs: 0 });
  }

  // Step 1: check and lock. The lock's event makes every proxy end the sessions on the old
  // master and answer new logins "try again" until the unlock below.
  const { result: first } = await admin.update(refs, (tx) => {
    const s = needStore(tx, storeId);
    if (s.master === to && s.status === 'active') return { unchanged: true as const, s };
    if (!s.master) throw usageError(`store ${storeId} has no master; use --force to set one`);
    const slot = tx.get('slot', to);
    if (!slot) throw usageError(`unknown slot ${to}`);
    if (s.master === to) {
      if (!opts.alreadyLocked) throw usageError(`${to} already is the master of store ${storeId}, which is locked; unlock it with: mailsplice ctl unlock store ${storeId}`);
    } else if (!s.replicas.includes(to)) {
      throw usageError(`${to} is not a replica of store ${storeId} (replicas: ${s.replicas.join(', ') || 'none'}); --force allows any defined slot`);
    }
    if (slot.status !== 'up') throw usageError(`slot ${to} is down; bring it up first (ctl slot set ${to} --status up) or use --force`);
    if (opts.alreadyLocked) {
      if (s.status !== 'locked') throw usageError(`store ${storeId} is not locked; leave out --already-locked`);
      return { unchanged: false as const, s, lockEpoch: s.epoch };
    }
    if (s.status === 'locked') {
      throw usageError(`store ${storeId} is locked (another failover or maintenance under way); if you locked it yourself add --already-locked, or override with --force`);
    }
    tx.put('store', storeId, { ...s, status: 'locked' });
    return { unchanged: false as const, s, lockEpoch: tx.get('store', storeId)?.epoch ?? s.epoch };
  });
  if (first.unchanged) {
    return done({ from: to, replicas: first.s.replicas, epochBefore: first.s.epoch, epochAfter: first.s.epoch, unchanged: true, lockedMs: 0 });
  }
  const tLocked = performance.now();
  const from = first.s.master;
  if (opts.between) {
    try {
      await opts.between({ from, epoch: first.lockEpoch });
    } catch (e) {
      const why = e instanceof Error ? e.message : String(e);
      throw new CtlError(
        e instanceof CtlError ? e.exit : EXIT.runtime,
        `failover of ${storeId} stopped after locking it: ${why}
` +
          `store ${storeId} is LOCKED on ${from} (epoch ${first.lockEpoch}); finish with: mailsplice ctl failover ${storeId} --to ${to} --already-locked
` +
          `or undo with: mailsplice ctl unlock store ${storeId}`,
      );
    }
  }

  // Step 2: switch master and unlock, only if nobody changed the store since we locked it.
  try {
    const { result } = await admin.update(refs, (tx) => {
      const s = tx.get('store', storeId);
      if (!s || s.status !== 'locked' || s.master !== from) {
        throw runtimeError(`store ${storeId} was changed by someone else during the failover (now: ${s ? `master ${s.master || 'none'}, ${s.status}` : 'deleted'}); not switching`);
      }
      const replicas = swapReplicas(s.replicas, from, to);
      tx.put('store', storeId, { ...s, master: to, replicas, status: 'active' });
      return { replicas, epochAfter: tx.get('store', storeId)?.epoch ?? s.epoch };
    });
    return done({ from, ...result, epochBefore: first.s.epoch, unchanged: false, lockedMs: ms(tLocked) });
  } catch (e) {
    if (e instanceof CtlError) throw e;
    throw runtimeError(
      `failover of ${storeId} interrupted after locking it: ${(e as Error).message}\n` +
        `store ${storeId} may be left LOCKED on ${from}; finish with: mailsplice ctl failover ${storeId} --to ${to} --already-locked\n` +
        `or undo with: mailsplice ctl unlock store ${storeId}`,
    );
  }
}

// ---- move-user ------------------------------------------------------------------------------

export interface MoveResult {
  login: string;
  from: string;
  to: string;
  unchanged: boolean;
  lockedMs: number;
  ms: number;
}

/** Lock the user, point it at the new store, unlock: three steps, three events. */
export async function moveUser(admin: RouteAdmin, login: string, to: string): Promise<MoveResult> {
  const t0 = performance.now();
  const user = { kind: 'user', id: login } as const;
  const { result: from } = await admin.update([user, { kind: 'store', id: to }], (tx) => {
    const u = tx.get('user', login);
    if (!u) throw notFound(`unknown user ${login}`);
    const s = tx.get('store', to);
    if (!s) throw usageError(`unknown store ${to}`);
    if (!s.master) throw usageError(`store ${to} has no master`);
    if (u.store === to) return undefined;
    if (u.status === 'locked') throw usageError(`user ${login} is locked (a move under way?); unlock it first: mailsplice ctl unlock user ${login}`);
    tx.put('user', login, { ...u, status: 'locked' });
    return u.store;
  });
  if (from === undefined) return { login, from: to, to, unchanged: true, lockedMs: 0, ms: ms(t0) };
  const tLocked = performance.now();
  const step = (what: string, check: (u: RecordOf['user']) => boolean, next: (u: RecordOf['user']) => RecordOf['user']) =>
    admin.update([user], (tx) => {
      const u = tx.get('user', login);
      if (!u || !check(u)) throw runtimeError(`user ${login} was changed by someone else during the move; stopped before ${what}`);
      tx.put('user', login, next(u));
    });
  try {
    await step('switching the store', (u) => u.status === 'locked' && u.store === from, (u) => ({ ...u, store: to }));
    await step('unlocking', (u) => u.status === 'locked' && u.store === to, (u) => ({ ...u, status: 'active' }));
  } catch (e) {
    if (e instanceof CtlError) throw e;
    throw runtimeError(`move of ${login} interrupted: ${(e as Error).message}\nuser ${login} may be left LOCKED; check with: mailsplice ctl whereis ${login}`);
  }
  return { login, from, to, unchanged: false, lockedMs: ms(tLocked), ms: ms(t0) };
}

// ---- lock / unlock --------------------------------------------------------------------------

export interface LockResult {
  kind: 'user' | 'store';
  id: string;
  status: 'active' | 'locked';
  changed: boolean;
  epoch?: number;
  /** A store's master (the slot a fence waits to be free). */
  master?: string;
}

export async function setLock(admin: RouteAdmin, kind: 'user' | 'store', id: string, locked: boolean): Promise<LockResult> {
  const status = locked ? ('locked' as const) : ('active' as const);
  const { result } = await admin.update([{ kind, id }], (tx) => {
    if (kind === 'user') {
      const u = tx.get('user', id);
      if (!u) throw notFound(`unknown user ${id}`);
      return { changed: tx.put('user', id, { ...u, status }), epoch: undefined };
    }
    const s = needStore(tx, id);
    const changed = tx.put('store', id, { ...s, status });
    return { changed, epoch: tx.get('store', id)?.epoch, master: s.master };
  });
  return { kind, id, status, ...result };
}

// ---- deleting ------------------------------------------------------------------------------

/** Deletes one object. A slot still named by a store is refused unless `force`. */
export async function deleteObject(admin: RouteAdmin, kind: ObjectKind, id: string, force = false): Promise<void> {
  // Stores are few (hundreds), so a slot delete can afford to read them all and watch them.
  const stores = kind === 'slot' ? await admin.list('store') : [];
  await admin.update([{ kind, id }, ...stores.map((s) => ({ kind: 'store' as const, id: s }))], (tx) => {
    if (!tx.del(kind, id)) throw notFound(`unknown ${kind} ${id}`);
    if (force) return;
    const users = stores.filter((s) => {
      const rec = tx.get('store', s);
      return rec && (rec.master === id || rec.replicas.includes(id));
    });
    if (users.length > 0) throw usageError(`slot ${id} is still used by store ${users.join(', ')}; change those first, or use --force`);
  });
}
