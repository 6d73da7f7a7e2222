import { spawn, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { stringify } from 'yaml';
import { freePort } from '../harness/ports.js';
import { tempDir } from './tmp.js';

export interface ProxyProcess {
  child: ChildProcess;
  port: number;
  configFile: string;
  /** Everything the process logged so far. */
  log(): string;
  stop(): Promise<void>;
}

const CLI = resolve(import.meta.dirname, '../../src/cli.ts');

/**
 * Runs `mailsplice serve` as its own process, as in production (several proxies in front
 * of one Redis). One IMAP listener on a free port; `extra` is merged into the config.
 */
export async function startProxyProcess(extra: Record<string, unknown>): Promise<ProxyProcess> {
  const port = await freePort('127.0.0.1');
  const dir = tempDir('proc');
  const configFile = join(dir, 'mailsplice.yaml');
  writeFileSync(configFile, stringify({ listeners: [{ protocol: 'imap', address: '127.0.0.1', port }], log: { level: 'info' }, ...extra }));
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
    configFile,
    log: () => out,
    stop: () =>
      new Promise((res) => {
        if (child.exitCode !== null) return res();
        child.once('exit', () => res());
        child.kill('SIGTERM');
      }),
  };
}
