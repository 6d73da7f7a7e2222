import type { Redis } from 'ioredis';
import type { Logger } from '../log.js';
import { failFastRedisOptions } from '../lookup/redis.js';
import { openRedis, type RedisEndpoint } from '../lookup/redis-endpoint.js';
import { RedisKeys } from '../lookup/redis-keys.js';
import type { Sweep } from './sweep.js';

// The failed-login throttle per client address, and the failure delay. Both are driven by
// the shared sweep: no timer per address, per connection or per attempt.

export interface ThrottleOptions {
  /** Failed logins one address may have per window. */
  failuresPerWindow: number;
  windowMs: number;
  /** Count in this Redis (shared by every proxy on it); in this process when absent. */
  redis?: { endpoint: RedisEndpoint; prefix: string; commandTimeoutMs: number };
  log: Logger;
}

/** One login attempt's place in its address's count; given back if the login succeeds. */
export interface Reservation {
  readonly ip: string;
  readonly window: number;
  /** Where it was counted: a success is given back there. */
  readonly inRedis: boolean;
}

// Every login runs one of these and every success the other, so each is one command (an
// EVALSHA, cached by ioredis) rather than a MULTI of two: on the login path the MULTI cost
// more proxy CPU than the rest of the login. RESERVE counts the attempt and starts the key's
// expiry with the window's first attempt; GIVE_BACK touches only a key that still exists, so
// a late success never leaves a count behind without an expiry.
const RESERVE = `local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n`;
const GIVE_BACK = `if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', KEYS[1]) end
return 0`;

type ThrottleRedis = Redis & {
  throttleReserve(key: string, ttlMs: number): Promise<number>;
  throttleGiveBack(key: string): Promise<number>;
};

/** Most addresses whose refusals are counted per window for the log; the rest are summed. */
const MAX_REFUSAL_ENTRIES = 10_000;

/**
 * Counts failed logins per client address in fixed windows. An attempt is counted when it
 * STARTS (`reserve`), before any backend is asked, and given back when it succeeds: 400
 * logins sent at the same moment get counts 1..400, and all past the limit are refused, where
 * counting failures as the backends answered let all 400 through.
 *
 * With Redis the count is `<prefix>throttle:<ip>:<window>` (one script: INCR, and PEXPIRE on the
 * window's first attempt), so every proxy on that Redis shares it. While Redis does not answer, and with
 * the routes-file lookup, the count is this process's own. The key is the exact address: one
 * address's count never refuses another.
 */
export class LoginThrottle {
  private readonly redis: ThrottleRedis | undefined;
  private readonly keys: RedisKeys;
  private window: number;
  private local = new Map<string, number>();
  private refusals = new Map<string, { count: number; why: string }>();
  private refusedElsewhere = 0;
  private redisWasDown = false;
  /** Attempts refused, for metrics. */
  refused = 0;

  constructor(
    private readonly opts: ThrottleOptions,
    sweep: Sweep,
  ) {
    this.window = this.windowOf(Date.now());
    this.keys = new RedisKeys(opts.redis?.prefix ?? '');
    if (opts.redis) {
      // A login never waits for Redis: while it is away the count is local.
      const redis = openRedis(opts.redis.endpoint, failFastRedisOptions(opts.redis.commandTimeoutMs));
      // The lookup logs Redis' own errors; here only the switch to and from local counting.
      redis.on('error', () => this.redisDown());
      redis.defineCommand('throttleReserve', { numberOfKeys: 1, lua: RESERVE });
      redis.defineCommand('throttleGiveBack', { numberOfKeys: 1, lua: GIVE_BACK });
      this.redis = redis as ThrottleRedis;
    }
    sweep.every(() => this.roll(Date.now()));
  }

  private windowOf(now: number): number {
    return Math.floor(now / this.opts.windowMs);
  }

  private redisDown(): void {
    if (this.redisWasDown) return;
    this.redisWasDown = true;
    this.opts.log.warn('login throttle cannot reach Redis; counting failed logins per proxy until it is back');
  }

  /** A new limit (SIGHUP), from the next attempt on. */
  setFailuresPerWindow(n: number): void {
    this.opts.failuresPerWindow = n;
  }

