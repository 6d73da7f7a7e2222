import { identityFor } from '../auth/identity.js';
import { BackendRefused, backendTlsFor } from '../net/backend.js';
import type { ProxyContext } from '../session/core.js';
import type { LiveSession } from '../session/registry.js';
import { newSessionId, type SessionInfo } from '../session/session-info.js';
import type { ClientInfo } from '../net/client-info.js';
import { LookupFailure, type Route } from '../lookup/model.js';
import { withDetail } from './address.js';
import { RoutingLoop, type LmtpClient, type LmtpClientOptions } from './client.js';
import type { BackendPool } from './pool.js';
import type { LmtpTransaction } from '../session/core.js';
import { isPositive, reply, replyText, type Reply } from './reply.js';

/**
 * One mail transaction's fan-out: one backend LMTP transaction per slot involved, the
 * message streamed to all of them at once, one real reply per recipient at the end.
 *
 * Design choice (issue #4): the backend transactions are opened at DATA time, not at RCPT
 * time. The client's RCPT gets its answer from the lookup alone; a backend's own refusal of
 * a recipient (Dovecot's 550 for a user its userdb lacks, a quota check) becomes that
 * recipient's reply after the final dot. That keeps RCPT fast (no backend round trip per
 * recipient), never holds backend connections open for a client that may never send DATA,
 * and is still exact: LMTP has a reply per recipient after DATA precisely for this.
 *
 * What is never done: sending the terminating dot to a backend before the client's own dot
 * arrived. A client that goes away, a message over the size limit, a route that changed
 * mid-way: the backend connection is dropped without the dot, and the backend discards the
 * partial message. Only a dot we sent can have made the backend deliver.
 */

export interface Recipient {
  /** As the client wrote it (used in our own reply texts). */
  address: string;
  /** Normal form used for the lookup (without +detail when the full address was unknown). */
  login: string;
  /** The +detail split off for the lookup, to be put back for the backend. */
  detail?: string;
  /** The route found at RCPT time. */
  route: Route;
  /** RCPT parameters to pass on (e.g. IGNOREQUOTA), to each backend that announced them. */
  params?: readonly string[];
}

/** The mailbox the backend is given: its own name for the user, with the client's +detail. */
export function backendAddress(route: Route, detail: string | undefined): string {
  return detail === undefined ? route.backendLogin : withDetail(route.backendLogin, detail);
}

export interface DeliveryEnvelope {
  /** Reverse path ("" for the null sender). */
  from: string;
  size?: number;
  body8bit: boolean;
}

export interface DeliverySettings {
  timeoutMs: number;
  /** Our name in LHLO to the backends. */
  hostname: string;
  pool: BackendPool;
}

/** The reply for a recipient whose route could not be found (RCPT time or DATA time). */
export function lookupFailureReply(e: LookupFailure, address: string): Reply {
  switch (e.kind) {
    case 'unknown-user':
      return reply(550, '5.1.1', `<${address}> User unknown`);
    case 'locked':
      return reply(451, '4.2.1', `<${address}> Mailbox temporarily locked for maintenance, try again later`);
    default:
      return reply(451, '4.3.0', `<${address}> Mailbox temporarily unavailable, try again later`);
  }
}

type LegState = 'opening' | 'streaming' | 'ending' | 'done' | 'failed';

interface LegRecipient {
  rcpt: Recipient;
  /** Index into the Delivery's recipient list. */
  index: number;
  mailbox: string;
}

/**
 * A MAIL refusal that is about the message, not the backend: its size. That one is the
 * sender's answer as it is; any other refusal of a sender we accepted (Cyrus's 430 when it
 * wants AUTH, a backend in trouble) is the backend's failure, and the recipients wait.
 */
function refusesMessageSize(r: Reply): boolean {
  return r.code === 552 && (r.enhanced === '5.3.4' || r.enhanced === '5.2.3');
}

/** One backend LMTP transaction: the recipients of one slot. */
class Leg implements LmtpTransaction {
  state: LegState = 'opening';
  client: LmtpClient | undefined;
  /** Recipients the backend accepted at RCPT, in the order they were sent. */
  accepted: LegRecipient[] = [];
  needsDrain = false;
  private readonly sessions: LiveSession[] = [];
  private opts: LmtpClientOptions | undefined;
  private unsubscribe: (() => void) | undefined;

  constructor(
    readonly d: Delivery,
    readonly route: Route,
    readonly recipients: LegRecipient[],
  ) {}

  private get ctx(): ProxyContext {
    return this.d.ctx;
  }

