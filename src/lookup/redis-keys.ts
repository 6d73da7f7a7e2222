// Every key name mailsplice uses in Redis, in one place: the route records and their events
// channel (the contract failover tools write), the failed-login throttle, and the proxies'
// own heartbeat records. Readers and writers (the lookup, ctl, the throttle, the heartbeat)
// build names only through this, so the contract's layout is written down once.

import type { ObjectKind } from './source.js';

export class RedisKeys {
  constructor(readonly prefix: string) {}

  /** `<prefix>user:<login>`, `<prefix>store:<id>`, `<prefix>slot:<id>`: one hash each. */
  object(kind: ObjectKind, id: string): string {
    return `${this.prefix}${kind}:${id}`;
  }

  /** What every object key of one kind starts with (ctl lists them with SCAN). */
  objectLead(kind: ObjectKind): string {
    return `${this.prefix}${kind}:`;
  }

  /** The pub/sub channel of change and kick events. */
  get events(): string {
    return `${this.prefix}events`;
  }

  /** Failed logins of one client address in one window (a counter with a PEXPIRE). */
  throttle(ip: string, window: number): string {
    return `${this.prefix}throttle:${ip}:${window}`;
  }

  /** One proxy's heartbeat record: a JSON string set with PX, so it is gone when the proxy is. */
  proxy(id: string): string {
    return `${this.prefix}proxy:${id}`;
  }

  /**
   * The index of proxies (a sorted set: member the proxy id, score the time of its last
   * heartbeat): readers need no SCAN over millions of user keys to find a handful of proxies.
   * Liveness is the record's own key; an index entry whose record has expired is dead.
   */
  get proxies(): string {
    return `${this.prefix}proxies`;
  }
}
