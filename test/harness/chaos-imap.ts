import { setTimeout as sleep } from 'node:timers/promises';
import { connectLines, type LineClient } from './lines.js';

/**
 * IMAP load for the chaos test (test/chaos.test.ts): sessions held in IDLE, and a churn of
 * short logins, through mailsplice. Raw sockets, so that every BYE and every refusal is
 * seen as the client sees it. Every loop is bounded in count and in time.
 */

export interface ImapTarget {
  host: string;
  port: number;
}

export interface Credentials {
  name: string;
  password: string;
}

/** How one login through the proxy went. */
export type Landing =
  /** Logged in; `slot` is where it landed (the seed message's Subject names the slot). */
  | { kind: 'ok'; client: LineClient; slot: string }
  /** A tagged NO/BAD to the LOGIN. */
  | { kind: 'refused'; line: string }
  /** Logged in, then a BYE before we were done looking around. */
  | { kind: 'ended'; line: string }
  /** No tagged answer: connection refused, closed or timed out. */
  | { kind: 'lost'; why: string };

/** Lines up to the tagged answer to `tag`; a BYE on the way is returned as such. */
async function untilTagged(c: LineClient, tag: string, timeoutMs: number): Promise<{ tagged?: string; bye?: string; lines: string[] }> {
  const lines: string[] = [];
  for (;;) {
    const line = await c.readLine(timeoutMs);
    lines.push(line);
    if (line.startsWith(`${tag} `)) return { tagged: line, lines };
    if (line.startsWith('* BYE')) return { bye: line, lines };
  }
}

/**
 * Logs in through the proxy, selects INBOX and reads the Subject of message 1, which the
 * world seeded as "on <slot id>": so the client knows which backend it is talking to.
 */
export async function loginAndLand(target: ImapTarget, user: Credentials, timeoutMs = 15_000): Promise<Landing> {
  let c: LineClient;
  try {
    c = await connectLines({ host: target.host, port: target.port, timeoutMs });
  } catch (e) {
    return { kind: 'lost', why: `connect: ${(e as Error).message}` };
  }
  try {
    const greeting = await c.readLine(timeoutMs);
    if (!greeting.startsWith('* OK')) {
      c.close();
      return { kind: 'lost', why: `greeting: ${greeting}` };
    }
    c.send(`a LOGIN ${user.name} ${user.password}`);
    const login = await untilTagged(c, 'a', timeoutMs);
    if (login.bye) {
      c.close();
      return login.bye.includes('route changed') ? { kind: 'ended', line: login.bye } : { kind: 'lost', why: login.bye };
    }
    if (!login.tagged!.startsWith('a OK')) {
      c.close();
      return { kind: 'refused', line: login.tagged! };
    }
    c.send('b SELECT INBOX');
    const select = await untilTagged(c, 'b', timeoutMs);
    if (select.bye || !select.tagged!.startsWith('b OK')) {
      c.close();
      return { kind: 'ended', line: select.bye ?? select.tagged! };
    }
    c.send('c FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])');
    const fetch = await untilTagged(c, 'c', timeoutMs);
    const subject = fetch.lines.find((l) => l.startsWith('Subject: on '));
    if (fetch.bye || !subject) {
      c.close();
      return { kind: 'ended', line: fetch.bye ?? fetch.tagged! };
    }
    return { kind: 'ok', client: c, slot: subject.slice('Subject: on '.length).trim() };
  } catch (e) {
    c.close();
    return { kind: 'lost', why: (e as Error).message };
  }
}

/**
 * Logs in on a backend directly and makes it index INBOX now, while the seed message is the
 * only one: else the first LMTP delivery may index the seed after itself, and message 1
 * would no longer say where a login landed.
 */
export async function primeInbox(backend: ImapTarget, user: Credentials): Promise<string> {
  const c = await connectLines({ host: backend.host, port: backend.port, timeoutMs: 15_000 });
  try {
    await c.readLine();
    c.send(`a LOGIN ${user.name} ${user.password}`);
    const login = (await c.readUntil(/^a /)).at(-1)!;
    if (!login.startsWith('a OK')) throw new Error(`${user.name} on ${backend.host}: ${login}`);
    c.send('b SELECT INBOX');
    await c.readUntil(/^b /);
    c.send('c FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])');
    const subject = (await c.readUntil(/^c /)).find((l) => l.startsWith('Subject: on '));
    if (!subject) throw new Error(`${user.name} on ${backend.host}: message 1 is not the seed`);
    c.send('d LOGOUT');
    await c.readUntil(/^d /).catch(() => undefined);
    return subject.slice('Subject: on '.length).trim();
  } finally {
    c.close();
  }
}

