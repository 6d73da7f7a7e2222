// Fencing a store before its master moves: what each proxy says it has applied and still
// holds, in its heartbeat record, and the check a failover tool runs on those records.
// With workers every worker answers `localFencing` and the instance merges the answers
// (`mergeFencing`) into its one record; `fenceCheck` is pure, for ctl and for tests.

import type { Router } from '../lookup/router.js';
import type { LmtpTransaction } from '../session/core.js';
import type { SessionRegistry } from '../session/registry.js';

/** What a process holds on one slot of one store. */
export interface Held {
  /** IMAP and POP3 sessions. */
  sessions: number;
  /** LMTP transactions (one per backend leg) open towards that slot. */
  lmtp: number;
}

export interface FencingState {
  /** The highest epoch this proxy has applied, per store it has read. */
  epochs: Record<string, number>;
  /** Sessions and LMTP transactions per store, then per slot. Only non-zero entries. */
  held: Record<string, Record<string, Held>>;
  /** Set when a worker did not answer: what it holds is unknown, so this proxy cannot be counted clear. */
  partial?: boolean;
}

/**
 * This process's part: the router's epochs, one pass over the registered IMAP/POP3 sessions,
 * and the LMTP transactions under way (counted from their start to their last reply, also
 * when an event has already taken their recipients' routes away: one past its final dot
 * still writes to the old master).
 */
export function localFencing(registry: SessionRegistry, router: Router, lmtp: Iterable<LmtpTransaction>): FencingState {
  const held: FencingState['held'] = {};
  const at = (store: string, slot: string): Held => ((held[store] ??= {})[slot] ??= { sessions: 0, lmtp: 0 });
  registry.forEach((s) => {
    if (s.protocol !== 'lmtp') at(s.route.store, s.route.slot).sessions++;
  });
  for (const t of lmtp) for (const store of t.stores) at(store, t.slot).lmtp++;
  return { epochs: Object.fromEntries(router.appliedEpochs()), held };
}

/**
 * Several workers as one proxy: a store's epoch is the lowest any worker that read it has
 * applied (the proxy has applied a lock only when every worker has); what they hold adds up.
 */
export function mergeFencing(parts: readonly FencingState[]): FencingState {
  const out: FencingState = { epochs: {}, held: {} };
  for (const p of parts) {
    if (p.partial) out.partial = true;
    for (const [store, e] of Object.entries(p.epochs)) out.epochs[store] = Math.min(out.epochs[store] ?? e, e);
    for (const [store, slots] of Object.entries(p.held)) {
      const into = (out.held[store] ??= {});
      for (const [slot, h] of Object.entries(slots)) {
        const t = (into[slot] ??= { sessions: 0, lmtp: 0 });
        t.sessions += h.sessions;
        t.lmtp += h.lmtp;
      }
    }
  }
  return out;
}

/** One proxy as the fence check reads its heartbeat record. */
export interface FenceReport {
  id: string;
  /** The epoch of the store it has applied; undefined when it has not read the store at all. */
  epoch: number | undefined;
  sessions: number;
  lmtp: number;
}

export interface FenceResult {
  /** Every live proxy has applied the epoch and holds nothing on the master. */
  done: boolean;
  /** Live proxies that have (ids). */
  clear: string[];
  /** Live proxies that have not (yet): an older epoch, or sessions/transactions left. */
  lagging: FenceReport[];
}

/** The fencing part of a heartbeat record, as far as it can be read (records from older proxies have none). */
export interface FencedRecord {
  id: string;
  fencing?: FencingState;
}

/**
 * Has every live proxy applied `epoch` of `store` (the lock) and let go of everything on
 * `master`? A proxy that applied the lock's event has the store cached at that epoch (every
 * live subscriber re-reads a store an event names), so a record showing an older epoch, or
 * none, is one written before the proxy applied it. A record without fencing data (a proxy
 * of an older version) can never be confirmed: it lags.
 */
export function fenceCheck(records: readonly FencedRecord[], store: string, master: string, epoch: number): FenceResult {
  const clear: string[] = [];
  const lagging: FenceReport[] = [];
  for (const r of records) {
    const applied = r.fencing?.epochs[store];
    const h = r.fencing?.held[store]?.[master] ?? { sessions: 0, lmtp: 0 };
    const report: FenceReport = { id: r.id, epoch: applied, sessions: h.sessions, lmtp: h.lmtp };
    if (r.fencing && !r.fencing.partial && applied !== undefined && applied >= epoch && h.sessions === 0 && h.lmtp === 0) clear.push(r.id);
    else lagging.push(report);
  }
  return { done: lagging.length === 0, clear, lagging };
}
