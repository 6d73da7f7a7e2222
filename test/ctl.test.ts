import { execFile, execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { runCtl } from '../src/ctl.js';
import { RedisHashStore } from '../src/ctl/redis-store.js';
import { RouteAdmin } from '../src/lookup/admin.js';
import { parseModel } from '../src/lookup/file.js';
import { RedisSource } from '../src/lookup/redis.js';
import type { ChangeEvent, RouteEvent } from '../src/lookup/source.js';
import { startRedis, type RedisServer } from './harness/redis.js';
import { tempDir } from './support/tmp.js';

// `mailsplice ctl` against a real Redis: the main paths and exit codes as a child process
// (exactly what a failover tool runs), everything else in-process through runCtl. Each
// test works under its own key prefix, and listens on that prefix's events channel.

const CLI = resolve(import.meta.dirname, '../src/cli.ts');
const FIXTURE = resolve(import.meta.dirname, 'fixtures/production.dat');

let redis: RedisServer;
let r: Redis;
let prefix = '';
let seq = 0;

interface Run {
  code: number;
  out: string;
  err: string;
}

/** In-process run against this test's prefix. */
async function ctl(...args: string[]): Promise<Run> {
  let out = '';
  let err = '';
  const code = await runCtl([...args, '--redis', redis.url, '--prefix', prefix], {
    stdout: (t) => (out += t),
    stderr: (t) => (err += t),
    env: {},
  });
  return { code, out, err };
}

/** As a failover tool runs it: `node --import tsx src/cli.ts ctl ...`. */
function cli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((res) => {
    execFile(process.execPath, ['--import', 'tsx', CLI, 'ctl', ...args], { env: { ...process.env, MAILSPLICE_CONFIG: '', ...env }, timeout: 30_000 }, (e, out, err) => {
      const code = e ? (typeof e.code === 'number' ? e.code : -1) : 0;
      res({ code, out, err });
    });
  });
}
const target = () => ['--redis', redis.url, '--prefix', prefix];

/** Everything published on the test's events channel while `fn` ran, in order. */
async function events(fn: () => Promise<unknown>): Promise<ChangeEvent[]> {
  const sub = new Redis(redis.url);
  const channel = `${prefix}events`;
  const got: string[] = [];
  const marker = `marker-${seq}-${Math.random()}`;
  const done = new Promise<void>((res) =>
    sub.on('message', (_ch: string, text: string) => (text === marker ? res() : got.push(text))),
  );
  await sub.subscribe(channel);
  try {
    await fn();
    // Redis delivers one channel's messages in publish order: once the marker arrives,
    // every event the command published has arrived too.
    await r.publish(channel, marker);
    await done;
  } finally {
    sub.disconnect();
  }
  return got.map((t) => JSON.parse(t) as ChangeEvent);
}

async function hash(kind: string, id: string): Promise<Record<string, string>> {
  return r.hgetall(`${prefix}${kind}:${id}`);
}

/** Two slots, one store, one user: the smallest world a failover needs. */
async function seed(): Promise<void> {
  const m = r.multi();
  m.hset(`${prefix}slot:slotA`, { host: '127.0.0.11', imap: '143', pop3: '110', lmtp: '24', status: 'up' });
  m.hset(`${prefix}slot:slotB`, { host: '127.0.0.12', imap: '143', pop3: '110', lmtp: '24', status: 'up' });
  m.hset(`${prefix}slot:slotC`, { host: '127.0.0.13', imap: '143', pop3: '110', lmtp: '24', status: 'up' });
  m.hset(`${prefix}store:store1`, { master: 'slotA', replicas: 'slotB,slotC', status: 'active', epoch: '5' });
  m.hset(`${prefix}user:alice@example.com`, { store: 'store1', status: 'active' });
  await m.exec();
}

beforeAll(async () => {
  redis = await startRedis();
  r = new Redis(redis.url);
});

afterAll(async () => {
  r?.disconnect();
  await redis?.destroy();
});

beforeEach(() => {
  prefix = `t${++seq}:`;
});

