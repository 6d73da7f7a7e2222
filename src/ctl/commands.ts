// The `mailsplice ctl` commands: argument handling and output only. What they change and
// how is in ops.ts, setters.ts, transfer.ts and whereis.ts, written once for every backend.

import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { extraFields, fieldsOf, parseAs, toDoc, type Hash, type HashWrite, type RouteAdmin } from '../lookup/admin.js';
import { normalizeLogin, PROTOCOLS, type Protocol } from '../lookup/model.js';
import type { ObjectKind } from '../lookup/source.js';
import { fenceError, notFound, usageError } from './errors.js';
import { DEFAULT_WAIT_S, describeFence, lagReason, waitForFence, waitSeconds, type FenceSource, type FenceWait } from './fence.js';
import { deleteObject, failover, moveUser, setLock } from './ops.js';
import { DEFAULT_PORTS, checkId, setSlot, setStore, setUser } from './setters.js';
import { dumpAll, formatDat, formatRoutes, importDat, importRoutes, type ImportResult } from './transfer.js';
import { whereis } from './whereis.js';
import { kickCommand, proxiesCommand, whoCommand, type Fleet } from './fleet.js';

export type OptionSpec = Record<string, { type: 'string' | 'boolean'; short?: string }>;
export type Values = Record<string, string | boolean | undefined>;

export interface Ctx {
  admin: RouteAdmin;
  /** The running proxies (Redis lookup only). */
  fleet?: Fleet;
  /** The config's admin.token_file (with --config), for the proxies' admin listeners. */
  adminTokenFile?: string;
  defaultDomain?: string;
  json: boolean;
  /** Writes a line (or lines) to stdout. */
  out(text: string): void;
  /** Progress and warnings: stderr, so stdout stays parseable. */
  note(text: string): void;
  /** The proxies' heartbeat records, for --wait (Redis only). */
  fence?: FenceSource;
}

export interface Command {
  name: string;
  summary: string;
  /** What it does, in a few words, for ctl --help. */
  about: string;
  help: string;
  options: OptionSpec;
  run(ctx: Ctx, args: string[], v: Values): Promise<void>;
}

// ---- small helpers -------------------------------------------------------------------------

function str(v: Values, name: string): string | undefined {
  const x = v[name];
  return typeof x === 'string' ? x : undefined;
}

function arity(args: string[], n: number, usage: string): void {
  if (args.length !== n) throw usageError(`${args.length < n ? 'missing' : 'too many'} arguments; usage: ${usage}`);
}

function port(v: Values, name: string): number | null | undefined {
  const s = str(v, name);
  if (s === undefined) return undefined;
  if (s === 'none') return null;
  const n = Number(s);
  if (!/^\d+$/.test(s) || n < 1 || n > 65535) throw usageError(`bad port for --${name}: ${JSON.stringify(s)} (1-65535, or "none")`);
  return n;
}

export function login(ctx: Ctx, raw: string): string {
  const l = normalizeLogin(raw, ctx.defaultDomain);
  if (l === '' || /[\s\x00-\x1f]/.test(l)) throw usageError(`bad login ${JSON.stringify(raw)}`);
  return l;
}

function objectId(ctx: Ctx, kind: ObjectKind, raw: string): string {
  return kind === 'user' ? login(ctx, raw) : checkId(kind, raw);
}

/** Canonical fields (defaults filled in) plus any extra fields, as typed document values. */
function describe(kind: ObjectKind, id: string, h: Hash): Record<string, unknown> {
  try {
    const rec = parseAs(kind, h, id);
    if (rec) return toDoc({ ...fieldsOf(kind, rec), ...extraFields(kind, h) });
  } catch {
    /* malformed: show it as stored, so that it can be seen and repaired */
  }
  return toDoc(h);
}

