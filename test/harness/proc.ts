import { spawn, type ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Daemons started by the harness. If a test file ends without stopping its
 * world (a failed or timed-out afterAll), they must not outlive the worker:
 * vitest ends fork workers with SIGTERM, where Node runs no 'exit' handlers,
 * so catch that too. SIGTERM lets Dovecot take its own children down.
 */
const live = new Set<ChildProcess>();
/** Daemons that detach from us (Cyrus's master -d): each entry signals its own process. */
const detached = new Set<() => void>();
function terminateAll(): void {
  for (const kill of detached) {
    try {
      kill();
    } catch {
      /* already gone */
    }
  }
  detached.clear();
  for (const c of live) {
    try {
      c.kill('SIGTERM');
    } catch {
      /* already gone */
    }
  }
  live.clear();
}
process.once('exit', terminateAll);
for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) {
  process.once(sig, () => {
    terminateAll();
    // Keep the default "die by this signal" unless someone else handles it.
    if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
  });
}

/**
 * Registers a synchronous "terminate it" for a daemon that is not our child
 * (it forked into the background), so it does not outlive the test worker
 * either. Returns the function that unregisters it (call it after a clean stop).
 */
export function killOnExit(kill: () => void): () => void {
  detached.add(kill);
  return () => detached.delete(kill);
}

export interface Daemon {
  child: ChildProcess;
  /** Last ~64 KiB of combined stdout/stderr, for error messages. */
  output(): string;
  /** Resolves with the exit code/signal once the process has exited. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  hasExited(): boolean;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process is gone. */
  stop(graceMs?: number): Promise<void>;
}

export function spawnDaemon(cmd: string, args: string[], cwd?: string): Daemon {
  const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let out = '';
  let done = false;
  // Output must be drained anyway or a chatty daemon would block on a full pipe.
  const collect = (d: Buffer): void => {
    out = (out + d.toString('utf8')).slice(-65536);
  };
  child.stdout?.on('data', collect);
  child.stderr?.on('data', collect);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => {
      done = true;
      live.delete(child);
      resolve({ code, signal });
    });
    child.once('error', (err) => {
      done = true;
      live.delete(child);
      out += `\nspawn error: ${err.message}`;
      resolve({ code: null, signal: null });
    });
  });
  return {
    child,
    output: () => out,
    exited,
    hasExited: () => done,
    async stop(graceMs = 5000) {
      if (done) return;
      child.kill('SIGTERM');
      const t = await Promise.race([exited.then(() => 'exited' as const), sleep(graceMs, 'timeout' as const)]);
      if (t === 'timeout') {
        child.kill('SIGKILL');
        await exited;
      }
    },
  };
}

/**
 * Poll `probe` until it returns true. Fails early if `daemon` exits, and after
 * `timeoutMs` with `describe()` in the message.
 */
export async function waitUntil(
  probe: () => Promise<boolean>,
  opts: { timeoutMs?: number; daemon?: Daemon; what: string; describe?: () => Promise<string> | string },
): Promise<void> {
  const deadline = Date.now() + (opts.timeoutMs ?? 20_000);
  for (let delay = 20; ; delay = Math.min(delay * 2, 250)) {
    if (await probe().catch(() => false)) return;
    const died = opts.daemon?.hasExited();
    if (died || Date.now() > deadline) {
      const details = opts.describe ? await opts.describe() : (opts.daemon?.output() ?? '');
      throw new Error(`${opts.what} ${died ? 'exited before becoming ready' : 'did not become ready in time'}\n${details}`);
    }
    await sleep(delay);
  }
}

/** Run a command to completion; rejects with its output on non-zero exit. */
export function run(cmd: string, args: string[], opts: { cwd?: string; input?: string } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString('utf8')));
    child.stderr.on('data', (d: Buffer) => (out += d.toString('utf8')));
    child.once('error', reject);
    child.once('close', (code) =>
      code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(' ')} exited ${code}\n${out}`)),
    );
    // A command that exits without reading its input (openssl, doveadm) makes the write
    // fail with EPIPE; its exit code and output already say what happened.
    child.stdin.on('error', () => undefined);
    child.stdin.end(opts.input ?? '');
  });
}
