import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../src/config.js';
import { createLogger } from '../src/log.js';
import { OutageLog, describeRedisError } from '../src/outage.js';
import { startServer, type RunningServer } from '../src/server.js';
import { freePort } from './harness/ports.js';
import { waitUntil } from './harness/proc.js';
import { startRedis, type RedisServer } from './harness/redis.js';

// Issue 14 item 8: a Redis outage used to log two warnings a second for ever, with ioredis
// internals as the reason. Now: one line when it goes down, in words, a summary a minute,
// one line when it is back. Real Redis, stopped and started again.

interface Line {
  level: string;
  msg: string;
  [k: string]: unknown;
}

describe('a Redis outage in the log', () => {
  let redis: RedisServer;
  let server: RunningServer;
  const lines: Line[] = [];
  beforeAll(async () => {
    redis = await startRedis();
    const cfg = parseConfig(
      { listeners: [{ protocol: 'imap', port: await freePort('127.0.0.1') }], lookup: { redis: { url: redis.url, command_timeout_ms: 500 } } },
      'test',
    );
    server = await startServer(cfg, createLogger('debug', (l) => lines.push(JSON.parse(l) as Line)));
  });
  afterAll(async () => {
    await server?.close();
    await redis?.destroy();
  });

  it('is one line down (in words), a count, and one line back', { timeout: 60_000 }, async () => {
    await waitUntil(async () => server.router.stats.live, { what: 'route events live' });
    const from = lines.length;
    await redis.stop();
    // Many errors, each of which used to be a line of its own.
    await waitUntil(async () => (server.lookupOutage?.errorCount ?? 0) >= 6, { what: 'six Redis errors', timeoutMs: 30_000, describe: () => JSON.stringify(lines.slice(from)) });
    const errors = server.lookupOutage!.errorCount;
    await redis.start();
    await waitUntil(async () => lines.slice(from).some((l) => / reachable again$/.test(l.msg)), { what: 'Redis back', timeoutMs: 30_000, describe: () => JSON.stringify(lines.slice(from)) });

    const during = lines.slice(from);
    const redisLines = during.filter((l) => /^Redis at /.test(l.msg));
    expect(redisLines[0]).toMatchObject({ level: 'warn', msg: `Redis at 127.0.0.1:${redis.port} unreachable; logins get UNAVAILABLE for users not in the cache` });
    expect(redisLines[0]!.reason).toMatch(/connection refused|not connected|dropped by the server/);
    const back = redisLines.at(-1)!;
    expect(back).toMatchObject({ level: 'info', msg: `Redis at 127.0.0.1:${redis.port} reachable again` });
    expect(back.errors as number).toBeGreaterThanOrEqual(errors);
    // Down and back: no summary is due within a minute, and no error has a line of its own.
    expect(redisLines).toHaveLength(2);
    expect(during.filter((l) => l.level === 'warn' && l.msg === 'lookup')).toEqual([]);
    expect(JSON.stringify(during)).not.toMatch(/Stream isn't writeable|enableOfflineQueue/);
  });
});

describe('OutageLog', () => {
  it('writes a summary with the count once per interval, and a line when it is back', () => {
    let now = 0;
    const out: string[] = [];
    const log = createLogger('info', (l) => {
      const { msg, errors, reason } = JSON.parse(l) as { msg: string; errors?: number; reason?: string };
      out.push(`${msg}${errors === undefined ? '' : ` errors=${errors}`}${reason === undefined ? '' : ` reason=${reason}`}`);
    });
    const o = new OutageLog(log, {
      what: 'Redis at r:6379',
      effect: 'logins get UNAVAILABLE for users not in the cache',
      describe: describeRedisError,
      now: () => now,
    });
    const refused = Object.assign(new Error('connect ECONNREFUSED 10.0.0.5:6379'), { code: 'ECONNREFUSED' });
    const internal = new Error("Stream isn't writeable and enableOfflineQueue options is false");
    for (let t = 0; t < 150_000; t += 500) {
      now = t;
      o.error(t % 1000 ? internal : refused);
    }
    now = 151_000;
    o.ok();
    o.ok(); // already up: nothing
    expect(out).toEqual([
      'Redis at r:6379 unreachable; logins get UNAVAILABLE for users not in the cache reason=connection refused (is redis-server running on that address?)',
      'Redis at r:6379 still unreachable errors=121 reason=connection refused (is redis-server running on that address?)',
      'Redis at r:6379 still unreachable errors=241 reason=connection refused (is redis-server running on that address?)',
      'Redis at r:6379 reachable again errors=300',
    ]);
  });
});
