import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Redis } from 'ioredis';
import { stringify } from 'yaml';
import { runCtl } from '../src/ctl.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { imapSubjects, lmtpSend } from './harness/clients.js';
import { connectLines } from './harness/lines.js';
import { waitUntil } from './harness/proc.js';
import { makeCA, makeCert } from './harness/certs.js';
import { startSentinels, type SentinelSetup } from './harness/sentinel.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, type RouteModel } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Issue 10, Redis Sentinel: a real redis-sentinel setup (one primary, one replica, three
// sentinels) and two proxies on it. The primary is killed under a login loop and an LMTP
// loop: Sentinel promotes the replica, the proxies follow it (no restart), logins keep
// working (cached users throughout, new users once the promotion is done), a failover
// published on the new primary is obeyed by both, and no LMTP message is lost.

let world: World;
let sentinel: SentinelSetup;
let writer: Redis;
const proxies: TestProxy[] = [];

async function seed(r: Redis, model: RouteModel): Promise<void> {
  const m = r.multi();
  for (const [kind, objs] of [['user', model.users], ['store', model.stores], ['slot', model.slots]] as const) {
    for (const [id, fields] of Object.entries(objs)) m.hset(`ms:${kind}:${id}`, fields);
  }
  await m.exec();
}

/** One IMAP login and LOGOUT over a raw socket; the tagged answer to LOGIN. */
async function imapLogin(port: number, user: string, password: string): Promise<string> {
  const c = await connectLines({ host: '127.0.0.1', port, timeoutMs: 5000 });
  try {
    await c.readLine(5000);
    c.send(`a LOGIN ${user} ${password}`);
    const lines = await c.readUntil(/^a /, 10_000);
    c.send('b LOGOUT');
    return lines.at(-1)!;
  } finally {
    c.close();
  }
}

function message(n: number): string {
  return `From: loop@example.net\r\nTo: bob@example.com\r\nSubject: sentinel-loop ${n}\r\nMessage-ID: <sentinel-loop-${n}@example.net>\r\n\r\nmessage ${n}\r\n`;
}

beforeAll(async () => {
  [world, sentinel] = await Promise.all([startWorld(), startSentinels()]);
  writer = sentinel.client();
  writer.on('error', () => undefined);
  await seed(writer, worldRoutes(world));
  // The routes are on the replica before anything is killed (Redis replicates asynchronously).
  expect(await writer.wait(1, 5000)).toBe(1);
  for (let i = 0; i < 2; i++) {
    proxies.push(
      await startProxy({
        listeners: [{ protocol: 'imap' }, { protocol: 'lmtp' }],
        lookup: {
          redis: { sentinels: sentinel.sentinels, name: sentinel.name, command_timeout_ms: 500, heartbeat_ms: 250, heartbeat_timeout_ms: 1000 },
          max_stale_ms: 20_000,
        },
        limits: { auth_failure_delay_ms: 0 },
      }),
    );
  }
}, 90_000);

afterAll(async () => {
  for (const p of proxies) await p.close();
  writer?.disconnect();
  await sentinel?.stop();
  await world?.stop();
});

