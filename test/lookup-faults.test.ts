import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { parseConfig } from '../src/config.js';
import { runCtl } from '../src/ctl.js';
import { createLogger } from '../src/log.js';
import { LookupFailure, type Route } from '../src/lookup/model.js';
import { startServer, type RunningServer } from '../src/server.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { freePort } from './harness/ports.js';
import { startRelay, type Relay } from './harness/relay.js';
import { startWorld, type World } from './harness/world.js';
import { changeInRedis, seedRedis, worldRoutes, writeRoutesFile, type RouteModel } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Routing under lookup faults (issue 13, lookup side), against real Redis and Dovecot:
// malformed records, a stalled subscriber, an emptied Redis, unusable slot records, the
// one staleness rule, and store changes with a lower epoch. Every proxy here runs in this
// process with a logger whose lines the tests read.

let world: World;
let redisUrl: string;

interface Proxy {
  server: RunningServer;
  port: number;
  adminPort: number;
  logs: string[];
  logged(re: RegExp): boolean;
  close(): Promise<void>;
}

const running: Proxy[] = [];

async function startProxy(lookup: Record<string, unknown>): Promise<Proxy> {
  const port = await freePort('127.0.0.1');
  const adminPort = await freePort('127.0.0.1');
  const cfg = parseConfig(
    { listeners: [{ protocol: 'imap', address: '127.0.0.1', port }], lookup, admin: { address: '127.0.0.1', port: adminPort } },
    'test config',
    tempDir('cfg'),
  );
  const logs: string[] = [];
  const server = await startServer(cfg, createLogger('info', (l) => logs.push(l)));
  const p: Proxy = { server, port, adminPort, logs, logged: (re) => logs.some((l) => re.test(l)), close: () => server.close() };
  running.push(p);
  return p;
}

async function healthz(p: Proxy): Promise<number> {
  return (await fetch(`http://127.0.0.1:${p.adminPort}/healthz`)).status;
}

beforeAll(async () => {
  world = await startWorld({ redis: true });
  redisUrl = world.redis!.url;
});

afterAll(async () => {
  await world?.stop();
});

beforeEach(async () => {
  const r = new Redis(redisUrl);
  await r.flushall();
  r.disconnect();
  await seedRedis(redisUrl, worldRoutes(world));
});

afterEach(async () => {
  await Promise.all(running.splice(0).map((p) => p.close()));
});

interface IdleSession {
  c: LineClient;
  /** The BYE line; rejects if the connection dies without one. */
  bye: Promise<string>;
  /** Ends IDLE and expects the tagged OK: proves the session is still spliced. */
  stillThere(): Promise<void>;
}

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
  let byeSeen = false;
  const bye = (async () => {
    for (;;) {
      const line = await c.readLine(60_000);
      if (line.startsWith('* BYE')) {
        byeSeen = true;
        return line;
      }
      if (line.startsWith('c OK')) return line;
    }
  })();
  bye.catch(() => undefined);
  return {
    c,
    bye,
    stillThere: async () => {
      c.send('DONE');
      expect(await bye).toMatch(/^c OK/);
      expect(byeSeen).toBe(false);
    },
  };
}

/** Logs in and says where it landed (the seed message's Subject), or the tagged answer. */
async function landsOn(port: number, user: string, pass: string): Promise<string> {
  const c = await connectLines({ host: '127.0.0.1', port });
  try {
    await c.readLine();
    c.send(`a LOGIN ${user} ${pass}`);
    const ok = (await c.readUntil(/^a /)).at(-1)!;
    if (!ok.startsWith('a OK')) return ok;
    c.send('b SELECT INBOX');
    await c.readUntil(/^b /);
    c.send('c FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]');
    return (await c.readUntil(/^c /)).find((l) => l.startsWith('Subject:'))!;
  } finally {
    c.close();
  }
}

async function hset(key: string, fields: Record<string, string>): Promise<void> {
  const r = new Redis(redisUrl);
  try {
    await r.hset(key, fields);
  } finally {
    r.disconnect();
  }
}

/** Ends the proxies' subscriptions: what was written meanwhile is only seen by the resync. */
async function killSubscribers(): Promise<void> {
  const r = new Redis(redisUrl);
  try {
    await r.call('CLIENT', 'KILL', 'TYPE', 'pubsub');
  } finally {
    r.disconnect();
  }
}