  async open(): Promise<void> {
    const { ctx, route } = this;
    const port = route.ports.lmtp;
    // Counted until its last reply (or failure), whatever an event says meanwhile: a fence
    // waits for a transaction past its dot to finish on the old master.
    ctx.lmtpTransactions.add(this);
    // Registered from the start: a failover event that moves one of these users while we
    // talk to the old master aborts this leg (451, Postfix retries against the new one).
    for (const r of this.recipients) {
      const s: LiveSession = { protocol: 'lmtp', route: r.rcpt.route, info: this.d.info, bytesUp: 0, bytesDown: 0, end: (why) => this.routeChanged(why) };
      this.sessions.push(s);
      ctx.registry.add(s);
    }
    if (!port) {
      this.fail(new Error(`slot ${route.slot} has no lmtp port`), 'unreachable');
      return;
    }
    this.opts = {
      host: route.host,
      port,
      connectTimeoutMs: ctx.backend.connect_timeout_ms,
      timeoutMs: this.d.settings.timeoutMs,
      tls: backendTlsFor(ctx.backend, route.slot, 'lmtp'),
      lhlo: this.d.settings.hostname,
      ownListeners: ctx.ownListeners,
    };
    try {
      // Inside the try: an admin password file that cannot be read fails this leg (451), not the session.
      const admin = identityFor(ctx.backend, route.slot).admin;
      if (admin) this.opts.auth = admin;
      const { from, size, body8bit } = this.d.envelope;
      const mailboxes = this.recipients.map((r) => (r.rcpt.params ? { mailbox: r.mailbox, params: r.rcpt.params } : { mailbox: r.mailbox }));
      const envOpts = { ...(size === undefined ? {} : { size }), body8bit };
      let env: Awaited<ReturnType<LmtpClient['envelope']>>;
      // The slot's bound on backend logins covers LMTP's: connect, LHLO, AUTH, the envelope.
      const placed = ctx.slotLogins.acquire(route.slot);
      if (placed !== true && !(placed !== false && (await placed))) {
        this.fail(new Error(`slot ${route.slot} busy: too many backend logins at once (backend.logins_per_slot)`), 'busy', false);
        return;
      }
      try {
        const answered = await this.envelope(from, mailboxes, envOpts);
        if (!answered) return;
        env = answered;
      } finally {
        ctx.slotLogins.release(route.slot);
      }
      const client = this.client;
      if (!client) return;
      this.unsubscribe = client.onFailure((e) => this.fail(e, 'lost'));
      if (!isPositive(env.mail)) {
        if (refusesMessageSize(env.mail)) {
          for (const r of this.recipients) this.d.settle(r.index, passThrough(env.mail));
        } else {
          // Never passed on as it is: a 430 would have Postfix retry for ever with nothing
          // counted, a 5xx would bounce mail for a backend's own trouble.
          this.d.totals.backendMailRefusals++;
          this.noteFailure(new Error(`MAIL refused: ${replyText(env.mail)}`));
          for (const r of this.recipients) this.d.settle(r.index, tempFail(r.rcpt.address, 'refused'));
        }
        this.finishQuietly();
        return;
      }
      this.recipients.forEach((r, i) => {
        const rr = env.rcpts[i];
        if (rr && isPositive(rr)) this.accepted.push(r);
        else this.d.settle(r.index, rr ? passThrough(rr) : tempFail(r.rcpt.address, 'lost'));
      });
      if (this.accepted.length === 0) {
        this.finishQuietly();
        return;
      }
      const data = await client.data();
      if (data.code !== 354) {
        for (const r of this.accepted) this.d.settle(r.index, passThrough(data));
        this.finishQuietly();
        return;
      }
      if (this.state === 'opening') this.state = 'streaming';
    } catch (e) {
      this.fail(e as Error, e instanceof BackendRefused ? 'unreachable' : 'lost');
    }
  }

  /**
   * A backend connection (pooled, else new) and its answer to MAIL and the RCPTs; undefined
   * when the leg ended meanwhile. A pooled connection the backend was just closing is
   * replaced by a fresh one, once.
   */
  private async envelope(...args: Parameters<LmtpClient['envelope']>): Promise<Awaited<ReturnType<LmtpClient['envelope']>> | undefined> {
    for (let attempt = 0; ; attempt++) {
      const { client, reused } = await this.d.settings.pool.acquire(this.opts!, attempt > 0);
      if (this.state !== 'opening') {
        client.destroy();
        return undefined;
      }
      this.client = client;
      try {
        const env = await client.envelope(...args);
        // A pooled connection the backend was just closing ("421 ... inactivity").
        if (reused && env.mail.code === 421) throw new Error(`reused connection: ${replyText(env.mail)}`);
        return env;
      } catch (e) {
        // Nothing was accepted on a stale pooled connection: one more try on a fresh one.
        client.destroy();
        this.client = undefined;
        if (!reused || attempt > 0 || this.state !== 'opening') throw e;
      }
    }
  }

