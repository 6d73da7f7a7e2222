import { writeFileSync } from 'node:fs';
import { Redis } from 'ioredis';
import { stringify } from 'yaml';
import type { World } from '../harness/world.js';

/**
 * The routes every suite starts from: alice and carol live on store1 (master slotA),
 * bob on store2 (master slotB), locked@ is locked. Field names are the Redis contract's.
 */
export interface RouteModel {
  users: Record<string, Record<string, string>>;
  stores: Record<string, Record<string, string>>;
  slots: Record<string, Record<string, string>>;
}

export function worldRoutes(world: World): RouteModel {
  const slot = (s: World['slotA']) => ({ host: s.host, imap: String(s.imap), pop3: String(s.pop3), lmtp: String(s.lmtp), status: 'up' });
  return {
    users: {
      'alice@example.com': { store: 'store1' },
      'carol@example.com': { store: 'store1' },
      'bob@example.com': { store: 'store2' },
      'locked@example.com': { store: 'store1', status: 'locked' },
    },
    stores: {
      store1: { master: 'slotA', replicas: 'slotB', status: 'active', epoch: '1' },
      store2: { master: 'slotB', replicas: 'slotA', status: 'active', epoch: '1' },
    },
    slots: { slotA: slot(world.slotA), slotB: slot(world.slotB) },
  };
}

export function writeRoutesFile(path: string, model: RouteModel): void {
  writeFileSync(path, stringify(model));
}

/** Writes the model into Redis under `prefix` (replacing what was there). */
export async function seedRedis(url: string, model: RouteModel, prefix = 'ms:'): Promise<void> {
  const r = new Redis(url);
  try {
    const m = r.multi();
    for (const [kind, objs] of [['user', model.users], ['store', model.stores], ['slot', model.slots]] as const) {
      for (const [id, fields] of Object.entries(objs)) {
        m.del(`${prefix}${kind}:${id}`);
        m.hset(`${prefix}${kind}:${id}`, fields);
      }
    }
    await m.exec();
  } finally {
    r.disconnect();
  }
}

/** Changes one object's fields and publishes the event, as a failover tool does. */
export async function changeInRedis(url: string, kind: 'user' | 'store' | 'slot', id: string, fields: Record<string, string>, prefix = 'ms:'): Promise<void> {
  const r = new Redis(url);
  try {
    await r
      .multi()
      .hset(`${prefix}${kind}:${id}`, fields)
      .publish(`${prefix}events`, JSON.stringify({ kind, id }))
      .exec();
  } finally {
    r.disconnect();
  }
}
