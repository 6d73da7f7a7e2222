// The admin endpoints of issue 9 over the whole instance: /readyz, /sessions and POST /kick,
// each asked of every serving process (askWorkers) and merged here; with one process the
// answer is its own. Each serving process registers its handlers with `answerFleetQuestions`.

import type { AdminSources } from '../admin.js';
import type { Answerer, Asker } from '../cluster/ask.js';
import type { Router } from '../lookup/router.js';
import type { KickEvent, RouteSource } from '../lookup/source.js';
import type { SessionRegistry } from '../session/registry.js';
import { DEFAULT_SESSION_LIMIT, filterFromQuery, localSessions, mergeSessions } from './sessions.js';

/** One serving process's readiness. */
export interface ProcessReady {
  /** Its listeners are bound. */
  listening: boolean;
  /** The lookup answers (Redis connected; a routes file always). */
  lookup: boolean;
  /** Route events are flowing (the cache is trusted). */
  events: boolean;
}

declare module '../cluster/ask.js' {
  interface Asks {
    ready: { arg: null; answer: ProcessReady };
    /** Ends the sessions a kick names in this process; how many. */
    kick: { arg: KickEvent; answer: number };
  }
}

export function answerFleetQuestions(asks: Answerer, p: { registry: SessionRegistry; router: Router; source: RouteSource; listening: () => boolean }): void {
  asks.onAsk('sessions', (filter) => localSessions(p.registry, filter));
  asks.onAsk('ready', () => ({ listening: p.listening(), lookup: p.source.reachable?.() ?? true, events: p.router.stats.live }));
  asks.onAsk('kick', (ev) => p.registry.kick(ev));
}

const KICK_SCOPES = { user: 'user', store: 'store', slot: 'slot' } as const;

export function fleetAdminSources(asker: Asker, normalize: (login: string) => string): Pick<AdminSources, 'ready' | 'sessions' | 'kick'> {
  return {
    async ready() {
      const answers = await asker.askWorkers('ready', null);
      let live = answers.length > 0;
      const workers = answers.map((a) => {
        if (!a.ok) {
          live = false;
          return { worker: a.worker, down: a.error };
        }
        if (!a.value.listening || !a.value.lookup || !a.value.events) live = false;
        return { worker: a.worker, ...a.value };
      });
      const all = (k: keyof ProcessReady) => answers.every((a) => a.ok && a.value[k]);
      return { live, body: { ready: live, listening: all('listening'), lookup: all('lookup'), events: all('events'), ...(asker.clustered ? { workers } : {}) } };
    },
    async sessions(query) {
      const filter = filterFromQuery(query, normalize);
      if (typeof filter === 'string') return filter;
      const answers = await asker.askWorkers('sessions', filter);
      const parts = answers.flatMap((a) => (a.ok ? [{ worker: asker.clustered ? a.worker : 0, list: a.value }] : []));
      const merged = mergeSessions(parts, filter.limit ?? DEFAULT_SESSION_LIMIT);
      const missing = answers.filter((a) => !a.ok).map((a) => a.worker);
      return missing.length > 0 ? { ...merged, workers_unanswered: missing } : merged;
    },
    async kick(query) {
      const named = (Object.keys(KICK_SCOPES) as (keyof typeof KICK_SCOPES)[]).filter((k) => query.has(k));
      if (named.length !== 1 || [...query.keys()].length !== 1) return 'name exactly one of user, store, slot';
      const scope = named[0]!;
      const raw = query.get(scope)!;
      if (raw === '') return `empty ${scope}`;
      const ev: KickEvent = { kind: 'kick', scope, id: scope === 'user' ? normalize(raw) : raw };
      const answers = await asker.askWorkers('kick', ev);
      return { ended: answers.reduce((n, a) => n + (a.ok ? a.value : 0), 0) };
    },
  };
}
