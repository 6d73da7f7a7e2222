// LMTP deliveries per second: straight to Dovecot LMTP, through mailsplice, and through
// Dovecot's own LMTP proxy (lmtp_proxy = yes, passdb proxy=y host port from the same routes).
//
//   node --import tsx bench/lmtp.ts [--messages 4000] [--seconds 20] [--concurrency 8] [--size 4096]
//
// Starts two real Dovecot slots (test/harness), mailsplice as its own process (as deployed)
// with the routes in a file, then runs the same bounded loop against each target: every
// worker keeps one LMTP connection and sends messages one after another on it, as Postfix's
// LMTP client does with connection caching. Each run stops at --messages or --seconds,
// whichever comes first. Results go to bench/results/lmtp.json.
//
// Scenarios:
//   single  one recipient per message (alice on slotA, bob on slotB, alternating workers)
//   fanout  two recipients per message, one on each slot (direct: the client itself sends
//           the message to both slots in parallel, which is what the proxy does for it)

import { execFileSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { LmtpClient } from '../src/lmtp/client.js';
import { startDovecotProxy, type DovecotProxy } from './lib/dovecot-proxy.js';
import { freePort } from '../test/harness/ports.js';
import { startWorld, type World } from '../test/harness/world.js';
import { startProxyProcess, type ProxyProcess } from '../test/support/process.js';
import { worldRoutes, writeRoutesFile } from '../test/support/routes.js';

const { values } = parseArgs({
  options: {
    messages: { type: 'string', default: '4000' },
    seconds: { type: 'string', default: '20' },
    concurrency: { type: 'string', default: '8' },
    size: { type: 'string', default: '4096' },
  },
});
const MESSAGES = Number(values.messages);
const SECONDS = Number(values.seconds);
const CONCURRENCY = Number(values.concurrency);
const SIZE = Number(values.size);
for (const [k, v] of Object.entries({ MESSAGES, SECONDS, CONCURRENCY, SIZE })) {
  if (!Number.isInteger(v) || v <= 0) throw new Error(`--${k.toLowerCase()} must be a positive integer`);
}

interface Endpoint {
  host: string;
  port: number;
}

interface RunResult {
  scenario: string;
  target: 'direct' | 'proxy' | 'dovecot-proxy';
  messages: number;
  deliveries: number;
  failures: number;
  seconds: number;
  deliveriesPerSecond: number;
  latencyMs: { p50: number; p90: number; p99: number; max: number };
}

function body(n: number): Buffer {
  const head = `From: bench@example.net\r\nSubject: bench ${n}\r\nMessage-ID: <bench-${n}-${process.pid}@example.net>\r\n\r\n`;
  const line = `${'The quick brown fox jumps over the lazy dog. '.repeat(2).slice(0, 76)}\r\n`;
  return Buffer.from(head + line.repeat(Math.max(1, Math.ceil((SIZE - head.length) / line.length))));
}

async function connect(e: Endpoint): Promise<LmtpClient> {
  return LmtpClient.connect({
    host: e.host,
    port: e.port,
    connectTimeoutMs: 5000,
    timeoutMs: 30_000,
    tls: { mode: 'none', verify: true },
    lhlo: 'bench.example',
  });
}

/** One transaction on an open connection; true when every recipient got 2xx. */
async function deliver(c: LmtpClient, rcpts: string[], msg: Buffer): Promise<number> {
  const env = await c.envelope('bench@example.net', rcpts);
  const accepted = env.rcpts.filter((r) => r.code === 250).length;
  if (env.mail.code !== 250 || accepted === 0) {
    await c.rset();
    return 0;
  }
  const d = await c.data();
  if (d.code !== 354) throw new Error(`DATA: ${d.code}`);
  if (!c.write(msg)) await c.drained();
  const { replies, error } = await c.endData(accepted);
  if (error) throw error;
  return replies.filter((r) => r.code === 250).length;
}

function percentile(sorted: number[], p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]! : 0;
}