describe('Redis Sentinel failover under load', () => {
  it('follows the promoted replica: logins go on, events are obeyed, no message is lost', { timeout: 120_000 }, async () => {
    const [p1, p2] = proxies as [TestProxy, TestProxy];
    for (const p of proxies) await waitUntil(async () => p.server.router.stats.live, { what: 'route events live' });
    // alice and bob are cached on both proxies; carol is looked up on neither before the promotion.
    for (const p of proxies) {
      expect(await imapLogin(p.ports.imap!, 'alice@example.com', 'alicepw')).toMatch(/^a OK/);
      expect(await imapLogin(p.ports.imap!, 'bob@example.com', 'bobpw')).toMatch(/^a OK/);
    }

    let stop = false;
    const deadline = Date.now() + 90_000;
    const logins: { began: number; at: number; proxy: number; user: string; reply: string }[] = [];
    const loginLoop = (async () => {
      for (let n = 0; n < 5000 && !stop && Date.now() < deadline; n++) {
        const i = n % 2;
        const [user, pw] = n % 4 < 2 ? ['alice@example.com', 'alicepw'] : ['bob@example.com', 'bobpw'];
        const began = Date.now();
        const reply = await imapLogin(proxies[i]!.ports.imap!, user, pw).catch((e: Error) => `error ${e.message}`);
        logins.push({ began, at: Date.now(), proxy: i, user, reply });
      }
    })();
    const lmtp: { n: number; reply: string }[] = [];
    const lmtpLoop = (async () => {
      for (let n = 0; n < 2000 && !stop && Date.now() < deadline; n++) {
        const r = await lmtpSend('127.0.0.1', p1.ports.lmtp!, ['bob@example.com'], message(n)).catch((e: Error) => ({ rcptReplies: [`error ${e.message}`], dataReplies: [] }));
        lmtp.push({ n, reply: r.dataReplies[0] ?? r.rcptReplies[0]! });
      }
    })();

    await waitUntil(async () => logins.length >= 10 && lmtp.length >= 5, { what: 'both loops running' });
    const oldPort = await sentinel.killMaster();
    const killedAt = Date.now();
    const newPort = await sentinel.waitForPromotion(oldPort);
    const promotedAt = Date.now();
    expect(newPort).not.toBe(oldPort);

    // Each proxy is back on events through the new primary (resubscribed and resynced).
    for (const p of proxies) await waitUntil(async () => p.server.router.stats.live, { what: 'route events live again', timeoutMs: 30_000 });
    // A user neither proxy has seen: read through from the new primary.
    for (const p of proxies) expect(await imapLogin(p.ports.imap!, 'carol@example.com', 'carolpw')).toMatch(/^a OK/);

    // A failover published on the new primary after the promotion: both proxies obey it.
    // Published with ctl, which finds the new primary through the sentinels of the config.
    const cfgFile = join(tempDir('sentinel'), 'mailsplice.yaml');
    writeFileSync(cfgFile, stringify({ listeners: [{ protocol: 'imap', port: 1 }], lookup: { redis: { sentinels: sentinel.sentinels, name: sentinel.name } } }));
    const out: string[] = [];
    const failoverFrom = Date.now();
    const code = await runCtl(['failover', 'store1', '--to', 'slotB', '--config', cfgFile], { stdout: (t) => out.push(t), stderr: (t) => out.push(t), env: {} });
    const failoverTo = Date.now();
    expect(code, out.join('')).toBe(0);
    for (const p of proxies) {
      await waitUntil(async () => (await p.server.router.resolve('alice@example.com')).slot === 'slotB', { what: 'store1 on slotB' });
      expect(await imapSubjects({ host: '127.0.0.1', port: p.ports.imap!, user: 'alice@example.com', password: 'alicepw' })).toContain('on slotB');
    }

    // Let both loops run on a little past the switch, then stop them.
    const after = logins.length;
    await waitUntil(async () => logins.length >= after + 10, { what: 'logins after the switch' });
    stop = true;
    await Promise.all([loginLoop, lmtpLoop]);

    // Nothing restarted: the same two servers, each with its listeners.
    expect(proxies.map((p) => p.server.proxies.length)).toEqual([1, 1]);
    // Every login succeeded, except alice's while the failover itself held store1 locked
    // (the lock between its two steps: "try again", as it should).
    const failed = logins.filter((l) => !/^a OK/.test(l.reply));
    const byTheLock = (l: (typeof logins)[number]) =>
      l.user === 'alice@example.com' && l.at >= failoverFrom && l.began <= failoverTo && /^a NO \[UNAVAILABLE\]/.test(l.reply);
    expect(failed.filter((l) => !byTheLock(l))).toEqual([]);
    const during = logins.filter((l) => l.at > killedAt && l.at < promotedAt);
    expect(during.length).toBeGreaterThan(0); // the loop did run while there was no primary

    // LMTP: what got 250 is on slotB once; what got 4xx is delivered on the retry, once.
    const refused = lmtp.filter((m) => !/^250 /.test(m.reply));
    for (const m of refused) expect(m.reply).toMatch(/^4\d\d /);
    for (const m of refused) {
      const r = await lmtpSend('127.0.0.1', p1.ports.lmtp!, ['bob@example.com'], message(m.n));
      expect(r.dataReplies).toEqual([expect.stringMatching(/^250 /)]);
    }
    const onDisk = (await world.slotB.messages('bob@example.com'))
      .map((m) => /Subject: sentinel-loop (\d+)/.exec(m)?.[1])
      .filter((x): x is string => x !== undefined)
      .map(Number)
      .sort((a, b) => a - b);
    expect(onDisk).toEqual(lmtp.map((m) => m.n));
    console.log(
      `sentinel failover: promotion ${promotedAt - killedAt} ms after the kill; ${logins.length} logins (${during.length} without a primary), none failed (${failed.length} refused by the failover's own lock); ${lmtp.length} LMTP messages, ${refused.length} deferred (4xx), none lost`,
    );
  });
});

describe('Redis Sentinel over TLS', () => {
  let tlsSetup: SentinelSetup | undefined;
  let proxy: TestProxy | undefined;
  afterAll(async () => {
    await proxy?.close();
    await tlsSetup?.stop();
  });

  it('reads routes and events through TLS to the sentinels and to the master (lookup.redis.tls)', { timeout: 90_000 }, async () => {
    const dir = tempDir('sentinel-tls');
    const ca = await makeCA(join(dir, 'ca'));
    const cert = await makeCert(join(dir, 'server'), { ca, cn: 'redis.example.test', altNames: ['127.0.0.1'], name: 'redis' });
    tlsSetup = await startSentinels('127.0.0.1', { cert: cert.certFile, key: cert.keyFile, ca: ca.certFile });
    const w = tlsSetup.client();
    w.on('error', () => undefined);
    try {
      await seed(w, worldRoutes(world));
    } finally {
      w.disconnect();
    }
    const redis = { sentinels: tlsSetup.sentinels, name: tlsSetup.name, tls: { ca: ca.certFile } };
    proxy = await startProxy({ listeners: [{ protocol: 'imap' }], lookup: { redis: { ...redis, command_timeout_ms: 2000 } }, limits: { auth_failure_delay_ms: 0 } });
    await waitUntil(async () => proxy!.server.router.stats.live, { what: 'route events live over TLS' });
    expect(await imapLogin(proxy.ports.imap!, 'bob@example.com', 'bobpw')).toMatch(/^a OK/);
    // ctl with the same settings (a config file) publishes; the proxy obeys.
    const cfgFile = join(dir, 'mailsplice.yaml');
    writeFileSync(cfgFile, stringify({ listeners: [{ protocol: 'imap', port: 1 }], lookup: { redis } }));
    const out: string[] = [];
    const code = await runCtl(['lock', 'user', 'bob@example.com', '--config', cfgFile], { stdout: (t) => out.push(t), stderr: (t) => out.push(t), env: {} });
    expect(code, out.join('')).toBe(0);
    await waitUntil(async () => (await imapLogin(proxy!.ports.imap!, 'bob@example.com', 'bobpw')).startsWith('a NO [UNAVAILABLE]'), { what: 'the lock obeyed' });
  });
});
