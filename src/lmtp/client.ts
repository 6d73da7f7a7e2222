import type { Socket } from 'node:net';
import type { BackendTlsConfig } from '../config.js';
import { BackendRefused, openBackend, startBackendTls } from '../net/backend.js';
import type { OwnListeners } from '../net/own-listeners.js';
import { DotEncoder } from './dot.js';
import { ReplyAssembler, isPositive, replyText, type Reply } from './reply.js';

/**
 * Our LMTP client for the backend side (RFC 2033). Written here rather than taken from
 * nodemailer, whose LMTP mode keeps only the last reply's text and reports success when every
 * recipient failed: the proxy needs each recipient's own reply, code and text, to pass on.
 *
 * One instance is one connection. Every wait is bounded by `timeoutMs`; any failure (timeout,
 * connection lost, a reply we cannot parse) fails the whole connection, so a caller never
 * reads a reply that belongs to another command.
 */

export interface LmtpClientOptions {
  host: string;
  port: number;
  connectTimeoutMs: number;
  /** Longest wait for one reply, or for a stalled write to drain. */
  timeoutMs: number;
  tls: BackendTlsConfig;
  /** Name we give in LHLO. */
  lhlo: string;
  /** Longest reply line accepted from the backend (RFC 5321 says 512 octets). */
  maxLine?: number;
  /** This process's listeners: a backend address that is one of them is a routing loop. */
  ownListeners?: OwnListeners;
  /**
   * The slot group's admin: AUTH PLAIN as it after LHLO (and STARTTLS) when the backend
   * offers AUTH. Cyrus's lmtpd without -a answers MAIL with 430 until then. A backend that
   * offers no AUTH at all (Dovecot's LMTP) is spoken to as before.
   */
  auth?: { user: string; password: Buffer };
}

/** One RCPT: the mailbox and the parameters the client gave that may be passed on. */
export interface EnvelopeRecipient {
  mailbox: string;
  /** RCPT parameter keywords (upper case, no value), sent only if the backend announced them in LHLO. */
  params?: readonly string[];
}

/** The backend address is this proxy itself (a slot record pointing back at it). */
export class RoutingLoop extends BackendRefused {
  constructor(message: string) {
    super('unavailable', message);
  }
}

export class LmtpClientError extends Error {
  constructor(
    message: string,
    /** The reply that made the step fail, when it was a reply (not a lost connection). */
    readonly reply?: Reply,
  ) {
    super(message);
    this.name = 'LmtpClientError';
  }
}

export interface EnvelopeOptions {
  /** The size the client declared (MAIL ... SIZE=); passed on if the backend offers SIZE. */
  size?: number;
  /** BODY=8BITMIME; passed on if the backend offers 8BITMIME. */
  body8bit?: boolean;
}

interface Waiter {
  resolve(r: Reply): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

const DEFAULT_MAX_LINE = 2048;
/** Replies nobody asked for yet that we keep before calling the peer broken. */
const MAX_UNREAD = 10_000;

export class LmtpClient {
  /** Keyword (upper-case) -> the rest of its LHLO line. */
  readonly capabilities = new Map<string, string>();
  private buf: Buffer = Buffer.alloc(0);
  private readonly assembler = new ReplyAssembler();
  private readonly unread: Reply[] = [];
  private readonly waiters: Waiter[] = [];
  private failure: Error | undefined;
  private encoder: DotEncoder | undefined;
  private readonly failListeners: ((e: Error) => void)[] = [];

  private constructor(
    private sock: Socket,
    private readonly opts: LmtpClientOptions,
  ) {
    this.attach();
  }

  /** Connects, reads the greeting, says LHLO (and STARTTLS when configured). */
  static async connect(opts: LmtpClientOptions): Promise<LmtpClient> {
    const sock = await openBackend(opts.host, opts.port, { connectTimeoutMs: opts.connectTimeoutMs, tls: opts.tls });
    if (opts.ownListeners?.reaches(sock)) {
      sock.destroy();
      throw new RoutingLoop(`${opts.host}:${opts.port} is a listener of this proxy`);
    }
    const c = new LmtpClient(sock, opts);
    try {
      const greeting = await c.read();
      if (greeting.code !== 220) throw new LmtpClientError(`greeting: ${replyText(greeting)}`, greeting);
      await c.lhlo();
      if (opts.tls.mode === 'starttls') await c.startTls();
      if (opts.auth && c.has('AUTH')) await c.authenticate(opts.auth);
    } catch (e) {
      c.destroy(e as Error);
      throw e;
    }
    return c;
  }

  get failed(): Error | undefined {
    return this.failure;
  }

  /** Between transactions and healthy: nothing pending, nothing unread, not failed. */
  get reusable(): boolean {
    return !this.failure && !this.encoder && this.unread.length === 0 && this.waiters.length === 0 && this.buf.length === 0;
  }

