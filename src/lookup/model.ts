// The routing model every lookup source speaks: users point at stores, stores name their
// master slot, slots say where the servers are. Pure data and pure functions only, so the
// Redis source, the file source, the cache and the CLI all agree on what a route is.

import { isIPv6 } from 'node:net';

/** Every protocol a slot may serve; `sieve` (ManageSieve, RFC 5804) is optional on a slot. */
export const PROTOCOLS = ['imap', 'pop3', 'lmtp', 'sieve'] as const;
export type Protocol = (typeof PROTOCOLS)[number];

export interface UserRecord {
  store: string;
  status: 'active' | 'locked';
  /** Name to log in with on the backend, when it differs from the client's login. */
  backendLogin?: string;
}

export interface StoreRecord {
  master: string;
  replicas: string[];
  status: 'active' | 'locked';
  /** Raised on every change; an older epoch never overwrites a newer one in a cache. */
  epoch: number;
}

export interface SlotRecord {
  host: string;
  ports: Partial<Record<Protocol, number>>;
  status: 'up' | 'down';
}

/** Where one login goes right now. */
export interface Route {
  login: string;
  backendLogin: string;
  store: string;
  slot: string;
  host: string;
  ports: Partial<Record<Protocol, number>>;
}

export type LookupFailureKind =
  | 'unknown-user' // no such user: the client hears "authentication failed" / 550
  | 'locked' // user or store locked by a tool: temporary
  | 'unavailable'; // lookup source down, store without master, slot down: temporary

export class LookupFailure extends Error {
  constructor(
    readonly kind: LookupFailureKind,
    message: string,
    /**
     * For a locked user or store whose master slot is known and up: where the password can
     * still be checked, so that the lock is told only to someone who knows it.
     */
    readonly route?: Route,
  ) {
    super(message);
    this.name = 'LookupFailure';
  }
}

/**
 * The normal form of a login: trimmed and lower-cased (logins and mail addresses are
 * matched case-insensitively on every platform we front), and a bare name gets the
 * configured default domain. The same function serves IMAP, POP3 and LMTP recipients.
 */
export function normalizeLogin(raw: string, defaultDomain?: string): string {
  const login = raw.trim().toLowerCase();
  if (defaultDomain && login.length > 0 && !login.includes('@')) return `${login}@${defaultDomain.toLowerCase()}`;
  return login;
}

/**
 * A record that exists in the source but cannot be used (a bad status, epoch, port or
 * host). It is not an error of the whole source: it stands for that one object, and it
 * counts as locked: its sessions end and its logins get a temporary error until a tool
 * writes it right. `key` names it as the source does (`ms:store:store23`,
 * `stores.store23`), so that the log points at what to repair.
 */
export class MalformedRecord {
  constructor(
    readonly key: string,
    readonly problem: string,
  ) {}
}

/** What a source says of one object: its record, unusable, or absent (undefined or null). */
export type Known<T> = T | MalformedRecord | null | undefined;

function usable<T>(r: Known<T>): T | undefined {
  return r === null || r instanceof MalformedRecord ? undefined : r;
}

/** Joins the three records into a route, or says precisely why there is none. */
export function routeFrom(login: string, user: Known<UserRecord>, store: Known<StoreRecord>, slot: Known<SlotRecord>): Route {
  if (user instanceof MalformedRecord) throw new LookupFailure('unavailable', `the record of ${login} is unreadable`);
  if (!user) throw new LookupFailure('unknown-user', `no such user ${login}`);
  // Where the password of a locked account can still be checked: its store's master slot,
  // when that is known and up (see LookupFailure.route).
  const where = (): Route | undefined => {
    const st = usable(store);
    const sl = usable(slot);
    return st?.master && sl && sl.status === 'up'
      ? { login, backendLogin: user.backendLogin ?? login, store: user.store, slot: st.master, host: sl.host, ports: sl.ports }
      : undefined;
  };
  if (user.status === 'locked') throw new LookupFailure('locked', `user ${login} is locked`, where());
  if (store instanceof MalformedRecord) throw new LookupFailure('unavailable', `the record of store ${user.store} is unreadable`);
  if (!store) throw new LookupFailure('unavailable', `store ${user.store} of ${login} is not defined`);
  if (store.status === 'locked') throw new LookupFailure('locked', `store ${user.store} is locked`, where());
  if (!store.master) throw new LookupFailure('unavailable', `store ${user.store} has no master`);
  if (slot instanceof MalformedRecord) throw new LookupFailure('unavailable', `the record of slot ${store.master} is unreadable`);
  if (!slot) throw new LookupFailure('unavailable', `slot ${store.master} of store ${user.store} is not defined`);
  if (slot.status === 'down') throw new LookupFailure('unavailable', `slot ${store.master} is down`);
  return where()!;
}

