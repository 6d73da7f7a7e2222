import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { imapSubjects, lmtpSend, pop3Uidls } from './harness/clients.js';
import { connectLines } from './harness/lines.js';
import { redisCommand } from './harness/redis.js';
import { startWorld, type World } from './harness/world.js';

function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
}

describe('harness world', () => {
  let world: World;
  beforeAll(async () => {
    world = await startWorld({ redis: true });
  });
  afterAll(async () => {
    await world?.stop();
  });

  it('runs two slots on their own loopback addresses', () => {
    expect(world.slotA.host).toBe('127.0.0.11');
    expect(world.slotB.host).toBe('127.0.0.12');
    expect(world.users.map((u) => u.name)).toEqual([
      'alice@example.com', 'bob@example.com', 'carol@example.com', 'locked@example.com',
    ]);
  });

  it('serves each user the seed message of the slot they logged into (imaplib)', async () => {
    const logins = [world.slotA, world.slotB].flatMap((slot) =>
      world.users.map(async (u) => ({
        who: `${u.name} on ${slot.id}`,
        subjects: await imapSubjects({ host: slot.host, port: slot.imap, user: u.name, password: u.password }),
        want: [`on ${slot.id}`],
      })),
    );
    for (const r of await Promise.all(logins)) expect(r.subjects, r.who).toEqual(r.want);
  });

  it('rejects a wrong password', async () => {
    const { slotA } = world;
    await expect(
      imapSubjects({ host: slotA.host, port: slotA.imap, user: 'alice@example.com', password: 'nope' }),
    ).rejects.toThrow(/AUTHENTICATIONFAILED/);
  });

  it('serves POP3 with the configured UIDL format (poplib)', async () => {
    const { slotB } = world;
    const uidls = await pop3Uidls({ host: slotB.host, port: slotB.pop3, user: 'bob@example.com', password: 'bobpw' });
    // %08Xu%08Xv: Dovecot's %X is lower-case hex.
    expect(uidls).toHaveLength(1);
    expect(uidls[0]).toMatch(/^[0-9a-f]{16}$/);
  });

  it('has a Redis that answers PING and keeps data across restart', async () => {
    const redis = world.redis!;
    expect(redis.url).toBe(`redis://${redis.host}:${redis.port}`);
    expect(await redisCommand(redis.host, redis.port, 'PING')).toBe('+PONG');
    expect(await redisCommand(redis.host, redis.port, 'SET harness:k v1')).toBe('+OK');
    await redis.restart();
    expect(await redisCommand(redis.host, redis.port, 'STRLEN harness:k')).toBe(':2');
  });

  it('delivers over LMTP and the message lands in the maildir', async () => {
    const { slotA, slotB } = world;
    const before = await slotA.messages('alice@example.com');
    const body = 'From: sender@example.net\nTo: alice@example.com\nSubject: via lmtp\n\nhello alice\n.dot line\n';
    const res = await lmtpSend(slotA.host, slotA.lmtp, ['alice@example.com'], body);
    expect(res.rcptReplies[0]).toMatch(/^250 /);
    expect(res.dataReplies).toHaveLength(1);
    expect(res.dataReplies[0]).toMatch(/^250 /);
    const after = await slotA.messages('alice@example.com');
    expect(after).toHaveLength(before.length + 1);
    expect(after.find((m) => m.includes('Subject: via lmtp'))).toContain('\n.dot line');
    expect((await slotB.messages('alice@example.com')).some((m) => m.includes('via lmtp'))).toBe(false);
  });

  it('rejects unknown LMTP recipients with 550 and still delivers to known ones', async () => {
    const { slotA } = world;
    const res = await lmtpSend(slotA.host, slotA.lmtp, ['nobody@example.com', 'carol@example.com'], 'Subject: mixed\n\nx\n');
    expect(res.rcptReplies[0]).toMatch(/^550 /);
    expect(res.rcptReplies[1]).toMatch(/^250 /);
    expect(res.dataReplies).toEqual([expect.stringMatching(/^250 /)]);
  });

  it('delivers into other folders via deliver()', async () => {
    const { slotA } = world;
    const msg = 'Subject: archived\r\n\r\nold\r\n';
    await slotA.deliver('bob@example.com', msg, 'Archive');
    expect(await slotA.messages('bob@example.com', 'Archive')).toEqual([msg]);
    const subjects = await imapSubjects({
      host: slotA.host, port: slotA.imap, user: 'bob@example.com', password: 'bobpw', folder: 'Archive',
    });
    expect(subjects).toEqual(['archived']);
  });

  it('stops and starts a slot on the same ports with the same data', async () => {
    const { slotB } = world;
    await slotB.stop();
    expect(await canConnect(slotB.host, slotB.imap)).toBe(false);
    await slotB.start();
    const subjects = await imapSubjects({ host: slotB.host, port: slotB.imap, user: 'carol@example.com', password: 'carolpw' });
    expect(subjects).toEqual(['on slotB']);
  });
});

describe('harness world with TLS', () => {
  let world: World;
  beforeAll(async () => {
    world = await startWorld({ tls: true });
  });
  afterAll(async () => {
    await world?.stop();
  });

  it('serves IMAPS with a certificate valid for the slot IP (imaplib)', async () => {
    const { slotA, tls } = world;
    const subjects = await imapSubjects({
      host: slotA.host, port: slotA.imaps!, user: 'alice@example.com', password: 'alicepw', caFile: tls!.ca.certFile,
    });
    expect(subjects).toEqual(['on slotA']);
  });

  it('serves POP3S on slotB, verified by Node against the CA', async () => {
    const { slotB, tls } = world;
    const c = await connectLines({ host: slotB.host, port: slotB.pop3s!, tls: { ca: tls!.ca.certPem } });
    try {
      expect(await c.readLine()).toMatch(/^\+OK/);
    } finally {
      c.close();
    }
  });
});