function show(ctx: Ctx, kind: ObjectKind, id: string, fields: Record<string, unknown>): void {
  if (ctx.json) return ctx.out(JSON.stringify({ kind, id, ...fields }, null, 2));
  const width = Math.max(...Object.keys(fields).map((k) => k.length));
  ctx.out([`${kind} ${id}`, ...Object.entries(fields).map(([k, x]) => `  ${k.padEnd(width)}  ${Array.isArray(x) ? x.join(',') : String(x)}`)].join('\n'));
}

function writeLine(w: HashWrite): string {
  if (!w.fields) return `delete ${w.kind} ${w.id}`;
  return `write ${w.kind} ${w.id}: ${Object.entries(w.fields).map(([k, x]) => `${k}=${x}`).join(' ')}`;
}

// ---- user / store / slot -------------------------------------------------------------------

const TARGET_OPTS_HELP = `Where: --config FILE | --redis URL [--prefix ms:] | --file ROUTES.yaml (default: $MAILSPLICE_CONFIG)`;

function objectCommand(kind: ObjectKind, setHelp: string, options: OptionSpec, set: (ctx: Ctx, id: string, v: Values) => Promise<void>): Command {
  const idName = kind === 'user' ? 'LOGIN' : 'ID';
  return {
    name: kind,
    summary: `${kind} get|set|del ${idName}`,
    about: kind === 'user' ? 'show, create/change, delete a user' : kind === 'store' ? 'show, create/change, delete a store' : 'show, create/change, delete a slot',
    help: `usage:
  mailsplice ctl ${kind} get ${idName} [--json]
  mailsplice ctl ${kind} set ${idName} ${setHelp}
  mailsplice ctl ${kind} del ${idName}${kind === 'slot' ? ' [--force]' : ''}
${
  kind === 'user'
    ? `\nLogins are normalised (trimmed, lower-cased, default domain added) as the proxy does.
set creates the user (needs --store, which must exist) or changes it; --backend-login ""
removes the backend name. Status changes go through ctl lock/unlock.`
    : kind === 'store'
      ? `\nset creates the store (needs --master) or changes it; every slot named must exist, and
a slot cannot be master and replica at once. Every change raises the store's epoch.
To move the master role use ctl failover, which checks and locks; set does not.
del does not look for users still on the store (that would scan every user).`
      : `\nset creates the slot (needs --host; ports default to 143/110/24) or changes it. A port
"none" removes it (the slot does not serve that protocol). --status down makes the
proxies end the slot's sessions and refuse logins to it.
del refuses while a store still names the slot, unless --force.`
}
Each write publishes one event (kind "${kind}") in the same MULTI/EXEC.
${TARGET_OPTS_HELP}`,
    options,
    async run(ctx, args, v) {
      const [verb, raw] = args;
      const usage = `mailsplice ctl ${kind} get|set|del ${idName}`;
      if (verb !== 'get' && verb !== 'set' && verb !== 'del') throw usageError(`usage: ${usage}`);
      arity(args, 2, usage);
      const id = objectId(ctx, kind, raw!);
      if (verb === 'get') {
        const h = await ctx.admin.getHash(kind, id);
        if (!h) throw notFound(`unknown ${kind} ${id}`);
        return show(ctx, kind, id, describe(kind, id, h));
      }
      if (verb === 'del') {
        await deleteObject(ctx.admin, kind, id, v.force === true);
        return ctx.out(ctx.json ? JSON.stringify({ kind, id, deleted: true }) : `deleted ${kind} ${id}`);
      }
      await set(ctx, id, v);
    },
  };
}

function setOutput(ctx: Ctx, r: { kind: ObjectKind; id: string; created: boolean; changed: boolean; record: Parameters<typeof fieldsOf>[1] }): void {
  const fields = toDoc(fieldsOf(r.kind, r.record));
  if (ctx.json) return ctx.out(JSON.stringify({ kind: r.kind, id: r.id, created: r.created, changed: r.changed, record: fields }));
  const what = r.created ? 'created' : r.changed ? 'changed' : 'unchanged';
  ctx.out(`${what} ${r.kind} ${r.id}: ${Object.entries(fields).map(([k, x]) => `${k}=${Array.isArray(x) ? x.join(',') : x}`).join(' ')}`);
}

