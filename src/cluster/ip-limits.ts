import { ClientGate, type GateLimits } from '../net/gate.js';

// Per-address limits over every worker of an instance, at no IPC cost per connection.
//
// Asking the primary on every accept and login was measured (one worker, 20,000 round trips,
// 16 at a time, JSON IPC): ~8 us of CPU on each side per round trip, about 8% of a login's
// whole cost (~210 us) for the connection count alone, and as much again for logins. So each
// worker counts its own connections and logins per address as before (never more than the
// limit in one worker), and sends the primary the CHANGES of those counts, batched, at most
// every FLUSH_MS. The primary adds them up per address and tells every worker which
// addresses are at the limit; a worker refuses those at once. An address is thus held to the
// limit over the whole instance, except for what a burst brings in within one flush
// interval plus an IPC hop (~20 ms): it can overshoot by that much, and by no more than the
// limit per worker in the worst case. The primary then gets at most 50 messages a second per
// worker, whatever the connection rate: 16 clients connecting and leaving as fast as they
// could from one address (~9,000 connections in 5 s) cost the primary 2-3 us of CPU per
// connection, under 1% of a core.

/** How often a worker sends its count changes to the primary, at most. */
export const FLUSH_MS = 20;

/** Which count: connections per address, or logins in progress per address. */
export type IpCount = 'connections' | 'logins';

/** worker -> primary: count changes per address since the last message. */
export interface IpDeltas {
  connections: [string, number][];
  logins: [string, number][];
}

/** primary -> worker: addresses that reached (or left) a limit. */
export interface IpDenials {
  /** Replace the whole set (a worker's first message) rather than add/remove. */
  full: boolean;
  deny: { connections: string[]; logins: string[] };
  allow: { connections: string[]; logins: string[] };
}

/**
 * A worker's ClientGate: its own counts as before (synchronous, no I/O on the accept path),
 * plus the primary's list of addresses at the limit over all workers.
 */
export class SharedClientGate extends ClientGate {
  private readonly denied: Record<IpCount, Set<string>> = { connections: new Set(), logins: new Set() };
  private readonly pending: Record<IpCount, Map<string, number>> = { connections: new Map(), logins: new Map() };
  private timer: NodeJS.Timeout | undefined;

  constructor(
    limits: GateLimits,
    private readonly send: (d: IpDeltas) => void,
  ) {
    super(limits);
  }

  override admit(ip: string): boolean {
    if (this.denied.connections.has(ip) || !super.admit(ip)) return false;
    this.note('connections', ip, 1);
    return true;
  }

  override release(ip: string): void {
    super.release(ip);
    this.note('connections', ip, -1);
  }

  override beginLogin(ip: string): boolean {
    if (this.denied.logins.has(ip) || !super.beginLogin(ip)) return false;
    this.note('logins', ip, 1);
    return true;
  }

  override endLogin(ip: string): void {
    super.endLogin(ip);
    this.note('logins', ip, -1);
  }

  /** The primary's word on which addresses are at a limit. */
  applyDenials(d: IpDenials): void {
    for (const k of ['connections', 'logins'] as const) {
      if (d.full) this.denied[k].clear();
      for (const ip of d.deny[k]) this.denied[k].add(ip);
      for (const ip of d.allow[k]) this.denied[k].delete(ip);
    }
  }

  private note(k: IpCount, ip: string, by: number): void {
    const m = this.pending[k];
    const n = (m.get(ip) ?? 0) + by;
    if (n === 0) m.delete(ip);
    else m.set(ip, n);
    // One shared timer for every change in the interval: none per connection.
    this.timer ??= setTimeout(() => this.flush(), FLUSH_MS);
  }

  private flush(): void {
    this.timer = undefined;
    const { connections, logins } = this.pending;
    if (connections.size === 0 && logins.size === 0) return;
    this.send({ connections: [...connections], logins: [...logins] });
    connections.clear();
    logins.clear();
  }

  close(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }
}

/**
 * In the primary: every worker's counts per address, their sums, and which addresses are at
 * a limit. A worker that dies takes its counts with it (its connections died with it).
 */
export class IpLedger {
  private readonly byWorker = new Map<number, Record<IpCount, Map<string, number>>>();
  private readonly totals: Record<IpCount, Map<string, number>> = { connections: new Map(), logins: new Map() };
  private readonly denied: Record<IpCount, Set<string>> = { connections: new Set(), logins: new Set() };

  constructor(
    private limits: GateLimits,
    /** Sends a change of the denied set to every live worker. */
    private readonly broadcast: (d: IpDenials) => void,
  ) {}

  /** New limits (SIGHUP): an address's standing is judged by them from its next change on. */
  setLimits(limits: GateLimits): void {
    this.limits = limits;
  }

  /** What a newly started worker must know. */
  snapshot(): IpDenials {
    return { full: true, deny: { connections: [...this.denied.connections], logins: [...this.denied.logins] }, allow: { connections: [], logins: [] } };
  }

  apply(worker: number, d: IpDeltas): void {
    let counts = this.byWorker.get(worker);
    if (!counts) this.byWorker.set(worker, (counts = { connections: new Map(), logins: new Map() }));
    const change = this.emptyChange();
    for (const k of ['connections', 'logins'] as const) {
      for (const [ip, by] of d[k]) {
        if (typeof ip !== 'string' || !Number.isInteger(by)) continue;
        add(counts[k], ip, by);
        this.retotal(k, ip, by, change);
      }
    }
    this.send(change);
  }

  /** A worker exited: its counts are gone. */
  forget(worker: number): void {
    const counts = this.byWorker.get(worker);
    if (!counts) return;
    this.byWorker.delete(worker);
    const change = this.emptyChange();
    for (const k of ['connections', 'logins'] as const) for (const [ip, n] of counts[k]) this.retotal(k, ip, -n, change);
    this.send(change);
  }

  /** Addresses at the limit now, over all workers. */
  atLimit(k: IpCount): number {
    return this.denied[k].size;
  }

  total(k: IpCount, ip: string): number {
    return this.totals[k].get(ip) ?? 0;
  }

  private limit(k: IpCount): number {
    return k === 'connections' ? this.limits.connectionsPerIp : this.limits.concurrentLoginsPerIp;
  }

  private retotal(k: IpCount, ip: string, by: number, change: IpDenials): void {
    const n = add(this.totals[k], ip, by);
    const atLimit = n >= this.limit(k);
    if (atLimit && !this.denied[k].has(ip)) {
      this.denied[k].add(ip);
      change.deny[k].push(ip);
    } else if (!atLimit && this.denied[k].delete(ip)) {
      change.allow[k].push(ip);
    }
  }

  private emptyChange(): IpDenials {
    return { full: false, deny: { connections: [], logins: [] }, allow: { connections: [], logins: [] } };
  }

  private send(c: IpDenials): void {
    if (c.deny.connections.length + c.deny.logins.length + c.allow.connections.length + c.allow.logins.length > 0) this.broadcast(c);
  }
}

function add(m: Map<string, number>, ip: string, by: number): number {
  const n = (m.get(ip) ?? 0) + by;
  if (n <= 0) m.delete(ip);
  else m.set(ip, n);
  return Math.max(0, n);
}
