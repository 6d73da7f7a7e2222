import { execFile, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHoldRelay, type HoldRelay } from './harness/hold-relay.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { openLmtp } from './harness/lmtp.js';
import { waitUntil } from './harness/proc.js';
import { startWorld, type World } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { seedRedis, worldRoutes } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Issue 10, fencing: `ctl lock store S --wait` returns only once every live proxy has
// applied the lock and holds nothing on the old master: two `mailsplice serve` processes
// with IDLE sessions on store1, and an LMTP transaction whose final dot the backend has not
// answered yet (held by a relay in front of the slot's LMTP port). A proxy frozen with
// SIGSTOP is reported, with exit code 4. `ctl failover --wait --pause-for` runs the same
// wait and a sync command between its lock and switch.

const CLI = resolve(import.meta.dirname, '../src/cli.ts');
const BEAT_MS = 300;
const execFileP = promisify(execFile);
let world: World;
let hold: HoldRelay;
const proxies: ProxyProcess[] = [];

interface Fence {
  done: boolean;
  clear: string[];
  lagging: { id: string; epoch?: number; sessions: number; lmtp: number }[];
  stopped: { id: string }[];
}
interface Record_ {
  id: string;
  pid: number;
  fencing?: { epochs: Record<string, number>; held: Record<string, Record<string, { sessions: number; lmtp: number }>> };
}

