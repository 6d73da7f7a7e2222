// The routing model every lookup source speaks: users point at stores, stores name their
// master slot, slots say where the servers are. Pure data and pure functions only, so the
// Redis source, the file source, the cache and the CLI all agree on what a route is.

export type Protocol = 'imap' | 'pop3' | 'lmtp';

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

/** Joins the three records into a route, or says precisely why there is none. */
export function routeFrom(
  login: string,
  user: UserRecord | undefined,
  store: StoreRecord | undefined,
  slot: SlotRecord | undefined,
): Route {
  if (!user) throw new LookupFailure('unknown-user', `no such user ${login}`);
  if (user.status === 'locked') throw new LookupFailure('locked', `user ${login} is locked`);
  if (!store) throw new LookupFailure('unavailable', `store ${user.store} of ${login} is not defined`);
  if (store.status === 'locked') throw new LookupFailure('locked', `store ${user.store} is locked`);
  if (!store.master) throw new LookupFailure('unavailable', `store ${user.store} has no master`);
  if (!slot) throw new LookupFailure('unavailable', `slot ${store.master} of store ${user.store} is not defined`);
  if (slot.status === 'down') throw new LookupFailure('unavailable', `slot ${store.master} is down`);
  return {
    login,
    backendLogin: user.backendLogin ?? login,
    store: user.store,
    slot: store.master,
    host: slot.host,
    ports: slot.ports,
  };
}

// ---- Parsing the wire form (Redis hashes, file entries) into records --------------------

type Fields = Record<string, string | number | string[] | undefined>;

function str(v: Fields[string]): string | undefined {
  if (v === undefined) return undefined;
  if (Array.isArray(v)) return v.join(',');
  const s = String(v).trim();
  return s === '' ? undefined : s;
}

function port(v: Fields[string], what: string): number | undefined {
  const s = str(v);
  if (s === undefined) return undefined;
  const n = Number(s);
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new Error(`${what}: bad port ${s}`);
  return n;
}

/** Parses a user hash; an empty hash means "no such user". Throws on malformed data. */
export function parseUser(f: Fields | undefined, id: string): UserRecord | undefined {
  if (!f || Object.keys(f).length === 0) return undefined;
  const store = str(f.store);
  if (!store) throw new Error(`user ${id}: no store`);
  const status = str(f.status) ?? 'active';
  if (status !== 'active' && status !== 'locked') throw new Error(`user ${id}: bad status ${status}`);
  const backendLogin = str(f.backend_login);
  return backendLogin ? { store, status, backendLogin } : { store, status };
}

export function parseStore(f: Fields | undefined, id: string): StoreRecord | undefined {
  if (!f || Object.keys(f).length === 0) return undefined;
  const status = str(f.status) ?? 'active';
  if (status !== 'active' && status !== 'locked') throw new Error(`store ${id}: bad status ${status}`);
  const epoch = Number(str(f.epoch) ?? 0);
  if (!Number.isSafeInteger(epoch) || epoch < 0) throw new Error(`store ${id}: bad epoch`);
  const replicas = (str(f.replicas) ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  return { master: str(f.master) ?? '', replicas, status, epoch };
}

export function parseSlot(f: Fields | undefined, id: string): SlotRecord | undefined {
  if (!f || Object.keys(f).length === 0) return undefined;
  const host = str(f.host);
  if (!host) throw new Error(`slot ${id}: no host`);
  const status = str(f.status) ?? 'up';
  if (status !== 'up' && status !== 'down') throw new Error(`slot ${id}: bad status ${status}`);
  const ports: Partial<Record<Protocol, number>> = {};
  for (const p of ['imap', 'pop3', 'lmtp'] as const) {
    const n = port(f[p], `slot ${id} ${p}`);
    if (n !== undefined) ports[p] = n;
  }
  return { host, ports, status };
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