// Each child process compiles the CLI with tsx (about a second): give these room on a busy CI.
describe('mailsplice ctl as a child process', { timeout: 120_000 }, () => {
  it('prints help, and exits 2 without a target or with a bad option, 1 when Redis is down', async () => {
    const help = await cli(['--help']);
    expect(help.code).toBe(0);
    expect(help.out).toMatch(/failover STORE --to SLOT/);
    expect((await cli(['failover', '--help'])).out).toMatch(/--already-locked/);
    const none = await cli(['list', 'users']);
    expect(none.code).toBe(2);
    expect(none.err).toMatch(/--config FILE.*--redis URL.*MAILSPLICE_CONFIG/);
    expect((await cli(['frobnicate', ...target()])).code).toBe(2);
    expect((await cli(['user', 'get', 'x', '--master', 'y', ...target()])).code).toBe(2);
    const down = await cli(['list', 'users', '--redis', 'redis://127.0.0.1:1']);
    expect(down.code).toBe(1);
    expect(down.err).toMatch(/cannot reach Redis/);
  });

  it('sets and gets slot, store and user, publishing one event per write', async () => {
    const evs = await events(async () => {
      expect((await cli(['slot', 'set', 'slotA', '--host', '127.0.0.11', '--imap', '1143', ...target()])).code).toBe(0);
      expect((await cli(['slot', 'set', 'slotB', '--host', '127.0.0.12', ...target()])).code).toBe(0);
      expect((await cli(['store', 'set', 'store1', '--master', 'slotA', '--replicas', 'slotB', ...target()])).code).toBe(0);
      expect((await cli(['user', 'set', 'Alice@Example.COM', '--store', 'store1', ...target()])).code).toBe(0);
    });
    expect(evs).toEqual([
      { kind: 'slot', id: 'slotA' },
      { kind: 'slot', id: 'slotB' },
      { kind: 'store', id: 'store1' },
      { kind: 'user', id: 'alice@example.com' },
    ]);
    const got = await cli(['user', 'get', 'alice@example.com', '--json', ...target()]);
    expect(got.code).toBe(0);
    expect(JSON.parse(got.out)).toEqual({ kind: 'user', id: 'alice@example.com', store: 'store1', status: 'active' });
    const slot = JSON.parse((await cli(['slot', 'get', 'slotA', '--json', ...target()])).out) as Record<string, unknown>;
    expect(slot).toMatchObject({ host: '127.0.0.11', imap: 1143, pop3: 110, lmtp: 24, status: 'up' });
    expect(await hash('store', 'store1')).toEqual({ master: 'slotA', replicas: 'slotB', status: 'active', epoch: '1' });
    expect((await cli(['user', 'get', 'nobody@example.com', ...target()])).code).toBe(3);
    expect((await cli(['store', 'set', 'store2', '--master', 'slotZ', ...target()])).code).toBe(2);
    expect((await cli(['slot', 'set', 'slotA', '--pop3', '70000', ...target()])).code).toBe(2);
  });

  it('fails over: lock then switch, two store events; refusals exit 2 or 3', async () => {
    await seed();
    const evs = await events(async () => {
      const ok = await cli(['failover', 'store1', '--to', 'slotB', ...target()]);
      expect(ok.code).toBe(0);
      expect(ok.out).toMatch(/master slotA -> slotB, replicas slotA,slotC, epoch 5 -> 7; locked for [\d.]+ ms, took [\d.]+ ms/);
    });
    expect(evs).toEqual([
      { kind: 'store', id: 'store1' },
      { kind: 'store', id: 'store1' },
    ]);
    expect(await hash('store', 'store1')).toEqual({ master: 'slotB', replicas: 'slotA,slotC', status: 'active', epoch: '7' });

    await r.hset(`${prefix}slot:slotD`, { host: '127.0.0.14', imap: '143' });
    const notReplica = await cli(['failover', 'store1', '--to', 'slotD', ...target()]);
    expect(notReplica.code).toBe(2);
    expect(notReplica.err).toMatch(/slotD is not a replica of store store1/);
    await r.hset(`${prefix}slot:slotC`, 'status', 'down');
    const down = await cli(['failover', 'store1', '--to', 'slotC', ...target()]);
    expect(down.code).toBe(2);
    expect(down.err).toMatch(/slot slotC is down/);
    expect((await cli(['failover', 'nostore', '--to', 'slotC', ...target()])).code).toBe(3);
    // Nothing refused changed anything.
    expect(await hash('store', 'store1')).toEqual({ master: 'slotB', replicas: 'slotA,slotC', status: 'active', epoch: '7' });

    // Host death: the dead master's replica is down and not even checked; one step, one event.
    const forced = await events(async () => {
      const f = await cli(['failover', 'store1', '--to', 'slotC', '--force', '--json', ...target()]);
      expect(f.code).toBe(0);
      expect(JSON.parse(f.out)).toMatchObject({ store: 'store1', from: 'slotB', to: 'slotC', forced: true, epochBefore: 7, epochAfter: 8 });
    });
    expect(forced).toEqual([{ kind: 'store', id: 'store1' }]);
    expect(await hash('store', 'store1')).toEqual({ master: 'slotC', replicas: 'slotA,slotB', status: 'active', epoch: '8' });
  });

  it('imports the production.dat fixture and finds a user on it with whereis', async () => {
    const imp = await cli(['import', FIXTURE, ...target()]);
    expect(imp.code).toBe(0);
    expect(imp.out).toMatch(/slots: 8 new, 0 changed, 0 unchanged; stores: 3 new/);
    expect((await cli(['user', 'set', 'bob@example.com', '--store', 'store2', ...target()])).code).toBe(0);
    const w = await cli(['whereis', 'Bob@Example.com', '--json', ...target()]);
    expect(w.code).toBe(0);
    expect(JSON.parse(w.out)).toMatchObject({
      login: 'bob@example.com',
      store: 'store2',
      storeStatus: 'active',
      master: { id: 'sloti2t02', host: '127.0.0.42', ports: { imap: 143, pop3: 110, lmtp: 24 }, status: 'up' },
      replicas: [{ id: 'sloti1t02', host: '127.0.0.32' }],
      route: { ok: true, slot: 'sloti2t02', host: '127.0.0.42' },
    });
  });

  it('reads the target from the config named by MAILSPLICE_CONFIG', async () => {
    const dir = tempDir('ctl');
    const cfg = join(dir, 'mailsplice.yaml');
    writeFileSync(
      cfg,
      stringify({ listeners: [{ protocol: 'imap', port: 1143 }], lookup: { redis: { url: redis.url, prefix }, default_domain: 'example.com' } }),
    );
    await seed();
    const w = await cli(['whereis', 'alice'], { MAILSPLICE_CONFIG: cfg });
    expect(w.code).toBe(0);
    expect(w.out).toMatch(/user\s+alice@example.com \(active\)/);
    expect(w.out).toMatch(/master\s+slotA 127.0.0.11/);
  });
});