export type ObjectRecord = UserRecord | StoreRecord | SlotRecord;

// ---- The one rule: does a session still match its route? -------------------------------

/**
 * Why a `protocol` session on `route` must end, given what is now known of one object it
 * depends on (`kind`: its user, its store or its slot); undefined when the session may stay.
 *
 * This is the only statement of the rule. The event path and the resync (the session
 * registry is told of every re-read object) and the login re-check (`Router.stillValid`,
 * which asks it about every cached object of a fresh route) all call it, so a session is
 * ended for exactly the changes that give a new login another route or none: moved,
 * renamed on the backend, locked, gone, unreadable, slot down or readdressed. A slot is
 * readdressed for a session when its host or the port of the session's own protocol
 * changed: a new LMTP port says nothing about an IMAP session's server.
 */
export function staleReason(kind: 'user' | 'store' | 'slot', rec: Known<ObjectRecord>, route: Route, protocol: Protocol): string | undefined {
  if (kind === 'user') {
    if (rec instanceof MalformedRecord) return 'account record unreadable';
    const u = usable(rec) as UserRecord | undefined;
    if (!u) return 'account removed';
    if (u.status !== 'active') return 'account locked';
    if (u.store !== route.store) return 'account moved';
    if ((u.backendLogin ?? route.login) !== route.backendLogin) return 'account renamed';
  } else if (kind === 'store') {
    if (rec instanceof MalformedRecord) return 'store record unreadable';
    const s = usable(rec) as StoreRecord | undefined;
    if (!s) return 'store removed';
    if (s.status !== 'active') return 'store locked for maintenance';
    if (s.master !== route.slot) return 'store moved to another server';
  } else {
    if (rec instanceof MalformedRecord) return 'server record unreadable';
    const s = usable(rec) as SlotRecord | undefined;
    if (!s) return 'server removed';
    if (s.status !== 'up') return 'server down';
    if (s.host !== route.host || s.ports[protocol] !== route.ports[protocol]) return 'server address changed';
  }
  return undefined;
}

// ---- Parsing the wire form (Redis hashes, file entries) into records --------------------

/**
 * The one error the record parsers throw: the object exists but is not a usable record.
 * Sources turn it into a `MalformedRecord` for that object alone.
 */
export class RecordError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RecordError';
  }
}

/** A hash from Redis (all strings) or an entry of the routes file (anything YAML holds). */
type Fields = Readonly<Record<string, unknown>>;

/** A scalar field as trimmed text; a list (replicas in YAML) as a comma list. */
function str(v: unknown, what: string, field: string): string | undefined {
  if (v === undefined || v === null) return undefined;
  let s: string;
  if (typeof v === 'string') s = v;
  else if (typeof v === 'number' && Number.isFinite(v)) s = String(v);
  else if (Array.isArray(v) && v.every((x) => typeof x === 'string' || (typeof x === 'number' && Number.isFinite(x)))) s = v.join(',');
  else throw new RecordError(`${what}: ${field} is not a string`);
  s = s.trim();
  return s === '' ? undefined : s;
}

/** Ports are decimal integers 1-65535 written plainly: not `0x0d017`, `53143.0`, `1e3` or `0143`. */
function port(v: unknown, what: string, field: string): number | undefined {
  if (typeof v === 'number') {
    if (!Number.isInteger(v) || v < 1 || v > 65535) throw new RecordError(`${what}: bad ${field} port ${v} (a decimal integer 1-65535)`);
    return v;
  }
  const s = str(v, what, field);
  if (s === undefined) return undefined;
  if (!/^[1-9][0-9]{0,4}$/.test(s) || Number(s) > 65535) throw new RecordError(`${what}: bad ${field} port ${JSON.stringify(s)} (a decimal integer 1-65535)`);
  return Number(s);
}

const HOSTNAME = /^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$/i;
const IPV4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;

/**
 * Why a slot host cannot be connected to, or undefined when it can. The unspecified
 * addresses (0.0.0.0, ::) mean "this machine" to connect(), so a slot there points back
 * at the proxy itself; a name of only digits and dots that is not a dotted quad is an
 * inet_aton() short form (`0`, `127.1`) that resolvers read as an address nobody meant.
 */
