import { readFileSync } from 'node:fs';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openLmtp } from './harness/lmtp.js';
import { freePort } from './harness/ports.js';
import { startWorld, type World } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// A 50 MiB message through a proxy running in its own process (node + tsx, as in
// production), fanned out to both slots. The proxy's RSS is sampled from /proc while the
// message streams: a proxy that held the message would grow by at least its size.

const MIB = 1024 * 1024;
const MESSAGE = Number(process.env.LMTP_MEM_MIB ?? 50) * MIB;
/**
 * Growth allowed over the warmed-up baseline. Measured: +10 MiB for a 10 MiB message, +32 MiB
 * for 50 MiB and +33 MiB for 100 MiB (LMTP_MEM_MIB=100): flat, the garbage collector's lag on
 * freed socket buffers, not the message. A proxy holding the message would pass 50 MiB.
 */
const RSS_BOUND = 45 * MIB;

let world: World;
let proxy: ProxyProcess;
let lmtpPort: number;

beforeAll(async () => {
  world = await startWorld();
  const routesFile = join(tempDir('routes'), 'routes.yaml');
  writeRoutesFile(routesFile, worldRoutes(world));
  lmtpPort = await freePort('127.0.0.1');
  proxy = await startProxyProcess({
    listeners: [{ protocol: 'lmtp', address: '127.0.0.1', port: lmtpPort }],
    lookup: { file: routesFile },
    lmtp: { max_message_size: MESSAGE + MIB },
  });
});

afterAll(async () => {
  await proxy?.stop();
  await world?.stop();
});

function rss(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0) * 1024;
}

/** Sizes of the message files in a user's INBOX on a slot (reading 50 MiB back is pointless). */
async function maildirSizes(slot: World['slotA'], user: string): Promise<number[]> {
  const root = join(slot.dir, 'mail', user, 'Maildir');
  const sizes: number[] = [];
  for (const sub of ['new', 'cur']) {
    for (const f of await readdir(join(root, sub)).catch(() => [] as string[])) sizes.push((await stat(join(root, sub, f))).size);
  }
  return sizes;
}

/** One transaction to alice (slotA) and bob (slotB); the body is generated as it is sent. */
async function send(bodyBytes: number, onChunk?: () => void): Promise<string[]> {
  const c = await openLmtp({ host: '127.0.0.1', port: lmtpPort });
  try {
    await c.line();
    c.write('LHLO t\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n');
    await c.reply();
    for (let i = 0; i < 3; i++) expect(await c.line()).toMatch(/^250 /);
    expect(await c.line()).toMatch(/^354 /);
    c.write(`Subject: big ${bodyBytes}\r\n\r\n`);
    const line = `${'0123456789abcdef'.repeat(62)}\r\n`; // 994 bytes
    const chunk = Buffer.from(line.repeat(64));
    for (let sent = 0; sent < bodyBytes; sent += chunk.length) {
      if (!c.write(chunk)) await c.drained();
      onChunk?.();
    }
    c.write('.\r\n');
    const replies = [await c.line(120_000), await c.line(120_000)];
    c.send('QUIT');
    return replies;
  } finally {
    c.close();
  }
}

describe('a 50 MiB message', () => {
  it('streams through to both slots with the proxy RSS bounded', async () => {
    const pid = proxy.child.pid!;
    // Warm up (JIT, buffers, backend code paths), then take the baseline.
    await send(4 * MIB);
    await new Promise((r) => setTimeout(r, 500));
    const baseline = rss(pid);
    let peak = baseline;
    const sampler = setInterval(() => (peak = Math.max(peak, rss(pid))), 20);
    const started = Date.now();
    let replies: string[];
    try {
      replies = await send(MESSAGE, () => (peak = Math.max(peak, rss(pid))));
    } finally {
      clearInterval(sampler);
    }
    const seconds = (Date.now() - started) / 1000;
    expect(replies[0]).toMatch(/^250 2\.0\.0 <alice@example\.com> /);
    expect(replies[1]).toMatch(/^250 2\.0\.0 <bob@example\.com> /);
    const growth = peak - baseline;
    console.log(`${MESSAGE / MIB} MiB to 2 slots in ${seconds.toFixed(1)} s; proxy RSS baseline ${(baseline / MIB).toFixed(0)} MiB, peak ${(peak / MIB).toFixed(0)} MiB (+${(growth / MIB).toFixed(1)} MiB)`);
    expect(growth).toBeLessThan(RSS_BOUND);
    // Both copies are whole: Dovecot stores LF line ends, so each 994-byte line is 993 bytes.
    for (const [slot, user] of [[world.slotA, 'alice@example.com'], [world.slotB, 'bob@example.com']] as const) {
      const big = (await maildirSizes(slot, user)).filter((s) => s > MESSAGE * 0.9);
      expect(big, `${slot.id} ${user}`).toHaveLength(1);
      const lines = Math.ceil(MESSAGE / (994 * 64)) * 64;
      expect(big[0]).toBeGreaterThan(lines * 993);
    }
  }, 180_000);
});