const userCommand = objectCommand(
  'user',
  '[--store STORE] [--backend-login NAME]',
  { store: { type: 'string' }, 'backend-login': { type: 'string' } },
  async (ctx, id, v) => setOutput(ctx, await setUser(ctx.admin, id, { store: str(v, 'store'), backendLogin: str(v, 'backend-login') })),
);

const storeCommand = objectCommand(
  'store',
  '[--master SLOT] [--replicas SLOT,SLOT...]',
  { master: { type: 'string' }, replicas: { type: 'string' } },
  async (ctx, id, v) => {
    const r = str(v, 'replicas');
    const replicas = r === undefined ? undefined : r.split(',').map((s) => s.trim()).filter(Boolean);
    setOutput(ctx, await setStore(ctx.admin, id, { master: str(v, 'master'), replicas }));
  },
);

const slotCommand = objectCommand(
  'slot',
  '[--host H] [--imap P] [--pop3 P] [--lmtp P] [--sieve P] [--status up|down]',
  { host: { type: 'string' }, imap: { type: 'string' }, pop3: { type: 'string' }, lmtp: { type: 'string' }, sieve: { type: 'string' }, status: { type: 'string' }, force: { type: 'boolean' } },
  async (ctx, id, v) => {
    const status = str(v, 'status');
    if (status !== undefined && status !== 'up' && status !== 'down') throw usageError(`--status is up or down, not ${JSON.stringify(status)}`);
    const ports: Partial<Record<Protocol, number | null>> = {};
    for (const p of PROTOCOLS) {
      const n = port(v, p);
      if (n !== undefined) ports[p] = n;
    }
    setOutput(ctx, await setSlot(ctx.admin, id, { host: str(v, 'host'), ports, status }));
  },
);

// ---- list, lock, failover, move-user, whereis --------------------------------------------------

const PLURAL: Record<string, ObjectKind> = { users: 'user', stores: 'store', slots: 'slot' };

const listCommand: Command = {
  name: 'list',
  summary: 'list users|stores|slots',
  about: 'every id of one kind (SCAN)',
  help: `usage: mailsplice ctl list users|stores|slots [--json]

Prints every id of that kind, sorted, one a line (--json: an array). Redis is walked with
SCAN, never KEYS, so a large user list does not stall the proxies' lookups.
${TARGET_OPTS_HELP}`,
  options: {},
  async run(ctx, args) {
    arity(args, 1, 'mailsplice ctl list users|stores|slots');
    const kind = PLURAL[args[0]!];
    if (!kind) throw usageError(`list users, stores or slots, not ${JSON.stringify(args[0])}`);
    const ids = await ctx.admin.list(kind);
    if (ctx.json) ctx.out(JSON.stringify(ids));
    else if (ids.length > 0) ctx.out(ids.join('\n'));
  },
};

