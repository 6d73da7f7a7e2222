import type { Config, ListenerConfig } from './config.js';

// What SIGHUP may change in a running proxy, and what it may not. Pure: server.ts applies it.

/**
 * Sections a running process cannot take over: the lookup source (the cache, the event
 * subscription and every live session depend on it), the admin listener, the password
 * checker and the number of worker processes. A change there is refused with a log line per key; the rest of the file applies.
 */
export const RESTART_ONLY = ['lookup', 'admin', 'auth', 'workers'] as const;

/** Dotted paths of the leaves where `a` and `b` differ (arrays compared whole). */
export function changedPaths(a: unknown, b: unknown, path = ''): string[] {
  if (a === b) return [];
  const isObj = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x);
  if (isObj(a) && isObj(b)) {
    const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
    return [...keys].flatMap((k) => changedPaths(a[k], b[k], path ? `${path}.${k}` : k));
  }
  return JSON.stringify(a) === JSON.stringify(b) ? [] : [path || '(top level)'];
}

/** The keys of a reload that need a restart (never their values: a URL may hold a password). */
export function restartOnlyChanges(running: Config, next: Config): string[] {
  return RESTART_ONLY.flatMap((section) => changedPaths(running[section], next[section], section));
}

/** A listener's identity across reloads: where it listens. */
export function listenerKey(l: ListenerConfig): string {
  return `${l.protocol}|${l.address}|${l.port ?? ''}|${l.path ?? ''}`;
}

/**
 * What a listener was started with: a listener whose settings changed is replaced (the old
 * one stops accepting and keeps its sessions). LMTP listeners also carry the lmtp section.
 */
export function listenerSettings(l: ListenerConfig, cfg: Config): string {
  return JSON.stringify(l.protocol === 'lmtp' ? { l, lmtp: cfg.lmtp } : { l });
}

/** The config a reload puts in force: the new file, with the restart-only sections as they run. */
export function nextInForce(running: Config, next: Config): Config {
  return { ...next, lookup: running.lookup, admin: running.admin, auth: running.auth, workers: running.workers };
}
