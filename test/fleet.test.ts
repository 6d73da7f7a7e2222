import { execFile } from 'node:child_process';
import { resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { HeartbeatRecord } from '../src/fleet/records.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { waitUntil } from './harness/proc.js';
import { startWorld, type World } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { seedRedis, worldRoutes } from './support/routes.js';

// Issue 9: the fleet as an operator sees it. Two `mailsplice serve` processes on one Redis,
// each with its heartbeat record; ctl reads them as a failover tool would.

let world: World;
let proxies: ProxyProcess[] = [];

const execFileP = promisify(execFile);
const CLI = resolve(import.meta.dirname, '../src/cli.ts');
const BEAT_MS = 300;

async function ctl(...args: string[]): Promise<string> {
  const { stdout } = await execFileP(process.execPath, ['--import', 'tsx', CLI, 'ctl', ...args, '--redis', world.redis!.url]);
  return stdout;
}

async function proxiesNow(): Promise<HeartbeatRecord[]> {
  return JSON.parse(await ctl('proxies', '--json')) as HeartbeatRecord[];
}

async function login(port: number, user: string, pass: string): Promise<LineClient> {
  const c = await connectLines({ host: '127.0.0.1', port, timeoutMs: 20_000 });
  await c.readLine();
  c.send(`a LOGIN ${user} ${pass}`);
  const answer = (await c.readUntil(/^a /, 20_000)).at(-1)!;
  if (!answer.startsWith('a OK')) throw new Error(`${user}: ${answer}`);
  return c;
}

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  const cfg = { lookup: { redis: { url: world.redis!.url, proxy_heartbeat_ms: BEAT_MS } } };
  // One after the other: ports picked at once by two starts can collide.
  proxies.push(await startProxyProcess(cfg, { admin: true }));
  // The second with two workers: its primary writes the record, summing what the workers hold.
  proxies.push(await startProxyProcess({ ...cfg, workers: 2 }, { admin: true }));
});

afterAll(async () => {
  await Promise.all(proxies.map((p) => p.stop()));
  await world?.stop();
});

interface WhoRow {
  proxy: string;
  sessions: { login: string; protocol: string; slot: string; ip: string; bytes_in: number; session: string }[];
  error?: string;
}

describe('ctl who and ctl kick across two proxies', () => {
  it('who lists the sessions of both; a kick of one user ends exactly the sessions of that user on both', { timeout: 60_000 }, async () => {
    const [p1, p2] = proxies as [ProxyProcess, ProxyProcess];
    const alice = [await login(p1.port, 'alice@example.com', 'alicepw'), await login(p2.port, 'alice@example.com', 'alicepw')];
    const others = [await login(p1.port, 'bob@example.com', 'bobpw'), await login(p2.port, 'carol@example.com', 'carolpw')];

    const rows = JSON.parse(await ctl('who', '--json')) as WhoRow[];
    expect(rows.map((r) => r.error)).toEqual([undefined, undefined]);
    const logins = (r: WhoRow) => r.sessions.map((s) => s.login).sort();
    const byPid = (pid: number | undefined) => rows.find((r) => r.proxy.endsWith(`:${pid}`))!;
    expect(logins(byPid(p1.child.pid))).toEqual(['alice@example.com', 'bob@example.com']);
    expect(logins(byPid(p2.child.pid))).toEqual(['alice@example.com', 'carol@example.com']);
    expect(byPid(p1.child.pid).sessions[0]).toMatchObject({ protocol: 'imap', ip: '127.0.0.1' });
    // Filtered, and as the table an operator reads.
    const onlyAlice = JSON.parse(await ctl('who', '--user', 'ALICE@example.com', '--json')) as WhoRow[];
    expect(onlyAlice.flatMap(logins)).toEqual(['alice@example.com', 'alice@example.com']);
    const text = (await ctl('who', '--slot', 'slotB')).trimEnd();
    expect(text.split('\n')[0]).toMatch(/^PROXY\s+LOGIN\s+PROTO\s+CLIENT\s+SLOT\s+AGE\s+IN\s+OUT$/);
    expect(text.split('\n').slice(1).map((l) => l.split(/\s+/)[1])).toEqual(['bob@example.com']);

    const out = JSON.parse(await ctl('kick', 'alice@example.com', '--json')) as { subscribers: number };
    expect(out.subscribers).toBe(3); // one subscription per serving process: 1 + 2 workers
    for (const c of alice) expect(await c.readLine(20_000)).toBe('* BYE [UNAVAILABLE] Session ended by the administrator');
    // The others were not touched: they answer, and both proxies still hold them.
    for (const c of others) {
      c.send('n NOOP');
      expect((await c.readUntil(/^n /)).at(-1)).toMatch(/^n OK/);
    }
    const after = JSON.parse(await ctl('who', '--json')) as WhoRow[];
    expect(after.flatMap(logins).sort()).toEqual(['bob@example.com', 'carol@example.com']);
    for (const c of [...alice, ...others]) c.close();
  });
});