  has(capability: string): boolean {
    return this.capabilities.has(capability);
  }

  /** Calls `fn` once if the connection fails (timeout, lost, protocol error, destroy). Returns an unsubscribe. */
  onFailure(fn: (e: Error) => void): () => void {
    if (this.failure) {
      fn(this.failure);
      return () => undefined;
    }
    this.failListeners.push(fn);
    return () => {
      const i = this.failListeners.indexOf(fn);
      if (i >= 0) this.failListeners.splice(i, 1);
    };
  }

  private attach(): void {
    this.sock.on('data', this.onData);
    this.sock.on('error', this.onError);
    // openBackend allows half-open sockets: a backend that hangs up is seen at 'end'.
    this.sock.on('end', this.onClose);
    this.sock.on('close', this.onClose);
  }

  private detach(): void {
    this.sock.off('data', this.onData);
    this.sock.off('error', this.onError);
    this.sock.off('end', this.onClose);
    this.sock.off('close', this.onClose);
  }

  private readonly onError = (e: Error): void => this.fail(new LmtpClientError(`backend connection: ${e.message}`));
  private readonly onClose = (): void => this.destroy(new LmtpClientError('backend closed the connection'));

  private readonly onData = (chunk: Buffer): void => {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    const max = this.opts.maxLine ?? DEFAULT_MAX_LINE;
    let nl: number;
    try {
      while ((nl = this.buf.indexOf(10)) >= 0) {
        if (nl > max) throw new LmtpClientError(`backend reply line longer than ${max} bytes`);
        const end = nl > 0 && this.buf[nl - 1] === 13 ? nl - 1 : nl;
        const line = this.buf.toString('latin1', 0, end);
        this.buf = this.buf.subarray(nl + 1);
        const r = this.assembler.push(line);
        if (r) this.deliver(r);
      }
      if (this.buf.length > max) throw new LmtpClientError(`backend reply line longer than ${max} bytes`);
    } catch (e) {
      this.destroy(e instanceof LmtpClientError ? e : new LmtpClientError(`backend: ${(e as Error).message}`));
    }
  };

  private deliver(r: Reply): void {
    const w = this.waiters.shift();
    if (w) {
      clearTimeout(w.timer);
      w.resolve(r);
      return;
    }
    this.unread.push(r);
    if (this.unread.length > MAX_UNREAD) this.destroy(new LmtpClientError('backend sends replies nobody asked for'));
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(e);
    }
    for (const fn of this.failListeners.splice(0)) fn(e);
  }

