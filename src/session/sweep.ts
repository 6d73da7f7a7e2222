/** Something with a deadline that the sweep enforces. */
export interface Expiring {
  /** Epoch ms; may be moved by its owner at any time. */
  deadline: number;
  expire(): void;
  /** Server shutdown: say goodbye and close now. Without it, shutdown expires the item. */
  shutdown?(): void;
}

/**
 * One interval timer for every pre-auth connection on the process, instead of a timer per
 * socket: at ten thousand connections that is ten thousand fewer timer objects and one
 * wake-up a tick. Deadlines are enforced to within one tick.
 */
export class Sweep {
  private readonly items = new Set<Expiring>();
  private readonly timer: NodeJS.Timeout;
  private readonly tickers: (() => void)[] = [];

  constructor(tickMs = 1000) {
    this.timer = setInterval(() => this.tick(Date.now()), tickMs);
    this.timer.unref();
  }

  add(item: Expiring): void {
    this.items.add(item);
  }

  delete(item: Expiring): void {
    this.items.delete(item);
  }

  /** Also run `fn` on every tick (rate windows and the like). */
  every(fn: () => void): void {
    this.tickers.push(fn);
  }

  get size(): number {
    return this.items.size;
  }

  tick(now: number): void {
    // Collect first, then expire: an expire() may add items (itself, with a new deadline),
    // and a Set visits what is added while it is being iterated.
    const due: Expiring[] = [];
    for (const item of this.items) if (item.deadline <= now) due.push(item);
    for (const item of due) {
      this.items.delete(item);
      item.expire();
    }
    for (const fn of this.tickers) fn();
  }

  /** Ends everything waiting (server shutdown), each with its shutdown() if it has one. */
  shutdownAll(): void {
    const all = [...this.items];
    this.items.clear();
    for (const item of all) {
      if (item.shutdown) item.shutdown();
      else item.expire();
    }
  }

  stop(): void {
    clearInterval(this.timer);
  }
}
