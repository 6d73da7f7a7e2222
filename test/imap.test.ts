import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { ImapFlow } from 'imapflow';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { imapSubjects } from './harness/clients.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { startWorld, type World } from './harness/world.js';
import { changeInRedis, seedRedis, worldRoutes } from './support/routes.js';
import { startProxy, type TestProxy } from './support/proxy.js';

const execFileP = promisify(execFile);

let world: World;
let proxy: TestProxy;

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  proxy = await startProxy({
    listeners: [{ protocol: 'imap' }],
    lookup: { redis: { url: world.redis!.url }, max_stale_ms: 0 },
    // No failure delay: these tests fail logins on purpose, under a 2 s login deadline.
    limits: { login_timeout_ms: 2000, bad_commands: 3, literal_size: 1024, line_length: 1024, auth_failures: 2, auth_failure_delay_ms: 0 },
  });
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

/** Subjects of INBOX as imapflow sees them through the proxy. */
async function subjectsVia(port: number, user: string, pass: string): Promise<string[]> {
  const client = new ImapFlow({ host: '127.0.0.1', port, secure: false, auth: { user, pass }, logger: false });
  await client.connect();
  try {
    await client.mailboxOpen('INBOX', { readOnly: true });
    const out: string[] = [];
    for await (const m of client.fetch('1:*', { envelope: true })) out.push(m.envelope?.subject ?? '');
    return out;
  } finally {
    await client.logout();
  }
}

async function raw(): Promise<LineClient> {
  const c = await connectLines({ host: '127.0.0.1', port: proxy.ports.imap! });
  const greeting = await c.readLine();
  expect(greeting).toMatch(/^\* OK \[CAPABILITY .*IMAP4rev1.*\]/);
  return c;
}

describe('routing', () => {
  it('sends each user to the master slot of their store', async () => {
    expect(await subjectsVia(proxy.ports.imap!, 'alice@example.com', 'alicepw')).toEqual(['on slotA']);
    expect(await subjectsVia(proxy.ports.imap!, 'bob@example.com', 'bobpw')).toEqual(['on slotB']);
  });

  it('matches logins case-insensitively', async () => {
    expect(await subjectsVia(proxy.ports.imap!, 'Carol@Example.COM', 'carolpw')).toEqual(['on slotA']);
  });

  it('follows a master change published in Redis', async () => {
    const url = world.redis!.url;
    await changeInRedis(url, 'store', 'store2', { master: 'slotA', epoch: '2' });
    try {
      await expect.poll(() => subjectsVia(proxy.ports.imap!, 'bob@example.com', 'bobpw'), { timeout: 5000 }).toEqual(['on slotA']);
    } finally {
      await changeInRedis(url, 'store', 'store2', { master: 'slotB', epoch: '3' });
    }
    await expect.poll(() => subjectsVia(proxy.ports.imap!, 'bob@example.com', 'bobpw'), { timeout: 5000 }).toEqual(['on slotB']);
  });

  it('works for Python imaplib, an independent client', async () => {
    expect(await imapSubjects({ host: '127.0.0.1', port: proxy.ports.imap!, user: 'bob@example.com', password: 'bobpw' })).toEqual(['on slotB']);
  });

  it('works for curl', async () => {
    const { stdout } = await execFileP('curl', ['-s', '--max-time', '20', '--user', 'alice@example.com:alicepw', `imap://127.0.0.1:${proxy.ports.imap}/INBOX;UID=1;SECTION=HEADER.FIELDS%20(SUBJECT)`]);
    expect(stdout).toContain('Subject: on slotA');
  });
});

