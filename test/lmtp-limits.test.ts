import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectLines, type LineClient } from './harness/lines.js';
import { startWorld, type World } from './harness/world.js';
import { seedRedis, worldRoutes } from './support/routes.js';
import { startProxy, type TestProxy } from './support/proxy.js';

// Issue 14 item 3, LMTP: 10,000 RCPTs were answered in 0.9 s with no limit, telling anyone
// who can connect which addresses exist, and a byte every 5 s kept a connection forever.
// Now: connections per address, RCPTs and unknown-recipient answers per address per minute,
// and an absolute deadline per transaction, all answered with RFC 3463 codes.

let world: World;
let proxy: TestProxy;

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  proxy = await startProxy({
    listeners: [{ protocol: 'lmtp' }],
    lookup: { redis: { url: world.redis!.url } },
    lmtp: {
      connections_per_ip: 3,
      recipients_per_ip_per_minute: 30,
      unknown_recipients_per_ip_per_minute: 5,
      transaction_timeout_ms: 3000,
    },
  });
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

async function lmtpFrom(from: string): Promise<LineClient> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.lmtp!, localAddress: from });
  expect(await c.readLine()).toMatch(/^220 /);
  c.send('LHLO test.example');
  await c.readUntil(/^250 /);
  c.send('MAIL FROM:<sender@example.net>');
  expect(await c.readLine()).toMatch(/^250 /);
  return c;
}

async function rcpt(c: LineClient, address: string): Promise<string> {
  c.send(`RCPT TO:<${address}>`);
  return c.readLine();
}

/** Counting windows are whole minutes: keep a short burst inside one. */
async function notAtTheEndOfAMinute(): Promise<void> {
  await expect.poll(() => Date.now() % 60_000 < 50_000, { timeout: 15_000, interval: 200 }).toBe(true);
}

describe('LMTP limits per client address', () => {
  it('stops answering whether addresses exist after too many unknown ones', async () => {
    await notAtTheEndOfAMinute();
    const c = await lmtpFrom('127.0.0.5');
    const answers: string[] = [];
    for (let i = 0; i < 20; i++) answers.push(await rcpt(c, `nobody${i}@example.com`));
    expect(answers.slice(0, 5).every((a) => a.startsWith('550 5.1.1 '))).toBe(true);
    expect(answers.slice(5).every((a) => a.startsWith('450 4.7.1 '))).toBe(true);
    // From now on a real address gets the same answer: nothing to tell them apart.
    expect(await rcpt(c, 'alice@example.com')).toMatch(/^450 4\.7\.1 /);
    c.close();
    // Another address is not affected.
    const other = await lmtpFrom('127.0.0.6');
    expect(await rcpt(other, 'alice@example.com')).toMatch(/^250 2\.1\.5 /);
    other.close();
  });

  it('limits recipients per address per minute', async () => {
    await notAtTheEndOfAMinute();
    const c = await lmtpFrom('127.0.0.7');
    const answers: string[] = [];
    for (let i = 0; i < 35; i++) answers.push(await rcpt(c, 'alice@example.com'));
    expect(answers.slice(0, 30).every((a) => a.startsWith('250 2.1.5 '))).toBe(true);
    expect(answers.slice(30).every((a) => a.startsWith('452 4.5.3 '))).toBe(true);
    c.close();
  });

  it('limits connections per address', async () => {
    const held = [await lmtpFrom('127.0.0.8'), await lmtpFrom('127.0.0.8'), await lmtpFrom('127.0.0.8')];
    const fourth = await connectLines({ host: proxy.host, port: proxy.ports.lmtp!, localAddress: '127.0.0.8' });
    expect(await fourth.readLine()).toMatch(/^421 4\.7\.0 /);
    fourth.close();
    const other = await lmtpFrom('127.0.0.9');
    other.close();
    for (const c of held) c.close();
    // Closing gives the places back.
    await expect.poll(async () => {
      const c = await connectLines({ host: proxy.host, port: proxy.ports.lmtp!, localAddress: '127.0.0.8' });
      try {
        return (await c.readLine()).slice(0, 3);
      } finally {
        c.close();
      }
    }, { timeout: 5000 }).toBe('220');
  });

  it('ends a transaction that outlasts its deadline, however it trickles', async () => {
    const c = await lmtpFrom('127.0.0.10');
    // A byte every 300 ms: never idle, never a whole line. Bounded: 40 bytes, 12 s.
    let answer: string | undefined;
    for (let i = 0; i < 40 && answer === undefined; i++) {
      c.write('X');
      answer = await c.readLine(300).catch(() => undefined);
    }
    expect(answer).toMatch(/^421 4\.4\.2 /);
    await expect(c.readLine(5000)).rejects.toThrow(/closed/);
  });
});
