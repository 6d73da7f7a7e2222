import type { Sweep } from './sweep.js';

export interface GateLimits {
  connectionsPerIp: number;
  authFailuresPerIpPerMinute: number;
}

/**
 * Per-client-IP limits shared by all listeners: concurrent connections, and failed logins
 * in the current minute (a window the shared sweep rolls over, so no timer per IP).
 */
export class ClientGate {
  private readonly connections = new Map<string, number>();
  private failures = new Map<string, number>();
  private windowStart = Date.now();

  constructor(
    private readonly limits: GateLimits,
    sweep: Sweep,
  ) {
    sweep.every(() => {
      if (Date.now() - this.windowStart >= 60_000) {
        this.failures = new Map();
        this.windowStart = Date.now();
      }
    });
  }

  /** Counts a new connection; false when the IP already has too many. */
  admit(ip: string): boolean {
    const n = this.connections.get(ip) ?? 0;
    if (n >= this.limits.connectionsPerIp) return false;
    this.connections.set(ip, n + 1);
    return true;
  }

  release(ip: string): void {
    const n = (this.connections.get(ip) ?? 1) - 1;
    if (n <= 0) this.connections.delete(ip);
    else this.connections.set(ip, n);
  }

  recordFailure(ip: string): void {
    this.failures.set(ip, (this.failures.get(ip) ?? 0) + 1);
  }

  /** Too many failed logins from this IP this minute: refuse further attempts. */
  blocked(ip: string): boolean {
    return (this.failures.get(ip) ?? 0) >= this.limits.authFailuresPerIpPerMinute;
  }
}
