// The proxy's CPU time per GiB of FETCH data, for comparing builds: mailsplice (a built
// dist/cli.js) in front of the fake backend, which answers every FETCH with the same 1 MiB
// message from memory (cheap, so the proxy's share of the 2 cores stays steady), several
// short runs, the median of proxy CPU seconds per GiB (user and system).
//
//   node --import tsx bench/tools/fetch-cpu.ts [--cli dist/cli.js ...] [--runs 7] [--seconds 4]
//        [--sessions 4] [--node-options='...']
//
// As with login-cpu.ts: copy a build aside inside the repo (cp -r dist .tmp/dist-a), change,
// build, then `--cli .tmp/dist-a/cli.js --cli dist/cli.js`. Every build runs as its own
// process at the same time and runs alternate between them, so outside load falls on both.
// A --cli value may carry node options after the path. `--direct` adds the fake backend
// itself as a row (the generator's and backend's cost without a proxy).

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { stringify } from 'yaml';
import { freePort } from '../../test/harness/ports.js';
import { spawnTracked, stopChild, cpuTimes, killAll, setClockTicks } from '../lib/procs.js';
import { loadedWorker, runFetch } from '../lib/workers.js';
import { startFakeWorld } from '../lib/fake-world.js';

const { values } = parseArgs({
  options: {
    cli: { type: 'string', multiple: true, default: ['dist/cli.js'] },
    runs: { type: 'string', default: '7' },
    seconds: { type: 'string', default: '4' },
    sessions: { type: 'string', default: '4' },
    'node-options': { type: 'string', default: '' },
    direct: { type: 'boolean', default: false },
  },
});
setClockTicks(100);

interface Row {
  sPerGiB: number;
  user: number;
  sys: number;
  mibPerSec: number;
  backend: number;
  client: number;
}

async function main(): Promise<void> {
  const tmp = mkdtempSync(join(os.tmpdir(), 'mailsplice-fetchcpu-'));
  try {
    const { fake, users, routes, backend } = await startFakeWorld(tmp, 8, 'f');
    const nodeArgs = values['node-options']!.split(/\s+/).filter(Boolean);
    const targets: { name: string; host: string; port: number; pid?: number; child?: ReturnType<typeof spawnTracked>['child']; rows: Row[] }[] = [];
    if (values.direct) targets.push({ name: 'direct (fake backend)', host: backend.host, port: backend.port, rows: [] });
    for (const [i, cli] of values.cli!.entries()) {
      const port = await freePort();
      const config = join(tmp, `ms${i}.yaml`);
      writeFileSync(config, stringify({ workers: 1, listeners: [{ protocol: 'imap', address: '127.0.0.1', port }], lookup: { file: routes }, limits: { connections_per_ip: 20000, concurrent_logins_per_ip: 20000, auth_failures_per_ip_per_minute: 10_000_000 }, log: { level: 'info' } }));
      const [path = '', ...own] = cli.split(/\s+/);
      const { child, output } = spawnTracked(process.execPath, [...nodeArgs, ...own, resolve(path), 'serve', '--config', config]);
      for (let t = 0; t < 200 && !output().includes('"mailsplice started"'); t++) await new Promise((r) => setTimeout(r, 50));
      if (!output().includes('"mailsplice started"')) throw new Error(`mailsplice ${cli} did not start: ${output()}`);
      targets.push({ name: cli, host: '127.0.0.1', port, pid: child.pid!, child, rows: [] });
    }
    const sessions = Number(values.sessions);
    const job = (t: { host: string; port: number }, seconds: number) => ({ mode: 'fetch' as const, host: t.host, port: t.port, users, concurrency: sessions, maxCount: 100_000, maxSeconds: seconds, hardStopSeconds: seconds + 60 });
    for (const t of targets) await runFetch(await loadedWorker(), job(t, 2)); // warm-up
    for (let i = 0; i < Number(values.runs); i++) {
      for (const t of targets) {
        const w = await loadedWorker();
        const a = t.pid ? cpuTimes(t.pid) : undefined;
        const fa = cpuTimes(fake.pid!);
        const r = await runFetch(w, job(t, Number(values.seconds)));
        const fb = cpuTimes(fake.pid!);
        const b = t.pid ? cpuTimes(t.pid) : undefined;
        const gib = r.bytes / 2 ** 30;
        const per = (s: number) => s / gib;
        const row: Row = {
          sPerGiB: a && b ? per(b.self - a.self) : 0,
          user: a && b ? per(b.user - a.user) : 0,
          sys: a && b ? per(b.system - a.system) : 0,
          mibPerSec: r.bytes / 2 ** 20 / r.seconds,
          backend: per(fb.self - fa.self),
          client: per(r.generatorCpuSeconds),
        };
        t.rows.push(row);
        console.log(`run ${i + 1} ${t.name}: ${row.mibPerSec.toFixed(0)} MiB/s, proxy CPU ${row.sPerGiB.toFixed(3)} s/GiB (user ${row.user.toFixed(3)}, system ${row.sys.toFixed(3)}), backend ${row.backend.toFixed(3)}, client ${row.client.toFixed(3)}${r.failed ? `, ${r.failed} failed: ${r.firstErrors[0]}` : ''}`);
      }
    }
    for (const t of targets) {
      const med = (k: keyof Row) => t.rows.map((r) => r[k]).sort((x, y) => x - y)[Math.floor(t.rows.length / 2)]!;
      console.log(`median ${t.name} ${nodeArgs.join(' ')}: proxy CPU ${med('sPerGiB').toFixed(3)} s/GiB (user ${med('user').toFixed(3)}, system ${med('sys').toFixed(3)}), ${med('mibPerSec').toFixed(0)} MiB/s, backend ${med('backend').toFixed(3)} s/GiB, client ${med('client').toFixed(3)} s/GiB`);
      if (t.child) await stopChild(t.child);
    }
    await stopChild(fake);
  } finally {
    await killAll();
    rmSync(tmp, { recursive: true, force: true });
  }
}

await main();
