import type { Socket } from 'node:net';
import type { Config } from '../config.js';
import { LookupFailure, type Route } from '../lookup/model.js';
import type { LoginResult, ProxyContext } from '../session/core.js';
import { peerText, type ClientInfo } from '../net/client-info.js';
import { canonicalRecipient, parsePathArgument, splitDetail } from './address.js';
import type { WindowCounts } from '../session/throttle.js';
import { Delivery, lookupFailureReply, type Recipient } from './delivery.js';
import { DotDecoder } from './dot.js';
import type { LmtpTotals, RcptResult } from './metrics.js';
import type { BackendPool } from './pool.js';
import { formatReply, reply, type Reply } from './reply.js';

/**
 * One LMTP client connection (RFC 2033): the command dialogue, the lookup of every RCPT, and
 * the DATA phase handed to a Delivery. Commands are handled strictly one after another, in
 * the order received, so replies to pipelined commands (RFC 2920) come out in order by
 * construction. Input is read into a small buffer that pauses the socket when full: a client
 * that pipelines without reading our replies is held back by TCP, not by our memory.
 */

export interface LmtpEnv {
  ctx: ProxyContext;
  cfg: Config['lmtp'];
  totals: LmtpTotals;
  pool: BackendPool;
  /** Per client address and minute, shared by the listener's connections. */
  perIp: { rcpts: WindowCounts; unknown: WindowCounts };
}

/** A RCPT that got 250: it will get exactly one reply after DATA. */
interface AcceptedRcpt {
  /** Index into `Transaction.unique`, whose delivery result this recipient shares. */
  unique: number;
}

interface Transaction {
  from: string;
  size?: number;
  body8bit: boolean;
  /** One entry per 250 given to RCPT, in order: LMTP owes one reply for each. */
  accepted: AcceptedRcpt[];
  /** Distinct backend recipients; a repeated RCPT is delivered once and answered twice. */
  unique: Recipient[];
  byKey: Map<string, number>;
}

class ClientGone extends Error {}

const EMPTY = Buffer.alloc(0);
/** Unread input we hold before pausing the socket. */
const INPUT_HIGH_WATER = 64 * 1024;

const BAD_SEQUENCE = (text: string) => reply(503, '5.5.1', text);

/**
 * RCPT parameters we offer in LHLO and pass on (keyword only, no value). IGNOREQUOTA is
 * Cyrus's: deliver even over quota. Passed to every backend of the transaction that
 * announced it, and left off for one that did not (Dovecot's LMTP): that backend then
 * applies its quota, and an over-quota mailbox gets its own 452/552, so nothing is lost and
 * no other recipient's delivery depends on it.
 */
const RCPT_PARAMS: readonly string[] = ['IGNOREQUOTA'];

export class LmtpSession {
  private buf: Buffer = EMPTY;
  private ended = false;
  private closed = false;
  /** Set while we wait for client input; resolved by data, end or close. */
  private wake: (() => void) | undefined;
  private waitingForClient = false;
  /** Set while we wait for the client to read our replies. */
  private drainWaiter: (() => void) | undefined;
  private unreadAtLastTick = Infinity;
  private corked = false;
  private readonly idle: NodeJS.Timeout;
  private lhlo = false;
  private tx: Transaction | undefined;
  private badCommands = 0;
  /** Whether a DATA phase is under way (the server's shutdown waits for it). */
  busy = false;
  private shutdownRequested = false;
  readonly done: Promise<void>;
  /**
   * The transaction deadline (lmtp.transaction_timeout_ms): from the connection, then from
   * the end of each transaction. The listener checks it on the shared sweep's tick. The
   * idle timer only sees silence; this one ends a client that trickles a byte at a time.
   */
  deadline: number;

  /** `address:port` for logs, `unix` on a unix socket. */
  private readonly peer: string;
  /** The client's address on TCP; undefined on a unix socket (not limited per address). */
  private readonly ip: string | undefined;

