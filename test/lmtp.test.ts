import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { lmtpTotals } from '../src/lmtp/metrics.js';
import { LookupFailure, type Route } from '../src/lookup/model.js';
import { createMetrics } from '../src/metrics.js';
import { lmtpTransaction, openLmtp, wireBody, type RawLmtp } from './harness/lmtp.js';
import { freePort } from './harness/ports.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { changeInRedis, seedRedis, worldRoutes } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// The LMTP front end against real Dovecot LMTP on two slots, routes in a real Redis.
// alice and carol live on store1 (master slotA), bob on store2 (master slotB).

const execFileP = promisify(execFile);

let world: World;
let proxy: TestProxy;
let socketPath: string;
let seq = 0;

const MAX_SIZE = 1024 * 1024;

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  socketPath = join(tempDir('lmtp'), 'lmtp.sock');
  proxy = await startProxy({
    listeners: [{ protocol: 'lmtp', path: socketPath }],
    lookup: { redis: { url: world.redis!.url }, max_stale_ms: 0 },
    limits: { bad_commands: 5, line_length: 1024 },
    lmtp: { max_message_size: MAX_SIZE, max_recipients: 5, timeout_ms: 3000 },
  });
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

const target = () => ({ host: '127.0.0.1', port: proxy.ports.lmtp! });

/** A message with a Subject nobody else uses, so a maildir can be searched for it. */
function message(extra = ''): { subject: string; body: string } {
  const subject = `lmtp-test-${process.pid}-${++seq}`;
  return { subject, body: `From: sender@example.net\nSubject: ${subject}\n\nHello.\n${extra}` };
}

async function copies(slot: World['slotA'], user: string, subject: string): Promise<string[]> {
  return (await slot.messages(user)).filter((m) => m.includes(`Subject: ${subject}\n`));
}

/** Changes routes in Redis and waits until the proxy's router sees the change. */
async function change(kind: 'user' | 'store' | 'slot', id: string, fields: Record<string, string>, probe: string, seen: (r: Route | LookupFailure) => boolean): Promise<void> {
  await changeInRedis(world.redis!.url, kind, id, fields);
  for (let i = 0; ; i++) {
    const r = await proxy.server.router.resolve(probe).catch((e: unknown) => e as LookupFailure);
    if (seen(r)) return;
    if (i > 250) throw new Error(`the proxy never saw ${kind} ${id} change`);
    await new Promise((res) => setTimeout(res, 20));
  }
}
const failsWith = (kind: LookupFailure['kind']) => (r: Route | LookupFailure) => r instanceof LookupFailure && r.kind === kind;
const onSlot = (slot: string) => (r: Route | LookupFailure) => !(r instanceof LookupFailure) && r.slot === slot;

async function session(): Promise<RawLmtp> {
  const c = await openLmtp(target());
  expect(await c.line()).toMatch(/^220 /);
  return c;
}