export function unusableHost(host: string): string | undefined {
  if (host === '') return 'empty';
  const v4 = IPV4.exec(host);
  if (v4) {
    const o = v4.slice(1).map(Number);
    if (o.some((x) => x > 255)) return 'not an IPv4 address';
    if (o[0] === 0) return 'an unspecified address (0.0.0.0/8)';
    if (o.every((x) => x === 255)) return 'the broadcast address';
    return undefined;
  }
  if (/^[\d.]+$/.test(host)) return 'not an IPv4 address';
  if (host.includes(':')) {
    if (!/^[0-9a-f:.]+$/i.test(host) || !isIPv6(host)) return 'not an IPv6 address';
    const tail = host.split(':').at(-1)!;
    if (tail.includes('.')) return unusableHost(tail); // ::ffff:0.0.0.0 and the like
    if (host.split(':').every((g) => g === '' || /^0{1,4}$/.test(g))) return 'an unspecified address (::)';
    return undefined;
  }
  return HOSTNAME.test(host) ? undefined : 'not a host name or address';
}

/**
 * Runs one parser for the object named `key`: its record, undefined when absent, or a
 * `MalformedRecord` when it does not parse. What a source does with each object it reads,
 * so that one bad record stays one bad object.
 */
export function parseOrMalformed<T>(key: string, parse: () => T | undefined): T | MalformedRecord | undefined {
  try {
    return parse();
  } catch (e) {
    if (e instanceof RecordError) return new MalformedRecord(key, e.message);
    throw e;
  }
}

function status<T extends string>(v: unknown, allowed: readonly T[], fallback: T, what: string): T {
  const s = str(v, what, 'status') ?? fallback;
  if (!(allowed as readonly string[]).includes(s)) throw new RecordError(`${what}: bad status ${JSON.stringify(s)} (${allowed.join(' or ')})`);
  return s as T;
}

function present(f: Fields | undefined | null): f is Fields {
  return typeof f === 'object' && f !== null && Object.keys(f).length > 0;
}

/** Parses a user hash; an empty hash means "no such user". Throws `RecordError` on malformed data. */
export function parseUser(f: Fields | undefined, id: string): UserRecord | undefined {
  if (!present(f)) return undefined;
  const what = `user ${id}`;
  const store = str(f.store, what, 'store');
  if (!store) throw new RecordError(`${what}: no store`);
  const st = status(f.status, ['active', 'locked'] as const, 'active', what);
  const backendLogin = str(f.backend_login, what, 'backend_login');
  return backendLogin ? { store, status: st, backendLogin } : { store, status: st };
}

/** Parses a store hash; an empty hash means "no such store". Throws `RecordError` on malformed data. */
export function parseStore(f: Fields | undefined, id: string): StoreRecord | undefined {
  if (!present(f)) return undefined;
  const what = `store ${id}`;
  const st = status(f.status, ['active', 'locked'] as const, 'active', what);
  const rawEpoch = str(f.epoch, what, 'epoch') ?? '0';
  if (!/^(0|[1-9][0-9]*)$/.test(rawEpoch) || !Number.isSafeInteger(Number(rawEpoch))) throw new RecordError(`${what}: bad epoch ${JSON.stringify(rawEpoch)}`);
  const replicas = (str(f.replicas, what, 'replicas') ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  return { master: str(f.master, what, 'master') ?? '', replicas, status: st, epoch: Number(rawEpoch) };
}

/** Parses a slot hash; an empty hash means "no such slot". Throws `RecordError` on malformed data. */
export function parseSlot(f: Fields | undefined, id: string): SlotRecord | undefined {
  if (!present(f)) return undefined;
  const what = `slot ${id}`;
  const host = str(f.host, what, 'host');
  if (!host) throw new RecordError(`${what}: no host`);
  const bad = unusableHost(host);
  if (bad) throw new RecordError(`${what}: unusable host ${JSON.stringify(host)} (${bad})`);
  const st = status(f.status, ['up', 'down'] as const, 'up', what);
  const ports: Partial<Record<Protocol, number>> = {};
  for (const p of PROTOCOLS) {
    const n = port(f[p], what, p);
    if (n !== undefined) ports[p] = n;
  }
  return { host, ports, status: st };
}

/** The wire form of records: what ctl writes to Redis and the file source reads back. */
export function userFields(u: UserRecord): Record<string, string> {
  const f: Record<string, string> = { store: u.store, status: u.status };
  if (u.backendLogin) f.backend_login = u.backendLogin;
  return f;
}

export function storeFields(s: StoreRecord): Record<string, string> {
  return { master: s.master, replicas: s.replicas.join(','), status: s.status, epoch: String(s.epoch) };
}

export function slotFields(s: SlotRecord): Record<string, string> {
  const f: Record<string, string> = { host: s.host, status: s.status };
  for (const [p, n] of Object.entries(s.ports)) f[p] = String(n);
  return f;
}
