import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startPostfix, type PostfixInstance } from './harness/postfix.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile, type RouteModel } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Real Postfix in front of mailsplice in front of real Dovecot: what production looks like.
// Routes come from the embedded YAML file this time (the Redis path is covered elsewhere).

const execFileP = promisify(execFile);

let world: World;
let proxy: TestProxy;
let postfix: PostfixInstance;
let routesFile: string;
let routes: RouteModel;
let seq = 0;

beforeAll(async () => {
  world = await startWorld();
  routes = worldRoutes(world);
  routesFile = join(tempDir('routes'), 'routes.yaml');
  writeRoutesFile(routesFile, routes);
  proxy = await startProxy({ listeners: [{ protocol: 'lmtp' }], lookup: { file: routesFile } });
  postfix = await startPostfix({ lmtp: `inet:127.0.0.1:${proxy.ports.lmtp}` });
});

afterAll(async () => {
  await postfix?.stop();
  await proxy?.close();
  await world?.stop();
});

/** Submits a message to Postfix's smtpd with swaks; returns its Subject and queue id. */
async function submit(from: string, to: string[]): Promise<{ subject: string; queueId: string }> {
  const subject = `postfix-test-${process.pid}-${++seq}`;
  const { stdout } = await execFileP(
    'swaks',
    ['--server', '127.0.0.1', '--port', String(postfix.smtpPort), '--from', from, '--to', to.join(','), '--header', `Subject: ${subject}`, '--body', `body of ${subject}`],
    { timeout: 30_000 },
  );
  const queueId = /250 2\.0\.0 Ok: queued as ([0-9A-F]+)/.exec(stdout)?.[1];
  if (!queueId) throw new Error(`postfix did not queue the message:\n${stdout}`);
  return { subject, queueId };
}

async function has(slot: World['slotA'], user: string, needle: string): Promise<number> {
  return (await slot.messages(user)).filter((m) => m.includes(needle)).length;
}

async function until(what: string, probe: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\n${(await postfix.log()).split('\n').slice(-20).join('\n')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function setRoutes(change: (m: RouteModel) => void, settled: () => Promise<boolean>): Promise<void> {
  change(routes);
  writeRoutesFile(routesFile, routes);
  await until('the route change to reach the proxy', settled, 10_000);
}

describe('Postfix -> mailsplice -> Dovecot', () => {
  it('delivers each recipient to its own store, and bounces the unknown one with 5.1.1', async () => {
    const { subject, queueId } = await submit('carol@example.com', ['alice@example.com', 'bob@example.com', 'nobody@example.com']);
    const log = await postfix.waitForLog(new RegExp(`${queueId}: removed`));
    expect(log).toMatch(new RegExp(`${queueId}: to=<alice@example.com>, relay=127\\.0\\.0\\.1\\[127\\.0\\.0\\.1\\]:\\d+, .*dsn=2\\.0\\.0, status=sent \\(250 2\\.0\\.0 <alice@example.com>`));
    expect(log).toMatch(new RegExp(`${queueId}: to=<bob@example.com>, .*status=sent \\(250 2\\.0\\.0 <bob@example.com>`));
    expect(log).toMatch(new RegExp(`${queueId}: to=<nobody@example.com>, .*dsn=5\\.1\\.1, status=bounced .*550 5\\.1\\.1 <nobody@example.com> User unknown`));
    expect(await has(world.slotA, 'alice@example.com', `Subject: ${subject}\n`)).toBe(1);
    expect(await has(world.slotB, 'bob@example.com', `Subject: ${subject}\n`)).toBe(1);
    // The bounce went back to the sender, through mailsplice, into carol's mailbox.
    await until('the bounce to reach carol', async () => (await has(world.slotA, 'carol@example.com', 'nobody@example.com')) > 0);
    const [bounce] = (await world.slotA.messages('carol@example.com')).filter((m) => m.includes('nobody@example.com'));
    expect(bounce).toMatch(/Undelivered Mail Returned to Sender/);
    expect(bounce).toContain(`Subject: ${subject}`);
  });

  it('keeps the message queued while the backend is down, and delivers it after flush once it is back', async () => {
    await world.slotB.stop();
    let subject: string;
    let queueId: string;
    try {
      ({ subject, queueId } = await submit('sender@example.com', ['bob@example.com', 'alice@example.com']));
      const log = await postfix.waitForLog(new RegExp(`${queueId}: to=<bob@example.com>, .*status=deferred`));
      expect(log).toMatch(new RegExp(`${queueId}: to=<bob@example.com>, .*dsn=4\\.4\\.1, status=deferred \\(host 127\\.0\\.0\\.1\\[127\\.0\\.0\\.1\\] said: 451 4\\.4\\.1 <bob@example.com> Mail store not reachable`));
      // alice's store was fine: she has it already, from the same transaction.
      expect(log).toMatch(new RegExp(`${queueId}: to=<alice@example.com>, .*status=sent`));
      expect(await has(world.slotA, 'alice@example.com', `Subject: ${subject}\n`)).toBe(1);
      expect(await postfix.queueIds()).toEqual([queueId]);
    } finally {
      await world.slotB.start();
    }
    await postfix.flush();
    await postfix.waitForLog(new RegExp(`${queueId}: to=<bob@example.com>, .*status=sent`));
    await postfix.waitForLog(new RegExp(`${queueId}: removed`));
    expect(await has(world.slotB, 'bob@example.com', `Subject: ${subject}\n`)).toBe(1);
    // Delivered once each: the retry went to bob only.
    expect(await has(world.slotA, 'alice@example.com', `Subject: ${subject}\n`)).toBe(1);
    expect(await postfix.queueIds()).toEqual([]);
  });

  it('defers while a mailbox is locked for maintenance, delivers after it is unlocked', async () => {
    const router = proxy.server.router;
    const locked = async () => router.resolve('alice@example.com').then(() => false, () => true);
    await setRoutes((m) => (m.users['alice@example.com']!.status = 'locked'), locked);
    let subject: string;
    let queueId: string;
    try {
      ({ subject, queueId } = await submit('sender@example.com', ['alice@example.com']));
      await postfix.waitForLog(new RegExp(`${queueId}: to=<alice@example.com>, .*dsn=4\\.2\\.1, status=deferred .*451 4\\.2\\.1 <alice@example.com> Mailbox temporarily locked`));
      expect(await has(world.slotA, 'alice@example.com', `Subject: ${subject}\n`)).toBe(0);
    } finally {
      await setRoutes((m) => (m.users['alice@example.com']!.status = 'active'), async () => !(await locked()));
    }
    await postfix.flush();
    await postfix.waitForLog(new RegExp(`${queueId}: removed`));
    expect(await has(world.slotA, 'alice@example.com', `Subject: ${subject}\n`)).toBe(1);
    expect(await postfix.queueIds()).toEqual([]);
  });
});
