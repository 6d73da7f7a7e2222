import type { Logger } from './log.js';

export interface OutageLogOptions {
  /** What is down, e.g. "Redis at 10.0.0.5:6379". */
  what: string;
  /** What it means for clients, said once when it goes down. */
  effect: string;
  /** An error in words an operator acts on. */
  describe: (e: Error) => string;
  summaryMs?: number;
  now?: () => number;
}

/**
 * Turns a stream of errors from one dependency (Redis, the LDAP directory) into a few lines
 * an operator can read: one when it goes down, a summary with a count every `summaryMs` while
 * it stays down, one when it is back. A reconnecting client reports an error per attempt
 * (several a second); logging each would bury everything else. No timer: the summary is
 * written by the next error after the interval, and errors keep coming for as long as the
 * outage lasts.
 */
export class OutageLog {
  private downSince: number | undefined;
  private lastSummary = 0;
  private errors = 0;
  private readonly what: string;
  private readonly summaryMs: number;
  private readonly now: () => number;

  constructor(
    private readonly log: Logger,
    private readonly opts: OutageLogOptions,
  ) {
    this.what = opts.what;
    this.summaryMs = opts.summaryMs ?? 60_000;
    this.now = opts.now ?? Date.now;
  }

  error(e: Error): void {
    const reason = this.opts.describe(e);
    const now = this.now();
    this.errors++;
    if (this.downSince === undefined) {
      this.downSince = this.lastSummary = now;
      this.log.warn(`${this.what} unreachable; ${this.opts.effect}`, { reason });
      return;
    }
    // Not on every change of reason: a client that reconnects and a command that fails
    // meanwhile report different errors in turn for the same outage.
    if (now - this.lastSummary >= this.summaryMs) {
      this.lastSummary = now;
      this.log.warn(`${this.what} still unreachable`, { reason, errors: this.errors, down_s: Math.round((now - this.downSince) / 1000) });
    }
  }

  /** The dependency answers again. */
  ok(): void {
    if (this.downSince === undefined) return;
    this.log.info(`${this.what} reachable again`, { errors: this.errors, down_s: Math.round((this.now() - this.downSince) / 1000) });
    this.downSince = undefined;
    this.errors = 0;
  }

  get down(): boolean {
    return this.downSince !== undefined;
  }

  /** Errors seen in the current outage (0 when up). */
  get errorCount(): number {
    return this.errors;
  }
}

/** An ioredis error in words an operator acts on, instead of the client's internals. */
export function describeRedisError(e: Error): string {
  const code = (e as NodeJS.ErrnoException).code;
  const m = e.message;
  if (code === 'ECONNREFUSED') return 'connection refused (is redis-server running on that address?)';
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return 'host name does not resolve';
  if (code === 'ETIMEDOUT' || code === 'EHOSTUNREACH' || code === 'ENETUNREACH') return 'host unreachable or not answering';
  if (code === 'ECONNRESET' || code === 'EPIPE') return 'connection dropped by the server';
  if (/WRONGPASS|NOAUTH|invalid password/i.test(m)) return 'Redis refused the password (lookup.redis password or url)';
  if (/Stream isn't writeable|Connection is closed|enableOfflineQueue/.test(m)) return 'not connected (reconnecting)';
  if (/timed? ?out/i.test(m)) return 'Redis did not answer within lookup.redis.command_timeout_ms';
  return m;
}