describe('a malformed record (item 2)', () => {
  it('is one unreadable object in a resync: the rest applies, its own sessions end, healthz stays up', async () => {
    const p = await startProxy({ redis: { url: redisUrl } });
    await expect.poll(() => p.server.router.stats.live).toBe(true);
    const alice = await idle(p.port, 'alice@example.com', 'alicepw'); // store1 on slotA
    const bob = await idle(p.port, 'bob@example.com', 'bobpw'); // store2 on slotB
    // Written with no event (as if published while the subscriber was away): only the
    // resync after the subscription comes back can find these.
    await hset('ms:store:store1', { master: 'slotB', replicas: 'slotA', epoch: '2' });
    await hset('ms:store:store2', { status: 'disabled' });
    const resyncs = p.server.router.stats.resyncs;
    await killSubscribers();
    expect(await alice.bye).toBe('* BYE [UNAVAILABLE] store moved to another server');
    expect(await bob.bye).toBe('* BYE [UNAVAILABLE] store record unreadable');
    expect(p.server.router.stats.resyncs).toBeGreaterThan(resyncs);
    await expect.poll(() => p.server.router.stats.live).toBe(true);
    expect(await healthz(p)).toBe(200);
    expect(p.logged(/"level":"error".*"key":"ms:store:store2".*bad status \\"disabled\\"/)).toBe(true);
    expect(await landsOn(p.port, 'alice@example.com', 'alicepw')).toBe('Subject: on slotB');
    expect(await landsOn(p.port, 'bob@example.com', 'bobpw')).toMatch(/^a NO \[UNAVAILABLE\] /);
    // Written right again (with its event), it serves again.
    await changeInRedis(redisUrl, 'store', 'store2', { status: 'active', epoch: '3' });
    await expect.poll(() => landsOn(p.port, 'bob@example.com', 'bobpw')).toBe('Subject: on slotB');
    expect(p.server.router.stats.malformed).toBe(0);
  });

  it('ends a session whose own record turns bad (event), and refuses its logins as temporary', async () => {
    const p = await startProxy({ redis: { url: redisUrl } });
    await expect.poll(() => p.server.router.stats.live).toBe(true);
    const carol = await idle(p.port, 'carol@example.com', 'carolpw');
    const alice = await idle(p.port, 'alice@example.com', 'alicepw');
    await changeInRedis(redisUrl, 'user', 'carol@example.com', { status: 'disabled' });
    expect(await carol.bye).toBe('* BYE [UNAVAILABLE] account record unreadable');
    expect(await landsOn(p.port, 'carol@example.com', 'carolpw')).toMatch(/^a NO \[UNAVAILABLE\] /);
    await changeInRedis(redisUrl, 'store', 'store1', { epoch: 'abc' });
    expect(await alice.bye).toBe('* BYE [UNAVAILABLE] store record unreadable');
    expect(p.logged(/"level":"error".*"key":"ms:store:store1".*bad epoch/)).toBe(true);
    expect(p.logged(/"level":"error".*"key":"ms:user:carol@example.com"/)).toBe(true);
    // A login that reads the bad record through (not cached) gets the same temporary error.
    const q = await startProxy({ redis: { url: redisUrl } });
    expect(await landsOn(q.port, 'alice@example.com', 'alicepw')).toMatch(/^a NO \[UNAVAILABLE\] /);
    expect(await landsOn(q.port, 'nobody@example.com', 'x')).toMatch(/^a NO \[AUTHENTICATIONFAILED\] /);
    expect(q.logged(/"level":"error".*"key":"ms:store:store1"/)).toBe(true);
  });

  it('is one unreadable entry of the routes file: the rest of the save applies', async () => {
    const dir = tempDir('faults');
    const file = join(dir, 'routes.yaml');
    const routes: RouteModel = worldRoutes(world);
    writeRoutesFile(file, routes);
    const p = await startProxy({ file });
    const alice = await idle(p.port, 'alice@example.com', 'alicepw');
    const carol = await idle(p.port, 'carol@example.com', 'carolpw');
    const bob = await idle(p.port, 'bob@example.com', 'bobpw');
    const next: RouteModel = structuredClone(routes);
    next.users['carol@example.com'] = { store: 'store1', status: 'disabled' };
    next.stores.store2 = { master: 'slotA', replicas: 'slotB', epoch: '2' };
    writeRoutesFile(file, next);
    expect(await carol.bye).toBe('* BYE [UNAVAILABLE] account record unreadable');
    expect(await bob.bye).toBe('* BYE [UNAVAILABLE] store moved to another server');
    await alice.stillThere();
    expect(await landsOn(p.port, 'carol@example.com', 'carolpw')).toMatch(/^a NO \[UNAVAILABLE\] /);
    expect(await landsOn(p.port, 'bob@example.com', 'bobpw')).toBe('Subject: on slotA');
    expect(p.logged(/"level":"error".*"key":"users.carol@example.com"/)).toBe(true);
  });
});

