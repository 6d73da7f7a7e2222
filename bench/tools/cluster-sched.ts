// How a multi-worker mailsplice should share its listening sockets: node:cluster's
// round-robin (the primary accepts every connection and passes it to a worker) against
// SCHED_NONE (every worker accepts from the shared socket, the kernel picks). IMAP logins
// against the fake backend, both variants running at the same time and measured in turns, so
// other load on the machine falls on both alike: logins/s, the CPU of the whole process tree
// per login, the primary's share of it, and how the logins spread over the workers.
//
//   npm run build && node --import tsx bench/tools/cluster-sched.ts [--workers 2] [--runs 5] [--seconds 4] [--concurrency 16]
//
// To compare two builds with one policy: copy dist/ aside inside the repo (cp -r dist .tmp/dist-a),
// change and build again, then --policies none:.tmp/dist-a/cli.js,none:dist/cli.js

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { stringify } from 'yaml';
import { freePort } from '../../test/harness/ports.js';
import { childPids, cpuTimes, killAll, setClockTicks, spawnTracked, stopChild, treeCpu } from '../lib/procs.js';
import { loadedWorker, runLogins } from '../lib/workers.js';
import { startFakeWorld } from '../lib/fake-world.js';

const { values } = parseArgs({
  options: {
    workers: { type: 'string', default: '2' },
    runs: { type: 'string', default: '5' },
    seconds: { type: 'string', default: '4' },
    concurrency: { type: 'string', default: '16' },
    policies: { type: 'string', default: 'rr,none' },
  },
});
setClockTicks(100);

interface Row {
  rate: number;
  usPerLogin: number;
  primaryUsPerLogin: number;
  /** Logins per worker in this run, as a share of the busiest. */
  spread: string;
}

async function workerCpu(adminPort: number): Promise<number[]> {
  const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text();
  // Logins are summed over workers; the per-worker CPU is labelled, so it shows the spread.
  return text
    .split('\n')
    .filter((l) => /^mailsplice_process_process_cpu_seconds_total\{worker="\d+"\}/.test(l))
    .map((l) => Number(l.split(' ').at(-1)));
}

async function main(): Promise<void> {
  const tmp = mkdtempSync(join(os.tmpdir(), 'mailsplice-clustersched-'));
  try {
    const { fake, users, routes } = await startFakeWorld(tmp, 50, 'u');
    const proxies: { policy: string; port: number; adminPort: number; pid: number; child: ReturnType<typeof spawnTracked>['child']; rows: Row[] }[] = [];
    for (const variant of values.policies!.split(',')) {
      const [policy = 'none', cli = 'dist/cli.js'] = variant.split(':');
      const port = await freePort();
      const adminPort = await freePort();
      const config = join(tmp, `ms-${proxies.length}.yaml`);
      writeFileSync(
        config,
        stringify({
          workers: Number(values.workers),
          listeners: [{ protocol: 'imap', address: '127.0.0.1', port }],
          lookup: { file: routes },
          admin: { address: '127.0.0.1', port: adminPort },
          limits: { connections_per_ip: 20000, concurrent_logins_per_ip: 20000, auth_failures_per_ip_per_minute: 10_000_000 },
          log: { level: 'info' },
        }),
      );
      // node:cluster reads its policy from the environment when the primary loads it.
      process.env.NODE_CLUSTER_SCHED_POLICY = policy;
      const { child, output } = spawnTracked(process.execPath, [resolve(cli), 'serve', '--config', config]);
      for (let t = 0; t < 400 && !output().includes('"mailsplice started"'); t++) await new Promise((r) => setTimeout(r, 50));
      if (!output().includes('"mailsplice started"')) throw new Error(`mailsplice (${policy}) did not start: ${output()}`);
      proxies.push({ policy: variant, port, adminPort, pid: child.pid!, child, rows: [] });
    }
    const job = (port: number, seconds: number) => ({ mode: 'logins' as const, host: '127.0.0.1', port, users, concurrency: Number(values.concurrency), maxCount: 200_000, maxSeconds: seconds, hardStopSeconds: seconds + 60 });
    for (const p of proxies) await runLogins(await loadedWorker(), job(p.port, 2)); // warm-up
    for (let i = 0; i < Number(values.runs); i++) {
      for (const p of proxies) {
        const w = await loadedWorker();
        const tree0 = treeCpu(p.pid);
        const primary0 = cpuTimes(p.pid).self;
        const perWorker0 = await workerCpu(p.adminPort);
        const r = await runLogins(w, job(p.port, Number(values.seconds)));
        const tree1 = treeCpu(p.pid);
        const primary1 = cpuTimes(p.pid).self;
        const perWorker1 = await workerCpu(p.adminPort);
        const cpu = perWorker1.map((v, k) => v - (perWorker0[k] ?? 0));
        const max = Math.max(...cpu);
        const row: Row = {
          rate: r.ok / r.seconds,
          usPerLogin: ((tree1 - tree0) * 1e6) / r.ok,
          primaryUsPerLogin: ((primary1 - primary0) * 1e6) / r.ok,
          spread: cpu.map((c) => (c / max).toFixed(2)).join('/'),
        };
        p.rows.push(row);
        console.log(
          `run ${i + 1} ${p.policy}: ${Math.round(row.rate)} logins/s, instance CPU ${row.usPerLogin.toFixed(0)} us/login (primary ${row.primaryUsPerLogin.toFixed(0)}), worker CPU shares ${row.spread}${r.failed ? `, ${r.failed} failed: ${r.firstErrors[0]}` : ''}`,
        );
      }
    }
    for (const p of proxies) {
      const med = (k: 'rate' | 'usPerLogin' | 'primaryUsPerLogin') => p.rows.map((r) => r[k]).sort((x, y) => x - y)[Math.floor(p.rows.length / 2)]!;
      console.log(`median ${p.policy} (${values.workers} workers, ${childPids(p.pid).length} running): ${med('rate').toFixed(0)} logins/s, instance CPU ${med('usPerLogin').toFixed(0)} us/login, primary ${med('primaryUsPerLogin').toFixed(0)} us/login`);
      await stopChild(p.child);
    }
    await stopChild(fake);
  } finally {
    await killAll();
    rmSync(tmp, { recursive: true, force: true });
  }
}

await main();