function lockCommand(lock: boolean): Command {
  const name = lock ? 'lock' : 'unlock';
  return {
    name,
    summary: `${name} user|store ID`,
    about: lock ? 'refuse logins, end sessions' : 'let logins through again',
    help: `usage: mailsplice ctl ${name} user|store ID${lock ? ' [--wait[=SECONDS]]' : ''} [--json]

${
  lock
    ? `Sets status "locked". The proxies end the sessions of that user (or of every user on
that store) and answer new logins with a temporary failure (IMAP NO [UNAVAILABLE], POP3
-ERR [SYS/TEMP], LMTP 451) until unlock.`
    : `Sets status "active" again: logins and deliveries go through.`
} Locking a store raises its epoch. Already ${lock ? 'locked' : 'unlocked'}: nothing is written.${
      lock
        ? `
--wait[=SECONDS]  (store, Redis) then wait, up to SECONDS (default ${DEFAULT_WAIT_S}), until every live
                  proxy's heartbeat record says it applied the lock's epoch and holds no
                  session and no LMTP transaction on the store's master: the old master is
                  free. A proxy whose heartbeat stopped is reported, not waited for.
                  Exit 4 (lock in place, fence not complete) names the lagging proxies;
                  --json: {..., fence: {done, clear, lagging, stopped, waitedMs}}.`
        : ''
    }
${TARGET_OPTS_HELP}`,
    options: lock ? { wait: { type: 'string' } } : {},
    async run(ctx, args, v) {
      const usage = `mailsplice ctl ${name} user|store ID`;
      arity(args, 2, usage);
      const kind = args[0];
      if (kind !== 'user' && kind !== 'store') throw usageError(`usage: ${usage}`);
      const seconds = waitOption(v);
      if (seconds !== undefined && kind !== 'store') throw usageError('--wait goes with lock store');
      if (seconds !== undefined && !ctx.fence) throw usageError(`--wait needs the Redis lookup: the proxies' heartbeat records live in Redis (${ctx.admin.where} has none)`);
      const r = await setLock(ctx.admin, kind, objectId(ctx, kind, args[1]!), lock);
      const target = { store: r.id, master: r.master ?? '', epoch: r.epoch ?? 0 };
      const fence = seconds === undefined ? undefined : await waitForFence(ctx.fence!, target, seconds * 1000, (lagging) => ctx.note(`waiting for ${lagging.map((l) => lagReason(l, target)).join('; ')}`));
      if (fence) for (const line of describeFence(fence)) ctx.note(line);
      if (ctx.json) ctx.out(JSON.stringify(fence ? { ...r, fence } : r));
      else {
        const epoch = r.epoch !== undefined ? ` (epoch ${r.epoch})` : '';
        ctx.out(r.changed ? `${lock ? 'locked' : 'unlocked'} ${kind} ${r.id}${epoch}` : `${kind} ${r.id} was already ${r.status === 'locked' ? 'locked' : 'unlocked'}${epoch}`);
      }
      if (fence && !fence.done) throw fenceError(`store ${r.id} is locked, but the fence is not complete: ${[...fence.lagging.map((l) => l.id), ...fence.stopped.map((x) => `${x.id} (heartbeat stopped)`)].join(', ')}`);
    },
  };
}

/** --wait / --wait=SECONDS as seconds, or undefined when not given. */
function waitOption(v: Values): number | undefined {
  try {
    return waitSeconds(v.wait);
  } catch (e) {
    throw usageError((e as Error).message);
  }
}

/** Runs the --pause-for command through the shell, its output on stderr; rejects unless it exits 0. */
function runPause(ctx: Ctx, command: string, env: Record<string, string>): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('/bin/sh', ['-c', command], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    const relay = (d: Buffer) => ctx.note(d.toString('utf8').replace(/\n$/, ''));
    child.stdout.on('data', relay);
    child.stderr.on('data', relay);
    child.once('error', (e) => reject(new Error(`--pause-for: ${e.message}`)));
    child.once('close', (code, signal) => (code === 0 ? resolve() : reject(new Error(`--pause-for command ${signal ? `killed by ${signal}` : `exited ${code}`}`))));
  });
}

