// What a logged-in session is, for the log, /sessions and the metrics: its id, where the
// client came from, and why it ended, in a small fixed set of words (a metric label).

import { randomBytes } from 'node:crypto';

/**
 * Session ids: a random prefix per process and a counter, so an id costs an increment, not
 * a random draw, and ids of different processes (and restarts) do not collide. The same id
 * is in every log line of the session and goes to IMAP backends as ID `x-session-id`, so the
 * proxy's and the backend's logs join on it.
 */
const PREFIX = randomBytes(6).toString('base64url');
let counter = 0;

export function newSessionId(): string {
  return `${PREFIX}${(++counter).toString(36)}`;
}

/** Set once per session at login; shared by its log lines and /sessions. */
export interface SessionInfo {
  readonly id: string;
  /** ms since the epoch, when the splice began. */
  readonly started: number;
  readonly ip: string;
  readonly port: number;
  /** The listener's name, or its protocol when it has none. */
  readonly listener: string;
  /** `TLSv1.3` and so on, or `none`. */
  readonly tls: string;
}

/**
 * Who or what ended a session: `client` (logout, or gone), `backend` (it closed or failed),
 * a route change (`failover`: the store's master moved; `lock`, `move`, `slot-down`,
 * `readdress`, `removed`, `unreadable`, `rename`), `kick`, `refused` (a command the proxy does
 * not pass on), `limit` (a client that kept a closed session open), `shutdown`.
 */
export type EndCause =
  | 'client'
  | 'backend'
  | 'failover'
  | 'lock'
  | 'move'
  | 'slot-down'
  | 'readdress'
  | 'removed'
  | 'unreadable'
  | 'rename'
  | 'kick'
  | 'refused'
  | 'limit'
  | 'shutdown';

/** The reasons `staleReason` gives (src/lookup/model.ts), by cause. */
const BY_REASON: Record<string, EndCause> = {
  'account record unreadable': 'unreadable',
  'account removed': 'removed',
  'account locked': 'lock',
  'account moved': 'move',
  'account renamed': 'rename',
  'store record unreadable': 'unreadable',
  'store removed': 'removed',
  'store locked for maintenance': 'lock',
  'store moved to another server': 'failover',
  'server record unreadable': 'unreadable',
  'server removed': 'removed',
  'server down': 'slot-down',
  'server address changed': 'readdress',
};

/** The cause of a route change's reason; `failover` for one this table does not know. */
export function causeOfStale(reason: string): EndCause {
  return BY_REASON[reason] ?? 'failover';
}

/** What a kicked client is told (IMAP BYE [UNAVAILABLE]). */
export const KICK_REASON = 'Session ended by the administrator';