  constructor(
    private readonly socket: Socket,
    private readonly env: LmtpEnv,
    /** Who this is, as the accept pipeline found it (a PROXY header's address, TLS facts). */
    readonly client: ClientInfo,
  ) {
    this.peer = peerText(client);
    this.ip = client.transport === 'tcp' ? client.address : undefined;
    this.deadline = Date.now() + env.cfg.transaction_timeout_ms;
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onClose);
    socket.on('error', () => this.onClose());
    // A TLS client that hung up right after its handshake: its 'close' came before we were
    // handed the socket, and would otherwise keep this session (and a shutdown) waiting.
    if (socket.destroyed) this.closed = this.ended = true;
    // The accept pipeline may hand the socket over paused (it read a PROXY header from it).
    socket.resume();
    // One timer per connection, refreshed on input: cheaper than a timer per read.
    this.idle = setTimeout(this.onIdle, env.cfg.timeout_ms);
    this.idle.unref();
    this.done = this.run().catch((e: unknown) => {
      if (!(e instanceof ClientGone)) this.env.ctx.log.error('lmtp session failed', { peer: this.peer, error: (e as Error).message });
    }).finally(() => this.close());
  }

  private get ctx(): ProxyContext {
    return this.env.ctx;
  }

  // ---- input -------------------------------------------------------------------------

  private readonly onData = (chunk: Buffer): void => {
    this.idle.refresh();
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    if (this.buf.length >= INPUT_HIGH_WATER) this.socket.pause();
    this.wakeUp();
  };

  private readonly onEnd = (): void => {
    this.ended = true;
    this.wakeUp();
  };

  private readonly onClose = (): void => {
    this.closed = true;
    this.ended = true;
    this.wakeUp();
  };

  private readonly onIdle = (): void => {
    if (this.closed) return;
    // Waiting for the client to read our replies: it is idle only if it read nothing since.
    const unread = this.socket.writableLength;
    const reading = this.drainWaiter !== undefined && unread < this.unreadAtLastTick;
    this.unreadAtLastTick = unread;
    if (!this.waitingForClient || reading) {
      // We are the slow side (a backend is working): the client is not idle.
      this.idle.refresh();
      return;
    }
    this.write(reply(421, '4.4.2', `${this.env.cfg.hostname} Timeout, closing connection`));
    this.close();
  };

  /** Past the deadline: called from the listener's sweep tick. */
  expire(): void {
    if (this.closed) return;
    if (!this.waitingForClient) {
      // We are the slow side (a backend is working, under its own timeouts): look again on
      // the next tick rather than drop replies a delivery may still produce.
      this.deadline = Date.now() + 1000;
      return;
    }
    this.ctx.log.info('lmtp transaction deadline', { peer: this.peer, limit_ms: this.env.cfg.transaction_timeout_ms });
    this.write(reply(421, '4.4.2', `${this.env.cfg.hostname} Transaction took too long, closing connection`));
    this.close();
  }

  private wakeUp(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /**
   * Waits for more input; throws ClientGone when there will be none. A client that pipelines
   * without reading our replies is not read from until it has taken them (the idle timeout
   * applies to that wait as well), so unread replies cannot pile up in our memory either.
   */
  private async more(): Promise<void> {
    if (this.closed || this.ended) throw new ClientGone();
    this.waitingForClient = true;
    this.idle.refresh();
    try {
      if (this.socket.writableNeedDrain) {
        this.socket.pause();
        await new Promise<void>((resolve) => {
          const done = () => {
            this.socket.off('drain', done);
            this.socket.off('close', done);
            this.drainWaiter = undefined;
            resolve();
          };
          this.socket.on('drain', done);
          this.socket.on('close', done);
          this.drainWaiter = done;
        });
        if (this.closed) throw new ClientGone();
      }
      this.socket.resume();
      await new Promise<void>((resolve) => (this.wake = resolve));
    } finally {
      this.waitingForClient = false;
    }
    if (this.closed) throw new ClientGone();
  }

  /**
   * The next command line (without CRLF). A line longer than the limit is answered with
   * 500 and skipped up to its end, so one bad line does not end the connection.
   */
  private async nextLine(): Promise<string | undefined> {
    const max = this.ctx.limits.line_length;
    let skipping = false;
    for (;;) {
      const nl = this.buf.indexOf(10);
      if (nl >= 0) {
        const line = this.buf.subarray(0, nl > 0 && this.buf[nl - 1] === 13 ? nl - 1 : nl);
        this.buf = this.buf.subarray(nl + 1);
        if (skipping || line.length > max) return undefined;
        return line.toString('latin1');
      }
      if (this.buf.length > max) {
        skipping = true;
        this.buf = EMPTY;
      }
      if (this.ended && this.buf.length === 0) throw new ClientGone();
      if (this.ended) {
        // A last line without CRLF before the client's FIN: treat it as a line.
        const line = this.buf.toString('latin1');
        this.buf = EMPTY;
        return skipping ? undefined : line;
      }
      await this.more();
    }
  }

  /**
   * Replies written in one turn of the event loop (answers to pipelined commands, the
   * per-recipient replies after DATA) leave in one segment: corked here, uncorked once the
   * loop has run everything that was ready.
   */
  private write(r: Reply, enhanced = true): void {
    if (this.closed || !this.socket.writable) return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    this.socket.write(formatReply(r, enhanced));
  }

  // ---- the dialogue --------------------------------------------------------------------

  private async run(): Promise<void> {
    this.env.totals.connections++;
    try {
      this.write(reply(220, undefined, `${this.env.cfg.hostname} LMTP mailsplice ready`), false);
      for (;;) {
        if (this.shutdownRequested) {
          this.write(reply(421, '4.3.2', `${this.env.cfg.hostname} Service shutting down, try again later`));
          return;
        }
        const line = await this.nextLine();
        if (line === undefined) {
          this.write(reply(500, '5.5.2', 'Line too long'));
          if (!this.countBad()) return;
          continue;
        }
        if (!(await this.command(line))) return;
      }
    } finally {
      this.env.totals.connections--;
    }
  }

  private countBad(): boolean {
    if (++this.badCommands < this.ctx.limits.bad_commands) return true;
    this.write(reply(421, '4.7.0', `${this.env.cfg.hostname} Too many errors, closing connection`));
    return false;
  }

  /** Handles one command; false when the connection is to end. */
  private async command(line: string): Promise<boolean> {
    const sp = line.indexOf(' ');
    const verb = (sp < 0 ? line : line.slice(0, sp)).toUpperCase();
    const arg = sp < 0 ? '' : line.slice(sp + 1);
    switch (verb) {
      case 'LHLO':
        return this.onLhlo(arg.trim());
      case 'MAIL':
        return this.answer(this.onMail(arg));
      case 'RCPT':
        return this.answer(await this.onRcpt(arg));
      case 'DATA':
        return this.onDataCommand(arg);
      case 'RSET':
        this.tx = undefined;
        return this.answer(reply(250, '2.0.0', 'OK'));
      case 'NOOP':
        return this.answer(reply(250, '2.0.0', 'OK'));
      case 'QUIT':
        this.write(reply(221, '2.0.0', `${this.env.cfg.hostname} Bye`));
        return false;
      case 'VRFY':
      case 'EXPN':
        // Off: it would tell anyone who can connect which addresses exist.
        return this.answer(reply(502, '5.5.1', `${verb} command is disabled`));
      case 'HELO':
      case 'EHLO':
        return this.answer(reply(500, '5.5.1', 'This is LMTP: say LHLO'));
      default:
        return this.answer(reply(500, '5.5.1', 'Unknown command'));
    }
  }

  /** Writes the reply; unknown commands and syntax errors count towards limits.bad_commands. */
  private answer(r: Reply): boolean {
    this.write(r);
    if (r.code === 500 || r.code === 501) return this.countBad();
    return true;
  }

  private onLhlo(arg: string): boolean {
    if (arg === '' || /\s/.test(arg)) return this.answer(reply(501, '5.5.4', 'Syntax: LHLO hostname'));
    this.lhlo = true;
    this.tx = undefined;
    // Not offered: SMTPUTF8, because the backends (Dovecot 2.3) do not offer it and we could
    // not pass it on; CHUNKING (BDAT), because Postfix's LMTP client never uses it, so DATA
    // is the one path to get right. DSN is not offered either: no NOTIFY/ORCPT to pass on.
    // IGNOREQUOTA (Cyrus) is: it goes to each backend that announced it, and is left off
    // for one that did not, which then applies its quota as usual (see RCPT_PARAMS).
    const caps = ['PIPELINING', 'ENHANCEDSTATUSCODES', '8BITMIME', `SIZE ${this.env.cfg.max_message_size}`, ...RCPT_PARAMS];
    this.write(reply(250, undefined, this.env.cfg.hostname, ...caps), false);
    return true;
  }

  private onMail(arg: string): Reply {
    if (!this.lhlo) return BAD_SEQUENCE('Send LHLO first');
    if (this.tx) return BAD_SEQUENCE('Nested MAIL command');
    const p = parsePathArgument(arg, 'FROM');
    if (typeof p === 'string') return reply(501, '5.1.7', `Bad sender address syntax: ${p}`);
    let size: number | undefined;
    let body8bit = false;
    for (const [key, value] of p.params) {
      if (key === 'SIZE') {
        if (typeof value !== 'string' || !/^\d{1,20}$/.test(value)) return reply(501, '5.5.4', 'Bad SIZE parameter');
        size = Number(value);
        if (size > this.env.cfg.max_message_size) {
          return reply(552, '5.3.4', `Message size exceeds fixed limit of ${this.env.cfg.max_message_size} bytes`);
        }
      } else if (key === 'BODY') {
        if (typeof value !== 'string' || !/^(7BIT|8BITMIME)$/i.test(value)) return reply(501, '5.5.4', 'BODY must be 7BIT or 8BITMIME');
        body8bit = value.toUpperCase() === '8BITMIME';
      } else {
        return reply(555, '5.5.4', `Unsupported parameter ${key}`);
      }
    }
    this.tx = { from: p.address, body8bit, accepted: [], unique: [], byKey: new Map(), ...(size === undefined ? {} : { size }) };
    return reply(250, '2.1.0', 'Sender OK');
  }

  private count(result: RcptResult): void {
    this.env.totals.rcpt[result]++;
    const login: Record<RcptResult, LoginResult | undefined> = {
      accepted: 'ok',
      unknown: 'auth-failed',
      locked: 'locked',
      unavailable: 'unavailable',
      refused: undefined,
    };
    const l = login[result];
    if (l) this.ctx.counters.logins.lmtp[l]++;
  }

  private async onRcpt(arg: string): Promise<Reply> {
    const tx = this.tx;
    if (!tx) return BAD_SEQUENCE('Need MAIL command');
    const p = parsePathArgument(arg, 'TO');
    const canonical = typeof p === 'string' ? undefined : this.recipient(p.address);
    if (typeof p === 'string' || canonical === undefined) {
      this.count('refused');
      return reply(501, '5.1.3', `Bad recipient address syntax${typeof p === 'string' ? `: ${p}` : ''}`);
    }
    const params: string[] = [];
    for (const [key, value] of p.params) {
      if (!RCPT_PARAMS.includes(key)) {
        this.count('refused');
        return reply(555, '5.5.4', `Unsupported parameter ${key}`);
      }
      if (value !== true) {
        this.count('refused');
        return reply(501, '5.5.4', `${key} takes no value`);
      }
      params.push(key);
    }
    if (tx.accepted.length >= this.env.cfg.max_recipients) {
      this.count('refused');
      return reply(452, '4.5.3', 'Too many recipients');
    }
    const address = canonical;
    const limited = this.rateLimited(address);
    if (limited) {
      this.count('refused');
      return limited;
    }
    let found: { route: Route; login: string; detail?: string };
    try {
      found = await this.lookup(address);
    } catch (e) {
      if (!(e instanceof LookupFailure)) throw e;
      if (e.kind === 'unknown-user' && this.ip !== undefined) this.env.perIp.unknown.add(this.ip);
      this.count(e.kind === 'unknown-user' ? 'unknown' : e.kind === 'locked' ? 'locked' : 'unavailable');
      this.ctx.log[e.kind === 'unavailable' ? 'warn' : 'info']('lmtp rcpt refused', { rcpt: address, why: e.message, peer: this.peer });
      return lookupFailureReply(e, address);
    }
    if (!found.route.ports.lmtp) {
      this.count('unavailable');
      this.ctx.log.warn('lmtp rcpt refused', { rcpt: address, why: `slot ${found.route.slot} has no lmtp port`, peer: this.peer });
      return reply(451, '4.3.0', `<${address}> Mailbox temporarily unavailable, try again later`);
    }
    // Repeated recipients: same user, same detail -> one delivery, one reply per RCPT.
    const key = `${found.login}\0${found.detail ?? ''}`;
    let unique = tx.byKey.get(key);
    if (unique === undefined) {
      unique = tx.unique.push({ address, login: found.login, route: found.route, ...(found.detail === undefined ? {} : { detail: found.detail }) }) - 1;
      tx.byKey.set(key, unique);
    }
    // One delivery for a repeated recipient: it carries every parameter any of its RCPTs gave.
    if (params.length) {
      const u = tx.unique[unique]!;
      u.params = [...new Set([...(u.params ?? []), ...params])];
    }
    tx.accepted.push({ unique });
    this.count('accepted');
    return reply(250, '2.1.5', `<${address}> Recipient OK`);
  }

  /**
   * The recipient in canonical form (see canonicalRecipient), or undefined when it is not a
   * mailbox. A bare name gets lookup.default_domain when one is set, as logins do (README,
   * "Logins: the normal form"); without one it stays a syntax error.
   */
  private recipient(address: string): string | undefined {
    if (!address.includes('@') && address.toLowerCase() !== 'postmaster') {
      const qualified = this.ctx.router.normalize(address);
      return qualified.includes('@') && address !== '' ? canonicalRecipient(qualified) : undefined;
    }
    return canonicalRecipient(address);
  }

  /**
   * The per-address limits on RCPT (TCP clients only). Past the unknown-recipient limit every
   * RCPT gets the same 450, known or not, so that probing tells nothing more this minute.
   * The first refusal per address and limit is logged, not each one.
   */
  private rateLimited(address: string): Reply | undefined {
    const ip = this.ip;
    if (ip === undefined) return undefined;
    const { cfg, perIp } = this.env;
    const unknown = perIp.unknown.get(ip);
    if (unknown >= cfg.unknown_recipients_per_ip_per_minute) {
      if (unknown === cfg.unknown_recipients_per_ip_per_minute) {
        perIp.unknown.add(ip); // past the limit now: the next refusal is not logged again
        this.ctx.log.warn('lmtp recipients refused', { ip, why: 'too many unknown recipients', limit_per_minute: cfg.unknown_recipients_per_ip_per_minute });
      }
      return reply(450, '4.7.1', `<${address}> Too many unknown recipients from your address, try again later`);
    }
    const n = perIp.rcpts.add(ip);
    if (n > cfg.recipients_per_ip_per_minute) {
      if (n === cfg.recipients_per_ip_per_minute + 1) {
        this.ctx.log.warn('lmtp recipients refused', { ip, why: 'too many recipients', limit_per_minute: cfg.recipients_per_ip_per_minute });
      }
      return reply(452, '4.5.3', `<${address}> Too many recipients from your address, try again later`);
    }
    return undefined;
  }

  /**
   * The whole address is looked up first (it may be a user of its own); only if that user is
   * unknown and the local part has a +detail is the address without it tried. The backend
   * gets the detail back (Dovecot's recipient_delimiter handles it), see backendAddress().
   */
  private async lookup(address: string): Promise<{ route: Route; login: string; detail?: string }> {
    const login = this.ctx.router.normalize(address);
    try {
      return { route: await this.ctx.router.resolve(login), login };
    } catch (e) {
      const split = e instanceof LookupFailure && e.kind === 'unknown-user' ? splitDetail(address) : undefined;
      if (!split) throw e;
      const base = this.ctx.router.normalize(split.base);
      return { route: await this.ctx.router.resolve(base), login: base, detail: split.detail };
    }
  }

  // ---- DATA ----------------------------------------------------------------------------

  private async onDataCommand(arg: string): Promise<boolean> {
    const tx = this.tx;
    if (!tx) return this.answer(BAD_SEQUENCE('Need MAIL command'));
    if (arg.trim() !== '') return this.answer(reply(501, '5.5.4', 'DATA takes no argument'));
    // RFC 2033 section 4.2: no successful RCPT, no DATA.
    if (tx.accepted.length === 0) return this.answer(BAD_SEQUENCE('No valid recipients'));
    this.busy = true;
    try {
      await this.transfer(tx);
    } finally {
      this.busy = false;
      this.tx = undefined;
    }
    // A whole transaction is done: the next one has the full time again.
    this.deadline = Date.now() + this.env.cfg.transaction_timeout_ms;
    return true;
  }

  private async transfer(tx: Transaction): Promise<void> {
    const { cfg, totals } = this.env;
    const delivery = new Delivery(
      this.ctx,
      { timeoutMs: cfg.timeout_ms, hostname: cfg.hostname, pool: this.env.pool },
      { from: tx.from, body8bit: tx.body8bit, ...(tx.size === undefined ? {} : { size: tx.size }) },
      tx.unique,
      totals,
      this.client,
    );
    await delivery.open();
    this.write(reply(354, undefined, 'End data with <CR><LF>.<CR><LF>'));
    const decoder = new DotDecoder();
    let tooBig = false;
    const emit = (content: Buffer) => {
      if (tooBig) return;
      if (decoder.bytes > cfg.max_message_size) {
        tooBig = true;
        delivery.abort('message exceeds max_message_size');
        return;
      }
      delivery.write(content);
    };
    let rest: Buffer | undefined;
    try {
      for (;;) {
        if (this.buf.length === 0) await this.more();
        const chunk = this.buf;
        this.buf = EMPTY;
        rest = decoder.push(chunk, emit);
        if (rest !== undefined) break;
        // Backpressure: read no further until every live backend took what it has.
        await delivery.drained();
      }
    } catch (e) {
      // The client left (or timed out) mid-message: no backend gets a dot.
      delivery.abort(e instanceof ClientGone ? 'client went away during DATA' : (e as Error).message);
      throw e;
    }
    this.buf = rest.length ? (this.buf.length ? Buffer.concat([rest, this.buf]) : rest) : this.buf;
    totals.transactions++;
    totals.bytes += decoder.bytes;
    const results = tooBig
      ? tx.unique.map(() => reply(552, '5.3.4', `Message size exceeds fixed limit of ${cfg.max_message_size} bytes`))
      : await delivery.finish();
    for (const a of tx.accepted) {
      const r = results[a.unique]!;
      const result = r.code < 300 ? 'delivered' : r.code < 500 ? 'deferred' : 'rejected';
      totals.delivery[result]++;
      this.ctx.meters.lmtpDeliveries.inc({ slot: tx.unique[a.unique]!.route.slot, result });
      this.write(r);
    }
    // One line per message, like an MTA's: who, how big, and every recipient's answer.
    this.ctx.log.info('lmtp message', {
      peer: this.peer,
      from: tx.from,
      bytes: decoder.bytes,
      results: tx.unique.map((r, i) => `${r.address}: ${Delivery.describe([results[i]!])}`).join('; '),
    });
  }

  // ---- end -----------------------------------------------------------------------------

  /** Server shutdown: an idle connection is told 421 now, a busy one after its transaction. */
  shutdown(): void {
    this.shutdownRequested = true;
    if (this.waitingForClient && !this.busy) {
      this.write(reply(421, '4.3.2', `${this.env.cfg.hostname} Service shutting down, try again later`));
      this.close();
    }
  }

  close(): void {
    clearTimeout(this.idle);
    if (!this.closed) {
      this.closed = true;
      this.socket.end();
      // Give our last reply a moment to leave, then let go whatever the peer does.
      setTimeout(() => this.socket.destroy(), 2000).unref();
    }
    this.drainWaiter?.();
    this.wakeUp();
  }

  /** Drops the connection at once (shutdown deadline). */
  destroy(): void {
    this.close();
    this.socket.destroy();
  }
}
