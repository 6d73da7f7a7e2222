// Where an idle session's memory goes: runs mailsplice (dist/cli.js) in front of the fake
// backend, takes a V8 heap snapshot (SIGUSR2; a snapshot runs a full GC first) with no
// sessions and with N idle sessions, and prints the difference by object class, per session.
// Also prints RSS and heap before/after a forced full GC, which separates what a session
// keeps from garbage a login leaves behind until the next GC.
//
//   npm run build && node --import tsx bench/tools/idle-heap.ts [N=2000] [NODE_OPTION...]
//
// NODE_OPTIONs are given to the mailsplice process, e.g. --max-semi-space-size=1.

import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort } from '../../test/harness/ports.js';
import { startMailsplice } from '../lib/mailsplice.js';
import { killAll, rssBytes, stopChild } from '../lib/procs.js';
import { hold, type Holder } from '../lib/workers.js';
import { startFakeWorld } from '../lib/fake-world.js';

const N = Number(process.argv[2] ?? 2000);
const NODE_ARGS = process.argv.slice(3);

interface Snapshot {
  snapshot: { meta: { node_fields: string[]; node_types: [string[]] } };
  nodes: number[];
  strings: string[];
}

/** Bytes and counts by "type:name" of every node in a heap snapshot. */
function classes(file: string): Map<string, { bytes: number; count: number }> {
  const s = JSON.parse(readFileSync(file, 'utf8')) as Snapshot;
  const f = s.snapshot.meta.node_fields;
  const types = s.snapshot.meta.node_types[0];
  const [iType, iName, iSize] = [f.indexOf('type'), f.indexOf('name'), f.indexOf('self_size')];
  const out = new Map<string, { bytes: number; count: number }>();
  for (let i = 0; i < s.nodes.length; i += f.length) {
    const type = types[s.nodes[i + iType]!]!;
    let name = s.strings[s.nodes[i + iName]!]!;
    if (type === 'string' || type === 'concatenated string' || type === 'sliced string') name = '(strings)';
    else if (type === 'code') name = '(code)';
    else if (type === 'closure') name = `closure ${name}`;
    const key = `${type}:${name.slice(0, 60)}`;
    const e = out.get(key) ?? { bytes: 0, count: 0 };
    e.bytes += s.nodes[i + iSize]!;
    e.count++;
    out.set(key, e);
  }
  return out;
}

/** Resident kB by kind of mapping: malloc heap, anonymous (V8 pages, big mallocs), files. */
function smaps(pid: number): Record<string, number> {
  const out: Record<string, number> = {};
  let kind = '';
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) {
      const name = head[1]!.trim();
      kind = name === '' ? 'anonymous' : name.startsWith('/') ? 'files' : name;
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (rss) out[kind] = (out[kind] ?? 0) + Number(rss[1]);
  }
  return out;
}

async function snapshot(pid: number, dir: string): Promise<string> {
  const before = new Set(readdirSync(dir));
  process.kill(pid, 'SIGUSR2');
  for (let i = 0; i < 600; i++) {
    await sleep(100);
    const fresh = readdirSync(dir).filter((f) => f.endsWith('.heapsnapshot') && !before.has(f));
    if (fresh.length) {
      const file = join(dir, fresh[0]!);
      // Written when its size stops changing.
      let size = -1;
      while (statSync(file).size !== size) {
        size = statSync(file).size;
        await sleep(300);
      }
      return file;
    }
  }
  throw new Error('no heap snapshot written');
}

async function main(): Promise<void> {
  const tmp = mkdtempSync(join(os.tmpdir(), 'mailsplice-heap-'));
  const holders: Holder[] = [];
  try {
    const { fake, users, routes } = await startFakeWorld(tmp, 100, 'idle');
    const ms = await startMailsplice({
      dir: tmp,
      name: 'heap',
      port: await freePort(),
      adminPort: await freePort(),
      lookup: { file: routes },
      nodeArgs: [...NODE_ARGS, `--heapsnapshot-signal=SIGUSR2`, `--diagnostic-dir=${tmp}`],
    });
    const heapUsed = () => ms.metric('mailsplice_process_nodejs_heap_size_used_bytes');
    const job = (count: number) => ({ mode: 'hold' as const, host: '127.0.0.1', port: ms.port, users, concurrency: 32, maxCount: count, maxSeconds: 60, hardStopSeconds: 300 });
    const warm = await hold(job(200));
    await warm.release();
    await sleep(1000);
    // The first snapshot leaves malloc'ed memory behind (resident, not returned to the OS):
    // every baseline is taken after it.
    const snap0 = await snapshot(ms.pid, tmp);
    const rss0 = rssBytes(ms.pid);
    const map0 = smaps(ms.pid);
    const ext0 = await ms.metric('mailsplice_process_nodejs_external_memory_bytes');
    const total0 = await ms.metric('mailsplice_process_nodejs_heap_size_total_bytes');
    const rss0gc = rss0;
    const heap0 = await heapUsed();
    holders.push(await hold(job(N)));
    await sleep(3000);
    const rss1 = rssBytes(ms.pid);
    const heap1 = await heapUsed();
    const map1 = smaps(ms.pid);
    const ext1 = await ms.metric('mailsplice_process_nodejs_external_memory_bytes');
    const total1 = await ms.metric('mailsplice_process_nodejs_heap_size_total_bytes');
    const snap1 = await snapshot(ms.pid, tmp);
    const rss1gc = rssBytes(ms.pid);
    const heap1gc = await heapUsed();
    const n = holders[0]!.ready.opened;
    const kib = (b: number) => `${(b / 1024).toFixed(2)} KiB`;
    console.log(`${n} idle sessions through mailsplice ${NODE_ARGS.join(' ')}`);
    console.log(`RSS/session, as the bench measures it (no forced GC): ${kib((rss1 - rss0) / n)}; heap used/session ${kib((heap1! - heap0!) / n)}`);
    console.log(`RSS/session between post-GC points (snapshots force a full GC): ${kib((rss1gc - rss0gc) / n)}; heap used/session after GC ${kib((heap1gc! - heap0!) / n)}`);
    console.log(`V8 heap committed/session ${kib((total1! - total0!) / n)}, external (ArrayBuffers)/session ${kib((ext1! - ext0!) / n)}`);
    console.log(`resident growth by mapping/session (no forced GC): ${Object.keys(map1).map((k) => `${k} ${kib((((map1[k] ?? 0) - (map0[k] ?? 0)) * 1024) / n)}`).join(', ')}`);
    const a = classes(snap0);
    const b = classes(snap1);
    const rows: [string, number, number][] = [];
    for (const [k, v] of b) {
      const o = a.get(k) ?? { bytes: 0, count: 0 };
      const d = v.bytes - o.bytes;
      if (Math.abs(d) / n >= 8) rows.push([k, d / n, (v.count - o.count) / n]);
    }
    rows.sort((x, y) => y[1] - x[1]);
    const total = rows.reduce((s, r) => s + r[1], 0);
    console.log(`\nheap snapshot difference per session (classes with >= 8 B/session), total ${total.toFixed(0)} B:`);
    console.log('   B/session  objects/session  class');
    for (const [k, bytes, count] of rows.slice(0, 45)) console.log(`${bytes.toFixed(0).padStart(12)}  ${count.toFixed(2).padStart(15)}  ${k}`);
    await Promise.all(holders.map((h) => h.release()));
    await ms.stop();
    await stopChild(fake);
  } finally {
    await Promise.all(holders.map((h) => h.release()));
    await killAll();
    rmSync(tmp, { recursive: true, force: true });
  }
}

await main();
