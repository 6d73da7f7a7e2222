// Processes the bench starts, and what it reads about them from /proc.
//
// Every child goes into one set; whatever happens (a thrown error, Ctrl-C, SIGTERM, the
// global hard stop) the set is killed before the bench exits. Dovecot and Redis come from
// test/harness, which keeps its own set with the same rule.

import { fork, spawn, type ChildProcess } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const children = new Set<ChildProcess>();

export function track(c: ChildProcess): ChildProcess {
  children.add(c);
  c.once('exit', () => children.delete(c));
  return c;
}

/** SIGTERM to every child still running, SIGKILL to the stubborn after `graceMs`. */
export async function killAll(graceMs = 3000): Promise<void> {
  const running = [...children].filter((c) => c.exitCode === null && c.signalCode === null);
  for (const c of running) c.kill('SIGTERM');
  const deadline = Date.now() + graceMs;
  while (Date.now() < deadline && running.some((c) => c.exitCode === null && c.signalCode === null)) await sleep(50);
  for (const c of running) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
}

function killAllNow(): void {
  for (const c of children) {
    try {
      c.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
}
process.on('exit', killAllNow);

/** Stops one child: SIGTERM, SIGKILL after `graceMs`; resolves once it has exited. */
export async function stopChild(c: ChildProcess | undefined, graceMs = 5000): Promise<void> {
  if (!c || c.exitCode !== null || c.signalCode !== null) return;
  const exited = new Promise<void>((r) => c.once('exit', () => r()));
  c.kill('SIGTERM');
  const t = await Promise.race([exited.then(() => 'ok' as const), sleep(graceMs, 'timeout' as const)]);
  if (t === 'timeout') {
    c.kill('SIGKILL');
    await exited;
  }
}

const BENCH_DIR = resolve(import.meta.dirname, '..');

/** A TypeScript helper of the bench as its own Node process (tsx), with an IPC channel. */
export function forkTs(file: string, args: string[] = []): ChildProcess {
  const c = fork(resolve(BENCH_DIR, file), args, {
    execArgv: ['--import', 'tsx'],
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  return track(c);
}

export function spawnTracked(cmd: string, args: string[], opts: { cwd?: string; env?: Record<string, string> } = {}): { child: ChildProcess; output: () => string } {
  const child = spawn(cmd, args, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'], ...(opts.env ? { env: { ...process.env, ...opts.env } } : {}) });
  track(child);
  let out = '';
  const collect = (d: Buffer) => (out = (out + d.toString()).slice(-65536));
  child.stdout!.on('data', collect);
  child.stderr!.on('data', collect);
  return { child, output: () => out };
}

/** The next IPC message from `c` that `pick` accepts, within `timeoutMs`. */
export function nextMessage<T>(c: ChildProcess, pick: (m: unknown) => T | undefined, timeoutMs: number, what: string): Promise<T> {
  return new Promise((res, rej) => {
    const onMsg = (m: unknown) => {
      const v = pick(m);
      if (v === undefined) return;
      done();
      res(v);
    };
    const onExit = (code: number | null) => {
      done();
      rej(new Error(`${what}: process exited (${code}) before answering`));
    };
    const timer = setTimeout(() => {
      done();
      rej(new Error(`${what}: no answer in ${timeoutMs} ms`));
    }, timeoutMs);
    const done = () => {
      clearTimeout(timer);
      c.off('message', onMsg);
      c.off('exit', onExit);
    };
    c.on('message', onMsg);
    c.once('exit', onExit);
  });
}

// ---- /proc ---------------------------------------------------------------------------

/** Resident set size in bytes (VmRSS). */
export function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]) * 1024;
}

let clkTck = 100;
export function setClockTicks(n: number): void {
  clkTck = n;
}

export interface CpuTimes {
  /** utime + stime of the process itself, seconds. */
  self: number;
  user: number;
  system: number;
  /** cutime + cstime: children it has waited for (Dovecot's master reaps its imap processes). */
  reaped: number;
}

export function cpuTimes(pid: number): CpuTimes {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Field 2 (comm) may contain spaces; everything after the last ')' is space-separated.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // f[0] is field 3 (state): utime is field 14 -> f[11].
  const n = (i: number) => Number(f[i]);
  return { self: (n(11) + n(12)) / clkTck, user: n(11) / clkTck, system: n(12) / clkTck, reaped: (n(13) + n(14)) / clkTck };
}

/** Direct children of `pid` (scan of /proc). */
export function childPids(pid: number): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) out.push(Number(d));
    } catch {
      /* exited meanwhile */
    }
  }
  return out;
}

/** `pid` and all its descendants. */
export function processTree(pid: number): number[] {
  const out = [pid];
  for (let i = 0; i < out.length; i++) out.push(...childPids(out[i]!));
  return out;
}

/** CPU seconds of a whole process tree, including children it has already reaped. */
export function treeCpu(pid: number): number {
  let total = 0;
  for (const p of processTree(pid)) {
    try {
      const t = cpuTimes(p);
      total += t.self + (p === pid ? t.reaped : 0);
    } catch {
      /* exited meanwhile: its time lands in its parent's cutime once reaped */
    }
  }
  return total;
}

/** Machine-wide busy and total jiffies (/proc/stat), to tell whether the 2 cores were saturated. */
export function machineCpu(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const total = v.reduce((a, b) => a + b, 0);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  return { busy: total - idle, total };
}
