import { execFile } from 'node:child_process';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { imapSubjects, lmtpSend } from './harness/clients.js';
import { startCyrusSlot, type CyrusSlot } from './harness/cyrus.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { startRedis, type RedisServer } from './harness/redis.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { seedRedis, type RouteModel } from './support/routes.js';

// A failover of a store whose two slots are Cyrus 3.6 with rolling replication, driven the
// way a failover tool drives it, while a client idles and Postfix delivers through the
// proxy:
//   1. `mailsplice ctl lock store cstore`: sessions end, logins get NO [UNAVAILABLE],
//      deliveries 451 4.2.1;
//   2. `sync_client -u alice` from the old master to the new one (the replication log of
//      a real deployment, replayed by hand);
//   3. `mailsplice ctl failover cstore --to cyrusR --already-locked`: switch and unlock.
// Then every message that got 250, and every 451 retried as Postfix would, is on the new
// master exactly once, and logins land there.
//
// Deliveries go to Cyrus's LMTP port that demands AUTH: the proxy authenticates as the
// slot group's admin_user, an admin of that LMTP service only (deploy/cyrus-backend.conf).

const alice = { name: 'alice', password: 'alicepw' };
/** The proxy's account on both slots: proxyservers, and admin of the authenticated LMTP service only. */
const proxyAccount = { name: 'mailsplice', password: 'mailsplice-secret' };
const PROXY_ACCOUNT_CONF = 'lmtpauth_admins: mailsplice\n';
const LOGIN = 'alice@example.com';
/** Bounds of the delivery load: two Postfix-like workers, one transaction at a time each. */
const WORKERS = 2;
const MAX_DELIVERIES = 400;
const LOAD_DEADLINE_MS = 120_000;
const DEFER_PAUSE_MS = 100;

const execFileP = promisify(execFile);
const CLI = path.resolve(import.meta.dirname, '../src/cli.ts');

let tmp: string;
let redis: RedisServer;
let master: CyrusSlot;
let replica: CyrusSlot;
let proxy: TestProxy;

/** Runs `mailsplice ctl ...` against the test Redis, as a failover tool would. */
async function ctl(...args: string[]): Promise<string> {
  const { stdout } = await execFileP(process.execPath, ['--import', 'tsx', CLI, 'ctl', ...args, '--redis', redis.url]);
  return stdout;
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-cyrus-failover-'));
  await chmod(tmp, 0o755); // Cyrus's services run as `cyrus`
  [redis, master, replica] = await Promise.all([
    startRedis({ dir: path.join(tmp, 'redis') }),
    startCyrusSlot({ id: 'cyrusM', host: '127.0.0.71', users: [alice], proxyUsers: [proxyAccount], extraImapdConf: PROXY_ACCOUNT_CONF, dir: path.join(tmp, 'cyrusM') }),
    startCyrusSlot({ id: 'cyrusR', host: '127.0.0.72', users: [alice], proxyUsers: [proxyAccount], extraImapdConf: PROXY_ACCOUNT_CONF, dir: path.join(tmp, 'cyrusR') }),
  ]);
  // A message from before the test, replicated: the replica starts as a true copy.
  await master.deliver(alice.name, message('seed', 0));
  await master.syncUser(alice.name, replica);
  const slot = (s: CyrusSlot) => ({ host: s.host, imap: String(s.imap), pop3: String(s.pop3), lmtp: String(s.lmtpAuth), status: 'up' });
  const routes: RouteModel = {
    // Cyrus without virtdomains: the backend login is the bare name (passthrough mode).
    users: { [LOGIN]: { store: 'cstore', backend_login: alice.name } },
    stores: { cstore: { master: 'cyrusM', replicas: 'cyrusR', status: 'active', epoch: '1' } },
    slots: { cyrusM: slot(master), cyrusR: slot(replica) },
  };
  await seedRedis(redis.url, routes);
  const passwordFile = path.join(tmp, 'cyrus-admin.pw');
  await writeFile(passwordFile, `${proxyAccount.password}\n`, { mode: 0o600 });
  proxy = await startProxy({
    listeners: [{ protocol: 'imap' }, { protocol: 'lmtp' }],
    lookup: { redis: { url: redis.url } },
    // IMAP with the client's own password; LMTP AUTH PLAIN as the group's admin.
    backend: { identity_groups: [{ slots: ['cyrus*'], identity: 'passthrough', admin_user: proxyAccount.name, admin_password_file: passwordFile }] },
  });
});

