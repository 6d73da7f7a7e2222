import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectLines, type LineClient } from './harness/lines.js';
import { freePort } from './harness/ports.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { changeInRedis, seedRedis, worldRoutes } from './support/routes.js';

// Staleness per protocol (issue 8): a slot change ends only the sessions whose own
// protocol's address changed. Real Dovecot slots, real Redis, events as a tool publishes them.

let world: World;
let proxy: TestProxy;

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  proxy = await startProxy({
    lookup: { redis: { url: world.redis!.url } },
    listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }],
  });
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

async function imapSession(): Promise<LineClient> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.imap! });
  await c.readLine();
  c.send('a LOGIN alice@example.com alicepw');
  expect((await c.readUntil(/^a /)).at(-1)).toMatch(/^a OK/);
  return c;
}

async function pop3Session(): Promise<LineClient> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.pop3! });
  await c.readLine();
  c.send('USER alice@example.com');
  expect(await c.readLine()).toMatch(/^\+OK/);
  c.send('PASS alicepw');
  expect(await c.readLine()).toMatch(/^\+OK/);
  return c;
}

/** The session still talks to its backend: a NOOP is answered. */
async function imapAlive(c: LineClient, tag: string): Promise<void> {
  c.send(`${tag} NOOP`);
  expect((await c.readUntil(new RegExp(`^${tag} `))).at(-1)).toMatch(new RegExp(`^${tag} OK`));
}

async function pop3Alive(c: LineClient): Promise<void> {
  c.send('NOOP');
  expect(await c.readLine()).toMatch(/^\+OK/);
}

/** Waits until this proxy's router has taken in slotA's new record (the event was seen). */
async function routerSees(check: (ports: Partial<Record<'imap' | 'pop3' | 'lmtp', number>>) => boolean): Promise<void> {
  const until = Date.now() + 10_000;
  for (;;) {
    const route = await proxy.server.router.resolve('alice@example.com');
    if (check(route.ports)) return;
    if (Date.now() > until) throw new Error(`router still has ${JSON.stringify(route.ports)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('staleness per protocol', () => {
  it('an LMTP-port change ends no IMAP or POP3 session; an IMAP-port change ends IMAP sessions only', async () => {
    const imap = await imapSession();
    const pop3 = await pop3Session();
    const endedBefore = proxy.server.ctx.registry.endedByEvents;

    const newLmtp = await freePort('127.0.0.11');
    await changeInRedis(world.redis!.url, 'slot', 'slotA', { lmtp: String(newLmtp) });
    await routerSees((p) => p.lmtp === newLmtp);
    expect(proxy.server.ctx.registry.endedByEvents).toBe(endedBefore);
    await imapAlive(imap, 'b');
    await pop3Alive(pop3);

    // The IMAP port moves (to a port nothing listens on): the IMAP session is told why and
    // ended; the POP3 session on the same slot goes on.
    const newImap = await freePort('127.0.0.11');
    await changeInRedis(world.redis!.url, 'slot', 'slotA', { imap: String(newImap) });
    const bye = await imap.readUntil(/^\* BYE/);
    expect(bye.at(-1)).toBe('* BYE [UNAVAILABLE] server address changed');
    expect(proxy.server.ctx.registry.endedByEvents).toBe(endedBefore + 1);
    await pop3Alive(pop3);

    // And the other way round: a POP3-port change leaves a new IMAP session alone.
    await changeInRedis(world.redis!.url, 'slot', 'slotA', { imap: String(world.slotA.imap) });
    await routerSees((p) => p.imap === world.slotA.imap);
    const imap2 = await imapSession();
    const newPop3 = await freePort('127.0.0.11');
    await changeInRedis(world.redis!.url, 'slot', 'slotA', { pop3: String(newPop3) });
    await expect(pop3.readLine()).rejects.toThrow(/closed/); // POP3 has no way to say why
    await imapAlive(imap2, 'c');
    expect(proxy.server.ctx.registry.endedByEvents).toBe(endedBefore + 2);
    imap.close();
    imap2.close();
    pop3.close();
    await changeInRedis(world.redis!.url, 'slot', 'slotA', { pop3: String(world.slotA.pop3), lmtp: String(world.slotA.lmtp) });
  });
});
