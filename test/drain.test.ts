import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { openLmtp } from './harness/lmtp.js';
import { waitUntil } from './harness/proc.js';
import { WORLD_USERS } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { tempDir } from './support/tmp.js';

// Issue 10, SIGTERM drains: a real `mailsplice serve` with 1,000 logged-in IMAP sessions and
// an LMTP transaction in DATA gets SIGTERM. The sessions' BYEs, timed by the clients, are
// spread over shutdown.drain_ms rather than sent in one burst; the LMTP transaction finishes
// (250, and the message is in the mailbox); the process exits 0 once nothing is left.

const SESSIONS = 1000;
const DRAIN_MS = 4000;
let slot: DovecotSlot;
let proxy: ProxyProcess | undefined;
const clients: LineClient[] = [];

beforeAll(async () => {
  // Dovecot's default is one imap process per session; 1,000 sessions share 50 here.
  slot = await startDovecotSlot({
    id: 'slotD',
    host: '127.0.0.13',
    users: WORLD_USERS.map((u) => ({ ...u })),
    dir: tempDir('drain-slot'),
    extraConfig: 'service imap {\n  client_limit = 50\n}\n',
  });
  const routes = join(tempDir('drain'), 'routes.yaml');
  writeFileSync(
    routes,
    stringify({
      users: Object.fromEntries(WORLD_USERS.map((u) => [u.name, { store: 'store1' }])),
      stores: { store1: { master: 'slotD', epoch: 1 } },
      slots: { slotD: { host: slot.host, imap: slot.imap, pop3: slot.pop3, lmtp: slot.lmtp } },
    }),
  );
  proxy = await startProxyProcess(
    {
      lookup: { file: routes },
      limits: { connections_per_ip: 5000, concurrent_logins_per_ip: 100, auth_failures_per_ip_per_minute: 100_000, auth_failure_delay_ms: 0 },
      shutdown: { drain_ms: DRAIN_MS },
    },
    { lmtp: true },
  );
}, 60_000);

afterAll(async () => {
  for (const c of clients) c.close();
  if (proxy?.child.exitCode === null) proxy.child.kill('SIGKILL');
  await slot?.destroy();
});

async function login(port: number, n: number): Promise<LineClient> {
  const user = WORLD_USERS[n % 3]!; // alice, bob, carol (not the locked one)
  const c = await connectLines({ host: '127.0.0.1', port, timeoutMs: 30_000 });
  await c.readLine(30_000);
  c.send(`a LOGIN ${user.name} ${user.password}`);
  const reply = (await c.readUntil(/^a /, 30_000)).at(-1)!;
  if (!/^a OK/.test(reply)) throw new Error(`login ${n}: ${reply}`);
  return c;
}

describe('SIGTERM drains', () => {
  it('spreads the BYEs of 1,000 sessions over drain_ms, lets an LMTP transaction in DATA finish, and exits 0', { timeout: 180_000 }, async () => {
    const p = proxy!;
    for (let i = 0; i < SESSIONS; i += 50) {
      clients.push(...(await Promise.all(Array.from({ length: Math.min(50, SESSIONS - i) }, (_, k) => login(p.port, i + k)))));
    }
    const lmtp = await openLmtp({ host: '127.0.0.1', port: p.lmtpPort! });
    expect(await lmtp.line()).toMatch(/^220 /);
    lmtp.send('LHLO drain.test');
    expect(await lmtp.line()).toMatch(/^250 /);
    lmtp.send('MAIL FROM:<sender@example.net>');
    expect(await lmtp.line()).toMatch(/^250 /);
    lmtp.send('RCPT TO:<alice@example.com>');
    expect(await lmtp.line()).toMatch(/^250 /);
    lmtp.send('DATA');
    expect(await lmtp.line()).toMatch(/^354 /);
    lmtp.write('From: sender@example.net\r\nTo: alice@example.com\r\nSubject: drained delivery\r\n\r\nfirst half\r\n');

    // Every client notes when its BYE arrives.
    const byeAt: number[] = [];
    const byes = clients.map((c) =>
      c.readUntil(/^\* BYE /, 60_000).then((lines) => {
        byeAt.push(Date.now());
        return lines.at(-1)!;
      }),
    );
    const exited = new Promise<number | null>((res) => p.child.once('exit', (code) => res(code)));
    const sentAt = Date.now();
    p.child.kill('SIGTERM');

    // The drain has begun (some sessions were told), and the transaction is still open: finish it.
    await waitUntil(async () => byeAt.length >= 10, { what: 'the first BYEs' });
    lmtp.write('second half\r\n.\r\n');
    expect(await lmtp.line(30_000)).toMatch(/^250 /);
    const replies = await Promise.all(byes);
    for (const r of replies) expect(r).toMatch(/^\* BYE \[UNAVAILABLE\] server shutting down/);
    expect(await exited).toBe(0);
    await lmtp.closed;

    // Spread, not one burst: the middle 80 % of the BYEs take at least half the drain time,
    // and no tenth of the drain time holds more than a quarter of them.
    const t = byeAt.map((x) => x - sentAt).sort((a, b) => a - b);
    const q = (f: number) => t[Math.min(t.length - 1, Math.floor(f * t.length))]!;
    expect(q(0.9) - q(0.1)).toBeGreaterThanOrEqual(DRAIN_MS / 2);
    const perTenth = new Array<number>(11).fill(0);
    for (const x of t) perTenth[Math.min(10, Math.floor(x / (DRAIN_MS / 10)))]!++;
    expect(Math.max(...perTenth)).toBeLessThanOrEqual(SESSIONS / 4);
    expect(await slot.messages('alice@example.com')).toEqual([expect.stringContaining('Subject: drained delivery')]);
    console.log(
      `drain: ${SESSIONS} sessions, drain_ms ${DRAIN_MS}: BYEs from ${t[0]} ms to ${t.at(-1)} ms after SIGTERM (10th-90th percentile ${q(0.1)}-${q(0.9)} ms), per tenth of the drain ${perTenth.join('/')}; LMTP in DATA answered 250`,
    );
  });
});
