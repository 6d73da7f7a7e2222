import type { Sweep } from './sweep.js';

/** The bound on backend logins per slot (backend.logins_per_slot and friends). */
export interface SlotLoginLimits {
  /** Backend logins in progress at once on one slot; 0: no bound. */
  concurrent: number;
  /** Logins that may wait for a place; past it, the temporary error at once. */
  queue: number;
  /** The longest wait for a place; then the temporary error. */
  queueTimeoutMs: number;
}

interface Waiter {
  due: number;
  resolve: (placed: boolean) => void;
}

interface SlotState {
  active: number;
  waiting: Waiter[];
}

/**
 * After a failover a store's thousands of clients reconnect in the same second, all to the
 * new master. This bounds the backend logins in progress per slot (from the backend connect
 * to the end of the login dialogue), with a short queue: a storm becomes a bounded wait
 * instead of a backend falling over, and past the queue the answer is "try again later".
 *
 * The hot path is a map lookup and two integer updates; a promise is made only for a login
 * that has to wait. The shared sweep ends waits that ran out of time: no timer per waiter.
 */
export class SlotLogins {
  private readonly slots = new Map<string, SlotState>();
  /** Logins that had to wait for a place, per slot (metrics). */
  readonly queued = new Map<string, number>();
  /** Logins refused because the slot's queue was full or the wait ran out, per slot (metrics). */
  readonly refused = new Map<string, number>();

  constructor(
    private limits: SlotLoginLimits,
    sweep: Sweep,
  ) {
    sweep.every(() => this.expire(Date.now()));
  }

  /** New limits (SIGHUP): logins in progress keep their places; waiters are let in as places allow. */
  setLimits(limits: SlotLoginLimits): void {
    this.limits = limits;
    for (const [slot, s] of this.slots) this.admit(slot, s);
  }

  /**
   * A place for one backend login on `slot`: true at once, false when refused (queue full),
   * or a promise that says which once it has waited. Every true must be given back with
   * `release`.
   */
  acquire(slot: string): boolean | Promise<boolean> {
    const { concurrent, queue, queueTimeoutMs } = this.limits;
    let s = this.slots.get(slot);
    if (!s) {
      s = { active: 0, waiting: [] };
      this.slots.set(slot, s);
    }
    if (concurrent === 0 || (s.active < concurrent && s.waiting.length === 0)) {
      s.active++;
      return true;
    }
    if (s.waiting.length >= queue) {
      bump(this.refused, slot);
      return false;
    }
    bump(this.queued, slot);
    const state = s;
    return new Promise<boolean>((resolve) => state.waiting.push({ due: Date.now() + queueTimeoutMs, resolve }));
  }

  release(slot: string): void {
    const s = this.slots.get(slot);
    if (!s) return;
    s.active--;
    this.admit(slot, s);
  }

  /** Backend logins in progress on a slot, and how many wait. */
  load(slot: string): { active: number; waiting: number } {
    const s = this.slots.get(slot);
    return { active: s?.active ?? 0, waiting: s?.waiting.length ?? 0 };
  }

  private admit(slot: string, s: SlotState): void {
    const { concurrent } = this.limits;
    while (s.waiting.length > 0 && (concurrent === 0 || s.active < concurrent)) {
      s.active++;
      s.waiting.shift()!.resolve(true);
    }
    if (s.active === 0 && s.waiting.length === 0) this.slots.delete(slot);
  }

  private expire(now: number): void {
    for (const [slot, s] of this.slots) {
      if (s.waiting.length === 0 || s.waiting[0]!.due > now) continue; // FIFO: the oldest is first
      const kept: Waiter[] = [];
      for (const w of s.waiting) {
        if (w.due > now) kept.push(w);
        else {
          bump(this.refused, slot);
          w.resolve(false);
        }
      }
      s.waiting = kept;
      if (s.active === 0 && kept.length === 0) this.slots.delete(slot);
    }
  }
}

function bump(m: Map<string, number>, slot: string): void {
  m.set(slot, (m.get(slot) ?? 0) + 1);
}
