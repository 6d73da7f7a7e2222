import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectLines } from './harness/lines.js';
import { startWorld, type World } from './harness/world.js';
import { changeInRedis, seedRedis, worldRoutes } from './support/routes.js';
import { startProxy, type TestProxy } from './support/proxy.js';

// Issue 14 item 3: whether a user exists must not be readable from the answers to a login.
// Every failed login takes limits.auth_failure_delay_ms (default 2 s) from its start, and a
// lock is told only to someone whose password the backend accepted.

const DELAY = 2000;

let world: World;
let proxy: TestProxy;

beforeAll(async () => {
  world = await startWorld({ redis: true });
  const routes = worldRoutes(world);
  routes.users['ghost@example.com'] = { store: 'nostore' }; // a user whose store is not defined
  await seedRedis(world.redis!.url, routes);
  proxy = await startProxy({
    listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }],
    lookup: { redis: { url: world.redis!.url } },
    // The default failure delay (the support helper does not change it).
    limits: { auth_failures_per_ip_per_minute: 1000 },
  });
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

/** The answer to one IMAP LOGIN and how long it took from the command. */
async function imapLogin(user: string, pass: string): Promise<{ answer: string; ms: number }> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.imap!, timeoutMs: 15_000 });
  try {
    await c.readLine();
    const t = Date.now();
    c.send(`a LOGIN ${user} ${pass}`);
    const answer = (await c.readUntil(/^a /, 15_000)).at(-1)!;
    return { answer, ms: Date.now() - t };
  } finally {
    c.close();
  }
}

async function pop3Login(user: string, pass: string): Promise<{ answer: string; ms: number }> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.pop3!, timeoutMs: 15_000 });
  try {
    await c.readLine();
    c.send(`USER ${user}`);
    await c.readLine();
    const t = Date.now();
    c.send(`PASS ${pass}`);
    const answer = await c.readLine(15_000);
    return { answer, ms: Date.now() - t };
  } finally {
    c.close();
  }
}

describe('failed logins tell nothing about the user', () => {
  it('answers an unknown user, a wrong password and a locked account alike, after the failure delay (IMAP)', async () => {
    const tries = await Promise.all([
      imapLogin('nobody@example.com', 'whatever'),
      imapLogin('alice@example.com', 'wrong'),
      imapLogin('locked@example.com', 'wrong'),
    ]);
    for (const t of tries) {
      expect(t.answer).toBe('a NO [AUTHENTICATIONFAILED] Authentication failed');
      expect(t.ms).toBeGreaterThanOrEqual(DELAY);
    }
  });

  it('does the same for POP3', async () => {
    const tries = await Promise.all([pop3Login('nobody@example.com', 'whatever'), pop3Login('alice@example.com', 'wrong'), pop3Login('locked@example.com', 'wrong')]);
    for (const t of tries) {
      expect(t.answer).toBe('-ERR [AUTH] Authentication failed');
      expect(t.ms).toBeGreaterThanOrEqual(DELAY);
    }
  });

  it('tells a locked account so only with the right password, checked on its master slot', async () => {
    const right = await imapLogin('locked@example.com', 'lockedpw');
    expect(right.answer).toMatch(/^a NO \[UNAVAILABLE\] Account is under maintenance/);
    expect((await pop3Login('locked@example.com', 'lockedpw')).answer).toMatch(/^-ERR \[SYS\/TEMP\] Account is under maintenance/);
    // A locked STORE is the same: bob's store is locked while this runs.
    await changeInRedis(world.redis!.url, 'store', 'store2', { status: 'locked', epoch: '5' });
    try {
      await expect.poll(async () => (await imapLogin('bob@example.com', 'bobpw')).answer, { timeout: 10_000 }).toMatch(/Account is under maintenance/);
      expect((await imapLogin('bob@example.com', 'wrong')).answer).toBe('a NO [AUTHENTICATIONFAILED] Authentication failed');
    } finally {
      await changeInRedis(world.redis!.url, 'store', 'store2', { status: 'active', epoch: '6' });
    }
    await expect.poll(async () => (await imapLogin('bob@example.com', 'bobpw')).answer, { timeout: 10_000 }).toMatch(/^a OK /);
  });

  it('where nothing can check the password, answers UNAVAILABLE after the same delay', async () => {
    const t = await imapLogin('ghost@example.com', 'whatever');
    expect(t.answer).toMatch(/^a NO \[UNAVAILABLE\] Mail server temporarily unavailable/);
    expect(t.ms).toBeGreaterThanOrEqual(DELAY);
  });
});