  /** An event changed a route this leg delivers on. After the dot it is too late to matter. */
  private routeChanged(why: string): void {
    if (this.state === 'opening' || this.state === 'streaming') {
      this.ctx.log.info('lmtp transaction abandoned, route changed', { slot: this.route.slot, why });
      this.fail(new Error(`route changed: ${why}`), 'moved', false);
    }
  }

  write(chunk: Buffer): void {
    if (this.state !== 'streaming' || !this.client) return;
    try {
      this.needsDrain = !this.client.write(chunk);
    } catch (e) {
      this.fail(e as Error, 'lost');
    }
  }

  async drained(): Promise<void> {
    if (this.state !== 'streaming' || !this.needsDrain || !this.client) return;
    try {
      await this.client.drained();
      this.needsDrain = false;
    } catch (e) {
      this.fail(e as Error, 'lost');
    }
  }

  /** Sends the dot and collects one reply per accepted recipient. */
  async end(): Promise<void> {
    if (this.state !== 'streaming' || !this.client) return;
    this.state = 'ending';
    const { replies, error } = await this.client.endData(this.accepted.length);
    this.accepted.forEach((r, i) => {
      const rr = replies[i];
      // No reply: the backend may or may not have stored it. 451 makes Postfix retry, which
      // at worst delivers a duplicate; a 250 here could lose the message.
      this.d.settle(r.index, rr ? passThrough(rr) : tempFail(r.rcpt.address, 'unconfirmed'));
    });
    if (error) {
      this.noteFailure(error);
      this.state = 'failed';
      this.client.destroy();
      this.unregister();
      return;
    }
    // A clean end: the connection is between transactions and can serve the next one.
    this.state = 'done';
    this.unsubscribe?.();
    this.d.settings.pool.release(this.opts!, this.client);
    this.unregister();
  }

  /** Drops the backend connection (no dot sent); every recipient without an answer gets a 451. */
  fail(e: Error, why: FailWhy, backendsFault = true): void {
    // After the dot, end() owns the outcome: it settles the replies that did arrive first.
    if (this.state === 'done' || this.state === 'failed' || this.state === 'ending') return;
    this.state = 'failed';
    this.client?.destroy();
    if (backendsFault) this.noteFailure(e);
    for (const r of this.recipients) this.d.settle(r.index, tempFail(r.rcpt.address, why));
    this.unregister();
  }

  private noteFailure(e: Error): void {
    this.d.totals.backendFailures++;
    this.ctx.meters.backendFailures.inc({ slot: this.route.slot, reason: e instanceof RoutingLoop ? 'loop' : 'lmtp' });
    if (e instanceof RoutingLoop) this.ctx.log.error('routing loop: slot points at this proxy', { slot: this.route.slot, host: this.route.host, port: this.route.ports.lmtp, protocol: 'lmtp' });
    this.ctx.log.warn('lmtp backend failed', {
      slot: this.route.slot,
      host: this.route.host,
      port: this.route.ports.lmtp,
      recipients: this.recipients.length,
      error: e.message,
    });
  }

  private finishQuietly(): void {
    if (this.state === 'failed' || this.state === 'done') return;
    this.state = 'done';
    this.client?.quit();
    this.unregister();
  }

  private unregister(): void {
    for (const s of this.sessions.splice(0)) this.ctx.registry.remove(s);
    this.ctx.lmtpTransactions.delete(this);
  }

  get slot(): string {
    return this.route.slot;
  }

  get stores(): string[] {
    return [...new Set(this.recipients.map((r) => r.rcpt.route.store))];
  }

  /** Any route this leg holds that an event made wrong while it was being opened. */
  stale(): boolean {
    return this.recipients.some((r) => !this.ctx.router.stillValid(r.rcpt.route, 'lmtp'));
  }
}

type FailWhy = 'unreachable' | 'lost' | 'unconfirmed' | 'moved' | 'refused' | 'busy';

function tempFail(address: string, why: FailWhy): Reply {
  switch (why) {
    case 'unreachable':
      return reply(451, '4.4.1', `<${address}> Mail store not reachable, try again later`);
    case 'moved':
      return reply(451, '4.3.0', `<${address}> Mailbox is being moved, try again later`);
    case 'refused':
      return reply(451, '4.3.0', `<${address}> Mail store refused the transaction, try again later`);
    case 'busy':
      return reply(451, '4.3.2', `<${address}> Mail store busy, try again later`);
    case 'unconfirmed':
      return reply(451, '4.4.2', `<${address}> Mail store did not confirm delivery, try again later`);
    default:
      return reply(451, '4.4.2', `<${address}> Connection to mail store failed, try again later`);
  }
}