/** Runs ctl as a failover tool does; resolves with its exit code and output, whatever the code. */
function ctl(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return execFileP(process.execPath, ['--import', 'tsx', CLI, 'ctl', ...args, '--redis', world.redis!.url], { timeout: 60_000 }).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

async function records(): Promise<Record_[]> {
  const r = new Redis(world.redis!.url);
  try {
    const ids = await r.zrange('ms:proxies', '0', '-1');
    const texts = ids.length ? await r.mget(ids.map((id) => `ms:proxy:${id}`)) : [];
    return texts.flatMap((t) => (t ? [JSON.parse(t) as Record_] : []));
  } finally {
    r.disconnect();
  }
}

async function idle(port: number, user: string, password: string): Promise<LineClient> {
  const c = await connectLines({ host: '127.0.0.1', port, timeoutMs: 20_000 });
  await c.readLine();
  c.send(`a LOGIN ${user} ${password}`);
  expect((await c.readUntil(/^a /, 20_000)).at(-1)).toMatch(/^a OK/);
  c.send('b SELECT INBOX');
  await c.readUntil(/^b /);
  c.send('c IDLE');
  expect(await c.readLine()).toMatch(/^\+ /);
  return c;
}

beforeAll(async () => {
  world = await startWorld({ redis: true });
  // slotA's LMTP through a relay that can hold the proxy's bytes (the final dot).
  hold = await startHoldRelay({ host: world.slotA.host, port: world.slotA.lmtp }, world.slotA.host);
  const routes = worldRoutes(world);
  routes.slots.slotA = { ...routes.slots.slotA!, lmtp: String(hold.port) };
  await seedRedis(world.redis!.url, routes);
  const cfg = { lookup: { redis: { url: world.redis!.url, proxy_heartbeat_ms: BEAT_MS } }, lmtp: { backend_idle_ms: 0 } };
  proxies.push(await startProxyProcess(cfg, { lmtp: true }));
  proxies.push(await startProxyProcess(cfg, { lmtp: true }));
  await waitUntil(async () => (await records()).length === 2, { what: 'two heartbeat records' });
}, 60_000);

afterAll(async () => {
  hold?.release();
  for (const p of proxies) if (p.child.exitCode === null) p.child.kill('SIGCONT');
  await Promise.all(proxies.map((p) => p.stop()));
  await hold?.close();
  await world?.stop();
});

describe('ctl lock store --wait', () => {
  it('returns only after both proxies ended their sessions on the master and the LMTP transaction finished', { timeout: 90_000 }, async () => {
    const [p1, p2] = proxies as [ProxyProcess, ProxyProcess];
    const sessions = [await idle(p1.port, 'alice@example.com', 'alicepw'), await idle(p2.port, 'carol@example.com', 'carolpw')];
    // An LMTP transaction on p1 whose final dot the backend has not seen.
    hold.hold(/(?:^|\n)\.\r\n/);
    const lmtp = await openLmtp({ host: '127.0.0.1', port: p1.lmtpPort! });
    expect(await lmtp.line()).toMatch(/^220 /);
    for (const [cmd, code] of [['LHLO fence.test', '250'], ['MAIL FROM:<s@example.net>', '250'], ['RCPT TO:<alice@example.com>', '250'], ['DATA', '354']] as const) {
      lmtp.send(cmd);
      expect(await lmtp.line()).toMatch(new RegExp(`^${code}`));
    }
    lmtp.write('Subject: fenced\r\n\r\nbody\r\n.\r\n');
    await waitUntil(async () => hold.holding === 1, { what: 'the final dot held before the backend' });

    // ctl as its own process, its stderr read as it comes: it says what it waits for.
    const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'ctl', 'lock', 'store', 'store1', '--wait=30', '--json', '--redis', world.redis!.url], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let exited = false;
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const locking = new Promise<{ code: number | null; stdout: string; stderr: string }>((res) =>
      child.once('exit', (code) => {
        exited = true;
        res({ code, stdout, stderr });
      }),
    );
    // Both proxies applied the lock (epoch 2), their IDLE sessions are gone, and the fence
    // is held up by exactly the LMTP transaction on p1.
    for (const s of sessions) expect((await s.readUntil(/^\* BYE /, 20_000)).at(-1)).toMatch(/^\* BYE \[UNAVAILABLE\]/);
    await waitUntil(
      async () => {
        const rs = await records();
        const of = (pid: number | undefined) => rs.find((r) => r.pid === pid)?.fencing;
        return of(p1.child.pid)?.epochs.store1 === 2 && of(p2.child.pid)?.epochs.store1 === 2 && of(p1.child.pid)?.held.store1?.slotA?.lmtp === 1 && of(p1.child.pid)?.held.store1?.slotA?.sessions === 0;
      },
      { what: 'both records at epoch 2, p1 holding the one transaction' },
    );
    // ctl saw exactly that and waits for it.
    const p1id = `:${p1.child.pid}: `;
    await waitUntil(async () => stderr.split('\n').some((l) => l.startsWith('waiting for ') && l.includes(p1id) && l.includes('1 LMTP transaction(s) on slotA') && !l.includes('epoch')), {
      what: 'ctl waiting for the transaction',
      describe: () => stderr,
    });
    expect(exited).toBe(false);
    hold.release();
    expect(await lmtp.line(20_000)).toMatch(/^250 /);
    const r = await locking;
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/fence: every live proxy \(2\) applied epoch 2 of store1 and holds nothing on slotA/);
    const out = JSON.parse(r.stdout) as { epoch: number; fence: Fence };
    expect(out.epoch).toBe(2);
    expect(out.fence.done).toBe(true);
    expect(out.fence.clear).toHaveLength(2);
    expect((await world.slotA.messages('alice@example.com')).filter((m) => m.includes('Subject: fenced'))).toHaveLength(1);
    lmtp.close();
    for (const s of sessions) s.close();
  });

  it('reports a proxy frozen with SIGSTOP as lagging, with exit code 4', { timeout: 90_000 }, async () => {
    const [p1, p2] = proxies as [ProxyProcess, ProxyProcess];
    p2.child.kill('SIGSTOP');
    try {
      expect((await ctl('unlock', 'store', 'store1')).code).toBe(0); // epoch 3: p2 does not hear it
      const r = await ctl('lock', 'store', 'store1', '--wait=20', '--json'); // epoch 4
      expect(r.code, r.stderr).toBe(4);
      const out = JSON.parse(r.stdout) as { fence: Fence };
      const p2id = `${(await records()).find((x) => x.pid === p1.child.pid)!.id.replace(/:\d+$/, '')}:${p2.child.pid}`;
      expect(out.fence.done).toBe(false);
      expect([...out.fence.lagging.map((l) => l.id), ...out.fence.stopped.map((s) => s.id)]).toEqual([p2id]);
      expect(out.fence.clear).toHaveLength(1);
      expect(r.stderr).toContain(p2id);
    } finally {
      p2.child.kill('SIGCONT');
    }
  });
});

describe('ctl failover --wait --pause-for', () => {
  it('waits for the fence, runs the sync command, then switches', { timeout: 90_000 }, async () => {
    // Both proxies live again and caught up (p2 resyncs after its freeze).
    await waitUntil(async () => (await records()).filter((r) => (r.fencing?.epochs.store1 ?? 0) >= 4).length === 2, { what: 'both proxies at epoch 4' });
    expect((await ctl('unlock', 'store', 'store1')).code).toBe(0);
    const marker = join(tempDir('fence'), 'synced');
    const r = await ctl('failover', 'store1', '--to', 'slotB', '--wait=30', '--pause-for', `echo "$MAILSPLICE_OLD_MASTER $MAILSPLICE_NEW_MASTER $MAILSPLICE_EPOCH" > ${marker}`, '--json');
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { from: string; to: string; fence: Fence };
    expect(out).toMatchObject({ from: 'slotA', to: 'slotB', fence: { done: true } });
    expect(readFileSync(marker, 'utf8').trim()).toBe('slotA slotB 6');
  });
});
