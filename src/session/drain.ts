import type { Protocol } from '../lookup/model.js';
import type { SessionRegistry } from './registry.js';

/** How often the drain ends its next batch of sessions. */
const TICK_MS = 50;

/**
 * Ends the logged-in sessions of `protocols` spread evenly over `overMs` (IMAP: `* BYE`
 * between responses), so that the other proxies get the clients' reconnects as a stream,
 * not as one wave. Each tick ends its share of what is left: sessions that leave on their
 * own meanwhile shorten the work, none is ended twice. Resolves when none is left (at once
 * when there is none); at `overMs` whatever remains is ended.
 */
export function drainSessions(registry: SessionRegistry, protocols: readonly Protocol[], overMs: number, reason: string): Promise<void> {
  if (overMs <= 0 || registry.count(protocols) === 0) {
    registry.endAll(reason, protocols);
    return Promise.resolve();
  }
  const end = Date.now() + overMs;
  return new Promise((resolve) => {
    const tick = () => {
      const left = registry.count(protocols);
      const now = Date.now();
      if (left === 0 || now >= end) {
        clearInterval(timer);
        registry.endAll(reason, protocols);
        resolve();
        return;
      }
      // The share of this tick: what is left over the ticks left (the last one takes the rest).
      const ticksLeft = Math.max(1, Math.ceil((end - now) / TICK_MS));
      registry.endSome(reason, Math.ceil(left / ticksLeft), protocols);
    };
    const timer = setInterval(tick, TICK_MS);
  });
}