/** A backend's reply, as the client gets it: same code and enhanced code, same text. */
function passThrough(r: Reply): Reply {
  return r.enhanced === undefined ? { code: r.code, lines: r.lines } : { code: r.code, enhanced: r.enhanced, lines: r.lines };
}

export interface DeliveryCounters {
  backendFailures: number;
  /** Backend transactions whose MAIL was refused (also counted in backendFailures). */
  backendMailRefusals: number;
}

export class Delivery {
  private readonly results: (Reply | undefined)[];
  private legs: Leg[] = [];

  constructor(
    readonly ctx: ProxyContext,
    readonly settings: DeliverySettings,
    readonly envelope: DeliveryEnvelope,
    readonly recipients: Recipient[],
    readonly totals: DeliveryCounters,
    client: ClientInfo,
  ) {
    this.results = recipients.map(() => undefined);
    this.info = { id: newSessionId(), started: Date.now(), ip: client.transport === 'tcp' ? client.address : '', port: client.port, listener: client.listener, tls: client.tls?.version ?? 'none' };
  }

  /** What the session registry shows of this delivery's legs. */
  readonly info: SessionInfo;

  /** Records a recipient's final reply; the first one stands unless `overwrite`. */
  settle(index: number, r: Reply, overwrite = false): void {
    if (this.results[index] === undefined || overwrite) this.results[index] = r;
  }

  /**
   * Finds each recipient's current route (a failover may have happened since RCPT), then
   * opens one backend transaction per slot, up to the backend's 354. Never throws: a
   * recipient that cannot be delivered to has its reply settled instead.
   */
  async open(): Promise<void> {
    const groups = new Map<string, { route: Route; recipients: LegRecipient[]; seen: Set<string> }>();
    await Promise.all(
      this.recipients.map(async (rcpt, index) => {
        let route: Route;
        try {
          route = await this.ctx.router.resolve(rcpt.login);
        } catch (e) {
          if (!(e instanceof LookupFailure)) throw e;
          this.settle(index, lookupFailureReply(e, rcpt.address));
          return;
        }
        rcpt.route = route;
        const key = `${route.slot}\0${route.host}\0${route.ports.lmtp ?? ''}`;
        let g = groups.get(key);
        if (!g) groups.set(key, (g = { route, recipients: [], seen: new Set() }));
        g.recipients.push({ rcpt, index, mailbox: backendAddress(route, rcpt.detail) });
      }),
    );
    // Keep RCPT order within each backend transaction.
    for (const g of groups.values()) g.recipients.sort((a, b) => a.index - b.index);
    this.legs = [...groups.values()].map((g) => new Leg(this, g.route, g.recipients));
    await Promise.all(this.legs.map((l) => l.open()));
    // An event that arrived while a leg was opening found it registered and failed it; one
    // that was applied between our resolve and the registration is caught here.
    for (const l of this.legs) if (l.stale()) l.fail(new Error('route changed while opening'), 'moved', false);
  }

  /** Whether any backend still waits for the message. */
  get streaming(): boolean {
    return this.legs.some((l) => l.state === 'streaming');
  }

  /** Writes content to every live backend; false when one of them needs to drain first. */
  write(chunk: Buffer): boolean {
    let ok = true;
    for (const l of this.legs) {
      l.write(chunk);
      if (l.state === 'streaming' && l.needsDrain) ok = false;
    }
    return ok;
  }

  /** Resolves when every live backend has drained (or failed, or timed out and failed). */
  async drained(): Promise<void> {
    await Promise.all(this.legs.map((l) => l.drained()));
  }

  /** Abandons the message on every backend (client gone, message too big): no dot is sent. */
  abort(reason: string): void {
    for (const l of this.legs) if (l.state === 'opening' || l.state === 'streaming') l.fail(new Error(reason), 'lost', false);
  }

  /** Ends the message on every live backend; one reply per recipient, in the given order. */
  async finish(): Promise<Reply[]> {
    await Promise.all(this.legs.map((l) => l.end()));
    return this.results.map((r, i) => r ?? tempFail(this.recipients[i]!.address, 'lost'));
  }

  /** For logs: the backend replies as text. */
  static describe(replies: Reply[]): string {
    return replies.map(replyText).join('; ');
  }
}