/** Figures for the summary: what the clients saw. */
export interface ImapTally {
  /** Logins that reached a backend (held and churned). */
  ok: number;
  /** Tagged NO [UNAVAILABLE]: "try again", the answer during a fault. */
  unavailable: number;
  /** Tagged NO [AUTHENTICATIONFAILED] for a known user with the right password: never right. */
  authFailed: string[];
  /** Any other tagged refusal. */
  otherRefusals: string[];
  /** Sessions that got `* BYE [UNAVAILABLE] ...` from the proxy (an event ended them). */
  endedByEvents: number;
  /** Sessions that ended otherwise (backend killed, connection lost). */
  endedOtherwise: number;
  lost: number;
  /** Clients that went away while their login was in flight. */
  abandoned: number;
  /** Logins by the slot they landed on. */
  landed: Record<string, number>;
  /** The last few refusals and losses, by user, for failure messages. */
  recent: string[];
}

export function newTally(): ImapTally {
  return { ok: 0, unavailable: 0, authFailed: [], otherRefusals: [], endedByEvents: 0, endedOtherwise: 0, lost: 0, abandoned: 0, landed: {}, recent: [] };
}

function count(t: ImapTally, r: Landing, user: string): void {
  if (r.kind !== 'ok') {
    t.recent.push(`${user}: ${r.kind === 'lost' ? r.why : r.line}`);
    if (t.recent.length > 6) t.recent.shift();
  }
  if (r.kind === 'ok') {
    t.ok++;
    t.landed[r.slot] = (t.landed[r.slot] ?? 0) + 1;
  } else if (r.kind === 'refused') {
    if (/\[UNAVAILABLE\]/.test(r.line)) t.unavailable++;
    else if (/\[AUTHENTICATIONFAILED\]/.test(r.line)) t.authFailed.push(r.line);
    else t.otherRefusals.push(r.line);
  } else if (r.kind === 'ended') {
    if (/^\* BYE \[UNAVAILABLE\]/.test(r.line)) t.endedByEvents++;
    else t.endedOtherwise++;
  } else t.lost++;
}

/** A session held in IDLE, as the client knows it. */
export interface HeldSession {
  user: string;
  /** Index of the proxy it went through. */
  proxy: number;
  /** The slot it landed on. */
  slot: string;
  openedAt: number;
  /** Set when the session ended, with the BYE if there was one. */
  endedAt?: number;
  bye?: string;
  client: LineClient;
}

type LoopState = 'opening' | 'holding' | 'waiting' | 'done';

export interface HolderOptions {
  targets: ImapTarget[];
  users: Credentials[];
  /** Sessions held at once. */
  size: number;
  /** Most sessions opened in all (each loop reopens after its session ends). */
  maxOpens: number;
  /** No new session after this time (ms since epoch). */
  until: number;
}

/**
 * Holds `size` IDLE sessions, spread over users and proxies; a session that ends is
 * replaced. `stop()` ends the replacing; the sessions held stay open until `closeAll()`.
 */
export class HolderPool {
  readonly sessions: HeldSession[] = [];
  readonly tally = newTally();
  private readonly states: LoopState[];
  private stopped = false;
  /** Set by closeAll: a login that completes from then on is closed, not held. */
  private closing = false;
  private opens = 0;
  private loops: Promise<void>[] = [];

  constructor(private readonly opts: HolderOptions) {
    this.states = Array.from({ length: opts.size }, () => 'waiting' as LoopState);
  }

  start(): void {
    this.loops = this.states.map((_, i) => this.loop(i));
  }

  /** Sessions open now (as far as the clients know). */
  live(): HeldSession[] {
    return this.sessions.filter((s) => s.endedAt === undefined);
  }

  /** Whether every loop holds a session (or has finished). */
  get settled(): boolean {
    return this.states.every((s) => s === 'holding' || s === 'done');
  }

  get holding(): number {
    return this.states.filter((s) => s === 'holding').length;
  }

  stop(): void {
    this.stopped = true;
  }

  /** Ends every session held (client side) and waits for the loops to finish. */
  async closeAll(): Promise<void> {
    this.stopped = true;
    this.closing = true;
    for (const s of this.live()) s.client.close();
    await Promise.all(this.loops);
  }

