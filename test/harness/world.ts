import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { makeCA, makeCert, type CertFiles } from './certs.js';
import { startDovecotSlot, type DovecotSlot, type SlotUser } from './dovecot.js';
import { startRedis, type RedisServer } from './redis.js';

export interface WorldOptions {
  redis?: boolean;
  /** Give both slots a certificate (signed by world.tls.ca) and imaps/pop3s ports. */
  tls?: boolean;
}

export interface World {
  redis?: RedisServer;
  slotA: DovecotSlot;
  slotB: DovecotSlot;
  users: SlotUser[];
  /** CA and server cert (SAN: localhost, 127.0.0.1, 127.0.0.11, 127.0.0.12) when tls was asked for. */
  tls?: { ca: CertFiles; cert: CertFiles };
  tmpDir: string;
  stop(): Promise<void>;
}

export const WORLD_USERS: readonly SlotUser[] = Object.freeze([
  { name: 'alice@example.com', password: 'alicepw' },
  { name: 'bob@example.com', password: 'bobpw' },
  { name: 'carol@example.com', password: 'carolpw' },
  { name: 'locked@example.com', password: 'lockedpw' },
]);

/** The seeded message: its Subject names the slot so a test can tell where a login landed. */
export function seedMessage(slotId: string, user: string): string {
  return [
    'From: seed@example.com',
    `To: ${user}`,
    `Subject: on ${slotId}`,
    `Message-ID: <seed-${slotId}-${user}>`,
    'Date: Mon, 1 Jan 2024 00:00:00 +0000',
    '',
    `Seed message for ${user} stored on ${slotId}.`,
    '',
  ].join('\r\n');
}

function settledValue<T>(r: PromiseSettledResult<T>): T {
  if (r.status === 'rejected') throw r.reason;
  return r.value;
}

/**
 * Redis (optional) plus two Dovecot slots on distinct loopback addresses.
 * Every user exists on both slots (stores are replicated), but each slot's copy
 * of the seed message differs, which makes routing observable.
 */
export async function startWorld(opts: WorldOptions = {}): Promise<World> {
  const tmpDir = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-world-'));
  // Dovecot's unprivileged processes must traverse into the slot dirs (mkdtemp gives 0700).
  await chmod(tmpDir, 0o755);
  const users = WORLD_USERS.map((u) => ({ ...u }));
  const started: { stop(): Promise<void> }[] = [];
  try {
    let tls: World['tls'];
    if (opts.tls) {
      const ca = await makeCA(path.join(tmpDir, 'certs'));
      const cert = await makeCert(path.join(tmpDir, 'certs'), {
        ca,
        cn: 'mail.example.test',
        altNames: ['mail.example.test', 'localhost', '127.0.0.1', '127.0.0.11', '127.0.0.12'],
        name: 'server',
      });
      tls = { ca, cert };
    }
    const slotTls = tls && { certFile: tls.cert.certFile, keyFile: tls.cert.keyFile };
    const track = <T extends { stop(): Promise<void> }>(x: T): T => (started.push(x), x);
    const slot = (id: string, host: string): Promise<DovecotSlot> =>
      startDovecotSlot({ id, host, users, tls: slotTls, dir: path.join(tmpDir, id) }).then(track);
    // allSettled, not all: on failure every server that did come up must be
    // known (tracked) before the catch below stops them.
    const [r, a, b] = await Promise.allSettled([
      opts.redis ? startRedis({ dir: path.join(tmpDir, 'redis') }).then(track) : undefined,
      slot('slotA', '127.0.0.11'),
      slot('slotB', '127.0.0.12'),
    ]);
    const redis = settledValue(r);
    const slotA = settledValue(a);
    const slotB = settledValue(b);
    for (const s of [slotA, slotB]) {
      for (const u of users) await s.deliver(u.name, seedMessage(s.id, u.name));
    }
    return {
      ...(redis ? { redis } : {}),
      slotA,
      slotB,
      users,
      ...(tls ? { tls } : {}),
      tmpDir,
      stop: async () => {
        await Promise.allSettled(started.map((s) => s.stop()));
        await rm(tmpDir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    // Leave tmpDir in place: the Dovecot logs in it explain the failure.
    await Promise.allSettled(started.map((s) => s.stop()));
    throw err;
  }
}
