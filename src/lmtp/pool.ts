import type { BackendTlsConfig } from '../config.js';
import { LmtpClient, type LmtpClientOptions } from './client.js';

const authIds = new WeakMap<object, number>();
let nextAuthId = 1;

function authId(auth: object): number {
  let id = authIds.get(auth);
  if (id === undefined) authIds.set(auth, (id = nextAuthId++));
  return id;
}

/**
 * Idle backend LMTP connections, kept for the next transaction to the same slot: the same
 * connection caching Postfix does towards us. It saves, per message, a TCP (maybe TLS)
 * handshake, the greeting and LHLO, and Dovecot the hand-over of a new connection to an
 * lmtp process.
 *
 * Only a connection whose last transaction ended cleanly (every reply after the dot read)
 * comes back here, so it is between transactions. One that the backend closed, or on which
 * the backend said something unasked (Dovecot's "421 ... inactivity") is dropped on the way
 * out; the race left over (it says so just as we send MAIL) is handled by the caller, which
 * retries once on a fresh connection when a reused one fails before MAIL was accepted.
 */
export class BackendPool {
  private readonly idle = new Map<string, { client: LmtpClient; since: number }[]>();
  private readonly timer: NodeJS.Timeout | undefined;
  private closed = false;

  constructor(
    /** How long a connection may wait unused; 0 turns pooling off. */
    private readonly idleMs: number,
    private readonly maxIdlePerBackend = 32,
  ) {
    if (idleMs > 0) {
      this.timer = setInterval(() => this.sweep(), Math.max(250, Math.floor(idleMs / 2)));
      this.timer.unref();
    }
  }

  static key(opts: LmtpClientOptions): string {
    const t: BackendTlsConfig = opts.tls;
    // The credentials we authenticated with are part of what a connection is: never lend it
    // to another identity (nor to a group whose admin password differs). Numbered per
    // credentials object, which lives as long as its config: no secret goes into the key.
    return [opts.host, opts.port, t.mode, t.servername ?? '', t.ca ?? '', t.verify, opts.auth ? authId(opts.auth) : ''].join('\0');
  }

  /** An idle connection to that backend if there is a usable one, else a new one. */
  async acquire(opts: LmtpClientOptions, fresh = false): Promise<{ client: LmtpClient; reused: boolean }> {
    const list = fresh ? undefined : this.idle.get(BackendPool.key(opts));
    while (list && list.length > 0) {
      const e = list.pop()!;
      if (e.client.reusable && Date.now() - e.since < this.idleMs) return { client: e.client, reused: true };
      e.client.quit();
    }
    return { client: await LmtpClient.connect(opts), reused: false };
  }

  /** Hands a connection back after a clean transaction; it is closed if it cannot be kept. */
  release(opts: LmtpClientOptions, client: LmtpClient): void {
    if (this.closed || this.idleMs <= 0 || !client.reusable) {
      client.quit();
      return;
    }
    const key = BackendPool.key(opts);
    let list = this.idle.get(key);
    if (!list) this.idle.set(key, (list = []));
    if (list.length >= this.maxIdlePerBackend) {
      client.quit();
      return;
    }
    list.push({ client, since: Date.now() });
  }

  get size(): number {
    let n = 0;
    for (const l of this.idle.values()) n += l.length;
    return n;
  }

  private sweep(): void {
    const now = Date.now();
    for (const [key, list] of this.idle) {
      const keep = list.filter((e) => {
        const ok = e.client.reusable && now - e.since < this.idleMs;
        if (!ok) e.client.quit();
        return ok;
      });
      if (keep.length) this.idle.set(key, keep);
      else this.idle.delete(key);
    }
  }

  close(): void {
    this.closed = true;
    clearInterval(this.timer);
    for (const list of this.idle.values()) for (const e of list) e.client.quit();
    this.idle.clear();
  }
}
