// What one process holds, summed up for the heartbeat record (and for anything else that
// wants the whole proxy's picture). With workers each worker answers `localState()` for
// itself and the process that writes the heartbeat merges the answers with `mergeStates`;
// with one process the merge is of one answer. To add a field: add it here, fill it in
// `localState`, and say in `mergeStates` how several workers' values combine.

import type { Protocol } from '../lookup/model.js';
import type { Router } from '../lookup/router.js';
import type { LmtpTransaction } from '../session/core.js';
import type { SessionRegistry } from '../session/registry.js';
import { localFencing, mergeFencing, type FencingState } from './fencing.js';

/** The last route event a process applied. `at`: ms since the epoch. */
export interface AppliedEvent {
  kind: string;
  id: string;
  at: number;
}

export interface ProcessState {
  sessions: {
    total: number;
    by_protocol: Record<Protocol, number>;
    by_slot: Record<string, number>;
  };
  events: {
    /** Every process's event stream is live. */
    live: boolean;
    /** Route events applied since start (summed). */
    applied: number;
    last: AppliedEvent | null;
  };
  /** For fencing a failover (src/fleet/fencing.ts): epochs applied per store, what is held per store and slot. */
  fencing: FencingState;
}

declare module '../cluster/ask.js' {
  interface Asks {
    /** This serving process's part of the heartbeat record. */
    state: { arg: null; answer: ProcessState };
  }
}

/**
 * This process's part (a worker's answer). Reads counters and index sizes; the fencing part
 * is one pass over the sessions (once per heartbeat, not per login).
 */
export function localState(registry: SessionRegistry, router: Router, lmtp: Iterable<LmtpTransaction>): ProcessState {
  const stats = router.stats;
  return {
    sessions: { total: registry.size, by_protocol: registry.countByProtocol(), by_slot: registry.countBy('slot') },
    events: { live: stats.live, applied: stats.events, last: stats.lastEvent ?? null },
    fencing: localFencing(registry, router, lmtp),
  };
}

function addInto(into: Record<string, number>, from: Record<string, number>): void {
  for (const [k, n] of Object.entries(from)) into[k] = (into[k] ?? 0) + n;
}

/** Several processes' parts as one: counts add up, events are live only if live everywhere, the newest last event. */
export function mergeStates(parts: readonly ProcessState[]): ProcessState {
  const out: ProcessState = {
    sessions: { total: 0, by_protocol: { imap: 0, pop3: 0, lmtp: 0, sieve: 0 }, by_slot: {} },
    events: { live: parts.length > 0, applied: 0, last: null },
    fencing: mergeFencing(parts.map((p) => p.fencing)),
  };
  for (const p of parts) {
    out.sessions.total += p.sessions.total;
    addInto(out.sessions.by_protocol, p.sessions.by_protocol);
    addInto(out.sessions.by_slot, p.sessions.by_slot);
    out.events.live &&= p.events.live;
    out.events.applied += p.events.applied;
    if (p.events.last && (!out.events.last || p.events.last.at > out.events.last.at)) out.events.last = p.events.last;
  }
  return out;
}
