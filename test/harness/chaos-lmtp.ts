import { setTimeout as sleep } from 'node:timers/promises';
import type { Credentials, ImapTarget } from './chaos-imap.js';
import { connectLines } from './lines.js';
import { lmtpTransaction } from './lmtp.js';

/**
 * LMTP load for the chaos test: deliveries with unique Message-IDs through mailsplice, and
 * the accounting afterwards, read over IMAP straight from the backends.
 */

/** What one recipient of one message got. */
export interface RecipientOutcome {
  messageId: string;
  rcpt: string;
  /** The reply that settled it: to RCPT when that refused, else the one after the dot. */
  reply: string;
}

export interface DeliveryOptions {
  targets: ImapTarget[];
  recipients: string[];
  workers: number;
  maxMessages: number;
  until: number;
  /** Makes the Message-IDs of this run unique. */
  runId: string;
}

export class DeliveryLoop {
  readonly outcomes: RecipientOutcome[] = [];
  /** Transactions that ended without a reply for every recipient (connection lost). */
  readonly lost: string[] = [];
  private stopped = false;
  private n = 0;
  private workers: Promise<void>[] = [];

  constructor(private readonly opts: DeliveryOptions) {}

  start(): void {
    this.workers = Array.from({ length: this.opts.workers }, () => this.work());
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.workers);
  }

  accepted(): RecipientOutcome[] {
    return this.outcomes.filter((o) => o.reply.startsWith('2'));
  }

  deferred(): RecipientOutcome[] {
    return this.outcomes.filter((o) => o.reply.startsWith('4'));
  }

  /** Anything that is neither 2xx nor 4xx (a 5xx for a known user is a lost message). */
  failed(): RecipientOutcome[] {
    return this.outcomes.filter((o) => !/^[24]/.test(o.reply));
  }

  private async work(): Promise<void> {
    const { targets, recipients } = this.opts;
    while (!this.stopped && this.n < this.opts.maxMessages && Date.now() < this.opts.until) {
      const k = this.n++;
      const target = targets[k % targets.length]!;
      // Every third message goes to two users (two stores, so two backend legs).
      const rcpts = k % 3 === 0 ? [recipients[k % recipients.length]!, recipients[(k + 1) % recipients.length]!] : [recipients[k % recipients.length]!];
      const messageId = `<chaos-${this.opts.runId}-${k}@mailsplice.test>`;
      const body = [
        'From: load@example.net',
        `To: ${rcpts.join(', ')}`,
        `Subject: chaos ${k}`,
        `Message-ID: ${messageId}`,
        'Date: Mon, 1 Jan 2024 00:00:00 +0000',
        '',
        `Chaos delivery ${k}.`,
        '',
      ].join('\n');
      let deferredAll = false;
      try {
        const t = await lmtpTransaction(target, 'load@example.net', rcpts, body);
        const results = [...t.results];
        for (const [i, rcpt] of rcpts.entries()) {
          const atRcpt = t.rcpt[i]!;
          const reply = atRcpt.startsWith('250') ? (results.shift() ?? `(no reply after DATA: ${t.data})`) : atRcpt;
          this.outcomes.push({ messageId, rcpt, reply });
        }
        deferredAll = t.rcpt.every((r) => !r.startsWith('250'));
      } catch (e) {
        this.lost.push(`${messageId} to ${rcpts.join(',')}: ${(e as Error).message}`);
        deferredAll = true;
      }
      if (deferredAll) await sleep(100); // a fault is on: do not spin
    }
  }
}

/**
 * How many times each Message-ID is in `user`'s INBOX on one backend, read with IMAP
 * straight from the backend (not through the proxy).
 */
export async function messageIdsOn(backend: ImapTarget, user: Credentials): Promise<Map<string, number>> {
  const c = await connectLines({ host: backend.host, port: backend.port, timeoutMs: 15_000 });
  try {
    await c.readLine();
    c.send(`a LOGIN ${user.name} ${user.password}`);
    const login = (await c.readUntil(/^a /)).at(-1)!;
    if (!login.startsWith('a OK')) throw new Error(`${user.name} on ${backend.host}: ${login}`);
    c.send('b EXAMINE INBOX');
    await c.readUntil(/^b /);
    c.send('c FETCH 1:* (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])');
    const lines = await c.readUntil(/^c /, 30_000);
    if (!lines.at(-1)!.startsWith('c OK')) throw new Error(`FETCH on ${backend.host}: ${lines.at(-1)}`);
    const ids = new Map<string, number>();
    for (const l of lines) {
      const m = /^Message-ID:\s*(<[^>]+>)/i.exec(l);
      if (m) ids.set(m[1]!, (ids.get(m[1]!) ?? 0) + 1);
    }
    c.send('d LOGOUT');
    await c.readUntil(/^d /).catch(() => undefined);
    return ids;
  } finally {
    c.close();
  }
}
