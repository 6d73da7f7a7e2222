import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Redis } from 'ioredis';
import { freePorts } from './ports.js';
import { spawnDaemon, waitUntil, type Daemon } from './proc.js';

/**
 * Redis Sentinel on loopback, as Debian ships it (redis-server, redis-sentinel): one primary,
 * one replica, three sentinels with short timeouts (down after 1 s), so that killing the
 * primary gets the replica promoted in a few seconds.
 */
export interface SentinelSetup {
  host: string;
  /** The master group's name. */
  name: string;
  /** "host:port" of each sentinel, as lookup.redis.sentinels takes them. */
  sentinels: string[];
  /** Ports of the two data servers; which one is master changes with failovers. */
  redisPorts: [number, number];
  /** The master's port as the sentinels say it now. */
  masterPort(): Promise<number>;
  /** SIGKILLs the data server that is master now; resolves with its port. */
  killMaster(): Promise<number>;
  /** Waits until the sentinels name another master than `oldPort`, and it says it is one. */
  waitForPromotion(oldPort: number, timeoutMs?: number): Promise<number>;
  /** A client of the current master (through the sentinels), for writing routes. */
  client(): Redis;
  stop(): Promise<void>;
}

const NAME = 'mailsplice';

/** Server side of TLS for every daemon of the setup (clients need no certificate of their own). */
export interface SetupTls {
  cert: string;
  key: string;
  ca: string;
}

function tlsArgs(tls: SetupTls | undefined, port: number): string[] {
  if (!tls) return ['--port', String(port)];
  return ['--port', '0', '--tls-port', String(port), '--tls-cert-file', tls.cert, '--tls-key-file', tls.key, '--tls-ca-cert-file', tls.ca, '--tls-auth-clients', 'no', '--tls-replication', 'yes'];
}

async function sentinelConf(dir: string, port: number, masterPort: number, host: string, tls?: SetupTls): Promise<string> {
  const file = path.join(dir, `sentinel-${port}.conf`);
  // Sentinel rewrites its config file as it learns: it must be its own, writable.
  await writeFile(
    file,
    [
      ...(tls
        ? ['port 0', `tls-port ${port}`, `tls-cert-file ${tls.cert}`, `tls-key-file ${tls.key}`, `tls-ca-cert-file ${tls.ca}`, 'tls-auth-clients no', 'tls-replication yes']
        : [`port ${port}`]),
      `bind ${host}`,
      'protected-mode no',
      'daemonize no',
      `dir ${dir}`,
      'logfile ""',
      `sentinel monitor ${NAME} ${host} ${masterPort} 2`,
      `sentinel down-after-milliseconds ${NAME} 1000`,
      `sentinel failover-timeout ${NAME} 3000`,
      `sentinel parallel-syncs ${NAME} 1`,
      '',
    ].join('\n'),
  );
  return file;
}

export async function startSentinels(host = '127.0.0.1', tls?: SetupTls): Promise<SentinelSetup> {
  // A short-lived client of one daemon (TLS when the setup has it).
  const connect = (port: number) => {
    const r = new Redis({ host, port, lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0, ...(tls ? { tls: { ca: readFileSync(tls.ca) } } : {}) });
    r.on('error', () => undefined);
    return r;
  };
  const ping = async (port: number) => {
    const r = connect(port);
    try {
      await r.connect();
      return (await r.ping()) === 'PONG';
    } finally {
      r.disconnect();
    }
  };
  const info = async (port: number) => {
    const r = connect(port);
    try {
      await r.connect();
      return await r.info('replication');
    } finally {
      r.disconnect();
    }
  };
  const dir = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-sentinel-'));
  const [p1, p2, s1, s2, s3] = (await freePorts(host, 5)) as [number, number, number, number, number];
  const daemons = new Map<number, Daemon>();
  const all: Daemon[] = [];
  const redisArgs = (port: number) => ['--bind', host, ...tlsArgs(tls, port), '--dir', path.join(dir), '--dbfilename', `dump-${port}.rdb`, '--save', '', '--appendonly', 'no', '--daemonize', 'no', '--logfile', '', '--protected-mode', 'no'];
  const stopAll = async () => {
    await Promise.allSettled(all.map((d) => d.stop(2000)));
  };
  try {
    for (const [port, extra] of [[p1, []], [p2, ['--replicaof', host, String(p1)]]] as const) {
      const d = spawnDaemon('redis-server', [...redisArgs(port), ...extra], dir);
      daemons.set(port, d);
      all.push(d);
      await waitUntil(() => ping(port), { what: `redis-server on ${port}`, daemon: d });
    }
    await waitUntil(async () => /master_link_status:up/.test(await info(p2)), { what: 'replica in sync' });
    for (const port of [s1, s2, s3]) {
      const d = spawnDaemon('redis-sentinel', [await sentinelConf(dir, port, p1, host, tls)], dir);
      all.push(d);
      await waitUntil(() => ping(port), { what: `redis-sentinel on ${port}`, daemon: d });
    }
    // Each sentinel must know the replica and the two other sentinels before a failover can
    // be agreed on (they find each other through the master, every 2 s).
    await waitUntil(
      async () => {
        for (const port of [s1, s2, s3]) {
          const s = connect(port);
          try {
            await s.connect();
            const others = (await s.call('SENTINEL', 'SENTINELS', NAME)) as unknown[];
            const replicas = (await s.call('SENTINEL', 'REPLICAS', NAME)) as unknown[];
            if (others.length < 2 || replicas.length < 1) return false;
          } finally {
            s.disconnect();
          }
        }
        return true;
      },
      { what: 'three sentinels that know each other and the replica', timeoutMs: 30_000 },
    );
  } catch (e) {
    await stopAll();
    throw e;
  }
  const sentinels = [s1, s2, s3].map((p) => `${host}:${p}`);
  const askMaster = async (): Promise<number> => {
    for (const port of [s1, s2, s3]) {
      const s = connect(port);
      try {
        await s.connect();
        const addr = (await s.call('SENTINEL', 'GET-MASTER-ADDR-BY-NAME', NAME)) as [string, string];
        return Number(addr[1]);
      } catch {
        continue; // the next sentinel
      } finally {
        s.disconnect();
      }
    }
    throw new Error('no sentinel answers');
  };
  return {
    host,
    name: NAME,
    sentinels,
    redisPorts: [p1, p2],
    masterPort: askMaster,
    async killMaster() {
      const port = await askMaster();
      const d = daemons.get(port)!;
      d.child.kill('SIGKILL');
      await d.exited;
      return port;
    },
    async waitForPromotion(oldPort, timeoutMs = 30_000) {
      let now = oldPort;
      await waitUntil(
        async () => {
          now = await askMaster();
          return now !== oldPort && /role:master/.test(await info(now));
        },
        { what: `a new master after ${oldPort}`, timeoutMs },
      );
      return now;
    },
    client: () =>
      new Redis({
        sentinels: sentinels.map((s) => ({ host, port: Number(s.split(':')[1]) })),
        name: NAME,
        ...(tls ? { tls: { ca: readFileSync(tls.ca) }, sentinelTLS: { ca: readFileSync(tls.ca) }, enableTLSForSentinelMode: true } : {}),
      }),
    async stop() {
      await stopAll();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