  /** Counts an attempt from `ip`; undefined when the address is over its limit (the attempt is refused). */
  async reserve(ip: string): Promise<Reservation | undefined> {
    const window = this.windowOf(Date.now());
    let n: number | undefined;
    if (this.redis?.status === 'ready') {
      try {
        n = await this.redis.throttleReserve(this.keys.throttle(ip, window), 2 * this.opts.windowMs);
        if (this.redisWasDown) {
          this.redisWasDown = false;
          this.opts.log.info('login throttle counts in Redis again');
        }
      } catch {
        this.redisDown();
      }
    }
    const inRedis = n !== undefined;
    if (n === undefined) {
      this.roll(Date.now());
      n = (this.local.get(ip) ?? 0) + 1;
      this.local.set(ip, n);
    }
    if (n > this.opts.failuresPerWindow) {
      this.noteRefused(ip, 'too many failed logins');
      return undefined;
    }
    return { ip, window, inRedis };
  }

  /** The attempt succeeded: it gives its place back. */
  succeeded(r: Reservation): void {
    if (r.inRedis) {
      if (this.redis?.status === 'ready') this.redis.throttleGiveBack(this.keys.throttle(r.ip, r.window)).catch(() => undefined);
      return;
    }
    if (r.window !== this.window) return;
    const n = (this.local.get(r.ip) ?? 1) - 1;
    if (n <= 0) this.local.delete(r.ip);
    else this.local.set(r.ip, n);
  }

  /**
   * A refused attempt, for the log: the first refusal of an address in a window is logged at
   * once, the rest as one count per address when the window ends. A flood from one address
   * makes two lines a minute, not one per attempt.
   */
  noteRefused(ip: string, why: string): void {
    this.refused++;
    const seen = this.refusals.get(ip);
    if (seen) {
      seen.count++;
      return;
    }
    if (this.refusals.size >= MAX_REFUSAL_ENTRIES) {
      this.refusedElsewhere++;
      return;
    }
    this.refusals.set(ip, { count: 1, why });
    this.opts.log.warn('login attempts refused', { ip, why, window_s: this.opts.windowMs / 1000 });
  }

  /** On every sweep tick: a new window forgets the local counts and logs the refusals. */
  private roll(now: number): void {
    const window = this.windowOf(now);
    if (window === this.window) return;
    this.window = window;
    this.local = new Map();
    for (const [ip, { count, why }] of this.refusals) {
      if (count > 1) this.opts.log.warn('login attempts refused', { ip, why, refused: count, window_s: this.opts.windowMs / 1000 });
    }
    if (this.refusedElsewhere > 0) this.opts.log.warn('login attempts refused', { ip: 'other addresses', refused: this.refusedElsewhere });
    this.refusals = new Map();
    this.refusedElsewhere = 0;
  }

  close(): void {
    this.redis?.disconnect();
  }
}

/**
 * Holds every failed login's answer until `delayMs` after the attempt began (Dovecot's
 * auth_failure_delay, for the proxy's own answers too): an unknown user, a wrong password, a
 * locked account and a refused attempt then take the same time. Answers leave on a tick of
 * the shared sweep, always, even when the delay has already passed: a slow backend and a
 * quick "no such user" end on the same tick.
 */
export class FailureDelay {
  private waiting: { due: number; resolve: () => void }[] = [];

  constructor(
    private delayMs: number,
    sweep: Sweep,
  ) {
    sweep.every(() => this.release(Date.now()));
  }

  /** A new delay (SIGHUP), for attempts that fail from now on. */
  setDelay(ms: number): void {
    this.delayMs = ms;
  }

  /** Resolves once the delay since `started` is over; at once when the delay is 0. */
  after(started: number): Promise<void> {
    if (this.delayMs === 0) return Promise.resolve();
    return new Promise((resolve) => this.waiting.push({ due: started + this.delayMs, resolve }));
  }

  get size(): number {
    return this.waiting.length;
  }

  private release(now: number): void {
    if (this.waiting.length === 0) return;
    let kept = 0;
    for (const w of this.waiting) {
      if (w.due <= now) w.resolve();
      else this.waiting[kept++] = w;
    }
    this.waiting.length = kept;
  }
}

/**
 * Counts per key (a client address) in fixed windows that the shared sweep rolls over: no
 * timer per key. The map holds only keys seen in the current window.
 */
export class WindowCounts {
  private counts = new Map<string, number>();
  private window: number;

  constructor(
    private readonly windowMs: number,
    sweep: Sweep,
  ) {
    this.window = Math.floor(Date.now() / windowMs);
    sweep.every(() => this.roll());
  }

  private roll(): void {
    const window = Math.floor(Date.now() / this.windowMs);
    if (window === this.window) return;
    this.window = window;
    this.counts = new Map();
  }

  get(key: string): number {
    this.roll();
    return this.counts.get(key) ?? 0;
  }

  /** Adds one; the count including it. */
  add(key: string): number {
    this.roll();
    const n = (this.counts.get(key) ?? 0) + 1;
    this.counts.set(key, n);
    return n;
  }
}