describe('delivery across slots', () => {
  it('answers once per accepted recipient, in RCPT order, with each backend real result', async () => {
    const { subject, body } = message();
    const t = await lmtpTransaction(target(), 'sender@example.net', ['alice@example.com', 'bob@example.com', 'nobody@example.com', 'Carol@Example.COM'], body);
    expect(t.greeting).toMatch(/^220 mailsplice LMTP/);
    expect(t.rcpt[0]).toMatch(/^250 2\.1\.5 /);
    expect(t.rcpt[1]).toMatch(/^250 2\.1\.5 /);
    expect(t.rcpt[2]).toBe('550 5.1.1 <nobody@example.com> User unknown');
    expect(t.rcpt[3]).toMatch(/^250 2\.1\.5 /);
    expect(t.data).toMatch(/^354 /);
    expect(t.results).toHaveLength(3);
    // Dovecot's own replies, passed through: they name the recipient.
    expect(t.results[0]).toMatch(/^250 2\.0\.0 <alice@example\.com> .* Saved$/);
    expect(t.results[1]).toMatch(/^250 2\.0\.0 <bob@example\.com> .* Saved$/);
    expect(t.results[2]).toMatch(/^250 2\.0\.0 <carol@example\.com> .* Saved$/);
    expect(await copies(world.slotA, 'alice@example.com', subject)).toHaveLength(1);
    expect(await copies(world.slotB, 'bob@example.com', subject)).toHaveLength(1);
    expect(await copies(world.slotA, 'carol@example.com', subject)).toHaveLength(1);
    // Nothing on the replicas: each copy went to its store's master only.
    expect(await copies(world.slotB, 'alice@example.com', subject)).toHaveLength(0);
    expect(await copies(world.slotA, 'bob@example.com', subject)).toHaveLength(0);
  });

  it('gives swaks one reply per recipient (an independent LMTP client)', async () => {
    const { subject } = message();
    const { stdout } = await execFileP(
      'swaks',
      ['--protocol', 'LMTP', '--server', '127.0.0.1', '--port', String(proxy.ports.lmtp), '--from', 'sender@example.net',
        '--to', 'bob@example.com,ghost@example.com,alice@example.com', '--header', `Subject: ${subject}`, '--body', 'via swaks'],
      { timeout: 30_000 },
    ).catch((e: { stdout: string }) => ({ stdout: e.stdout }));
    // swaks prints what it sends as " -> line" and what it reads as "<-  line".
    const afterDot = stdout.split(/\n -> \.\n/)[1] ?? '';
    const replies = afterDot.split('\n').filter((l) => /^<[-~*]+\s+\d{3} /.test(l)).map((l) => l.replace(/^<[-~*]+\s+/, ''));
    expect(replies.slice(0, 2), stdout).toEqual([
      expect.stringMatching(/^250 2\.0\.0 <bob@example\.com> /),
      expect.stringMatching(/^250 2\.0\.0 <alice@example\.com> /),
    ]);
    expect(stdout).toMatch(/RCPT TO:<ghost@example.com>\n.*550 5\.1\.1/);
    expect(await copies(world.slotB, 'bob@example.com', subject)).toHaveLength(1);
    expect(await copies(world.slotA, 'alice@example.com', subject)).toHaveLength(1);
  });

  it('passes a backend refusal of one recipient through as that recipient result only', async () => {
    // ghost2 is routed (the lookup knows it) but slotA's userdb does not: Dovecot says 550.
    await changeInRedis(world.redis!.url, 'user', 'ghost2@example.com', { store: 'store1' });
    const { subject, body } = message();
    const t = await lmtpTransaction(target(), 'sender@example.net', ['ghost2@example.com', 'alice@example.com'], body);
    expect(t.rcpt).toEqual([expect.stringMatching(/^250 /), expect.stringMatching(/^250 /)]);
    expect(t.results[0]).toMatch(/^550 5\.1\.1 <ghost2@example\.com> User doesn't exist/);
    expect(t.results[1]).toMatch(/^250 2\.0\.0 <alice@example\.com> /);
    expect(await copies(world.slotA, 'alice@example.com', subject)).toHaveLength(1);
  });

  it('looks up user+detail as the user when the whole address is unknown, and gives the backend the detail', async () => {
    const { subject, body } = message();
    const t = await lmtpTransaction(target(), 'sender@example.net', ['Alice+News@example.com'], body);
    expect(t.rcpt[0]).toMatch(/^250 /);
    expect(t.results[0]).toMatch(/^250 2\.0\.0 <alice\+News@example\.com> /);
    expect(await copies(world.slotA, 'alice@example.com', subject)).toHaveLength(1);
    const u = await lmtpTransaction(target(), 'sender@example.net', ['nobody+x@example.com'], body);
    expect(u.rcpt[0]).toBe('550 5.1.1 <nobody+x@example.com> User unknown');
  });

  it('delivers a repeated recipient once and answers each RCPT', async () => {
    const { subject, body } = message();
    const t = await lmtpTransaction(target(), '', ['bob@example.com', 'BOB@example.com'], body);
    expect(t.results).toEqual([expect.stringMatching(/^250 /), expect.stringMatching(/^250 /)]);
    expect(await copies(world.slotB, 'bob@example.com', subject)).toHaveLength(1);
  });

  it('works over the unix socket', async () => {
    const { subject, body } = message();
    const t = await lmtpTransaction({ path: socketPath }, 'sender@example.net', ['bob@example.com'], body);
    expect(t.results[0]).toMatch(/^250 /);
    expect(await copies(world.slotB, 'bob@example.com', subject)).toHaveLength(1);
  });

  it('keeps the message whole: dot lines, 8-bit text, and a smuggled LF.LF stay content', async () => {
    const { subject } = message();
    // Raw wire text, written as a crafted client would: a bare "\n.\n" followed by what
    // would be commands on a lax server. Dovecot 2.3 ends DATA on LF "." LF itself.
    const wire =
      `Subject: ${subject}\r\n\r\n.leading dot\r\n..two dots\r\ncaf\xc3\xa9\r\n` +
      'smuggle\n.\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n';
    const c = await session();
    c.write('LHLO t\r\nMAIL FROM:<s@example.net> BODY=8BITMIME\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n');
    for (let i = 0; i < 3; i++) expect(await c.line()).toMatch(/^250 /);
    expect(await c.line()).toMatch(/^354 /);
    c.write(Buffer.from(wire, 'latin1'));
    expect(await c.line()).toMatch(/^250 2\.0\.0 <alice@example\.com>/);
    c.send('QUIT');
    expect(await c.line()).toMatch(/^221 /);
    c.close();
    const [m] = await copies(world.slotA, 'alice@example.com', subject);
    expect(m).toContain('\nleading dot\n.two dots\ncafé\n');
    expect(m).toContain('smuggle\n.\nMAIL FROM:<evil@example.net>\nRCPT TO:<carol@example.com>\nDATA\nSubject: smuggled\n\nx\n');
    expect((await world.slotA.messages('carol@example.com')).some((x) => x.includes('Subject: smuggled'))).toBe(false);
  });

  it('runs several transactions on one connection (RSET between, as Postfix does)', async () => {
    const c = await session();
    c.send('LHLO t');
    expect((await c.reply()).join('\n')).toMatch(/^250-mailsplice\n250-PIPELINING\n250-ENHANCEDSTATUSCODES\n250-8BITMIME\n250-SIZE 1048576\n250 IGNOREQUOTA$/);
    const subjects: string[] = [];
    for (const rcpt of ['alice@example.com', 'bob@example.com', 'carol@example.com']) {
      const { subject, body } = message();
      subjects.push(subject);
      c.write(`MAIL FROM:<s@example.net>\r\nRCPT TO:<${rcpt}>\r\nDATA\r\n`);
      expect(await c.line()).toMatch(/^250 2\.1\.0/);
      expect(await c.line()).toMatch(/^250 2\.1\.5/);
      expect(await c.line()).toMatch(/^354/);
      c.write(wireBody(body));
      expect(await c.line()).toMatch(/^250 2\.0\.0/);
      c.send('RSET');
      expect(await c.line()).toBe('250 2.0.0 OK');
    }
    c.close();
    expect(await copies(world.slotA, 'alice@example.com', subjects[0]!)).toHaveLength(1);
    expect(await copies(world.slotB, 'bob@example.com', subjects[1]!)).toHaveLength(1);
    expect(await copies(world.slotA, 'carol@example.com', subjects[2]!)).toHaveLength(1);
  });
});

describe('backend connections', () => {
  const connects = async (slot: World['slotA']) => ((await readFile(slot.logFile, 'utf8')).match(/lmtp\(\d+\): Info: Connect from/g) ?? []).length;

  it('reuses an idle backend connection for the next message', async () => {
    const before = await connects(world.slotA);
    for (let i = 0; i < 3; i++) {
      const t = await lmtpTransaction(target(), 's@example.net', ['alice@example.com'], message().body);
      expect(t.results[0]).toMatch(/^250 /);
    }
    expect((await connects(world.slotA)) - before).toBeLessThanOrEqual(1);
  });

  it('does not use a pooled connection the backend has closed (restart between messages)', async () => {
    expect((await lmtpTransaction(target(), 's@example.net', ['bob@example.com'], message().body)).results[0]).toMatch(/^250 /);
    await world.slotB.stop();
    await world.slotB.start();
    const { subject, body } = message();
    const t = await lmtpTransaction(target(), 's@example.net', ['bob@example.com'], body);
    expect(t.results[0]).toMatch(/^250 /);
    expect(await copies(world.slotB, 'bob@example.com', subject)).toHaveLength(1);
  });
});

describe('temporary failures (Postfix must keep the message)', () => {
  it('answers 451 for a locked user, a locked store and a slot that is down', async () => {
    const t = await lmtpTransaction(target(), 's@example.net', ['locked@example.com', 'alice@example.com'], message().body);
    expect(t.rcpt[0]).toMatch(/^451 4\.2\.1 <locked@example\.com> Mailbox temporarily locked/);
    expect(t.results[0]).toMatch(/^250 /);

    await change('store', 'store2', { status: 'locked', epoch: '2' }, 'bob@example.com', failsWith('locked'));
    try {
      const u = await lmtpTransaction(target(), 's@example.net', ['bob@example.com'], message().body);
      expect(u.rcpt[0]).toMatch(/^451 4\.2\.1 <bob@example\.com> /);
      expect(u.data).toMatch(/^503 5\.5\.1 /);
    } finally {
      await change('store', 'store2', { status: 'active', epoch: '3' }, 'bob@example.com', onSlot('slotB'));
    }

    await change('slot', 'slotB', { status: 'down' }, 'bob@example.com', failsWith('unavailable'));
    try {
      const v = await lmtpTransaction(target(), 's@example.net', ['bob@example.com'], message().body);
      expect(v.rcpt[0]).toMatch(/^451 4\.3\.0 <bob@example\.com> Mailbox temporarily unavailable/);
    } finally {
      await change('slot', 'slotB', { status: 'up' }, 'bob@example.com', onSlot('slotB'));
    }
  });

  it('gives 451 to the recipients of a backend stopped before DATA; the others are delivered', async () => {
    const { subject, body } = message();
    const c = await session();
    c.write('LHLO t\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\n');
    for (let i = 0; i < 5; i++) expect(await c.line()).toMatch(/^250 /);
    await world.slotB.stop();
    try {
      c.send('DATA');
      expect(await c.line()).toMatch(/^354 /);
      c.write(wireBody(body));
      expect(await c.line()).toMatch(/^250 2\.0\.0 <alice@example\.com>/);
      expect(await c.line()).toBe('451 4.4.1 <bob@example.com> Mail store not reachable, try again later');
      expect(await c.line()).toMatch(/^250 2\.0\.0 <carol@example\.com>/);
      c.close();
    } finally {
      await world.slotB.start();
    }
    expect(await copies(world.slotA, 'alice@example.com', subject)).toHaveLength(1);
    expect(await copies(world.slotA, 'carol@example.com', subject)).toHaveLength(1);
    expect(await copies(world.slotB, 'bob@example.com', subject)).toHaveLength(0);
  });

  it('gives 451 to the recipients of a backend killed during DATA; what got 250 is on disk', async () => {
    const { subject, body } = message();
    const c = await session();
    c.write('LHLO t\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n');
    for (let i = 0; i < 4; i++) expect(await c.line()).toMatch(/^250 /);
    expect(await c.line()).toMatch(/^354 /);
    // Half the message, then slotB goes away, then the rest.
    const filler = `${'x'.repeat(998)}\r\n`.repeat(200);
    c.write(`Subject: ${subject}\r\n\r\n${filler}`);
    await c.drained();
    await world.slotB.stop();
    try {
      c.write(`${filler}${wireBody(body).replace(/^/, 'tail\r\n')}`);
      expect(await c.line()).toMatch(/^451 4\.4\.2 <bob@example\.com> /);
      expect(await c.line()).toMatch(/^250 2\.0\.0 <alice@example\.com>/);
      c.close();
    } finally {
      await world.slotB.start();
    }
    const [m] = await copies(world.slotA, 'alice@example.com', subject);
    expect(m).toBeDefined();
    expect(m!.length).toBeGreaterThan(400 * 999);
    expect(m).toContain('\ntail\n');
    expect(await copies(world.slotB, 'bob@example.com', subject)).toHaveLength(0);
  });

  it('gives 451 when a backend does not answer within timeout_ms', async () => {
    // A slot whose LMTP port accepts connections and then says nothing at all.
    const hole = net.createServer(() => undefined);
    const port = await freePort('127.0.0.1');
    await new Promise<void>((r) => hole.listen(port, '127.0.0.1', () => r()));
    await changeInRedis(world.redis!.url, 'slot', 'slotHole', { host: '127.0.0.1', lmtp: String(port), status: 'up' });
    await changeInRedis(world.redis!.url, 'store', 'storeHole', { master: 'slotHole', status: 'active', epoch: '1' });
    await changeInRedis(world.redis!.url, 'user', 'hole@example.com', { store: 'storeHole' });
    try {
      const started = Date.now();
      const t = await lmtpTransaction(target(), 's@example.net', ['hole@example.com', 'bob@example.com'], message().body);
      expect(t.results[0]).toMatch(/^451 4\.4\.2 <hole@example\.com> /);
      expect(t.results[1]).toMatch(/^250 /);
      expect(Date.now() - started).toBeLessThan(10_000);
    } finally {
      hole.close();
    }
  });

  it('delivers to the new master when the store moved between RCPT and DATA', async () => {
    const { subject, body } = message();
    const c = await session();
    c.write('LHLO t\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<carol@example.com>\r\n');
    for (let i = 0; i < 3; i++) expect(await c.line()).toMatch(/^250 /);
    await change('store', 'store1', { master: 'slotB', replicas: 'slotA', epoch: '5' }, 'carol@example.com', onSlot('slotB'));
    try {
      c.send('DATA');
      expect(await c.line()).toMatch(/^354 /);
      c.write(wireBody(body));
      expect(await c.line()).toMatch(/^250 2\.0\.0 <carol@example\.com>/);
      c.close();
    } finally {
      await change('store', 'store1', { master: 'slotA', replicas: 'slotB', epoch: '6' }, 'carol@example.com', onSlot('slotA'));
    }
    expect(await copies(world.slotB, 'carol@example.com', subject)).toHaveLength(1);
    expect(await copies(world.slotA, 'carol@example.com', subject)).toHaveLength(0);
  });
});

describe('protocol', () => {
  let c: RawLmtp;
  beforeEach(async () => {
    c = await session();
    return () => c.close();
  });

  it('enforces the command sequence and refuses what it does not offer', async () => {
    c.send('MAIL FROM:<a@b.c>');
    expect(await c.line()).toBe('503 5.5.1 Send LHLO first');
    c.send('HELO x');
    expect(await c.line()).toMatch(/^500 5\.5\.1 /);
    c.send('LHLO t');
    await c.reply();
    c.send('RCPT TO:<alice@example.com>');
    expect(await c.line()).toBe('503 5.5.1 Need MAIL command');
    c.send('DATA');
    expect(await c.line()).toBe('503 5.5.1 Need MAIL command');
    c.send('VRFY alice@example.com');
    expect(await c.line()).toBe('502 5.5.1 VRFY command is disabled');
    c.send('NOOP');
    expect(await c.line()).toBe('250 2.0.0 OK');
    c.send('MAIL FROM:<a@b.c> RET=FULL');
    expect(await c.line()).toBe('555 5.5.4 Unsupported parameter RET');
    c.send('MAIL FROM:<a@b.c> SIZE=2000000');
    expect(await c.line()).toMatch(/^552 5\.3\.4 /);
    c.send('MAIL FROM:a@b.c');
    expect(await c.line()).toMatch(/^501 5\.1\.7 /);
  });

  it('refuses DATA without a valid recipient, bad addresses and too many recipients', async () => {
    c.write('LHLO t\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n');
    await c.reply();
    expect(await c.line()).toMatch(/^250 /);
    expect(await c.line()).toMatch(/^550 5\.1\.1 /);
    expect(await c.line()).toBe('503 5.5.1 No valid recipients');
    c.send('RCPT TO:<alice>');
    expect(await c.line()).toMatch(/^501 5\.1\.3 /);
    c.send('RSET');
    expect(await c.line()).toBe('250 2.0.0 OK');
    c.send('MAIL FROM:<a@b.c>');
    await c.line();
    for (let i = 0; i < 5; i++) {
      c.send('RCPT TO:<alice@example.com>');
      expect(await c.line()).toMatch(/^250 /);
    }
    c.send('RCPT TO:<bob@example.com>');
    expect(await c.line()).toBe('452 4.5.3 Too many recipients');
  });

  it('answers 552 per recipient for a message over the limit without SIZE, and delivers nothing', async () => {
    const { subject } = message();
    c.write('LHLO t\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n');
    await c.reply();
    for (let i = 0; i < 3; i++) await c.line();
    expect(await c.line()).toMatch(/^354/);
    c.write(`Subject: ${subject}\r\n\r\n`);
    const line = `${'y'.repeat(1000)}\r\n`;
    for (let i = 0; i < 1100; i++) c.write(line);
    c.write('.\r\n');
    expect(await c.line()).toMatch(/^552 5\.3\.4 /);
    expect(await c.line()).toMatch(/^552 5\.3\.4 /);
    // The connection goes on.
    c.send('NOOP');
    expect(await c.line()).toBe('250 2.0.0 OK');
    expect(await copies(world.slotA, 'alice@example.com', subject)).toHaveLength(0);
    expect(await copies(world.slotB, 'bob@example.com', subject)).toHaveLength(0);
  });

  it('answers a too long line with 500 and carries on; closes after too many errors', async () => {
    c.send(`NOOP ${'z'.repeat(2000)}`);
    expect(await c.line()).toBe('500 5.5.2 Line too long');
    c.send('NOOP');
    expect(await c.line()).toBe('250 2.0.0 OK');
    for (let i = 0; i < 3; i++) {
      c.send('BOGUS');
      expect(await c.line()).toBe('500 5.5.1 Unknown command');
    }
    // The fifth error (bad_commands: 5) is answered, then the connection is closed.
    c.send('BOGUS');
    expect(await c.line()).toBe('500 5.5.1 Unknown command');
    expect(await c.line()).toMatch(/^421 4\.7\.0 /);
    await c.closed;
  });

  it('stops reading from a client that pipelines without reading the replies', async () => {
    c.close();
    const n = 1_000_000;
    const reply = '250 2.0.0 OK\r\n';
    // A proxy of its own with a long timeout, so waiting here cannot end the connection.
    const patient = await startProxy({
      listeners: [{ protocol: 'lmtp' }],
      lookup: { redis: { url: world.redis!.url } },
      lmtp: { timeout_ms: 60_000 },
    });
    const s = net.connect(patient.ports.lmtp!, '127.0.0.1');
    await new Promise((r) => s.once('connect', r));
    s.pause(); // we read nothing until told
    s.write('NOOP\r\n'.repeat(n));
    // 14 MB of replies do not fit in the kernel's socket buffers: the proxy must stop reading
    // once they back up, so part of our 6 MB stays unsent on our side for good. (A proxy that
    // kept reading would answer all 1M NOOPs into its memory in about 4 s.)
    let last = -1;
    for (let stable = 0, t = 0; stable < 5 && t < 100; t++) {
      await new Promise((r) => setTimeout(r, 200));
      stable = s.writableLength === last ? stable + 1 : 0;
      last = s.writableLength;
    }
    expect(s.writableLength).toBeGreaterThan(0);
    let received = '';
    let bytes = 0;
    const all = new Promise<void>((resolve) =>
      s.on('data', (d: Buffer) => {
        bytes += d.length;
        if (received.length < 200) received += d.toString('latin1');
        if (bytes >= received.indexOf('\r\n') + 2 + n * reply.length) resolve();
      }),
    );
    s.resume();
    await all;
    expect(received).toMatch(/^220 [^\r]*\r\n250 2\.0\.0 OK\r\n250 2\.0\.0 OK/);
    s.destroy();
    await patient.close();
  }, 60_000);

  it('closes an idle connection with 421 after timeout_ms', async () => {
    const started = Date.now();
    expect(await c.line(10_000)).toMatch(/^421 4\.4\.2 /);
    expect(Date.now() - started).toBeGreaterThan(2500);
    await c.closed;
  });

  it('drops a message whose client goes away mid-DATA: nothing is delivered', async () => {
    const { subject } = message();
    c.write('LHLO t\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n');
    await c.reply();
    for (let i = 0; i < 2; i++) await c.line();
    expect(await c.line()).toMatch(/^354/);
    c.write(`Subject: ${subject}\r\n\r\nhalf a message\r\n`);
    const aliceLegs = () => proxy.server.ctx.registry.sessionsOf('user', 'alice@example.com').filter((s) => s.protocol === 'lmtp').length;
    // The backend leg is open (registered) before the client goes away...
    await expect.poll(aliceLegs).toBeGreaterThan(0);
    const open = lmtpTotals.connections;
    c.socket.destroy();
    // ...and the proxy has seen the client go and given up the leg before we look.
    await expect.poll(() => lmtpTotals.connections).toBeLessThan(open);
    await expect.poll(aliceLegs).toBe(0);
    expect(await copies(world.slotA, 'alice@example.com', subject)).toHaveLength(0);
  });

  it('shuts down gracefully: idle connections hear 421, a message under way is finished first', async () => {
    const other = await startProxy({ listeners: [{ protocol: 'lmtp' }], lookup: { redis: { url: world.redis!.url } } });
    // Until its Redis connection is up a fresh proxy answers 451 (rightly): wait for it.
    for (let i = 0; i < 100 && !other.server.router.stats.live; i++) await new Promise((r) => setTimeout(r, 50));
    const t = { host: '127.0.0.1', port: other.ports.lmtp! };
    const idle = await openLmtp(t);
    const busy = await openLmtp(t);
    await idle.line();
    await busy.line();
    idle.send('LHLO t');
    await idle.reply();
    const { subject, body } = message();
    busy.write('LHLO t\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n');
    await busy.reply();
    for (let i = 0; i < 2; i++) expect(await busy.line()).toMatch(/^250 /);
    expect(await busy.line()).toMatch(/^354 /);
    const wire = wireBody(body);
    busy.write(wire.slice(0, 20));
    const closing = other.close();
    expect(await idle.line()).toMatch(/^421 4\.3\.2 /);
    busy.write(wire.slice(20));
    expect(await busy.line()).toMatch(/^250 2\.0\.0 <bob@example\.com>/);
    expect(await busy.line()).toMatch(/^421 4\.3\.2 /);
    await closing;
    idle.close();
    busy.close();
    expect(await copies(world.slotB, 'bob@example.com', subject)).toHaveLength(1);
  });

  it('counts what it did, and shows it in /metrics', async () => {
    expect(lmtpTotals.rcpt.accepted).toBeGreaterThan(10);
    expect(lmtpTotals.rcpt.unknown).toBeGreaterThan(0);
    expect(lmtpTotals.rcpt.locked).toBeGreaterThan(0);
    expect(lmtpTotals.delivery.delivered).toBeGreaterThan(10);
    expect(lmtpTotals.delivery.deferred).toBeGreaterThan(0);
    expect(lmtpTotals.delivery.rejected).toBeGreaterThan(0);
    // The login counters see the same RCPT outcomes (lmtpTotals is process-wide, and the
    // shutdown test ran a second proxy, hence <=).
    expect(proxy.server.ctx.counters.logins.lmtp.ok).toBeGreaterThan(10);
    expect(proxy.server.ctx.counters.logins.lmtp.ok).toBeLessThanOrEqual(lmtpTotals.rcpt.accepted);
    expect(proxy.server.ctx.counters.logins.lmtp['auth-failed']).toBeGreaterThan(0);
    const text = await createMetrics(proxy.server.ctx).metrics();
    expect(text).toMatch(/^mailsplice_lmtp_rcpt_total\{result="accepted"\} [1-9]\d*$/m);
    expect(text).toMatch(/^mailsplice_lmtp_deliveries_total\{result="deferred"\} [1-9]\d*$/m);
    expect(text).toMatch(/^mailsplice_lmtp_backend_failures_total [1-9]\d*$/m);
  });
});
