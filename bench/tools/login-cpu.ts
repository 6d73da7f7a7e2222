// The proxy's CPU time per IMAP login, for comparing builds: mailsplice (a built dist/cli.js)
// in front of the fake backend (cheap, so the proxy's share of the 2 cores stays steady),
// several short runs, the median of proxy CPU microseconds per login (user and system).
//
//   node --import tsx bench/tools/login-cpu.ts [--cli dist/cli.js ...] [--runs 7] [--seconds 4] [--node-options='...']
//        [--redis redis://127.0.0.1:PORT]   (routes in that Redis, as in production: the route
//        lookup and the shared failed-login throttle then go through it; default: a routes file)
//
// To compare a change: build, copy dist/ aside inside the repo so that node_modules resolve
// (cp -r dist .tmp/dist-a), apply the change, build again, then
//   node --import tsx bench/tools/login-cpu.ts --cli .tmp/dist-a/cli.js --cli dist/cli.js
// Every build runs as its own process at the same time, and runs alternate between them, so
// the load other programs put on the machine falls on both alike. A --cli value may carry
// node options after the path: --cli 'dist/cli.js --max-semi-space-size=1', and environment
// settings before it: --cli 'NODE_CLUSTER_SCHED_POLICY=none dist/cli.js'. --workers N runs
// each build with that many workers (CPU is then the whole process tree's).

import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { stringify } from 'yaml';
import { freePort } from '../../test/harness/ports.js';
import { spawnTracked, stopChild, cpuTimes, killAll, setClockTicks, treeCpu } from '../lib/procs.js';
import { loadedWorker, runLogins } from '../lib/workers.js';
import { startFakeWorld } from '../lib/fake-world.js';

const { values } = parseArgs({
  options: {
    cli: { type: 'string', multiple: true, default: ['dist/cli.js'] },
    runs: { type: 'string', default: '7' },
    seconds: { type: 'string', default: '4' },
    concurrency: { type: 'string', default: '16' },
    'node-options': { type: 'string', default: '' },
    redis: { type: 'string' },
    workers: { type: 'string', default: '1' },
  },
});
setClockTicks(100);

async function main(): Promise<void> {
  const tmp = mkdtempSync(join(os.tmpdir(), 'mailsplice-logincpu-'));
  try {
    const { fake, users, routes } = await startFakeWorld(tmp, 50, 'u');
    // The routes go into Redis the supported way (ctl import of the same routes file).
    if (values.redis) execFileSync(process.execPath, [resolve('dist/cli.js'), 'ctl', 'import', routes, '--redis', values.redis], { stdio: 'inherit' });
    const lookup = values.redis ? { redis: { url: values.redis } } : { file: routes };
    const nodeArgs = values['node-options']!.split(/\s+/).filter(Boolean);
    const proxies: { cli: string; port: number; pid: number; child: ReturnType<typeof spawnTracked>['child']; rows: { us: number; user: number; sys: number; rate: number }[] }[] = [];
    for (const [i, cli] of values.cli!.entries()) {
      const port = await freePort();
      const config = join(tmp, `ms${i}.yaml`);
      writeFileSync(config, stringify({ workers: Number(values.workers), listeners: [{ protocol: 'imap', address: '127.0.0.1', port }], lookup, limits: { connections_per_ip: 20000, concurrent_logins_per_ip: 20000, auth_failures_per_ip_per_minute: 10_000_000 }, log: { level: 'info' } }));
      const words = cli.split(/\s+/);
      const env = Object.fromEntries(words.filter((w) => /^[A-Z_]+=/.test(w)).map((w) => [w.slice(0, w.indexOf('=')), w.slice(w.indexOf('=') + 1)]));
      const [path = '', ...own] = words.filter((w) => !/^[A-Z_]+=/.test(w));
      const { child, output } = spawnTracked(process.execPath, [...nodeArgs, ...own, resolve(path), 'serve', '--config', config], { env });
      for (let t = 0; t < 200 && !output().includes('"mailsplice started"'); t++) await new Promise((r) => setTimeout(r, 50));
      if (!output().includes('"mailsplice started"')) throw new Error(`mailsplice ${cli} did not start: ${output()}`);
      proxies.push({ cli, port, pid: child.pid!, child, rows: [] });
    }
    const job = (port: number, seconds: number) => ({ mode: 'logins' as const, host: '127.0.0.1', port, users, concurrency: Number(values.concurrency), maxCount: 200_000, maxSeconds: seconds, hardStopSeconds: seconds + 60 });
    for (const p of proxies) await runLogins(await loadedWorker(), job(p.port, 2)); // warm-up
    for (let i = 0; i < Number(values.runs); i++) {
      for (const p of proxies) {
        const w = await loadedWorker();
        const tree = Number(values.workers) > 1;
        const a = tree ? { self: treeCpu(p.pid), user: 0, system: 0 } : cpuTimes(p.pid);
        const r = await runLogins(w, job(p.port, Number(values.seconds)));
        const b = tree ? { self: treeCpu(p.pid), user: 0, system: 0 } : cpuTimes(p.pid);
        const per = (s: number) => (s * 1e6) / r.ok;
        p.rows.push({ us: per(b.self - a.self), user: per(b.user - a.user), sys: per(b.system - a.system), rate: r.ok / r.seconds });
        console.log(`run ${i + 1} ${p.cli}: ${Math.round(r.ok / r.seconds)} logins/s, proxy CPU ${per(b.self - a.self).toFixed(0)} us/login (user ${per(b.user - a.user).toFixed(0)}, system ${per(b.system - a.system).toFixed(0)})${r.failed ? `, ${r.failed} failed: ${r.firstErrors[0]}` : ''}`);
      }
    }
    for (const p of proxies) {
      const med = (k: 'us' | 'user' | 'sys' | 'rate') => p.rows.map((r) => r[k]).sort((x, y) => x - y)[Math.floor(p.rows.length / 2)]!;
      console.log(`median ${p.cli} ${nodeArgs.join(' ')}: proxy CPU ${med('us').toFixed(0)} us/login (user ${med('user').toFixed(0)}, system ${med('sys').toFixed(0)}), ${med('rate').toFixed(0)} logins/s`);
      await stopChild(p.child);
    }
    await stopChild(fake);
  } finally {
    await killAll();
    rmSync(tmp, { recursive: true, force: true });
  }
}

await main();
