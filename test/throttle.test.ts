import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectLines } from './harness/lines.js';
import { waitUntil } from './harness/proc.js';
import { startWorld, type World } from './harness/world.js';
import { createLogger } from '../src/log.js';
import { seedRedis, worldRoutes } from './support/routes.js';
import { startProxy, type TestProxy } from './support/proxy.js';

// Issue 14 item 1 and the brute-force test: the per-address failed-login throttle, through
// TWO proxies on one Redis, attacked with many logins at the same moment. It must be
// shared (counted in Redis), hold under concurrency (an attempt counts from its start, not
// from the backend's answer), never lock out another address, fall back to local counting
// while Redis is away, and not log one line per refused attempt.

const LIMIT = 20;
const FLOOD = 150; // connections per proxy, all at once

let world: World;
const proxies: TestProxy[] = [];
const logs: string[][] = [];

function capturing(lines: string[]) {
  return createLogger('info', (l) => void lines.push(l));
}

async function proxyOn(limits: Record<string, unknown>): Promise<TestProxy> {
  const lines: string[] = [];
  logs.push(lines);
  const p = await startProxy(
    {
      listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }],
      lookup: { redis: { url: world.redis!.url }, max_stale_ms: 0 },
      limits: { auth_failures_per_ip_per_minute: LIMIT, auth_failure_delay_ms: 0, connections_per_ip: 2000, ...limits },
    },
    capturing(lines),
  );
  proxies.push(p);
  return p;
}

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  // Room for every attempt at once: here the shared count alone has to hold.
  await proxyOn({ concurrent_logins_per_ip: 1000 });
  await proxyOn({ concurrent_logins_per_ip: 1000 });
});

afterAll(async () => {
  for (const p of proxies) await p.close();
  await world?.stop();
});

/** One IMAP LOGIN from `from`; the tagged answer, or what ended the connection. */
async function imapLogin(p: TestProxy, from: string, user: string, pass: string): Promise<string> {
  const c = await connectLines({ host: p.host, port: p.ports.imap!, localAddress: from, timeoutMs: 30_000 });
  try {
    await c.readLine();
    c.send(`a LOGIN ${user} ${pass}`);
    return (await c.readUntil(/^a /, 30_000)).at(-1)!;
  } catch (e) {
    return `error: ${(e as Error).message}`;
  } finally {
    c.close();
  }
}

/** One POP3 USER/PASS from `from`; the answer to PASS. */
async function pop3Login(p: TestProxy, from: string, user: string, pass: string): Promise<string> {
  const c = await connectLines({ host: p.host, port: p.ports.pop3!, localAddress: from, timeoutMs: 30_000 });
  try {
    await c.readLine();
    c.send(`USER ${user}`);
    await c.readLine();
    c.send(`PASS ${pass}`);
    return await c.readLine(30_000);
  } catch (e) {
    return `error: ${(e as Error).message}`;
  } finally {
    c.close();
  }
}

/** Counting windows are whole minutes: start a flood early in one, so it stays inside it. */
async function earlyInAMinute(): Promise<void> {
  await expect.poll(() => Date.now() % 60_000 < 30_000, { timeout: 35_000, interval: 200 }).toBe(true);
}

const count = (answers: string[], re: RegExp) => answers.filter((a) => re.test(a)).length;

