import type { Config } from '../config.js';

export interface GateLimits {
  connectionsPerIp: number;
  concurrentLoginsPerIp: number;
}

export function gateLimits(cfg: Config): GateLimits {
  return { connectionsPerIp: cfg.limits.connections_per_ip, concurrentLoginsPerIp: cfg.limits.concurrent_logins_per_ip };
}

/**
 * Per-client-IP limits of this process, shared by all listeners: concurrent connections, and
 * logins in progress (between the login command and the backend's answer). The second keeps
 * one address from holding many backend dialogues at once; the failed-login count per
 * address is the LoginThrottle's (throttle.ts), shared between proxies.
 */
export class ClientGate {
  private readonly connections = new Map<string, number>();
  private readonly logins = new Map<string, number>();

  constructor(private limits: GateLimits) {}

  /** New limits (SIGHUP): counts already made stay; the next admission uses these. */
  setLimits(limits: GateLimits): void {
    this.limits = limits;
  }

  /** Counts a new connection; false when the IP already has too many. */
  admit(ip: string): boolean {
    return increment(this.connections, ip, this.limits.connectionsPerIp);
  }

  release(ip: string): void {
    decrement(this.connections, ip);
  }

  /** Counts a login in progress; false when the IP already has too many (the login is refused). */
  beginLogin(ip: string): boolean {
    return increment(this.logins, ip, this.limits.concurrentLoginsPerIp);
  }

  endLogin(ip: string): void {
    decrement(this.logins, ip);
  }
}

/** Connections per client address for a listener with a limit of its own (LMTP's connections_per_ip). */
export class ConnectionsPerAddress {
  private readonly connections = new Map<string, number>();

  constructor(private readonly max: number) {}

  admit(ip: string): boolean {
    return increment(this.connections, ip, this.max);
  }

  release(ip: string): void {
    decrement(this.connections, ip);
  }
}

function increment(m: Map<string, number>, ip: string, max: number): boolean {
  const n = m.get(ip) ?? 0;
  if (n >= max) return false;
  m.set(ip, n + 1);
  return true;
}

function decrement(m: Map<string, number>, ip: string): void {
  const n = (m.get(ip) ?? 1) - 1;
  if (n <= 0) m.delete(ip);
  else m.set(ip, n);
}
