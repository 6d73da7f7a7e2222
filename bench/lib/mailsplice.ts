// mailsplice under test: the built CLI (dist/cli.js) as its own process, as in production.

import type { ChildProcess } from 'node:child_process';
import { createWriteStream, mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { stringify } from 'yaml';
import { processTree, spawnTracked, stopChild } from './procs.js';

export const CLI = resolve(import.meta.dirname, '../../dist/cli.js');

export interface Mailsplice {
  child: ChildProcess;
  /** The process started (with workers: the primary; sessions live in its workers). */
  pid: number;
  /** The process and its workers. */
  pids(): number[];
  port: number;
  pop3: number;
  adminPort: number;
  log(): string;
  /** One sample from the admin /metrics endpoint, by metric name (first series). */
  metric(name: string): Promise<number | undefined>;
  /** The admin /healthz document. */
  health(): Promise<{ lookupLive: boolean; sessions: number; preauth: number }>;
  stop(): Promise<void>;
}

export async function startMailsplice(opts: {
  dir: string;
  port: number;
  /** A POP3 listener too, on this port. */
  pop3?: number;
  adminPort: number;
  lookup: Record<string, unknown>;
  name: string;
  /** Extra node options, e.g. --cpu-prof (the bench's --cpu-prof DIR). */
  nodeArgs?: string[];
  /** The built CLI to run; dist/cli.js by default (another build to compare: bench --cli). */
  cli?: string;
  /**
   * Worker processes (config `workers`); 1 by default, one process as the bench has always
   * measured. With more, the proxy's CPU is the whole process tree's (treeCpu), not the pid's.
   */
  workers?: number | 'auto';
}): Promise<Mailsplice> {
  mkdirSync(opts.dir, { recursive: true });
  const configFile = join(opts.dir, `${opts.name}.yaml`);
  writeFileSync(
    configFile,
    stringify({
      workers: opts.workers ?? 1,
      listeners: [{ protocol: 'imap', address: '127.0.0.1', port: opts.port }, ...(opts.pop3 ? [{ protocol: 'pop3', address: '127.0.0.1', port: opts.pop3 }] : [])],
      lookup: opts.lookup,
      // The load comes from one address: lift the per-IP limits, nothing else.
      limits: { connections_per_ip: 20000, concurrent_logins_per_ip: 20000, auth_failures_per_ip_per_minute: 10_000_000 },
      admin: { address: '127.0.0.1', port: opts.adminPort },
      log: { level: 'info' },
    }),
  );
  // BENCH_PROXY_LOG_DIR=DIR keeps each proxy's stdout/stderr (e.g. with --node-options=--trace-gc).
  const logDir = process.env.BENCH_PROXY_LOG_DIR;
  const { child, output } = spawnTracked(process.execPath, [...(opts.nodeArgs ?? []), opts.cli ?? CLI, 'serve', '--config', configFile]);
  if (logDir) {
    const file = createWriteStream(join(logDir, `${opts.name}-${child.pid}.log`));
    child.stdout!.pipe(file);
    child.stderr!.pipe(file);
  }
  await new Promise<void>((res, rej) => {
    const timer = setTimeout(() => {
      clearInterval(poll);
      rej(new Error(`mailsplice ${opts.name} did not start:\n${output()}`));
    }, 20_000);
    const poll = setInterval(() => {
      if (output().includes('"mailsplice started"')) {
        clearTimeout(timer);
        clearInterval(poll);
        res();
      } else if (child.exitCode !== null) {
        clearTimeout(timer);
        clearInterval(poll);
        rej(new Error(`mailsplice ${opts.name} exited with ${child.exitCode}:\n${output()}`));
      }
    }, 20);
  });
  const admin = `http://127.0.0.1:${opts.adminPort}`;
  return {
    child,
    pid: child.pid!,
    pids: () => processTree(child.pid!),
    port: opts.port,
    pop3: opts.pop3 ?? 0,
    adminPort: opts.adminPort,
    log: output,
    async metric(name) {
      const text = await (await fetch(`${admin}/metrics`)).text();
      const m = new RegExp(`^${name}(?:\\{[^}]*\\})? ([0-9.e+-]+)`, 'm').exec(text);
      return m ? Number(m[1]) : undefined;
    },
    async health() {
      return (await (await fetch(`${admin}/healthz`)).json()) as { lookupLive: boolean; sessions: number; preauth: number };
    },
    stop: () => stopChild(child, 10_000),
  };
}
