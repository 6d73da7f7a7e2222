import { mkdtemp, mkdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { connectLines } from './lines.js';
import { freePort } from './ports.js';
import { spawnDaemon, waitUntil, type Daemon } from './proc.js';

export interface RedisServer {
  host: string;
  port: number;
  /** redis://host:port */
  url: string;
  /** Working dir (holds dump.rdb across stop()/start()). */
  dir: string;
  /** Saves the dataset to dir/dump.rdb, then terminates redis and waits for exit. */
  stop(): Promise<void>;
  /** Starts again on the same port, loading the data saved by stop(). */
  start(): Promise<void>;
  restart(): Promise<void>;
  /** stop(), then delete dir if the harness created it. */
  destroy(): Promise<void>;
}

export interface RedisOptions {
  host?: string;
  port?: number;
  /** Directory to use; a fresh temp dir by default. */
  dir?: string;
}

/** Send one inline command over a raw socket and return the first reply line. */
export async function redisCommand(host: string, port: number, command: string): Promise<string> {
  const c = await connectLines({ host, port, timeoutMs: 2000 });
  try {
    c.send(command);
    return await c.readLine(2000);
  } finally {
    c.close();
  }
}

export async function startRedis(opts: RedisOptions = {}): Promise<RedisServer> {
  const host = opts.host ?? '127.0.0.1';
  const port = opts.port ?? (await freePort(host));
  const dir = opts.dir ?? (await mkdtemp(path.join(os.tmpdir(), 'mailsplice-redis-')));
  await mkdir(dir, { recursive: true });
  let daemon: Daemon | undefined;

  const start = async (): Promise<void> => {
    if (daemon && !daemon.hasExited()) return;
    // --save '' turns off background snapshots (speed); stop() saves explicitly
    // so a restart keeps the data, like a real restart with persistence would.
    daemon = spawnDaemon(
      'redis-server',
      ['--bind', host, '--port', String(port), '--dir', dir, '--save', '', '--appendonly', 'no',
        '--daemonize', 'no', '--logfile', '', '--protected-mode', 'no'],
      dir,
    );
    const d = daemon;
    await waitUntil(async () => (await redisCommand(host, port, 'PING')) === '+PONG', {
      what: `redis-server on ${host}:${port}`,
      daemon: d,
    }).catch(async (err: unknown) => {
      await d.stop(); // do not leave a half-started server behind
      throw err;
    });
  };

  const stop = async (): Promise<void> => {
    if (!daemon || daemon.hasExited()) return;
    // SAVE is synchronous; ignore failures (e.g. a test already killed it).
    await redisCommand(host, port, 'SAVE').catch(() => undefined);
    await daemon.stop();
  };

  await start();
  return {
    host,
    port,
    url: `redis://${host}:${port}`,
    dir,
    stop,
    start,
    restart: async () => {
      await stop();
      await start();
    },
    destroy: async () => {
      await stop();
      if (!opts.dir) await rm(dir, { recursive: true, force: true });
    },
  };
}
