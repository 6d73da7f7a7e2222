// The heartbeat record each proxy keeps in Redis (`<prefix>proxy:<id>`, a JSON string set
// with PX, listed in the sorted set `<prefix>proxies`): what `ctl proxies` and `ctl who`
// read, and what failover tools may read to see the fleet. The layout is part of the
// contract (README, "For tool writers"); new fields may be added, none removed.

import type { Redis } from 'ioredis';
import type { RedisKeys } from '../lookup/redis-keys.js';
import type { ProcessState } from './state.js';

export interface HeartbeatRecord extends ProcessState {
  /** `<host>:<pid>` unless configured; unique among live proxies. */
  id: string;
  host: string;
  pid: number;
  version: string;
  /** The admin listener (`address:port`), where `/sessions` answers; null without one. */
  admin: string | null;
  /** When the proxy started and when this record was written (ISO 8601, the proxy's clock). */
  started: string;
  updated: string;
  /** The record expires this long after it was written unless written again. */
  ttl_ms: number;
  /** Processes serving connections (1 without workers). */
  workers: number;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A record as read from Redis; undefined for anything that is not one (never throws). */
export function parseHeartbeat(text: string | null): HeartbeatRecord | undefined {
  if (text === null) return undefined;
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (!isObject(v) || typeof v.id !== 'string' || !isObject(v.sessions) || !isObject(v.events)) return undefined;
  return v as unknown as HeartbeatRecord;
}

/** Every live proxy's record, sorted by id: the index, then the records that have not expired. */
export async function readHeartbeats(redis: Redis, keys: RedisKeys): Promise<HeartbeatRecord[]> {
  const ids = await redis.zrange(keys.proxies, '0', '-1');
  if (ids.length === 0) return [];
  const texts = await redis.mget(ids.map((id) => keys.proxy(id)));
  return texts
    .map(parseHeartbeat)
    .filter((r): r is HeartbeatRecord => r !== undefined)
    .sort((a, b) => a.id.localeCompare(b.id));
}