const failoverCommand: Command = {
  name: 'failover',
  summary: 'failover STORE --to SLOT [--force]',
  about: 'move the master role to a replica',
  help: `usage: mailsplice ctl failover STORE --to SLOT [--force | --already-locked] [--wait[=SECONDS]] [--pause-for CMD] [--json]

Moves the master role of STORE to SLOT, which must be one of its replicas and up:
  1. lock the store (event: every proxy ends the sessions on the old master and answers
     new logins "try again");
  2. switch: SLOT becomes master, the old master takes SLOT's place among the replicas,
     status active, epoch raised (event: logins go to SLOT).
Each step is one MULTI/EXEC that checks what it read has not changed (WATCH).
--already-locked  you locked the store yourself (ctl lock store STORE) and did your own
                  work (stop the old master, replay its sync log); do step 2 only.
--force           host death: SLOT may be any defined slot, its status and the store's
                  lock are not checked, and both steps are done as one.
--wait[=SECONDS]  (Redis) between the two steps, wait as ctl lock store --wait does until
                  every live proxy applied the lock and holds nothing on the old master
                  (default ${DEFAULT_WAIT_S} s). Not complete in time: the store stays locked,
                  exit 4, the lagging proxies named (--json: fence).
--pause-for CMD   then run CMD (sh -c) before the switch: the final replication sync.
                  Its environment has MAILSPLICE_STORE, MAILSPLICE_OLD_MASTER,
                  MAILSPLICE_NEW_MASTER and MAILSPLICE_EPOCH (the lock's). CMD failing
                  leaves the store locked (exit 1).
Prints the old and new master, the epoch and the time taken.
Exit: 0 done (or SLOT already master), 2 refused (not a replica, slot down, store locked,
unknown slot), 3 unknown store, 1 interrupted (the message says how to finish), 4 fence
not complete (store left locked).
${TARGET_OPTS_HELP}`,
  options: { to: { type: 'string' }, force: { type: 'boolean' }, 'already-locked': { type: 'boolean' }, wait: { type: 'string' }, 'pause-for': { type: 'string' } },
  async run(ctx, args, v) {
    arity(args, 1, 'mailsplice ctl failover STORE --to SLOT');
    const to = str(v, 'to');
    if (!to) throw usageError('failover needs --to SLOT');
    if (v.force && v['already-locked']) throw usageError('--force and --already-locked exclude each other');
    const seconds = waitOption(v);
    const pause = str(v, 'pause-for');
    if (v.force && (seconds !== undefined || pause !== undefined)) throw usageError('--force is one step: there is no pause between lock and switch for --wait or --pause-for');
    if (seconds !== undefined && !ctx.fence) throw usageError(`--wait needs the Redis lookup: the proxies' heartbeat records live in Redis (${ctx.admin.where} has none)`);
    const store = checkId('store', args[0]!);
    const slot = checkId('slot', to);
    let fence: FenceWait | undefined;
    const between =
      seconds === undefined && pause === undefined
        ? undefined
        : async (locked: { from: string; epoch: number }) => {
            if (seconds !== undefined) {
              const target = { store, master: locked.from, epoch: locked.epoch };
              fence = await waitForFence(ctx.fence!, target, seconds * 1000, (lagging) => ctx.note(`waiting for ${lagging.map((l) => lagReason(l, target)).join('; ')}`));
              for (const line of describeFence(fence)) ctx.note(line);
              if (!fence.done) {
                throw fenceError(`the fence is not complete: ${[...fence.lagging.map((l) => l.id), ...fence.stopped.map((x) => `${x.id} (heartbeat stopped)`)].join(', ')}`);
              }
            }
            if (pause !== undefined) {
              ctx.note(`running --pause-for: ${pause}`);
              await runPause(ctx, pause, { MAILSPLICE_STORE: store, MAILSPLICE_OLD_MASTER: locked.from, MAILSPLICE_NEW_MASTER: slot, MAILSPLICE_EPOCH: String(locked.epoch) });
            }
          };
    let r;
    try {
      r = await failover(ctx.admin, store, slot, { force: v.force === true, alreadyLocked: v['already-locked'] === true, ...(between ? { between } : {}) });
    } catch (e) {
      if (ctx.json && fence) ctx.out(JSON.stringify({ store, to: slot, switched: false, fence }));
      throw e;
    }
    if (ctx.json) return ctx.out(JSON.stringify(fence ? { ...r, fence } : r));
    if (r.unchanged) return ctx.out(`store ${r.store}: ${r.to} already is the master; nothing to do (${r.ms} ms)`);
    ctx.out(
      `store ${r.store}: master ${r.from || '(none)'} -> ${r.to}${r.forced ? ' (forced)' : ''}, replicas ${r.replicas.join(',') || '(none)'}, ` +
        `epoch ${r.epochBefore} -> ${r.epochAfter}; ${r.forced ? 'one step' : `locked for ${r.lockedMs} ms`}, took ${r.ms} ms`,
    );
  },
};

