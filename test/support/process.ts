import { spawn, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { stringify } from 'yaml';
import { freePorts } from '../harness/ports.js';
import { tempDir } from './tmp.js';

export interface ProxyProcess {
  child: ChildProcess;
  /** The IMAP listener's port. */
  port: number;
  /** The LMTP listener's port, when asked for. */
  lmtpPort?: number;
  /** The admin server's port (/healthz, /metrics), when asked for. */
  adminPort?: number;
  configFile: string;
  /** Everything the process logged so far. */
  log(): string;
  stop(): Promise<void>;
}

const CLI = resolve(import.meta.dirname, '../../src/cli.ts');

export interface ProxyProcessOptions {
  /** Add an LMTP listener on a free port. */
  lmtp?: boolean;
  /** Start the admin server (/healthz, /metrics) on a free port. */
  admin?: boolean;
}

/**
 * Runs `mailsplice serve` as its own process, as in production (several proxies in front
 * of one Redis). One IMAP listener on a free port (and an LMTP listener and the admin
 * server when asked for); `extra` is merged into the config.
 */
export async function startProxyProcess(extra: Record<string, unknown>, opts: ProxyProcessOptions = {}): Promise<ProxyProcess> {
  // Distinct ports in one go: separate freePort calls may hand out the same port twice.
  const free = await freePorts('127.0.0.1', 3);
  const port = free[0]!;
  const lmtpPort = opts.lmtp ? free[1] : undefined;
  const adminPort = opts.admin ? free[2] : undefined;
  const listeners: Record<string, unknown>[] = [{ protocol: 'imap', address: '127.0.0.1', port }];
  if (lmtpPort !== undefined) listeners.push({ protocol: 'lmtp', address: '127.0.0.1', port: lmtpPort });
  const dir = tempDir('proc');
  const configFile = join(dir, 'mailsplice.yaml');
  writeFileSync(
    configFile,
    stringify({
      listeners,
      log: { level: 'info' },
      // One process unless a test asks for workers: most suites test what one process does.
      workers: 1,
      // SIGTERM ends sessions at once, as stop() wants; a test of the drain sets its own.
      shutdown: { drain_ms: 0 },
      ...(adminPort !== undefined ? { admin: { address: '127.0.0.1', port: adminPort } } : {}),
      ...extra,
    }),
  );
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'serve', '--config', configFile], { stdio: ['ignore', 'ignore', 'pipe'] });
  let out = '';
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise<void>((res, rej) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL'); // never leave a half-started proxy behind
      rej(new Error(`proxy did not start:\n${out}`));
    }, 20_000);
    const check = () => {
      if (out.includes('"mailsplice started"')) {
        clearTimeout(timer);
        res();
      }
    };
    child.stderr!.on('data', check);
    child.once('exit', (code) => {
      clearTimeout(timer);
      rej(new Error(`proxy exited with ${code}:\n${out}`));
    });
  });
  return {
    child,
    port,
    ...(lmtpPort !== undefined ? { lmtpPort } : {}),
    ...(adminPort !== undefined ? { adminPort } : {}),
    configFile,
    log: () => out,
    stop: () =>
      new Promise((res) => {
        if (child.exitCode !== null || child.signalCode !== null) return res();
        child.once('exit', () => res());
        child.kill('SIGTERM');
      }),
  };
}