describe('the failed-login throttle', () => {
  it('is shared by two proxies on one Redis, holds under concurrency, and never locks out another address', async () => {
    const [p1, p2] = proxies as [TestProxy, TestProxy];
    await earlyInAMinute();
    // Another address logs in through both proxies again and again while the flood runs.
    let flooding = true;
    const bystander = (async () => {
      const results: string[] = [];
      for (let i = 0; i < 200 && (flooding || i < 4); i++) {
        const p = i % 2 ? p2 : p1;
        results.push(i % 4 < 2 ? await imapLogin(p, '127.0.0.6', 'bob@example.com', 'bobpw') : await pop3Login(p, '127.0.0.6', 'carol@example.com', 'carolpw'));
      }
      return results;
    })();
    const flood = await Promise.all([
      ...Array.from({ length: FLOOD }, (_, i) => imapLogin(i % 2 ? p2 : p1, '127.0.0.5', 'alice@example.com', 'wrong')),
      ...Array.from({ length: FLOOD }, (_, i) => pop3Login(i % 2 ? p1 : p2, '127.0.0.5', 'alice@example.com', 'wrong')),
    ]);
    flooding = false;
    const legit = await bystander;

    // Counted in Redis, under the contract's prefix: one key per minute window the flood
    // touched (two only if the machine was so slow that it ran into the next minute).
    const r = new Redis(world.redis!.url);
    let windows: number;
    try {
      const keys = await r.keys('ms:throttle:127.0.0.5:*');
      windows = keys.length;
      // Every count expires on its own (a key without expiry would be kept for ever).
      for (const k of keys) expect(await r.pttl(k)).toBeGreaterThan(0);
      // The bystander's logins all succeeded: each gave its place back, so its counts are 0.
      // Wait for that: a give-back is sent after the login's answer.
      const bystanderKeys = await r.keys('ms:throttle:127.0.0.6:*');
      expect(bystanderKeys.length).toBeGreaterThan(0);
      await waitUntil(async () => (await Promise.all(bystanderKeys.map((k) => r.get(k)))).every((v) => v === null || Number(v) === 0), {
        what: 'the bystander\'s successful logins given back',
        timeoutMs: 10_000,
      });
    } finally {
      r.disconnect();
    }
    expect(windows).toBeGreaterThan(0);
    // Only attempts that reached Dovecot can hear that the password is wrong: at most LIMIT
    // a window across BOTH proxies. Every other one was turned away before any backend.
    const reachedBackend = count(flood, /^a NO \[AUTHENTICATIONFAILED\]|^-ERR \[AUTH\]/);
    expect(reachedBackend).toBeGreaterThan(0);
    expect(reachedBackend).toBeLessThanOrEqual(LIMIT * windows);
    expect(count(flood, /Too many login attempts/)).toBe(2 * FLOOD - reachedBackend);
    // The bystander was never refused.
    expect(legit.length).toBeGreaterThanOrEqual(4);
    for (const l of legit) expect(l).toMatch(/^a OK |^\+OK/);
    // One line per refused attempt would be ~280 lines. Instead: per proxy and window, one
    // line at the first refusal and one with the count when the window ends.
    const about = logs.slice(0, 2).flat().filter((l) => l.includes('"ip":"127.0.0.5"'));
    const refusedLines = about.filter((l) => l.includes('login attempts refused'));
    expect(refusedLines.length).toBeGreaterThan(0);
    expect(refusedLines.length).toBeLessThanOrEqual(2 * 2 * (windows + 1));
    expect(about.length - refusedLines.length).toBe(reachedBackend); // "login failed", one per real answer
  });

  it('bounds the logins one address has in progress at once', async () => {
    const p = await proxyOn({ concurrent_logins_per_ip: 2, auth_failures_per_ip_per_minute: 1000 });
    const answers = await Promise.all(Array.from({ length: 40 }, () => imapLogin(p, '127.0.0.7', 'alice@example.com', 'wrong')));
    const refused = count(answers, /Too many login attempts/);
    expect(refused).toBeGreaterThan(0);
    expect(count(answers, /AUTHENTICATIONFAILED/)).toBe(40 - refused);
    // Another address is not affected.
    expect(await imapLogin(p, '127.0.0.6', 'bob@example.com', 'bobpw')).toMatch(/^a OK /);
  });

  it('counts in this process while Redis is away', async () => {
    const [p1] = proxies as [TestProxy];
    // A user the proxy has cached (max_stale_ms 0 keeps nothing): an unknown one is
    // answered without Redis either way, so every attempt is a failed login.
    await earlyInAMinute();
    await world.redis!.stop();
    try {
      const answers: string[] = [];
      for (let i = 0; i < LIMIT + 5; i++) answers.push(await imapLogin(p1, '127.0.0.9', 'alice@example.com', 'wrong'));
      // Before the limit: the lookup is down (UNAVAILABLE); past it: throttled.
      expect(count(answers.slice(0, LIMIT), /Too many login attempts/)).toBe(0);
      expect(count(answers.slice(LIMIT), /Too many login attempts/)).toBe(5);
    } finally {
      await world.redis!.start();
    }
  });
});