/**
 * `lanes(worker)` gives, per worker, the connections to use and the recipients for each: a
 * message is one transaction per lane, run in parallel (one lane normally; two for direct
 * fan-out).
 */
async function run(
  scenario: string,
  target: RunResult['target'],
  lanes: (w: number) => { endpoint: Endpoint; rcpts: string[] }[],
  maxMessages = MESSAGES,
  maxSeconds = SECONDS,
): Promise<RunResult> {
  const msg = body(0);
  let started = 0;
  let messages = 0;
  let deliveries = 0;
  let failures = 0;
  const latencies: number[] = [];
  const t0 = performance.now();
  const deadline = t0 + maxSeconds * 1000;
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async (_, w) => {
      const plan = lanes(w);
      const conns = await Promise.all(plan.map((l) => connect(l.endpoint)));
      try {
        while (started < maxMessages && performance.now() < deadline) {
          started++;
          const t = performance.now();
          const ok = await Promise.all(plan.map((l, i) => deliver(conns[i]!, l.rcpts, msg)));
          latencies.push(performance.now() - t);
          const want = plan.reduce((n, l) => n + l.rcpts.length, 0);
          const got = ok.reduce((a, b) => a + b, 0);
          messages++;
          deliveries += got;
          failures += want - got;
        }
      } finally {
        for (const c of conns) c.quit();
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  const r = (x: number) => Math.round(x * 100) / 100;
  return {
    scenario,
    target,
    messages,
    deliveries,
    failures,
    seconds: r(seconds),
    deliveriesPerSecond: r(deliveries / seconds),
    latencyMs: { p50: r(percentile(latencies, 50)), p90: r(percentile(latencies, 90)), p99: r(percentile(latencies, 99)), max: r(latencies.at(-1) ?? 0) },
  };
}

async function main(): Promise<void> {
  const loadBefore = os.loadavg().map((x) => Math.round(x * 100) / 100);
  let world: World | undefined;
  let proxy: ProxyProcess | undefined;
  let dp: DovecotProxy | undefined;
  try {
    world = await startWorld();
    const routesFile = join(mkdtempSync(join(os.tmpdir(), 'mailsplice-bench-')), 'routes.yaml');
    writeRoutesFile(routesFile, worldRoutes(world));
    const lmtpPort = await freePort('127.0.0.1');
    proxy = await startProxyProcess({
      listeners: [{ protocol: 'lmtp', address: '127.0.0.1', port: lmtpPort }],
      // info, as deployed: one log line per message is part of the cost.
      lookup: { file: routesFile },
      // The load comes from one address: lift the per-address RCPT rate.
      lmtp: { recipients_per_ip_per_minute: 10_000_000 },
    });
    const { slotA, slotB } = world;
    const dpParent = mkdtempSync(join(os.tmpdir(), 'mailsplice-bench-'));
    chmodSync(dpParent, 0o755); // Dovecot's auth process (user dovecot) reads the passdb below it
    const dpDir = join(dpParent, 'dovecot-proxy');
    dp = await startDovecotProxy({
      dir: dpDir,
      routes: [
        { login: 'alice@example.com', host: slotA.host, imap: slotA.imap, lmtp: slotA.lmtp },
        { login: 'bob@example.com', host: slotB.host, imap: slotB.imap, lmtp: slotB.lmtp },
      ],
    });
    const viaDp: Endpoint = { host: dp.host, port: dp.lmtp };
    const viaProxy: Endpoint = { host: '127.0.0.1', port: lmtpPort };
    const a: Endpoint = { host: slotA.host, port: slotA.lmtp };
    const b: Endpoint = { host: slotB.host, port: slotB.lmtp };
    const user = (w: number) => (w % 2 === 0 ? 'alice@example.com' : 'bob@example.com');
    const home = (w: number) => (w % 2 === 0 ? a : b);

    const results: RunResult[] = [];
    const say = (r: RunResult) => {
      results.push(r);
      console.log(
        `${r.scenario.padEnd(6)} ${r.target.padEnd(6)} ${String(r.deliveries).padStart(6)} deliveries in ${r.seconds.toFixed(1).padStart(5)} s = ${r.deliveriesPerSecond.toFixed(0).padStart(5)}/s  p50 ${r.latencyMs.p50} ms p99 ${r.latencyMs.p99} ms${r.failures ? `  FAILURES ${r.failures}` : ''}`,
      );
    };
    // Warm-up (JIT, Dovecot's first-process costs), not recorded.
    await run('warmup', 'direct', (w) => [{ endpoint: home(w), rcpts: [user(w)] }], 200, 5);
    await run('warmup', 'proxy', (w) => [{ endpoint: viaProxy, rcpts: [user(w)] }], 200, 5);
    await run('warmup', 'dovecot-proxy', (w) => [{ endpoint: viaDp, rcpts: [user(w)] }], 200, 5);

    say(await run('single', 'direct', (w) => [{ endpoint: home(w), rcpts: [user(w)] }]));
    say(await run('single', 'proxy', (w) => [{ endpoint: viaProxy, rcpts: [user(w)] }]));
    say(await run('single', 'dovecot-proxy', (w) => [{ endpoint: viaDp, rcpts: [user(w)] }]));
    say(
      await run('fanout', 'direct', () => [
        { endpoint: a, rcpts: ['alice@example.com'] },
        { endpoint: b, rcpts: ['bob@example.com'] },
      ]),
    );
    say(await run('fanout', 'proxy', () => [{ endpoint: viaProxy, rcpts: ['alice@example.com', 'bob@example.com'] }]));
    say(await run('fanout', 'dovecot-proxy', () => [{ endpoint: viaDp, rcpts: ['alice@example.com', 'bob@example.com'] }]));

    const by = (s: string, t: string) => results.find((r) => r.scenario === s && r.target === t)!.deliveriesPerSecond;
    const out = {
      date: new Date().toISOString(),
      command: `node --import tsx bench/lmtp.ts --messages ${MESSAGES} --seconds ${SECONDS} --concurrency ${CONCURRENCY} --size ${SIZE}`,
      machine: {
        cpus: os.cpus().length,
        cpu: os.cpus()[0]?.model ?? '',
        node: process.version,
        dovecot: execFileSync('dovecot', ['--version']).toString().trim(),
        // Client, proxy and both Dovecots share these CPUs: a busy machine lowers every figure.
        loadAverageBefore: loadBefore,
      },
      settings: { messagesPerRun: MESSAGES, secondsPerRun: SECONDS, concurrency: CONCURRENCY, messageBytes: body(0).length },
      results,
      proxyOverDirect: { single: Math.round((by('single', 'proxy') / by('single', 'direct')) * 100) / 100, fanout: Math.round((by('fanout', 'proxy') / by('fanout', 'direct')) * 100) / 100 },
      dovecotProxyOverDirect: { single: Math.round((by('single', 'dovecot-proxy') / by('single', 'direct')) * 100) / 100, fanout: Math.round((by('fanout', 'dovecot-proxy') / by('fanout', 'direct')) * 100) / 100 },
    };
    const dir = resolve(import.meta.dirname, 'results');
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'lmtp.json'), `${JSON.stringify(out, null, 2)}\n`);
    console.log(`proxy/direct: single ${out.proxyOverDirect.single}, fanout ${out.proxyOverDirect.fanout}; Dovecot proxy/direct: single ${out.dovecotProxyOverDirect.single}, fanout ${out.dovecotProxyOverDirect.fanout}; written to bench/results/lmtp.json`);
  } finally {
    await proxy?.stop();
    await dp?.stop();
    await world?.stop();
  }
}

await main();
