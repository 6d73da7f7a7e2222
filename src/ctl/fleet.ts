// `mailsplice ctl proxies`: the running proxies, as their heartbeat records in Redis say.

import type { HeartbeatRecord } from '../fleet/records.js';
import type { Command, Ctx } from './commands.js';
import { usageError } from './errors.js';

/** What ctl reads about the running proxies: only a Redis lookup has heartbeat records. */
export interface Fleet {
  proxies(): Promise<HeartbeatRecord[]>;
}

export function fleetOf(ctx: Ctx, command: string): Fleet {
  if (!ctx.fleet) throw usageError(`${command} needs the Redis lookup: the proxies' heartbeat records live in Redis (${ctx.admin.where} has none)`);
  return ctx.fleet;
}

/** `3d4h`, `5m12s`, `800ms`: an age as an operator reads it. */
export function age(ms: number): string {
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)}ms`;
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${s % 60 ? `${s % 60}s` : ''}`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h${m % 60 ? `${m % 60}m` : ''}`;
  return `${Math.floor(h / 24)}d${h % 24 ? `${h % 24}h` : ''}`;
}

/** Columns padded to their widest cell; the last column is not padded. */
export function table(head: string[], rows: string[][]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(head), ...rows.map(line)].join('\n');
}

function since(iso: string, now: number): string {
  const t = Date.parse(iso);
  return Number.isFinite(t) ? age(now - t) : '?';
}

export const proxiesCommand: Command = {
  name: 'proxies',
  summary: 'proxies',
  about: 'the running proxies (heartbeat records)',
  help: `usage: mailsplice ctl proxies [--json]

Lists every proxy whose heartbeat record is live in Redis (<prefix>proxy:<id>, written every
lookup.redis.proxy_heartbeat_ms, expiring after three times that): its id, admin address,
uptime, workers, sessions, whether its route events are flowing, the last event it applied,
and how long ago it wrote the record. A proxy that died drops out within its TTL.
--json prints the records as they are stored.
Where: --config FILE | --redis URL [--prefix ms:] (default: $MAILSPLICE_CONFIG)`,
  options: {},
  async run(ctx, args) {
    if (args.length > 0) throw usageError('too many arguments; usage: mailsplice ctl proxies [--json]');
    const records = await fleetOf(ctx, 'ctl proxies').proxies();
    if (ctx.json) return ctx.out(JSON.stringify(records, null, 2));
    if (records.length === 0) return ctx.out('no live proxies (no heartbeat records)');
    const now = Date.now();
    ctx.out(
      table(
        ['PROXY', 'ADMIN', 'UP', 'WORKERS', 'SESSIONS', 'EVENTS', 'LAST EVENT', 'BEAT'],
        records.map((r) => [
          r.id,
          r.admin ?? '-',
          since(r.started, now),
          String(r.workers),
          String(r.sessions.total),
          r.events.live ? 'live' : 'LOST',
          r.events.last ? `${r.events.last.kind} ${r.events.last.id} ${age(now - r.events.last.at)} ago` : '-',
          `${since(r.updated, now)} ago`,
        ]),
      ),
    );
  },
};
