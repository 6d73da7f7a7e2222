import { execFile } from 'node:child_process';
import { resolve } from 'node:path';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectLines, type LineClient } from './harness/lines.js';
import { startWorld, type World } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { changeInRedis, seedRedis, worldRoutes } from './support/routes.js';

// Failover across a fleet: two mailsplice processes on one Redis, sessions of one store
// spread over both, one change published, every stale session ended at once.

let world: World;
let proxies: ProxyProcess[] = [];

const execFileP = promisify(execFile);
const CLI = resolve(import.meta.dirname, '../src/cli.ts');

/** Runs `mailsplice ctl ...` against the test Redis, as a failover tool would. */
async function ctl(...args: string[]): Promise<string> {
  const { stdout } = await execFileP(process.execPath, ['--import', 'tsx', CLI, 'ctl', ...args, '--redis', world.redis!.url]);
  return stdout;
}

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  const cfg = { lookup: { redis: { url: world.redis!.url } } };
  proxies = await Promise.all([startProxyProcess(cfg), startProxyProcess(cfg)]);
});

afterAll(async () => {
  await Promise.all(proxies.map((p) => p.stop()));
  await world?.stop();
});

interface IdleSession {
  c: LineClient;
  user: string;
  /** Resolves with the BYE line and when it came; rejects if the connection dies without one. */
  bye: Promise<{ line: string; at: number }>;
}

/** Logs in through `port`, selects INBOX and starts IDLE. */
async function idle(port: number, user: string, pass: string): Promise<IdleSession> {
  const c = await connectLines({ host: '127.0.0.1', port, timeoutMs: 20_000 });
  await c.readLine();
  c.send(`a LOGIN ${user} ${pass}`);
  const login = (await c.readUntil(/^a /, 20_000)).at(-1)!;
  if (!login.startsWith('a OK')) throw new Error(`${user}: ${login}`);
  c.send('b SELECT INBOX');
  await c.readUntil(/^b OK/, 20_000);
  c.send('c IDLE');
  expect(await c.readLine(20_000)).toMatch(/^\+ /);
  const bye = (async () => {
    for (;;) {
      const line = await c.readLine(120_000);
      if (line.startsWith('* BYE')) return { line, at: Date.now() };
    }
  })();
  bye.catch(() => undefined);
  return { c, user, bye };
}

async function landsOn(port: number, user: string, pass: string): Promise<string> {
  const c = await connectLines({ host: '127.0.0.1', port });
  await c.readLine();
  c.send(`a LOGIN ${user} ${pass}`);
  const ok = (await c.readUntil(/^a /)).at(-1)!;
  if (!ok.startsWith('a OK')) {
    c.close();
    return ok;
  }
  c.send('b SELECT INBOX');
  await c.readUntil(/^b /);
  c.send('c FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]');
  const subject = (await c.readUntil(/^c /)).find((l) => l.startsWith('Subject:'))!;
  c.close();
  return subject;
}

/** Opens n sessions spread over both proxies, a few at a time. */
async function openMany(n: number, user: string, pass: string): Promise<IdleSession[]> {
  const out: IdleSession[] = [];
  for (let i = 0; i < n; i += 20) {
    const batch = Array.from({ length: Math.min(20, n - i) }, (_, k) => idle(proxies[(i + k) % 2]!.port, user, pass));
    out.push(...(await Promise.all(batch)));
  }
  return out;
}

