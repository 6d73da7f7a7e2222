// `/sessions` on the admin listener, and what `ctl who` prints: every logged-in IMAP/POP3
// session of the instance. Each serving process answers `localSessions` for itself (askWorkers
// 'sessions'); the admin side merges the answers with `mergeSessions`, a pure function.

import type { SessionRegistry } from '../session/registry.js';

/** Which sessions: one user (normal form), store or slot; none: all. */
export interface SessionFilter {
  user?: string;
  store?: string;
  slot?: string;
  /** At most this many sessions come back (the oldest first); the total is still counted. */
  limit?: number;
}

/** One session as /sessions shows it (JSON; the field names are part of the admin API). */
export interface SessionView {
  session: string;
  protocol: string;
  login: string;
  backend_login: string;
  ip: string;
  port: number;
  listener: string;
  tls: string;
  store: string;
  slot: string;
  backend: string;
  /** ISO 8601, and ms since. */
  started: string;
  age_ms: number;
  bytes_in: number;
  bytes_out: number;
  /** The worker holding it (1..N), with workers. */
  worker?: number;
}

export interface SessionList {
  sessions: SessionView[];
  /** Sessions matching the filter, also those past `limit`. */
  total: number;
}

declare module '../cluster/ask.js' {
  interface Asks {
    /** This serving process's sessions matching the filter. */
    sessions: { arg: SessionFilter; answer: SessionList };
  }
}

export const DEFAULT_SESSION_LIMIT = 10_000;

/** This process's sessions matching `filter`, oldest first, at most `filter.limit`. */
export function localSessions(registry: SessionRegistry, filter: SessionFilter): SessionList {
  const now = Date.now();
  const found = registry.list(filter);
  found.sort((a, b) => a.info.started - b.info.started);
  const limit = filter.limit ?? DEFAULT_SESSION_LIMIT;
  return {
    total: found.length,
    sessions: found.slice(0, limit).map((s) => ({
      session: s.info.id,
      protocol: s.protocol,
      login: s.route.login,
      backend_login: s.route.backendLogin,
      ip: s.info.ip,
      port: s.info.port,
      listener: s.info.listener,
      tls: s.info.tls,
      store: s.route.store,
      slot: s.route.slot,
      backend: `${s.route.host}:${s.route.ports[s.protocol] ?? ''}`,
      started: new Date(s.info.started).toISOString(),
      age_ms: now - s.info.started,
      bytes_in: s.bytesUp,
      bytes_out: s.bytesDown,
    })),
  };
}

/** Several processes' answers as one list, oldest first, at most `limit`; `worker` set when there are workers. */
export function mergeSessions(parts: readonly { worker: number; list: SessionList }[], limit = DEFAULT_SESSION_LIMIT): SessionList {
  const all: SessionView[] = [];
  let total = 0;
  for (const p of parts) {
    total += p.list.total;
    for (const s of p.list.sessions) all.push(p.worker > 0 ? { ...s, worker: p.worker } : s);
  }
  all.sort((a, b) => b.age_ms - a.age_ms || a.session.localeCompare(b.session));
  return { total, sessions: all.slice(0, limit) };
}

/** The filter from a /sessions query string (user, store, slot, limit); an error text for a bad one. */
export function filterFromQuery(query: URLSearchParams, normalize: (login: string) => string): SessionFilter | string {
  const f: SessionFilter = {};
  for (const key of query.keys()) if (!['user', 'store', 'slot', 'limit'].includes(key)) return `unknown parameter ${JSON.stringify(key)} (user, store, slot, limit)`;
  const user = query.get('user');
  const store = query.get('store');
  const slot = query.get('slot');
  if (user !== null) f.user = normalize(user);
  if (store !== null) f.store = store;
  if (slot !== null) f.slot = slot;
  const limit = query.get('limit');
  if (limit !== null) {
    if (!/^\d{1,7}$/.test(limit) || Number(limit) < 1) return 'limit must be a whole number from 1';
    f.limit = Number(limit);
  }
  return f;
}
