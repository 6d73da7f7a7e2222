// `mailsplice ctl proxies`, `who` and `kick`: the running proxies, as their heartbeat records
// in Redis say, their sessions (asked of their admin listeners), and ending sessions.

import type { HeartbeatRecord } from '../fleet/records.js';
import type { SessionList, SessionView } from '../fleet/sessions.js';
import { readAdminToken } from '../preflight.js';
import { login, type Command, type Ctx } from './commands.js';
import { usageError } from './errors.js';
import { checkId } from './setters.js';

/** What ctl reads about the running proxies: only a Redis lookup has heartbeat records. */
export interface Fleet {
  proxies(): Promise<HeartbeatRecord[]>;
  /** Proxies still in the index whose record expired: their heartbeat stopped `agoMs` ago (fencing reports them). */
  stopped(): Promise<{ id: string; agoMs: number }[]>;
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

// ---- kick ---------------------------------------------------------------------------------

export const kickCommand: Command = {
  name: 'kick',
  summary: 'kick LOGIN | --store S | --slot S',
  about: 'end sessions on every proxy (no lock)',
  help: `usage:
  mailsplice ctl kick LOGIN [--json]
  mailsplice ctl kick --store STORE [--json]
  mailsplice ctl kick --slot SLOT [--json]

Ends every IMAP and POP3 session of that login (or of every user of the store, or on the
slot) on every proxy: IMAP clients get "* BYE [UNAVAILABLE] Session ended by the
administrator", POP3 connections close. Nothing is locked: the next login works at once.
LMTP deliveries under way are not touched.
Redis: publishes {"kind":"kick","id":LOGIN} ({"kind":"kick","store":S}, {"kind":"kick","slot":S})
with "ts" on <prefix>events, and says how many proxy subscriptions heard it. Routes file:
appends {user|store|slot: ID, at: NOW} under "kicks:"; each proxy reading the new file ends
the sessions named that began before "at".
${'Where: --config FILE | --redis URL [--prefix ms:] | --file ROUTES.yaml (default: $MAILSPLICE_CONFIG)'}`,
  options: { store: { type: 'string' }, slot: { type: 'string' } },
  async run(ctx, args, v) {
    const store = typeof v.store === 'string' ? v.store : undefined;
    const slot = typeof v.slot === 'string' ? v.slot : undefined;
    const given = (args.length > 0 ? 1 : 0) + (store !== undefined ? 1 : 0) + (slot !== undefined ? 1 : 0);
    if (given !== 1 || args.length > 1) throw usageError('usage: mailsplice ctl kick LOGIN | --store STORE | --slot SLOT');
    const scope = store !== undefined ? 'store' : slot !== undefined ? 'slot' : 'user';
    const id = scope === 'user' ? login(ctx, args[0]!) : checkId(scope, (store ?? slot)!);
    const heard = await ctx.admin.kick(scope, id);
    if (ctx.json) return ctx.out(JSON.stringify({ kick: scope, id, ...(heard === undefined ? {} : { subscribers: heard }) }));
    const what = scope === 'user' ? id : `${scope} ${id}`;
    ctx.out(heard === undefined ? `kick ${what} written to ${ctx.admin.where}` : `kick ${what} published; ${heard} proxy subscription${heard === 1 ? '' : 's'} heard it`);
  },
};

// ---- who ----------------------------------------------------------------------------------

interface WhoRow {
  proxy: string;
  sessions: SessionView[];
  error?: string;
}

/** GET <admin>/sessions on one proxy, bounded in time; an error text when it cannot answer. */
async function askSessions(admin: string, query: URLSearchParams, token: string | undefined, timeoutMs: number): Promise<SessionList | string> {
  const host = admin.replace(/^(0\.0\.0\.0|\[?::\]?)(?=:\d+$)/, (a) => (a.includes(':') ? '[::1]' : '127.0.0.1'));
  try {
    const res = await fetch(`http://${host}/sessions?${query.toString()}`, {
      headers: token ? { authorization: `Bearer ${token}` } : {},
      signal: AbortSignal.timeout(timeoutMs),
    });
    if (res.status !== 200) return `HTTP ${res.status}${res.status === 401 ? ' (admin token needed: --token-file, or --config with admin.token_file)' : ''}`;
    return (await res.json()) as SessionList;
  } catch (e) {
    const err = e as Error & { cause?: { code?: string } };
    return err.name === 'TimeoutError' ? `no answer in ${timeoutMs} ms` : (err.cause?.code ?? err.message);
  }
}

export const whoCommand: Command = {
  name: 'who',
  summary: 'who [--user U | --store S | --slot S]',
  about: 'sessions on every live proxy',
  help: `usage: mailsplice ctl who [--user LOGIN | --store STORE | --slot SLOT] [--json] [--token-file FILE]

Asks every live proxy (heartbeat records in Redis, see ctl proxies) for its sessions on its
admin listener (GET /sessions) and prints one table: proxy, login, protocol, client, slot,
age, bytes in (client to server) and out. The admin listeners must be reachable from here:
a proxy whose admin listens on loopback of another host is listed as unreachable. The admin
token is read from --token-file, or from the config's admin.token_file (--config).
--json: [{proxy, sessions: [...], error?}] with /sessions' fields.
Where: --config FILE | --redis URL [--prefix ms:] (default: $MAILSPLICE_CONFIG)`,
  options: { user: { type: 'string' }, store: { type: 'string' }, slot: { type: 'string' }, 'token-file': { type: 'string' } },
  async run(ctx, args, v) {
    if (args.length > 0) throw usageError('too many arguments; usage: mailsplice ctl who [--user U | --store S | --slot S]');
    const query = new URLSearchParams();
    const named = (['user', 'store', 'slot'] as const).filter((k) => typeof v[k] === 'string');
    if (named.length > 1) throw usageError('name at most one of --user, --store, --slot');
    for (const k of named) query.set(k, k === 'user' ? login(ctx, v[k] as string) : (v[k] as string));
    const tokenFile = typeof v['token-file'] === 'string' ? v['token-file'] : ctx.adminTokenFile;
    let token: string | undefined;
    if (tokenFile !== undefined) {
      try {
        token = readAdminToken(tokenFile);
      } catch (e) {
        throw usageError((e as Error).message);
      }
    }
    const records = await fleetOf(ctx, 'ctl who').proxies();
    const rows: WhoRow[] = await Promise.all(
      records.map(async (r): Promise<WhoRow> => {
        if (!r.admin) return { proxy: r.id, sessions: [], error: 'no admin listener' };
        const answer = await askSessions(r.admin, query, token, 5000);
        return typeof answer === 'string' ? { proxy: r.id, sessions: [], error: answer } : { proxy: r.id, sessions: answer.sessions };
      }),
    );
    if (ctx.json) return ctx.out(JSON.stringify(rows, null, 2));
    for (const r of rows) if (r.error) ctx.note(`${r.proxy}: ${r.error}`);
    const lines = rows.flatMap((r) =>
      r.sessions.map((s) => [r.proxy, s.login, s.protocol, `${s.ip}:${s.port}`, s.slot, age(s.age_ms), String(s.bytes_in), String(s.bytes_out)]),
    );
    if (lines.length === 0) return ctx.out(records.length === 0 ? 'no live proxies (no heartbeat records)' : 'no sessions');
    ctx.out(table(['PROXY', 'LOGIN', 'PROTO', 'CLIENT', 'SLOT', 'AGE', 'IN', 'OUT'], lines));
  },
};
