import { execFile } from 'node:child_process';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectLines, type LineClient } from './harness/lines.js';
import { startWorld, type World } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { changeInRedis, seedRedis, worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Issue 11, workers: `mailsplice serve` with workers: 2 is one instance of three processes.
// Sessions land on both workers, a route event ends them on every worker, the admin listener
// (in the primary) sums the workers, a killed worker comes back while the other one's
// sessions go on, and SIGHUP / SIGTERM reach every worker.

const execFileP = promisify(execFile);
const CLI = resolve(import.meta.dirname, '../src/cli.ts');
const HOST = '127.0.0.1';

interface WorkerHealth {
  worker: number;
  pid: number;
  sessions?: number;
  lookupLive?: boolean;
  down?: string;
}
interface Health {
  status: number;
  sessions: number;
  workers: WorkerHealth[];
}

async function health(p: ProxyProcess): Promise<Health> {
  const res = await fetch(`http://${HOST}:${p.adminPort}/healthz`, { signal: AbortSignal.timeout(5000) });
  const body = (await res.json()) as { sessions: number; workers: WorkerHealth[] };
  return { status: res.status, sessions: body.sessions, workers: body.workers };
}

async function metric(p: ProxyProcess, line: RegExp): Promise<number | undefined> {
  const text = await (await fetch(`http://${HOST}:${p.adminPort}/metrics`, { signal: AbortSignal.timeout(5000) })).text();
  const found = text.split('\n').find((l) => line.test(l));
  return found === undefined ? undefined : Number(found.split(' ').at(-1));
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined | false>, ms = 20_000): Promise<T> {
  const end = Date.now() + ms;
  let last: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined && v !== false) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * A logged-in IMAP session in IDLE, with one reader that keeps every line (the line client
 * has one reader at a time, and a test asks a session both "did it get a BYE" and "does it
 * still answer").
 */
class Session {
  readonly lines: string[] = [];
  closed = false;
  private tag = 0;

  constructor(readonly c: LineClient) {
    void (async () => {
      for (;;) {
        try {
          this.lines.push(await c.readLine(600_000));
        } catch {
          this.closed = true;
          return;
        }
      }
    })();
  }

  /** The first line from `from` on that matches; undefined once the connection has closed without one. */
  async until(re: RegExp, from = 0, ms = 20_000): Promise<string | undefined> {
    const end = Date.now() + ms;
    for (;;) {
      const hit = this.lines.slice(from).find((l) => re.test(l));
      if (hit !== undefined) return hit;
      if (this.closed) return undefined;
      if (Date.now() > end) throw new Error(`no line matching ${re} in ${ms} ms; got ${JSON.stringify(this.lines.slice(from))}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  bye(): Promise<string | undefined> {
    return this.until(/^\* BYE/);
  }

  /** Leaves IDLE, NOOPs and IDLEs again: true when the session answers end to end. */
  async works(): Promise<boolean> {
    const t = `t${++this.tag}`;
    const from = this.lines.length;
    this.c.send('DONE');
    this.c.send(`${t} NOOP`);
    if ((await this.until(new RegExp(`^${t} `), from, 5000)) === undefined) return false;
    const idleFrom = this.lines.length;
    this.c.send(`${t}i IDLE`);
    return (await this.until(/^\+ /, idleFrom, 5000)) !== undefined;
  }
}

/** Logs in, selects INBOX and waits in IDLE. */
async function idle(port: number, user: string, pass: string): Promise<Session> {
  const c = await connectLines({ host: HOST, port, timeoutMs: 20_000 });
  await c.readLine();
  c.send(`a LOGIN ${user} ${pass}`);
  const login = (await c.readUntil(/^a /)).at(-1)!;
  if (!login.startsWith('a OK')) throw new Error(`${user}: ${login}`);
  c.send('b SELECT INBOX');
  await c.readUntil(/^b OK/);
  c.send('c IDLE');
  expect(await c.readLine()).toMatch(/^\+ /);
  return new Session(c);
}

/**
 * Opens sessions of `user` until every worker holds at least one of them (at least `min`,
 * at most 40): the workers accept from a shared socket, so which one takes a connection is
 * the kernel's choice.
 */
async function onEveryWorker(p: ProxyProcess, user: string, pass: string, min = 4): Promise<{ sessions: Session[]; health: Health }> {
  const sessions: Session[] = [];
  const base = await health(p);
  const had = new Map(base.workers.map((w) => [w.worker, w.sessions ?? 0]));
  for (;;) {
    sessions.push(await idle(p.port, user, pass));
    const h = await waitFor(`${base.sessions + sessions.length} sessions in /healthz`, async () => {
      const x = await health(p);
      return x.sessions === base.sessions + sessions.length && x;
    });
    if (sessions.length >= min && h.workers.every((w) => (w.sessions ?? 0) > (had.get(w.worker) ?? 0))) return { sessions, health: h };
    if (sessions.length >= 40) throw new Error(`40 sessions and not on every worker: ${JSON.stringify(h.workers)}`);
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('workers: 2 with the Redis lookup', () => {
  let world: World;
  let proxy: ProxyProcess;
  const sessions: Session[] = [];

  beforeAll(async () => {
    world = await startWorld({ redis: true });
    await seedRedis(world.redis!.url, worldRoutes(world));
    proxy = await startProxyProcess({ workers: 2, lookup: { redis: { url: world.redis!.url } } }, { admin: true });
  });
  afterAll(async () => {
    for (const s of sessions) s.c.close();
    await proxy?.stop();
    await world?.stop();
  });

  it('puts sessions on both workers, ends a store\'s sessions on every worker, and /metrics sums them', async () => {
    // Both workers hold some of alice's sessions: the event below must reach both.
    const { sessions: alice, health: h } = await onEveryWorker(proxy, 'alice@example.com', 'alicepw');
    sessions.push(...alice);
    expect(h.status).toBe(200);
    expect(h.workers.map((w) => w.worker)).toEqual([1, 2]);
    const n = alice.length + 2;
    const bob = [await idle(proxy.port, 'bob@example.com', 'bobpw'), await idle(proxy.port, 'bob@example.com', 'bobpw')];
    sessions.push(...bob);

    await waitFor(`${n} sessions in /metrics`, async () => (await metric(proxy, /^mailsplice_sessions\{protocol="imap"\}/)) === n);
    expect(await metric(proxy, /^mailsplice_logins_total\{protocol="imap",result="ok"\}/)).toBe(n);
    expect(await metric(proxy, /^mailsplice_workers /)).toBe(2);
    expect(await metric(proxy, /^mailsplice_workers_unanswered /)).toBe(0);
    // Per-process figures are kept per worker, not summed.
    expect(await metric(proxy, /^mailsplice_process_process_resident_memory_bytes\{worker="1"\}/)).toBeGreaterThan(0);
    expect(await metric(proxy, /^mailsplice_process_process_resident_memory_bytes\{worker="2"\}/)).toBeGreaterThan(0);
    expect(await metric(proxy, /^mailsplice_process_process_resident_memory_bytes\{worker="primary"\}/)).toBeGreaterThan(0);
    // Every worker's subscription is live, so the instance's is (min, not a sum of 2).
    expect(await metric(proxy, /^mailsplice_route_events_live /)).toBe(1);

    await changeInRedis(world.redis!.url, 'store', 'store1', { master: 'slotB', replicas: 'slotA', epoch: '2' });
    for (const s of alice) expect(await s.bye()).toMatch(/^\* BYE \[UNAVAILABLE\] /);
    for (const s of bob) expect(await s.works()).toBe(true);
    await waitFor('2 sessions left', async () => (await health(proxy)).sessions === 2);
    expect(await metric(proxy, /^mailsplice_sessions_ended_by_events_total /)).toBe(alice.length);
  });

  it('restarts a worker killed with SIGKILL, and the other worker\'s sessions go on', async () => {
    const { sessions: open, health: before } = await onEveryWorker(proxy, 'carol@example.com', 'carolpw', 2);
    sessions.push(...open);
    const victim = before.workers[0]!;
    const survivor = before.workers[1]!;
    process.kill(victim.pid, 'SIGKILL');

    // The victim's sessions are cut; every other session still answers.
    const results = await Promise.all([...open, ...sessions.filter((s) => !open.includes(s) && !s.closed)].map((s) => s.works()));
    expect(results.filter((r) => !r).length).toBe(victim.sessions);
    expect(results.filter((r) => r).length).toBeGreaterThanOrEqual(survivor.sessions!);

    const after = await waitFor('the killed worker back, with a new process', async () => {
      const x = await health(proxy);
      const w = x.workers.find((y) => y.worker === victim.worker);
      return x.status === 200 && w?.pid !== undefined && w.pid !== victim.pid && w.down === undefined && x;
    });
    expect(after.workers.find((w) => w.worker === survivor.worker)!.pid).toBe(survivor.pid);
    const delay = (pid: number) => Number(new RegExp(`"msg":"worker died; restarting it","worker":${victim.worker},"pid":${pid},"how":"killed by SIGKILL","lived_ms":\\d+,"restart_in_ms":(\\d+)`).exec(proxy.log())?.[1]);
    const firstDelay = delay(victim.pid);
    expect(firstDelay).toBeGreaterThanOrEqual(0);
    // Dying again within seconds of its start is a crash loop: the next start waits.
    const second = after.workers.find((w) => w.worker === victim.worker)!.pid;
    process.kill(second, 'SIGKILL');
    const back = await waitFor('the worker back after a delay', async () => {
      const x = await health(proxy);
      const w = x.workers.find((y) => y.worker === victim.worker);
      return x.status === 200 && w?.pid !== undefined && w.pid !== second && w.down === undefined && x;
    });
    // 0 after a worker that had run 10 s, then 500 ms, 1 s, 2 s ... while they keep dying young.
    expect(delay(second)).toBe(Math.max(500, 2 * firstDelay));
    expect(back.workers.find((w) => w.worker === survivor.worker)!.pid).toBe(survivor.pid);
    // Logins work on both again (the restarted one included).
    sessions.push(...(await onEveryWorker(proxy, 'alice@example.com', 'alicepw', 1)).sessions);
  });

  it('passes SIGHUP to every worker, and SIGTERM stops them all', async () => {
    const h = await health(proxy);
    const reloads = () => [...proxy.log().matchAll(/"msg":"reloaded","worker":(\d+)/g)].map((m) => Number(m[1]));
    expect(reloads()).toEqual([]);
    proxy.child.kill('SIGHUP');
    await waitFor('a reload in each worker', async () => reloads().sort().join() === '1,2');

    const open = sessions.filter((s) => !s.closed);
    expect(open.length).toBeGreaterThan(0);
    const exited = new Promise<number | null>((res) => proxy.child.once('exit', (code) => res(code)));
    proxy.child.kill('SIGTERM');
    for (const s of open) expect(await s.bye()).toMatch(/^\* BYE \[UNAVAILABLE\] server shutting down/i);
    expect(await exited).toBe(0);
    for (const w of h.workers) await waitFor(`worker ${w.worker} (pid ${w.pid}) gone`, async () => !alive(w.pid));
  });
});

describe('workers: 2 with the routes file', () => {
  let world: World;
  let proxy: ProxyProcess;
  const dir = tempDir('workers-file');
  const routes = join(dir, 'routes.yaml');

  beforeAll(async () => {
    world = await startWorld();
    writeRoutesFile(routes, worldRoutes(world));
    proxy = await startProxyProcess({ workers: 2, lookup: { file: routes } }, { admin: true });
  });
  afterAll(async () => {
    await proxy?.stop();
    await world?.stop();
  });

  it('every worker follows a `mailsplice ctl --file` change', async () => {
    const { sessions: alice } = await onEveryWorker(proxy, 'alice@example.com', 'alicepw');
    try {
      await execFileP(process.execPath, ['--import', 'tsx', CLI, 'ctl', 'failover', 'store1', '--to', 'slotB', '--file', routes]);
      for (const s of alice) expect(await s.bye()).toMatch(/^\* BYE \[UNAVAILABLE\] /);
      await waitFor('no session left', async () => (await health(proxy)).sessions === 0);
    } finally {
      for (const s of alice) s.c.close();
    }
  });
});

describe('workers: 2 and limits.connections_per_ip', () => {
  let proxy: ProxyProcess;
  const dir = tempDir('workers-limits');
  const routes = join(dir, 'routes.yaml');

  beforeAll(async () => {
    writeRoutesFile(routes, { users: {}, stores: {}, slots: {} });
    proxy = await startProxyProcess({ workers: 2, lookup: { file: routes }, limits: { connections_per_ip: 4 } }, { admin: true });
  });
  afterAll(async () => {
    await proxy?.stop();
  });

  it('holds one address to the limit over the whole instance, not per worker', async () => {
    const held: LineClient[] = [];
    try {
      for (let i = 0; i < 4; i++) {
        const c = await connectLines({ host: HOST, port: proxy.port });
        held.push(c);
        expect(await c.readLine()).toMatch(/^\* OK /);
      }
      // The workers' counts reach the primary within ~20 ms; it then holds the address.
      await waitFor('the address at the limit', async () => (await metric(proxy, /^mailsplice_client_addresses_at_limit\{limit="connections"\}/)) === 1);
      // Counted per worker, these would mostly be let in (4 connections over 2 workers leave
      // each worker below 4). Every one is turned away, whichever worker takes it.
      for (let i = 0; i < 8; i++) {
        const c = await connectLines({ host: HOST, port: proxy.port });
        try {
          expect(await c.readLine()).toBe('* BYE [UNAVAILABLE] Too many connections, try again later');
        } finally {
          c.close();
        }
      }
      // One leaves: the address is below the limit again, on every worker.
      held.pop()!.close();
      await waitFor('the address below the limit', async () => (await metric(proxy, /^mailsplice_client_addresses_at_limit\{limit="connections"\}/)) === 0);
      const again = await connectLines({ host: HOST, port: proxy.port });
      held.push(again);
      expect(await again.readLine()).toMatch(/^\* OK /);
    } finally {
      for (const c of held) c.close();
    }
  });
});