const moveUserCommand: Command = {
  name: 'move-user',
  summary: 'move-user USER --to STORE',
  about: 'point a user at another store',
  help: `usage: mailsplice ctl move-user USER --to STORE [--json]

Points USER at STORE in three steps, each published: lock the user (the proxies end only
that user's sessions), set the store, unlock. STORE must exist and have a master. Copying
the mail is not ctl's job: do it before, or lock the user yourself while you copy.
${TARGET_OPTS_HELP}`,
  options: { to: { type: 'string' } },
  async run(ctx, args, v) {
    arity(args, 1, 'mailsplice ctl move-user USER --to STORE');
    const to = str(v, 'to');
    if (!to) throw usageError('move-user needs --to STORE');
    const r = await moveUser(ctx.admin, login(ctx, args[0]!), checkId('store', to));
    if (ctx.json) return ctx.out(JSON.stringify(r));
    if (r.unchanged) return ctx.out(`user ${r.login} already is on store ${r.to}; nothing to do`);
    ctx.out(`user ${r.login}: store ${r.from} -> ${r.to}; locked for ${r.lockedMs} ms, took ${r.ms} ms`);
  },
};

const whereisCommand: Command = {
  name: 'whereis',
  summary: 'whereis USER',
  about: 'the whole route of a user, with lock states',
  help: `usage: mailsplice ctl whereis USER [--json]

Shows the user's store, the store's master slot with its address and ports, the replicas,
the lock state of user, store and slots, and what a proxy would do with a login now.
${TARGET_OPTS_HELP}`,
  options: {},
  async run(ctx, args) {
    arity(args, 1, 'mailsplice ctl whereis USER');
    const w = await whereis(ctx.admin, login(ctx, args[0]!));
    if (ctx.json) return ctx.out(JSON.stringify(w, null, 2));
    const slot = (s: NonNullable<typeof w.master>) =>
      s.host === undefined ? `${s.id} (not defined)` : `${s.id} ${s.host} imap=${s.ports?.imap ?? '-'} pop3=${s.ports?.pop3 ?? '-'} lmtp=${s.ports?.lmtp ?? '-'}${s.ports?.sieve ? ` sieve=${s.ports.sieve}` : ''} ${s.status}`;
    const lines = [
      `user      ${w.login} (${w.userStatus})${w.backendLogin !== w.login ? `, backend login ${w.backendLogin}` : ''}`,
      `store     ${w.store}${w.storeStatus ? ` (${w.storeStatus}, epoch ${w.epoch})` : ' (not defined)'}`,
      `master    ${w.master ? slot(w.master) : '(none)'}`,
      ...(w.replicas.length > 0 ? w.replicas.map((r, i) => `${i === 0 ? 'replicas ' : '         '} ${slot(r)}`) : ['replicas  (none)']),
      `route     ${w.route.ok ? `${w.route.slot} ${w.route.host}` : `none: ${w.route.reason} (${w.route.failure})`}`,
    ];
    ctx.out(lines.join('\n'));
  },
};

// ---- import / export -----------------------------------------------------------------------