describe('failover of a store', () => {
  it('ends every session of the store on both proxies, and only those', async () => {
    const store1 = [...(await openMany(100, 'alice@example.com', 'alicepw')), ...(await openMany(100, 'carol@example.com', 'carolpw'))];
    const others = await openMany(10, 'bob@example.com', 'bobpw');

    const t0 = Date.now();
    const out = await ctl('failover', 'store1', '--to', 'slotB', '--json');
    const tDone = Date.now();
    expect(JSON.parse(out)).toMatchObject({ store: 'store1', to: 'slotB' });
    const byes = await Promise.all(store1.map((s) => s.bye));
    const first = Math.min(...byes.map((b) => b.at));
    const last = Math.max(...byes.map((b) => b.at));
    console.log(
      `failover: ctl failover took ${tDone - t0} ms (process start included); ${store1.length} sessions on 2 proxies ended, ` +
        `first BYE ${first - t0} ms, last BYE ${last - t0} ms after the command started`,
    );
    // The lock is the first step of a failover: sessions end with its reason or the move's.
    for (const b of byes) expect(b.line).toMatch(/^\* BYE \[UNAVAILABLE\] (store locked for maintenance|store moved to another server)$/);
    expect(last - t0).toBeLessThan(10_000); // generous: a loaded 2-core CI machine

    // Sessions of the other store are untouched: still in IDLE, still answering.
    for (const s of others) {
      s.c.send('DONE');
      expect(await s.c.readLine()).toMatch(/^c OK/);
      s.c.close();
    }
    store1.forEach((s) => s.c.close());

    // A reconnect lands on the new master, through either proxy.
    expect(await landsOn(proxies[0]!.port, 'alice@example.com', 'alicepw')).toBe('Subject: on slotB');
    expect(await landsOn(proxies[1]!.port, 'carol@example.com', 'carolpw')).toBe('Subject: on slotB');
  });

  it('ends only the moved user on move, and the next login follows', async () => {
    const alice = await openMany(4, 'alice@example.com', 'alicepw');
    const carol = await openMany(4, 'carol@example.com', 'carolpw');
    // store2's master is slotB, as store1's is after the failover above: point store2 at
    // slotA first, so that the move changes where carol lands.
    await ctl('failover', 'store2', '--to', 'slotA');
    await ctl('move-user', 'carol@example.com', '--to', 'store2');
    for (const s of carol) expect((await s.bye).line).toMatch(/^\* BYE \[UNAVAILABLE\] /);
    for (const s of alice) {
      s.c.send('DONE');
      expect(await s.c.readLine()).toMatch(/^c OK/);
      s.c.close();
    }
    carol.forEach((s) => s.c.close());
    expect(await landsOn(proxies[0]!.port, 'carol@example.com', 'carolpw')).toBe('Subject: on slotA');
  });

  it('ends sessions and refuses logins while a store is locked, and serves again after unlock', async () => {
    const bob = await openMany(4, 'bob@example.com', 'bobpw'); // store2, master slotA now
    await ctl('lock', 'store', 'store2');
    for (const s of bob) expect((await s.bye).line).toBe('* BYE [UNAVAILABLE] store locked for maintenance');
    bob.forEach((s) => s.c.close());
    expect(await landsOn(proxies[1]!.port, 'bob@example.com', 'bobpw')).toMatch(/^a NO \[UNAVAILABLE\] /);
    await ctl('unlock', 'store', 'store2');
    await expect.poll(() => landsOn(proxies[1]!.port, 'bob@example.com', 'bobpw')).toBe('Subject: on slotA');
  });
});

describe('lost event stream', () => {
  it('resyncs after the subscription is killed, catching a change published in the gap', async () => {
    const alice = await openMany(6, 'alice@example.com', 'alicepw'); // store1 on slotB
    const admin = new Redis(world.redis!.url);
    try {
      // Kill every subscriber, then change the store at once: the proxies are reconnecting
      // and miss the event; only the resync after resubscribing can catch the change.
      const resyncsBefore = proxies.map((p) => p.log().split('"route events live"').length);
      await admin.call('CLIENT', 'KILL', 'TYPE', 'pubsub');
      await changeInRedis(world.redis!.url, 'store', 'store1', { master: 'slotA', replicas: 'slotB', epoch: '100' });
      for (const s of alice) expect((await s.bye).line).toMatch(/^\* BYE \[UNAVAILABLE\] store moved/);
      alice.forEach((s) => s.c.close());
      // Both proxies noticed the loss and resynced (their logs reach us a little later than the BYEs).
      await expect.poll(() => proxies.every((p, i) => p.log().split('"route events live"').length > resyncsBefore[i]!)).toBe(true);
      expect(proxies.every((p) => p.log().includes('"route events lost'))).toBe(true);
      await expect.poll(() => landsOn(proxies[0]!.port, 'alice@example.com', 'alicepw')).toBe('Subject: on slotA');
    } finally {
      admin.disconnect();
    }
  });

  it('follows changes after Redis itself restarts', async () => {
    const carol = await openMany(4, 'carol@example.com', 'carolpw'); // store2 -> slotA
    await world.redis!.restart();
    await changeInRedis(world.redis!.url, 'store', 'store2', { master: 'slotB', replicas: 'slotA', epoch: '200' });
    for (const s of carol) expect((await s.bye).line).toMatch(/^\* BYE \[UNAVAILABLE\] store moved/);
    carol.forEach((s) => s.c.close());
    await expect.poll(() => landsOn(proxies[1]!.port, 'carol@example.com', 'carolpw'), { timeout: 10_000 }).toBe('Subject: on slotB');
  });
});