describe('a stalled subscriber (item 3)', () => {
  let relay: Relay;
  beforeEach(async () => {
    relay = await startRelay({ host: world.redis!.host, port: world.redis!.port });
  });
  afterEach(async () => {
    await relay.close();
  });

  it('counts silence as events lost: a user locked meanwhile is refused within a bound, and resynced when it flows', async () => {
    // Defaults for the heartbeat (PING every 1 s, 3 s of silence is "lost").
    const p = await startProxy({ redis: { url: relay.url, command_timeout_ms: 500 }, max_stale_ms: 1000 });
    await expect.poll(() => p.server.router.stats.live).toBe(true);
    const session = await idle(p.port, 'alice@example.com', 'alicepw');
    expect(await landsOn(p.port, 'alice@example.com', 'alicepw')).toBe('Subject: on slotA'); // cached
    relay.stall();
    await changeInRedis(redisUrl, 'user', 'alice@example.com', { status: 'locked' }); // its event is stuck in the relay
    const t0 = Date.now();
    await expect.poll(() => landsOn(p.port, 'alice@example.com', 'alicepw'), { timeout: 15_000, interval: 250 }).toMatch(/^a NO \[UNAVAILABLE\] /);
    const refusedAfter = Date.now() - t0;
    expect(p.server.router.stats.live).toBe(false);
    expect(p.logged(/no answer on the event subscription/)).toBe(true);
    expect(await healthz(p)).toBe(503);
    relay.flow();
    // Once it flows the subscription is made again and everything re-read: the lock
    // reaches the cache (and the session), and the refusal says why.
    expect(await session.bye).toBe('* BYE [UNAVAILABLE] account locked');
    await expect.poll(() => p.server.router.stats.live, { timeout: 15_000 }).toBe(true);
    await expect(p.server.router.resolve('alice@example.com')).rejects.toMatchObject({ kind: 'locked' });
    console.log(`stalled subscriber: a user locked during the stall was refused ${refusedAfter} ms after the lock (heartbeat 1000/3000 ms, max_stale_ms 1000)`);
  });
});

describe('Redis that comes back empty (item 4)', () => {
  it('is a lookup failure, not "every account removed": sessions stay, logins get UNAVAILABLE, routes come back', async () => {
    const p = await startProxy({ redis: { url: redisUrl }, max_stale_ms: 1000, resync_retry_max_ms: 1000 });
    await expect.poll(() => p.server.router.stats.live).toBe(true);
    const alice = await idle(p.port, 'alice@example.com', 'alicepw');
    const bob = await idle(p.port, 'bob@example.com', 'bobpw');
    expect(await landsOn(p.port, 'carol@example.com', 'carolpw')).toBe('Subject: on slotA');
    // A restart without persistence: the data is gone when it comes back.
    await world.redis!.stop();
    rmSync(join(world.redis!.dir, 'dump.rdb'), { force: true });
    await world.redis!.start();
    await expect.poll(() => p.server.router.stats.massRemovalsRefused, { timeout: 15_000 }).toBeGreaterThan(0);
    expect(p.logged(/"level":"error".*most known routes are gone/)).toBe(true);
    await alice.stillThere();
    await bob.stillThere();
    // Past max_stale_ms: temporary errors, never "authentication failed" (which makes
    // clients ask for passwords), for known and unknown users alike.
    await expect.poll(() => landsOn(p.port, 'carol@example.com', 'carolpw'), { timeout: 10_000 }).toMatch(/^a NO \[UNAVAILABLE\] /);
    expect(await landsOn(p.port, 'nobody@example.com', 'x')).toMatch(/^a NO \[UNAVAILABLE\] /);
    expect(await healthz(p)).toBe(503);
    // The routes are restored (a replica promoted back, a restore): the retried resync takes them.
    await seedRedis(redisUrl, worldRoutes(world));
    await expect.poll(() => p.server.router.stats.live, { timeout: 15_000 }).toBe(true);
    expect(await landsOn(p.port, 'carol@example.com', 'carolpw')).toBe('Subject: on slotA');
    expect(await landsOn(p.port, 'nobody@example.com', 'x')).toMatch(/^a NO \[AUTHENTICATIONFAILED\] /);
  });

  it('still applies a few real deletions found by a resync', async () => {
    const p = await startProxy({ redis: { url: redisUrl } });
    await expect.poll(() => p.server.router.stats.live).toBe(true);
    const carol = await idle(p.port, 'carol@example.com', 'carolpw');
    expect(await landsOn(p.port, 'alice@example.com', 'alicepw')).toBe('Subject: on slotA');
    expect(await landsOn(p.port, 'bob@example.com', 'bobpw')).toBe('Subject: on slotB');
    const r = new Redis(redisUrl);
    await r.del('ms:user:carol@example.com');
    r.disconnect();
    await killSubscribers();
    expect(await carol.bye).toBe('* BYE [UNAVAILABLE] account removed');
    expect(p.server.router.stats.massRemovalsRefused).toBe(0);
    await expect.poll(() => p.server.router.stats.live).toBe(true);
  });
});