const importCommand: Command = {
  name: 'import',
  summary: 'import FILE [--dry-run]',
  about: 'load a production.dat layout (or a routes file)',
  help: `usage: mailsplice ctl import FILE [--format dat|routes] [--dry-run] [--json]
         [--imap-port P] [--pop3-port P] [--lmtp-port P] [--masters-from-file]

Imports a production.dat layout (default; --format routes for a .yaml/.yml/.json file):
  i30 30 t15 0 1000 e 10.202.80.1      slots sloti30t01..sloti30t15, IPs .1 to .15
  store23 n 0 90 sloti30t01 sloti15t03  store23, master sloti30t01, the rest replicas
Blank lines and # comments are ignored. Slots get ports 143/110/24 unless the --*-port
options say otherwise. Every slot a store names must be in the file or already defined.
A store line's location, branch and disk target are kept as extra fields (location,
branch, disk_target) for ctl export. Run-time state is kept: a slot's up/down and a
store's lock, and an existing store keeps its current master when that slot is still
listed for it (a re-import does not undo failovers; --masters-from-file does).
A routes file (ctl export --format yaml|json) imports users, stores and slots as given.
Imports only add and change, never delete. Unchanged objects are not written.
--dry-run prints what would be written and writes nothing.
${TARGET_OPTS_HELP}`,
  options: {
    format: { type: 'string' },
    'dry-run': { type: 'boolean' },
    'imap-port': { type: 'string' },
    'pop3-port': { type: 'string' },
    'lmtp-port': { type: 'string' },
    'masters-from-file': { type: 'boolean' },
  },
  async run(ctx, args, v) {
    arity(args, 1, 'mailsplice ctl import FILE');
    const file = args[0]!;
    const format = str(v, 'format') ?? (/\.(ya?ml|json)$/i.test(file) ? 'routes' : 'dat');
    if (format !== 'dat' && format !== 'routes') throw usageError(`--format is dat or routes, not ${JSON.stringify(format)}`);
    const ports = { ...DEFAULT_PORTS };
    for (const p of ['imap', 'pop3', 'lmtp'] as const) {
      const n = port(v, `${p}-port`);
      if (n === null) throw usageError(`--${p}-port needs a port number`);
      if (n !== undefined) ports[p] = n;
    }
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (e) {
      throw usageError(`cannot read ${file}: ${(e as Error).message}`);
    }
    const opts = { ports, dryRun: v['dry-run'] === true, mastersFromFile: v['masters-from-file'] === true, defaultDomain: ctx.defaultDomain };
    const r = format === 'dat' ? await importDat(ctx.admin, text, opts) : await importRoutes(ctx.admin, text, opts);
    printImport(ctx, r);
  },
};

function printImport(ctx: Ctx, r: ImportResult): void {
  if (ctx.json) {
    const { writes, ...counts } = r;
    return ctx.out(JSON.stringify({ ...counts, ...(r.dryRun ? { writes } : { written: writes.length }) }, null, 2));
  }
  const lines = r.dryRun ? r.writes.map(writeLine) : [];
  const c = (name: string, x: ImportResult['slots']) => `${name}: ${x.created} new, ${x.changed} changed, ${x.unchanged} unchanged`;
  const kinds = [c('slots', r.slots), c('stores', r.stores), ...(r.format === 'routes' ? [c('users', r.users)] : [])];
  lines.push(`${r.dryRun ? 'dry run, nothing written; would write' : 'imported'}: ${kinds.join('; ')}`);
  ctx.out(lines.join('\n'));
}

const exportCommand: Command = {
  name: 'export',
  summary: 'export [--format dat|yaml|json]',
  about: 'store lines, or everything as a routes file',
  help: `usage: mailsplice ctl export [--format dat|yaml|json]

dat (default): production.dat store lines, master first, with the slots as comments.
yaml, json:    everything (users, stores, slots, with any extra fields), as a routes file:
               valid as lookup.file, and ctl import FILE.yaml loads it back.
${TARGET_OPTS_HELP}`,
  options: { format: { type: 'string' } },
  async run(ctx, args, v) {
    arity(args, 0, 'mailsplice ctl export [--format dat|yaml|json]');
    const format = str(v, 'format') ?? (ctx.json ? 'json' : 'dat');
    if (format !== 'dat' && format !== 'yaml' && format !== 'json') throw usageError(`--format is dat, yaml or json, not ${JSON.stringify(format)}`);
    const dump = await dumpAll(ctx.admin);
    const text = format === 'dat' ? formatDat(dump, ctx.admin.where) : formatRoutes(dump, format);
    ctx.out(text.replace(/\n$/, ''));
  },
};

export const COMMANDS: readonly Command[] = [
  userCommand,
  storeCommand,
  slotCommand,
  listCommand,
  lockCommand(true),
  lockCommand(false),
  failoverCommand,
  moveUserCommand,
  whereisCommand,
  importCommand,
  exportCommand,
  proxiesCommand,
  whoCommand,
  kickCommand,
];