afterAll(async () => {
  await proxy?.close();
  await Promise.allSettled([master?.destroy(), replica?.destroy(), redis?.stop()]);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

function message(kind: string, n: number): string {
  return [
    'From: postfix@example.net',
    `To: ${LOGIN}`,
    `Subject: ${kind} ${n}`,
    `Message-ID: <cyrus-failover-${kind}-${n}@example.net>`,
    'Date: Mon, 1 Jan 2024 00:00:00 +0000',
    '',
    `Message ${n}.`,
    '',
  ].join('\r\n');
}

/** The numbers of the `load N` messages in a mailbox, sorted, duplicates kept. */
function loadNumbers(subjects: string[]): number[] {
  return subjects
    .map((s) => /^load (\d+)$/.exec(s)?.[1])
    .filter((x): x is string => x !== undefined)
    .map(Number)
    .sort((a, b) => a - b);
}

async function imapOpen(): Promise<LineClient> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.imap!, timeoutMs: 20_000 });
  expect(await c.readLine()).toMatch(/^\* OK /);
  return c;
}

/** The tagged reply to a LOGIN through the proxy (the session is closed afterwards). */
async function tryLogin(): Promise<string> {
  const c = await imapOpen();
  try {
    c.send(`a LOGIN ${LOGIN} ${alice.password}`);
    return (await c.readUntil(/^a /, 20_000)).at(-1)!;
  } finally {
    c.close();
  }
}

interface Delivery {
  n: number;
  worker: number;
  /** The final answer Postfix acts on: the DATA reply if RCPT got 250, else the RCPT reply. */
  reply: string;
  /** When the answer came (ms, Date.now()). */
  at: number;
}

/**
 * Postfix's side: WORKERS loops, each one LMTP transaction at a time through the proxy,
 * until stopped or bounded by MAX_DELIVERIES / LOAD_DEADLINE_MS.
 */
function startLoad(): { results: Delivery[]; stop(): Promise<void> } {
  const results: Delivery[] = [];
  let next = 1;
  let stopped = false;
  const deadline = Date.now() + LOAD_DEADLINE_MS;
  const worker = async (w: number): Promise<void> => {
    while (!stopped && next <= MAX_DELIVERIES && Date.now() < deadline) {
      const n = next++;
      let reply: string;
      try {
        const r = await lmtpSend(proxy.host, proxy.ports.lmtp!, [LOGIN], message('load', n));
        reply = r.dataReplies[0] ?? r.rcptReplies[0] ?? 'no reply';
      } catch (err) {
        // Postfix defers on a broken connection too; the retry below re-sends it.
        reply = `4xx connection: ${(err as Error).message}`;
      }
      results.push({ n, worker: w, reply, at: Date.now() });
      // Postfix does not re-send a deferred message at once, and a 451 is quick: without a
      // pause the lock would eat the whole MAX_DELIVERIES budget. (Pacing of the load, not
      // a wait for something to happen.)
      if (!reply.startsWith('250')) await sleep(DEFER_PAUSE_MS);
    }
  };
  const running = Promise.all(Array.from({ length: WORKERS }, (_, w) => worker(w)));
  return {
    results,
    stop: async () => {
      stopped = true;
      await running;
    },
  };
}

/** Polls `cond` until true; fails with `what` after `timeoutMs`. Bounded by construction. */
async function until(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  await expect.poll(cond, { timeout: timeoutMs, interval: 20, message: what }).toBe(true);
}