  /** The next reply, in order. */
  read(): Promise<Reply> {
    const r = this.unread.shift();
    if (r) return Promise.resolve(r);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => this.destroy(new LmtpClientError(`backend did not answer within ${this.opts.timeoutMs} ms`)), this.opts.timeoutMs);
      this.waiters.push({ resolve, reject, timer });
    });
  }

  private send(text: string | Buffer): void {
    if (this.failure) throw this.failure;
    this.sock.write(text);
  }

  /** Sends one command line and reads its reply. */
  async command(line: string): Promise<Reply> {
    this.send(`${line}\r\n`);
    return this.read();
  }

  private async lhlo(): Promise<void> {
    const r = await this.command(`LHLO ${this.opts.lhlo}`);
    if (r.code !== 250) throw new LmtpClientError(`LHLO: ${replyText(r)}`, r);
    this.capabilities.clear();
    for (const line of r.lines.slice(1)) {
      const [kw = '', ...rest] = line.trim().split(/\s+/);
      if (kw) this.capabilities.set(kw.toUpperCase(), rest.join(' '));
    }
  }

  private async startTls(): Promise<void> {
    if (!this.has('STARTTLS')) throw new LmtpClientError('backend does not offer STARTTLS but backend.tls.mode is starttls');
    const r = await this.command('STARTTLS');
    if (r.code !== 220) throw new LmtpClientError(`STARTTLS: ${replyText(r)}`, r);
    // Anything the backend sent after its 220 came in the clear: it must not be read as a reply.
    this.detach();
    this.buf = Buffer.alloc(0);
    const raw = this.sock;
    raw.on('error', () => undefined); // the TLS socket reports errors from here on
    this.sock = await startBackendTls(raw, this.opts.host, this.opts.tls);
    this.attach();
    await this.lhlo();
  }

  /** AUTH PLAIN (RFC 4954, RFC 4616) with an empty authzid. The payload is never logged or kept. */
  private async authenticate(auth: { user: string; password: Buffer }): Promise<void> {
    const mechs = (this.capabilities.get('AUTH') ?? '').toUpperCase().split(/\s+/);
    if (!mechs.includes('PLAIN')) throw new LmtpClientError(`backend offers AUTH ${this.capabilities.get('AUTH')} but not PLAIN`);
    const raw = Buffer.concat([Buffer.from([0]), Buffer.from(auth.user, 'utf8'), Buffer.from([0]), auth.password]);
    const line = `AUTH PLAIN ${raw.toString('base64')}`;
    raw.fill(0);
    const r = await this.command(line);
    if (r.code !== 235) throw new LmtpClientError(`AUTH PLAIN as ${auth.user}: ${replyText(r)}`, r);
  }

  /**
   * MAIL FROM and one RCPT TO per recipient, pipelined when the backend offers PIPELINING.
   * Returns the MAIL reply and, in order, one reply per recipient. When MAIL failed the
   * recipient replies are the backend's answers to RCPTs without a sender (or absent).
   */
  async envelope(from: string, recipients: readonly (string | EnvelopeRecipient)[], opts: EnvelopeOptions = {}): Promise<{ mail: Reply; rcpts: Reply[] }> {
    let mailLine = `MAIL FROM:<${from}>`;
    if (opts.body8bit && this.has('8BITMIME')) mailLine += ' BODY=8BITMIME';
    if (opts.size !== undefined && this.has('SIZE')) mailLine += ` SIZE=${opts.size}`;
    // A parameter this backend did not announce is left off for it (see README, "LMTP").
    const rcptLines = recipients.map((r) =>
      typeof r === 'string' ? `RCPT TO:<${r}>` : `RCPT TO:<${r.mailbox}>${(r.params ?? []).filter((p) => this.has(p)).map((p) => ` ${p}`).join('')}`,
    );
    if (this.has('PIPELINING')) {
      this.send([mailLine, ...rcptLines].map((l) => `${l}\r\n`).join(''));
      const replies: Reply[] = [];
      // Read one by one (not Promise.all): on failure nothing is left waiting.
      for (let i = 0; i <= rcptLines.length; i++) replies.push(await this.read());
      return { mail: replies[0]!, rcpts: replies.slice(1) };
    }
    const mail = await this.command(mailLine);
    if (!isPositive(mail)) return { mail, rcpts: [] };
    const rcpts: Reply[] = [];
    for (const l of rcptLines) rcpts.push(await this.command(l));
    return { mail, rcpts };
  }

  /** DATA; resolves with the backend's answer (354 when it wants the message). */
  async data(): Promise<Reply> {
    const r = await this.command('DATA');
    if (r.code === 354) this.encoder = new DotEncoder();
    return r;
  }

  /**
   * Writes message content, dot-stuffed. False when the socket wants to drain first
   * (see `drained`). Throws if the connection already failed.
   */
  write(chunk: Buffer): boolean {
    if (this.failure) throw this.failure;
    if (!this.encoder) throw new Error('write() outside DATA');
    const parts = this.encoder.encode(chunk);
    this.sock.cork();
    for (const p of parts) this.sock.write(p);
    this.sock.uncork();
    return !this.sock.writableNeedDrain;
  }

  /** Resolves when the socket drained; fails the connection if that takes longer than the timeout. */
  drained(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (!this.sock.writableNeedDrain) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const done = (e?: Error) => {
        clearTimeout(timer);
        this.sock.off('drain', onDrain);
        unsubscribe();
        if (e) reject(e);
        else resolve();
      };
      const onDrain = () => done();
      const timer = setTimeout(() => this.destroy(new LmtpClientError(`backend did not take data for ${this.opts.timeoutMs} ms`)), this.opts.timeoutMs);
      this.sock.on('drain', onDrain);
      const unsubscribe = this.onFailure(done);
    });
  }

  /**
   * Ends the message and reads one reply per recipient the backend accepted (RFC 2033
   * section 4.2). If the connection fails part-way, the replies read so far are returned
   * with the error: those recipients have their real answer, the rest have none.
   */
  async endData(accepted: number): Promise<{ replies: Reply[]; error?: Error }> {
    if (!this.encoder) throw new Error('endData() outside DATA');
    const replies: Reply[] = [];
    try {
      this.send(this.encoder.terminator());
      this.encoder = undefined;
      while (replies.length < accepted) replies.push(await this.read());
      return { replies };
    } catch (e) {
      return { replies, error: e as Error };
    }
  }

  async rset(): Promise<Reply> {
    return this.command('RSET');
  }

  /** Says QUIT without waiting for the answer, and closes. */
  quit(): void {
    if (this.failure) return;
    this.failure = new LmtpClientError('connection closed by us');
    this.failListeners.length = 0;
    this.sock.end('QUIT\r\n');
    // The socket is ours to close even if the backend never answers.
    setTimeout(() => this.sock.destroy(), 5000).unref();
  }

  /** Drops the connection. Mid-DATA this abandons the message: no terminator is ever sent. */
  destroy(e: Error = new LmtpClientError('connection dropped by us')): void {
    this.fail(e);
    this.sock.destroy();
  }
}