describe('heartbeat records and ctl proxies', () => {
  it('lists both proxies with their admin address and sessions, and a killed one drops out within its TTL', { timeout: 60_000 }, async () => {
    const [p1, p2] = proxies as [ProxyProcess, ProxyProcess];
    const c = await login(p1.port, 'alice@example.com', 'alicepw');
    // Three sessions on the two-worker proxy: whichever workers took them, the record sums them.
    const more = [await login(p2.port, 'alice@example.com', 'alicepw'), await login(p2.port, 'bob@example.com', 'bobpw'), await login(p2.port, 'carol@example.com', 'carolpw')];
    let records: HeartbeatRecord[] = [];
    await waitUntil(
      async () => {
        records = await proxiesNow();
        return records.length === 2 && records.some((r) => r.sessions.total === 1) && records.some((r) => r.sessions.total === 3);
      },
      { what: 'both proxies listed with their sessions', timeoutMs: 10_000, describe: () => JSON.stringify(records) },
    );
    const r1 = records.find((r) => r.pid === p1.child.pid)!;
    const r2 = records.find((r) => r.pid === p2.child.pid)!;
    expect(r1).toMatchObject({ admin: `127.0.0.1:${p1.adminPort}`, workers: 1, ttl_ms: 3 * BEAT_MS, events: { live: true } });
    expect(r1.sessions).toMatchObject({ total: 1, by_protocol: { imap: 1 }, by_slot: { slotA: 1 } });
    expect(r2).toMatchObject({ admin: `127.0.0.1:${p2.adminPort}`, workers: 2, events: { live: true } });
    expect(r2.sessions).toMatchObject({ total: 3, by_protocol: { imap: 3 }, by_slot: { slotA: 2, slotB: 1 } });
    expect(Date.parse(r1.started)).toBeLessThanOrEqual(Date.parse(r1.updated));
    for (const m of more) m.close();

    const text = await ctl('proxies');
    expect(text.split('\n')[0]).toMatch(/^PROXY\s+ADMIN\s+UP\s+WORKERS\s+SESSIONS\s+EVENTS\s+LAST EVENT\s+BEAT$/);
    expect(text).toContain(`127.0.0.1:${p1.adminPort}`);
    expect(text).toMatch(/\blive\b/);
    c.close();

    // kill -9: nothing cleans up; the record's TTL does.
    const killedAt = Date.now();
    p1.child.kill('SIGKILL');
    await waitUntil(async () => (await proxiesNow()).every((r) => r.pid !== p1.child.pid), { what: 'killed proxy gone from ctl proxies', timeoutMs: 10_000 });
    const gone = Date.now() - killedAt;
    // Within its TTL, plus slack for the check itself (each ctl run starts a process).
    expect(gone).toBeLessThan(3 * BEAT_MS + 5000);
    expect((await proxiesNow()).map((r) => r.pid)).toEqual([p2.child.pid]);
  });
});