describe('failover of a Cyrus store with rolling replication', () => {
  it('lock, sync_client -u, failover --already-locked: no message lost or doubled, logins on the new master', async () => {
    // A client idling on the master through the proxy.
    const idle = await imapOpen();
    idle.send(`a LOGIN ${LOGIN} ${alice.password}`);
    expect((await idle.readUntil(/^a /)).at(-1)).toMatch(/^a OK /);
    idle.send('b SELECT INBOX');
    await idle.readUntil(/^b OK/);
    idle.send('c IDLE');
    expect(await idle.readLine()).toMatch(/^\+ /);
    const idleLines: string[] = [];
    const bye = (async () => {
      for (;;) {
        const line = await idle.readLine(120_000);
        idleLines.push(line);
        if (line.startsWith('* BYE')) return { line, at: Date.now() };
      }
    })();
    bye.catch(() => undefined);

    // When each route event was published, as a proxy sees it: the lock's BYE is timed from here.
    const events: { event: string; at: number }[] = [];
    const subscriber = new Redis(redis.url);
    subscriber.on('message', (_channel: string, event: string) => events.push({ event, at: Date.now() }));
    await subscriber.subscribe('ms:events');

    const load = startLoad();
    try {
      const ok = (d: Delivery) => d.reply.startsWith('250');
      // Deliveries land on the master and reach the idling client live.
      await until('5 deliveries accepted and pushed to the IDLE session', () => load.results.filter(ok).length >= 5 && idleLines.some((l) => /^\* \d+ EXISTS$/.test(l)));

      // 1. Lock.
      const tLock = Date.now();
      expect(await ctl('lock', 'store', 'cstore')).toMatch(/^locked store cstore/);
      const tLocked = Date.now();
      const ended = await bye;
      const lockEvent = events.find((e) => e.event.includes('"cstore"'));
      expect(lockEvent).toBeDefined();
      expect(ended.line).toBe('* BYE [UNAVAILABLE] store locked for maintenance');
      idle.close();
      expect(await tryLogin()).toMatch(/^a NO \[UNAVAILABLE\] /);
      // Every worker got a 451 after the lock: each runs one transaction at a time, so
      // every transaction that began before the lock has ended; what got 250 is on the
      // old master, and nothing more will be written there.
      await until('each worker deferred once', () =>
        Array.from({ length: WORKERS }, (_, w) => w).every((w) => load.results.some((d) => d.worker === w && d.at >= tLock && d.reply.startsWith('451'))));
      const tFirstDefer = Math.min(...load.results.filter((d) => d.reply.startsWith('451')).map((d) => d.at));
      const acceptedBeforeSync = new Set(load.results.filter(ok).map((d) => d.n));

      // 2. Replay the old master's changes on the new one.
      const tSync = Date.now();
      await master.syncUser(alice.name, replica);
      const syncMs = Date.now() - tSync;

      // 3. Switch and unlock.
      const tSwitch = Date.now();
      const switched = JSON.parse(await ctl('failover', 'cstore', '--to', 'cyrusR', '--already-locked', '--json')) as Record<string, unknown>;
      expect(switched).toMatchObject({ store: 'cstore', from: 'cyrusM', to: 'cyrusR', replicas: ['cyrusM'], unchanged: false });
      const countAtSwitch = load.results.length;
      await until('5 deliveries accepted after the switch', () => load.results.slice(countAtSwitch).filter(ok).length >= 5);
      const tFirstAfter = Math.min(...load.results.filter((d) => d.at >= tSwitch && ok(d)).map((d) => d.at));
      await load.stop();

      // Every final answer is a 250 or a 451 Postfix retries: 4.2.1 for a transaction that
      // found the store locked, 4.3.0 for one the lock's event abandoned before its dot.
      const deferred = load.results.filter((d) => !ok(d));
      for (const d of load.results) expect(d.reply).toMatch(/^(250 |451 4\.2\.1 |451 4\.3\.0 )/);
      const locked = deferred.filter((d) => d.reply.startsWith('451 4.2.1')).length;
      expect(locked).toBeGreaterThanOrEqual(WORKERS);
      // Postfix's retry of each deferred message.
      for (const d of deferred) {
        const r = await lmtpSend(proxy.host, proxy.ports.lmtp!, [LOGIN], message('load', d.n));
        expect(r.dataReplies).toEqual([expect.stringMatching(/^250 /)]);
      }

      const issued = load.results.map((d) => d.n).sort((a, b) => a - b);
      const onNew = await imapSubjects({ host: replica.host, port: replica.imap, user: alice.name, password: alice.password });
      const onOld = await imapSubjects({ host: master.host, port: master.imap, user: alice.name, password: alice.password });
      // Each message on the new master exactly once: those that got 250 and those retried.
      expect(loadNumbers(onNew)).toEqual(issued);
      expect(onNew.filter((s) => s === 'seed 0')).toHaveLength(1);
      // The old master got what was accepted before the lock, and nothing after the switch.
      const onOldNumbers = loadNumbers(onOld);
      expect(onOldNumbers).toEqual([...acceptedBeforeSync].sort((a, b) => a - b));

      // New logins land on the new master: they see what only it holds.
      const viaProxy = await imapSubjects({ host: proxy.host, port: proxy.ports.imap!, user: LOGIN, password: alice.password });
      expect(viaProxy).toEqual(onNew);
      expect(loadNumbers(viaProxy).length).toBeGreaterThan(onOldNumbers.length);

      console.log(
        `cyrus failover: ${load.results.length} deliveries by ${WORKERS} workers, ${load.results.length - deferred.length} got 250, ` +
          `${deferred.length} got 451 (${locked} 4.2.1 locked, ${deferred.length - locked} 4.3.0 abandoned in flight) and were retried (all 250); ctl lock took ${tLocked - tLock} ms (process start included), ` +
          `IDLE session ended ${ended.at - lockEvent!.at} ms after the lock's event, first 451 ${tFirstDefer - lockEvent!.at} ms after it; ` +
          `sync_client -u ${syncMs} ms; failover --already-locked: ${JSON.stringify(switched)}; ` +
          `deliveries refused for ${tFirstAfter - tFirstDefer} ms (first 451 to first 250 after the switch)`,
      );
    } finally {
      await load.stop();
      idle.close();
      subscriber.disconnect();
    }
  }, 180_000);
});