describe('slot records (item 8)', () => {
  it('refuses ports that are not plain decimal and hosts that point nowhere, in the proxy and in ctl', async () => {
    const p = await startProxy({ redis: { url: redisUrl } });
    await expect.poll(() => p.server.router.stats.live).toBe(true);
    const slotA = worldRoutes(world).slots.slotA!;
    const bads: Record<string, string>[] = [{ imap: `${slotA.imap}.0` }, { imap: `0x${Number(slotA.imap).toString(16)}` }, { host: '0.0.0.0' }, { host: '::' }];
    for (const bad of bads) {
      await changeInRedis(redisUrl, 'slot', 'slotA', { ...slotA, ...bad });
      await expect.poll(() => landsOn(p.port, 'alice@example.com', 'alicepw')).toMatch(/^a NO \[UNAVAILABLE\] /);
      expect(p.logged(/"level":"error".*"key":"ms:slot:slotA"/)).toBe(true);
      await changeInRedis(redisUrl, 'slot', 'slotA', slotA);
      await expect.poll(() => landsOn(p.port, 'alice@example.com', 'alicepw')).toBe('Subject: on slotA');
    }
    const ctl = async (...args: string[]) => {
      let err = '';
      const code = await runCtl([...args, '--redis', redisUrl], { stdout: () => {}, stderr: (t) => (err += t), env: {} });
      return { code, err };
    };
    for (const host of ['0.0.0.0', '::', '0']) {
      const res = await ctl('slot', 'set', 'slotA', '--host', host);
      expect(res.code, res.err).toBe(2);
      expect(res.err).toMatch(/unusable host/);
    }
    expect((await ctl('slot', 'set', 'slotA', '--imap', '0x0d017')).code).toBe(2);
    expect((await ctl('slot', 'set', 'slotA', '--imap', '53143.0')).code).toBe(2);
    const r = new Redis(redisUrl);
    expect(await r.hget('ms:slot:slotA', 'host')).toBe(slotA.host);
    r.disconnect();
  });
});

describe('one staleness rule (item 9)', () => {
  it('fails the login re-check of a route whose backend login was renamed', async () => {
    const p = await startProxy({ redis: { url: redisUrl } });
    await expect.poll(() => p.server.router.stats.live).toBe(true);
    const route: Route = await p.server.router.resolve('alice@example.com');
    expect(p.server.router.stillValid(route, 'imap')).toBe(true);
    const events = p.server.router.stats.events;
    await changeInRedis(redisUrl, 'user', 'alice@example.com', { backend_login: 'alice-renamed@example.com' });
    await expect.poll(() => p.server.router.stats.events).toBeGreaterThan(events);
    expect(p.server.router.stillValid(route, 'imap')).toBe(false);
    // ... as the event path does for a session already spliced.
    const renamed = p.server.router.stats.events;
    await changeInRedis(redisUrl, 'user', 'alice@example.com', { backend_login: 'alice@example.com' });
    await expect.poll(() => p.server.router.stats.events).toBeGreaterThan(renamed); // the login below must see it
    const session = await idle(p.port, 'alice@example.com', 'alicepw');
    await changeInRedis(redisUrl, 'user', 'alice@example.com', { backend_login: 'alice-renamed@example.com' });
    expect(await session.bye).toBe('* BYE [UNAVAILABLE] account renamed');
  });
});

describe('store changes with a lower epoch (item 10)', () => {
  it('are ignored, and logged with the store and both epochs', async () => {
    const p = await startProxy({ redis: { url: redisUrl } });
    await expect.poll(() => p.server.router.stats.live).toBe(true);
    const session = await idle(p.port, 'alice@example.com', 'alicepw');
    const events = p.server.router.stats.events;
    await changeInRedis(redisUrl, 'store', 'store1', { epoch: '5' });
    await expect.poll(() => p.server.router.stats.events).toBeGreaterThan(events); // epoch 5 is known before the next change
    await changeInRedis(redisUrl, 'store', 'store1', { master: 'slotB', epoch: '4' }); // a buggy tool
    await expect.poll(() => p.logs.find((l) => l.includes('lower epoch'))).toMatch(/"level":"warn".*"store":"store1","known_epoch":5,"read_epoch":4/);
    expect(p.server.router.stats.olderEpochsIgnored).toBeGreaterThan(0);
    expect((await p.server.router.resolve('alice@example.com')).slot).toBe('slotA');
    await session.stillThere();
    const failure = await p.server.router.resolve('nobody@example.com').catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(LookupFailure);
  });
});