  private async loop(i: number): Promise<void> {
    const { users, targets } = this.opts;
    const user = users[i % users.length]!;
    const proxy = Math.floor(i / users.length) % targets.length;
    while (!this.stopped && this.opens < this.opts.maxOpens && Date.now() < this.opts.until) {
      this.states[i] = 'opening';
      this.opens++;
      const r = await loginAndLand(targets[proxy]!, user);
      count(this.tally, r, user.name);
      let held = false;
      if (r.kind === 'ok') {
        const session: HeldSession = { user: user.name, proxy, slot: r.slot, openedAt: Date.now(), client: r.client };
        r.client.send('d IDLE');
        const cont = await r.client.readLine(15_000).catch((e: Error) => `(${e.message})`);
        if (cont.startsWith('+') && !this.closing) {
          held = true;
          this.sessions.push(session);
          this.states[i] = 'holding';
          await this.watch(session);
        } else {
          r.client.close();
          if (cont.startsWith('* BYE [UNAVAILABLE]')) this.tally.endedByEvents++;
          else if (!this.closing) this.tally.endedOtherwise++;
        }
      }
      this.states[i] = 'waiting';
      // Replace an ended session soon; after a refusal, give the fault a moment.
      if (!this.stopped) await sleep(held ? 20 : 200);
    }
    this.states[i] = 'done';
  }

  /** Resolves when the session is over: BYE and close, or close alone. */
  private async watch(s: HeldSession): Promise<void> {
    for (;;) {
      let line: string;
      try {
        line = await s.client.readLine(10 * 60_000);
      } catch {
        s.endedAt ??= Date.now();
        if (!s.bye) this.tally.endedOtherwise++;
        s.client.close();
        return;
      }
      if (line.startsWith('* BYE')) {
        s.endedAt = Date.now();
        s.bye = line;
        if (line.startsWith('* BYE [UNAVAILABLE]')) this.tally.endedByEvents++;
        else this.tally.endedOtherwise++;
      }
    }
  }
}

export interface ChurnOptions {
  targets: ImapTarget[];
  users: Credentials[];
  workers: number;
  /** Most logins in all. */
  maxLogins: number;
  until: number;
  /**
   * Every n-th client sends LOGIN and leaves at once (closes, or half-closes with FIN),
   * as an impatient client does: the proxy must not leave a backend session behind.
   */
  abandonEvery: number;
}

/** Short sessions: log in, look where we landed, LOGOUT; now and then leave mid-login. */
export class LoginChurn {
  readonly tally = newTally();
  private stopped = false;
  private n = 0;
  private workers: Promise<void>[] = [];

  constructor(private readonly opts: ChurnOptions) {}

  start(): void {
    this.workers = Array.from({ length: this.opts.workers }, () => this.work());
  }

  /** Stops starting logins and waits for those under way. */
  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.workers);
  }

  private async work(): Promise<void> {
    const { targets, users } = this.opts;
    while (!this.stopped && this.n < this.opts.maxLogins && Date.now() < this.opts.until) {
      const k = this.n++;
      const user = users[k % users.length]!;
      const target = targets[Math.floor(k / users.length) % targets.length]!;
      if (this.opts.abandonEvery > 0 && k % this.opts.abandonEvery === 0) {
        await this.abandon(target, user, k % (2 * this.opts.abandonEvery) === 0);
        continue;
      }
      const r = await loginAndLand(target, user);
      count(this.tally, r, user.name);
      if (r.kind === 'ok') {
        r.client.send('z LOGOUT');
        await untilTagged(r.client, 'z', 10_000).catch(() => undefined);
        r.client.close();
      } else if (r.kind !== 'ended') {
        await sleep(100); // a fault is on: do not spin
      }
    }
  }

  private async abandon(target: ImapTarget, user: Credentials, halfClose: boolean): Promise<void> {
    try {
      const c = await connectLines({ host: target.host, port: target.port, timeoutMs: 10_000 });
      await c.readLine(10_000);
      c.send(`a LOGIN ${user.name} ${user.password}`);
      if (halfClose) c.socket.end();
      else c.close();
      // Half-closed: the proxy may still answer; the client reads nothing more and goes.
      if (halfClose) setTimeout(() => c.close(), 2000).unref();
      this.tally.abandoned++;
    } catch {
      this.tally.lost++;
    }
  }
}