describe('pre-auth dialogue', () => {
  it('answers CAPABILITY, NOOP, ID and LOGOUT itself', async () => {
    const c = await raw();
    c.send('a1 CAPABILITY');
    const caps = await c.readUntil(/^a1 /);
    expect(caps[0]).toMatch(/^\* CAPABILITY IMAP4rev1 .*AUTH=PLAIN/);
    expect(caps[1]).toMatch(/^a1 OK/);
    c.send('a2 NOOP');
    expect(await c.readLine()).toMatch(/^a2 OK/);
    c.send('a3 ID ("name" "test" "version" NIL)');
    expect(await c.readUntil(/^a3 /)).toEqual(['* ID ("name" "mailsplice")', 'a3 OK ID completed']);
    c.send('a4 LOGOUT');
    expect(await c.readUntil(/^a4 /)).toEqual(['* BYE Logging out', 'a4 OK Logout completed']);
    c.close();
  });

  it('logs in with a synchronising literal password', async () => {
    const c = await raw();
    c.send('a1 LOGIN alice@example.com {7}');
    expect(await c.readLine()).toMatch(/^\+ /);
    c.send('alicepw');
    const lines = await c.readUntil(/^a1 /);
    expect(lines.at(-1)).toMatch(/^a1 OK \[CAPABILITY .*\] /);
    // Now spliced to Dovecot: its answers come through.
    c.send('a2 SELECT INBOX');
    expect((await c.readUntil(/^a2 /)).at(-1)).toMatch(/^a2 OK \[READ-WRITE\]/);
    c.close();
  });

  it('logs in with LITERAL+ literals for both arguments', async () => {
    const c = await raw();
    c.write('a1 LOGIN {17+}\r\nalice@example.com {7+}\r\nalicepw\r\n');
    expect((await c.readUntil(/^a1 /)).at(-1)).toMatch(/^a1 OK /);
    c.close();
  });

  it('logs in with quoted strings carrying escapes', async () => {
    const c = await raw();
    c.send('a1 LOGIN "alice@example.com" "alicepw"');
    expect((await c.readUntil(/^a1 /)).at(-1)).toMatch(/^a1 OK /);
    c.close();
  });

  it('authenticates PLAIN with SASL-IR and with a continuation, and can be cancelled', async () => {
    const plain = Buffer.from('\0alice@example.com\0alicepw').toString('base64');
    const c = await raw();
    c.send(`a1 AUTHENTICATE PLAIN ${plain}`);
    expect((await c.readUntil(/^a1 /)).at(-1)).toMatch(/^a1 OK /);
    c.close();

    const d = await raw();
    d.send('b1 AUTHENTICATE PLAIN');
    expect(await d.readLine()).toBe('+ ');
    d.send('*');
    expect(await d.readLine()).toMatch(/^b1 BAD /);
    d.send('b2 AUTHENTICATE PLAIN');
    expect(await d.readLine()).toBe('+ ');
    d.send(Buffer.from('\0bob@example.com\0bobpw').toString('base64'));
    expect((await d.readUntil(/^b2 /)).at(-1)).toMatch(/^b2 OK /);
    d.send('b3 SELECT INBOX');
    await d.readUntil(/^b3 OK/);
    d.close();
  });

  it('refuses a wrong password and an unknown user alike', async () => {
    const c = await raw();
    c.send('a1 LOGIN alice@example.com wrong');
    expect(await c.readLine()).toBe('a1 NO [AUTHENTICATIONFAILED] Authentication failed');
    c.send('a2 LOGIN nobody@example.com whatever');
    expect(await c.readLine()).toBe('a2 NO [AUTHENTICATIONFAILED] Authentication failed');
    // auth_failures: 2 -> the connection is closed after the second failure
    expect(await c.readLine()).toMatch(/^\* BYE /);
    c.close();
  });

  it('says UNAVAILABLE for a locked user', async () => {
    const c = await raw();
    c.send('a1 LOGIN locked@example.com lockedpw');
    expect(await c.readLine()).toMatch(/^a1 NO \[UNAVAILABLE\] /);
    c.close();
  });

  it('answers BAD to commands not valid before login, and closes after too many', async () => {
    const c = await raw();
    c.send('a1 SELECT INBOX');
    expect(await c.readLine()).toBe('a1 BAD Command not valid before login');
    c.send('garbage');
    expect(await c.readLine()).toBe('garbage BAD Missing command');
    c.send('a3 FROB');
    // bad_commands: 3 -> the third one is answered and the connection ends
    expect(await c.readLine()).toBe('a3 BAD Command not valid before login');
    expect(await c.readLine()).toBe('* BYE [LIMIT] Too many invalid commands');
    await expect(c.readLine()).rejects.toThrow(/closed/);
  });
});

describe('limits', () => {
  it('ends a connection whose line is too long', async () => {
    const c = await raw();
    c.write(`a1 LOGIN ${'x'.repeat(5000)}`);
    expect(await c.readLine()).toBe('* BYE [LIMIT] Line too long');
    await expect(c.readLine()).rejects.toThrow();
  });

  it('refuses a literal above the limit', async () => {
    const c = await raw();
    c.send('a1 LOGIN {5000}');
    expect(await c.readLine()).toBe('a1 BAD [LIMIT] Literal too large');
    c.send('a2 NOOP');
    expect(await c.readLine()).toMatch(/^a2 OK/);
    c.write('a3 LOGIN {5000+}\r\n');
    expect(await c.readUntil(/^\* BYE/)).toContain('a3 BAD [LIMIT] Literal too large');
    c.close();
  });

  it('ends a connection that does not log in in time', async () => {
    const c = await raw();
    expect(await c.readLine(5000)).toMatch(/^\* BYE .*login took too long/);
    c.close();
  });
});

describe('when things are down', () => {
  it('says UNAVAILABLE when the backend is down', async () => {
    await world.slotB.stop();
    try {
      const c = await raw();
      c.send('a1 LOGIN bob@example.com bobpw');
      expect(await c.readLine()).toMatch(/^a1 NO \[UNAVAILABLE\] /);
      c.close();
    } finally {
      await world.slotB.start();
    }
  });

  it('says UNAVAILABLE when Redis is down, and recovers when it is back', async () => {
    await world.redis!.stop();
    try {
      const c = await raw();
      c.send('a1 LOGIN alice@example.com alicepw');
      expect(await c.readLine()).toMatch(/^a1 NO \[UNAVAILABLE\] /);
      c.close();
    } finally {
      await world.redis!.start();
    }
    await seedRedis(world.redis!.url, worldRoutes(world)); // the harness' Redis keeps no data
    await expect.poll(() => subjectsVia(proxy.ports.imap!, 'alice@example.com', 'alicepw').catch(() => []), { timeout: 10_000 }).toEqual(['on slotA']);
  });
});