describe('mailsplice ctl in-process', () => {
  it('round-trips every field and writes only what changed', async () => {
    await seed();
    expect((await ctl('user', 'set', 'alice@example.com', '--backend-login', 'alice')).code).toBe(0);
    expect(await hash('user', 'alice@example.com')).toEqual({ store: 'store1', status: 'active', backend_login: 'alice' });
    const again = await events(async () => expect((await ctl('user', 'set', 'alice@example.com', '--backend-login', 'alice')).out).toMatch(/^unchanged/));
    expect(again).toEqual([]); // no write, no event
    await ctl('user', 'set', 'alice@example.com', '--backend-login', '');
    expect(await hash('user', 'alice@example.com')).toEqual({ store: 'store1', status: 'active' });

    await ctl('slot', 'set', 'slotA', '--pop3', 'none', '--lmtp', '2424', '--status', 'down');
    expect(await hash('slot', 'slotA')).toEqual({ host: '127.0.0.11', imap: '143', lmtp: '2424', status: 'down' });
    const s = JSON.parse((await ctl('slot', 'get', 'slotA', '--json')).out) as Record<string, unknown>;
    expect(s).toEqual({ kind: 'slot', id: 'slotA', host: '127.0.0.11', imap: 143, lmtp: 2424, status: 'down' });

    // Fields the contract does not define (another tool's) survive a set.
    await r.hset(`${prefix}store:store1`, 'owner', 'ops-team');
    await ctl('store', 'set', 'store1', '--replicas', 'slotC');
    expect(await hash('store', 'store1')).toEqual({ master: 'slotA', replicas: 'slotC', status: 'active', epoch: '6', owner: 'ops-team' });
  });

  it('refuses bad input with exit 2 and clear messages', async () => {
    await seed();
    const cases: [string[], RegExp][] = [
      [['user', 'set', 'bob@example.com', '--store', 'nostore'], /unknown store nostore/],
      [['user', 'set', 'bob@example.com'], /nothing to set/],
      [['user', 'set', 'bob@example.com', '--backend-login', 'bob'], /does not exist yet: give --store/],
      [['store', 'set', 'store9', '--replicas', 'slotA'], /store store9 needs a master/],
      [['store', 'set', 'store1', '--replicas', 'slotA'], /cannot be both master and replica/],
      [['store', 'set', 'store1', '--replicas', 'slotB,slotB'], /listed twice/],
      [['store', 'set', 'store1', '--master', 'slotQ'], /unknown slot slotQ/],
      [['slot', 'set', 'slotQ', '--imap', '143'], /give --host/],
      [['slot', 'set', 'slotA', '--imap', 'x'], /bad port for --imap/],
      [['slot', 'set', 'slotA', '--status', 'sideways'], /--status is up or down/],
      [['slot', 'set', 'bad,id', '--host', 'h'], /bad slot id/],
      [['slot', 'del', 'slotB'], /still used by store store1/],
      [['list', 'things'], /list users, stores or slots/],
      [['lock', 'slot', 'slotA'], /usage/],
      [['move-user', 'alice@example.com', '--to', 'nostore'], /unknown store nostore/],
      [['failover', 'store1', '--to', 'slotB', '--force', '--already-locked'], /exclude each other/],
      [['failover', 'store1', '--to', 'noslot'], /unknown slot noslot/],
      [['failover', 'store1', '--to', 'noslot', '--force'], /unknown slot noslot/],
      [['failover', 'store1'], /needs --to SLOT/],
    ];
    for (const [args, msg] of cases) {
      const res = await ctl(...args);
      expect({ args, code: res.code }).toEqual({ args, code: 2 });
      expect(res.err).toMatch(msg);
    }
    for (const args of [['user', 'del', 'x@y'], ['store', 'get', 'nope'], ['lock', 'store', 'nope'], ['move-user', 'nobody@x', '--to', 'store1'], ['whereis', 'nobody@x']]) {
      expect({ args, code: (await ctl(...args)).code }).toEqual({ args, code: 3 });
    }
    expect(await hash('store', 'store1')).toEqual({ master: 'slotA', replicas: 'slotB,slotC', status: 'active', epoch: '5' });
  });

  it('deletes with one event each; a used slot only with --force', async () => {
    await seed();
    const evs = await events(async () => {
      expect((await ctl('user', 'del', 'Alice@example.com')).code).toBe(0);
      expect((await ctl('slot', 'del', 'slotC', '--force')).code).toBe(0);
      expect((await ctl('store', 'del', 'store1')).code).toBe(0);
    });
    expect(evs).toEqual([
      { kind: 'user', id: 'alice@example.com' },
      { kind: 'slot', id: 'slotC' },
      { kind: 'store', id: 'store1' },
    ]);
    expect(await r.exists(`${prefix}user:alice@example.com`, `${prefix}slot:slotC`, `${prefix}store:store1`)).toBe(0);
    expect(JSON.parse((await ctl('list', 'slots', '--json')).out)).toEqual(['slotA', 'slotB']);
  });

  it('locks and unlocks users and stores, raising the store epoch, publishing each', async () => {
    await seed();
    const evs = await events(async () => {
      expect((await ctl('lock', 'store', 'store1')).out).toMatch(/locked store store1 \(epoch 6\)/);
      expect((await ctl('lock', 'store', 'store1')).out).toMatch(/already locked/); // no write
      expect(await hash('store', 'store1')).toMatchObject({ status: 'locked', epoch: '6' });
      expect((await ctl('unlock', 'store', 'store1', '--json')).out).toMatch(/"changed":true/);
      await ctl('lock', 'user', 'ALICE@example.com');
      expect(await hash('user', 'alice@example.com')).toEqual({ store: 'store1', status: 'locked' });
      await ctl('unlock', 'user', 'alice@example.com');
    });
    expect(evs).toEqual([
      { kind: 'store', id: 'store1' },
      { kind: 'store', id: 'store1' },
      { kind: 'user', id: 'alice@example.com' },
      { kind: 'user', id: 'alice@example.com' },
    ]);
    expect(await hash('store', 'store1')).toMatchObject({ status: 'active', epoch: '7' });
    expect(await hash('user', 'alice@example.com')).toEqual({ store: 'store1', status: 'active' });
  });

  it('failover refuses a locked store, and finishes one the caller locked with --already-locked', async () => {
    await seed();
    await ctl('lock', 'store', 'store1');
    const refused = await ctl('failover', 'store1', '--to', 'slotB');
    expect(refused.code).toBe(2);
    expect(refused.err).toMatch(/store store1 is locked/);
    const evs = await events(async () => expect((await ctl('failover', 'store1', '--to', 'slotB', '--already-locked')).code).toBe(0));
    expect(evs).toEqual([{ kind: 'store', id: 'store1' }]);
    expect(await hash('store', 'store1')).toEqual({ master: 'slotB', replicas: 'slotA,slotC', status: 'active', epoch: '7' });
    // Already master: nothing to do, nothing written.
    const same = await events(async () => expect((await ctl('failover', 'store1', '--to', 'slotB')).out).toMatch(/already is the master/));
    expect(same).toEqual([]);
  });

  it("reaches a proxy's RedisSource: two store events, then the new master on read", async () => {
    await seed();
    const src = new RedisSource({ endpoint: { url: redis.url }, prefix, commandTimeoutMs: 2000 });
    const seen: RouteEvent[] = [];
    await new Promise<void>((res) => src.watch((ev) => seen.push(ev), (up) => up && res()));
    try {
      expect((await ctl('failover', 'store1', '--to', 'slotC')).code).toBe(0);
      await expect.poll(() => seen.length, { timeout: 5000 }).toBe(2);
      expect(seen).toEqual([
        { kind: 'store', id: 'store1' },
        { kind: 'store', id: 'store1' },
      ]);
      const [store] = await src.readObjects([{ kind: 'store', id: 'store1' }]);
      expect(store).toEqual({ master: 'slotC', replicas: ['slotB', 'slotA'], status: 'active', epoch: 7 });
      expect((await src.readRoute('alice@example.com')).slot).toMatchObject({ host: '127.0.0.13' });
    } finally {
      await src.close();
    }
  });

  it('moves a user: lock, set store, unlock, three user events', async () => {
    await seed();
    await r.hset(`${prefix}store:store2`, { master: 'slotB', replicas: 'slotA', status: 'active', epoch: '1' });
    const evs = await events(async () => {
      const res = await ctl('move-user', 'alice@example.com', '--to', 'store2');
      expect(res.code).toBe(0);
      expect(res.out).toMatch(/user alice@example.com: store store1 -> store2; locked for [\d.]+ ms/);
    });
    expect(evs).toEqual(Array.from({ length: 3 }, () => ({ kind: 'user', id: 'alice@example.com' })));
    expect(await hash('user', 'alice@example.com')).toEqual({ store: 'store2', status: 'active' });
    // Other users and the stores are untouched: only this user's sessions are ended.
    expect(await hash('store', 'store1')).toMatchObject({ epoch: '5' });
    await r.hset(`${prefix}store:store3`, { replicas: 'slotA', status: 'active', epoch: '1' });
    expect((await ctl('move-user', 'alice@example.com', '--to', 'store3')).err).toMatch(/store store3 has no master/);
    await ctl('lock', 'user', 'alice@example.com');
    expect((await ctl('move-user', 'alice@example.com', '--to', 'store1')).err).toMatch(/user alice@example.com is locked/);
  });

  it('whereis shows lock states and why there is no route', async () => {
    await seed();
    await ctl('lock', 'store', 'store1');
    await ctl('slot', 'set', 'slotB', '--status', 'down');
    const w = await ctl('whereis', 'alice@example.com');
    expect(w.code).toBe(0);
    expect(w.out).toMatch(/store\s+store1 \(locked, epoch 6\)/);
    expect(w.out).toMatch(/slotB 127.0.0.12 imap=143 pop3=110 lmtp=24 down/);
    expect(w.out).toMatch(/route\s+none: store store1 is locked \(locked\)/);
  });

  it('imports production.dat: dry run writes nothing, re-import is a no-op and keeps failed-over masters', async () => {
    const dry = await events(async () => {
      const res = await ctl('import', FIXTURE, '--dry-run');
      expect(res.code).toBe(0);
      expect(res.out).toMatch(/write slot sloti1t04: host=127.0.0.34 status=up imap=143 pop3=110 lmtp=24/);
      expect(res.out).toMatch(/write store store3: master=sloti1t03 replicas=sloti2t03,sloti2t04 status=active epoch=1 location=i branch=future disk_target=80/);
      expect(res.out).toMatch(/dry run, nothing written; would write: slots: 8 new/);
    });
    expect(dry).toEqual([]);
    expect(await r.keys(`${prefix}*`)).toEqual([]);

    const evs = await events(async () => {
      const res = await ctl('import', FIXTURE, '--imap-port', '1143', '--json');
      expect(JSON.parse(res.out)).toMatchObject({ format: 'dat', slots: { created: 8 }, stores: { created: 3 }, written: 11 });
    });
    expect(evs).toHaveLength(11);
    expect(evs.slice(8)).toEqual(['store1', 'store2', 'store3'].map((id) => ({ kind: 'store', id })));
    expect(await hash('slot', 'sloti2t04')).toEqual({ host: '127.0.0.44', imap: '1143', pop3: '110', lmtp: '24', status: 'up' });
    expect(await hash('store', 'store3')).toEqual({
      master: 'sloti1t03',
      replicas: 'sloti2t03,sloti2t04',
      status: 'active',
      epoch: '1',
      location: 'i',
      branch: 'future',
      disk_target: '80',
    });

    expect((await ctl('failover', 'store1', '--to', 'sloti2t01')).code).toBe(0);
    await ctl('slot', 'set', 'sloti1t03', '--status', 'down');
    const again = await events(async () => expect((await ctl('import', FIXTURE, '--imap-port', '1143')).out).toMatch(/slots: 0 new, 0 changed, 8 unchanged; stores: 0 new, 0 changed, 3 unchanged/));
    expect(again).toEqual([]);
    expect(await hash('store', 'store1')).toMatchObject({ master: 'sloti2t01', replicas: 'sloti1t01' });
    expect(await hash('slot', 'sloti1t03')).toMatchObject({ status: 'down' });
    await ctl('import', FIXTURE, '--imap-port', '1143', '--masters-from-file');
    expect(await hash('store', 'store1')).toMatchObject({ master: 'sloti1t01', replicas: 'sloti2t01', epoch: '4' });
  });

  it('refuses a production.dat with bad lines or unknown slots, writing nothing', async () => {
    const dir = tempDir('ctl');
    const bad = join(dir, 'bad.dat');
    writeFileSync(bad, 'i1 1 t2 0 1000 e 127.0.0.300\nstore1 n 0 90 sloti1t01 slotnowhere\nwhat is this\n');
    const res = await ctl('import', bad);
    expect(res.code).toBe(2);
    expect(res.err).toMatch(/line 1: bad IPv4 address 127.0.0.300/);
    expect(res.err).toMatch(/line 3: neither a slot line/);
    writeFileSync(bad, 'i1 1 t2 0 1000 e 127.0.0.31\nstore1 n 0 90 sloti1t01 slotnowhere\n');
    expect((await ctl('import', bad)).err).toMatch(/unknown slots \(neither in the file nor already defined\): slotnowhere/);
    expect(await r.keys(`${prefix}*`)).toEqual([]);
    expect((await ctl('import', join(dir, 'missing.dat'))).code).toBe(2);
  });

  it('exports store lines and a routes file that a proxy and ctl import both accept', async () => {
    await ctl('import', FIXTURE);
    await ctl('user', 'set', 'carol@example.com', '--store', 'store3', '--backend-login', 'carol');
    await ctl('lock', 'user', 'carol@example.com');
    const dat = await ctl('export');
    expect(dat.out).toMatch(/^store1 n 0 90 sloti1t01 sloti2t01$/m);
    expect(dat.out).toMatch(/^store3 i future 80 sloti1t03 sloti2t03 sloti2t04$/m);
    expect(dat.out).toMatch(/^#\s+sloti1t01 127.0.0.31 imap=143 pop3=110 lmtp=24 up$/m);

    const yaml = (await ctl('export', '--format', 'yaml')).out;
    const model = parseModel(yaml);
    expect(model.users.get('carol@example.com')).toEqual({ store: 'store3', status: 'locked', backendLogin: 'carol' });
    expect(model.stores.get('store2')).toEqual({ master: 'sloti2t02', replicas: ['sloti1t02'], status: 'active', epoch: 1 });
    expect(model.slots.size).toBe(8);

    // Round trip: the dump loads into an empty prefix and exports identically (epochs
    // aside: every import into a fresh place starts them at 1, as here).
    const dir = tempDir('ctl');
    writeFileSync(join(dir, 'dump.yaml'), yaml);
    writeFileSync(join(dir, 'dump.json'), (await ctl('export', '--format', 'json')).out);
    const first = prefix;
    prefix = `t${++seq}:`;
    expect((await ctl('import', join(dir, 'dump.yaml'))).out).toMatch(/slots: 8 new.*stores: 3 new.*users: 1 new/);
    expect((await ctl('export', '--format', 'yaml')).out).toBe(yaml);
    prefix = `t${++seq}:`;
    expect((await ctl('import', join(dir, 'dump.json'))).code).toBe(0);
    expect((await ctl('export', '--format', 'yaml')).out).toBe(yaml);
    // Re-importing the dat layout into the first place changes nothing.
    prefix = first;
    expect((await ctl('import', FIXTURE)).out).toMatch(/8 unchanged.*3 unchanged/);
  });

  it('lists with SCAN past many keys, and under a prefix with glob characters', async () => {
    prefix = `t${seq}[x]*:`;
    const m = r.multi();
    for (let i = 0; i < 2500; i++) m.hset(`${prefix}user:u${i}@example.com`, { store: 'store1' });
    m.hset(`t${seq}x*:user:other@example.com`, { store: 'store1' }); // would match an unescaped glob
    await m.exec();
    const ids = JSON.parse((await ctl('list', 'users', '--json')).out) as string[];
    expect(ids).toHaveLength(2500);
    expect(ids).not.toContain('other@example.com');
  });

  it('plans again on fresh data when a watched object changes before EXEC', async () => {
    await seed();
    const store = await RedisHashStore.connect({ url: redis.url }, prefix);
    const admin = new RouteAdmin(store);
    let plans = 0;
    try {
      const { result } = await admin.update([{ kind: 'store', id: 'store1' }], (tx) => {
        plans++;
        // Another tool raises the epoch between our read and our EXEC, once. (Synchronous,
        // so it has certainly landed before this plan returns and EXEC is sent.)
        if (plans === 1) execFileSync('redis-cli', ['-h', redis.host, '-p', String(redis.port), 'HSET', `${prefix}store:store1`, 'epoch', '9']);
        const s = tx.get('store', 'store1')!;
        tx.put('store', 'store1', { ...s, status: 'locked' });
        return tx.get('store', 'store1')!.epoch;
      });
      expect(plans).toBe(2);
      expect(result).toBe(10);
      expect(await hash('store', 'store1')).toMatchObject({ status: 'locked', epoch: '10' });
    } finally {
      await admin.close();
    }
  });

  it('concurrent failovers on one store never lose an epoch (WATCH retry)', async () => {
    await seed();
    // 20 forced failovers at once, each on its own connection, alternating targets: every
    // one changes the master, so every one must raise the epoch exactly once.
    const targets = Array.from({ length: 20 }, (_, i) => ['slotA', 'slotB', 'slotC'][i % 3]!);
    const runs = await Promise.all(targets.map((t) => ctl('failover', 'store1', '--to', t, '--force', '--json')));
    expect(runs.map((x) => x.code)).toEqual(targets.map(() => 0));
    const changed = runs.map((x) => JSON.parse(x.out) as { unchanged: boolean; epochAfter: number }).filter((x) => !x.unchanged);
    const after = await hash('store', 'store1');
    expect(Number(after.epoch)).toBe(5 + changed.length);
    expect(new Set(changed.map((x) => x.epochAfter)).size).toBe(changed.length); // no epoch handed out twice
    expect([after.master, ...after.replicas!.split(',')].sort()).toEqual(['slotA', 'slotB', 'slotC']);

    // Checked failovers racing: one at a time gets the lock, the rest are refused cleanly.
    const checked = await Promise.all(['slotA', 'slotB', 'slotC', 'slotA', 'slotB', 'slotC'].map((t) => ctl('failover', 'store1', '--to', t, '--json')));
    const done = checked.filter((x) => x.code === 0).map((x) => JSON.parse(x.out) as { unchanged: boolean });
    for (const x of checked.filter((c) => c.code !== 0)) expect(x.err).toMatch(/is locked|already is the master|changed by someone else/);
    const final = await hash('store', 'store1');
    expect(final.status).toBe('active');
    expect(Number(final.epoch)).toBe(Number(after.epoch) + 2 * done.filter((x) => !x.unchanged).length);
    expect([final.master, ...final.replicas!.split(',')].sort()).toEqual(['slotA', 'slotB', 'slotC']);
  });
});
