import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHoldRelay, type HoldRelay } from './harness/hold-relay.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { startLoginRelay, type LoginRelay } from './harness/login-relay.js';
import { lmtpSend } from './harness/clients.js';
import { freePort } from './harness/ports.js';
import { waitUntil } from './harness/proc.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Issue 10, login storms: after a failover a store's clients all log in to the new master in
// the same second. backend.logins_per_slot bounds the backend logins in progress per slot,
// with a short queue; past it the temporary error. Measured at the backend by a relay that
// counts connections between their connect and the backend's answer to the login.

let world: World;
beforeAll(async () => {
  world = await startWorld();
}, 60_000);
afterAll(async () => {
  await world?.stop();
});

/** Limits that let 2,000 logins from 127.0.0.1 through, so that only the slot bound acts. */
const OPEN_LIMITS = { connections_per_ip: 5000, concurrent_logins_per_ip: 5000, auth_failures_per_ip_per_minute: 100_000, auth_failure_delay_ms: 0 };

describe('a login storm on one slot', () => {
  let relay: LoginRelay;
  let proxy: TestProxy;
  let adminPort: number;
  const BOUND = 20;
  beforeAll(async () => {
    relay = await startLoginRelay({ host: world.slotA.host, port: world.slotA.imap });
    const routes = worldRoutes(world);
    routes.slots.slotA = { ...routes.slots.slotA!, host: relay.host, imap: String(relay.port) };
    const file = `${tempDir('storm')}/routes.yaml`;
    writeRoutesFile(file, routes);
    adminPort = await freePort('127.0.0.1');
    proxy = await startProxy({
      listeners: [{ protocol: 'imap' }],
      lookup: { file },
      limits: OPEN_LIMITS,
      backend: { logins_per_slot: BOUND, login_queue_per_slot: 200, login_queue_timeout_ms: 20_000 },
      admin: { port: adminPort },
    });
  }, 30_000);
  afterAll(async () => {
    await proxy?.close();
    await relay?.close();
  });

  it('keeps the backend within the bound; every login gets OK or the temporary error', { timeout: 180_000 }, async () => {
    const N = 2000;
    // Connected first (in batches, so the accept backlog is not the test), then every LOGIN at once.
    const clients: LineClient[] = [];
    try {
      for (let i = 0; i < N; i += 200) {
        const batch = await Promise.all(
          Array.from({ length: Math.min(200, N - i) }, async () => {
            const c = await connectLines({ host: '127.0.0.1', port: proxy.ports.imap!, timeoutMs: 30_000 });
            await c.readLine(30_000);
            return c;
          }),
        );
        clients.push(...batch);
      }
      for (const c of clients) c.send('a LOGIN alice@example.com alicepw');
      const replies = await Promise.all(
        clients.map(async (c) => {
          const lines = await c.readUntil(/^a /, 120_000);
          c.send('b LOGOUT');
          return lines.at(-1)!;
        }),
      );
      const ok = replies.filter((r) => /^a OK /.test(r)).length;
      const busy = replies.filter((r) => /^a NO \[UNAVAILABLE\] /.test(r)).length;
      expect(replies.filter((r) => !/^a OK /.test(r) && !/^a NO \[UNAVAILABLE\] /.test(r))).toEqual([]);
      expect(ok + busy).toBe(N);
      // The bound held at the backend, and was used: the storm did press on it.
      expect(relay.max).toBeLessThanOrEqual(BOUND);
      expect(relay.max).toBe(BOUND);
      expect(ok).toBeGreaterThanOrEqual(BOUND + 200); // the first places and the whole queue
      expect(busy).toBeGreaterThan(0);
      const refused = proxy.server.ctx.slotLogins.refused.get('slotA') ?? 0;
      expect(refused).toBe(busy);
      expect(proxy.server.ctx.slotLogins.queued.get('slotA')).toBeGreaterThanOrEqual(200);
      const metrics = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text();
      expect(metrics).toContain(`mailsplice_slot_logins_refused_total{slot="slotA"} ${busy}`);
      console.log(`login storm: ${N} simultaneous logins to one slot, at most ${relay.max} at the backend at once (bound ${BOUND}); ${ok} OK, ${busy} NO [UNAVAILABLE]`);
    } finally {
      for (const c of clients) c.close();
    }
  });
});

describe('past the queue, every protocol gets its temporary error', () => {
  let hold: HoldRelay;
  let proxy: TestProxy;
  beforeAll(async () => {
    hold = await startHoldRelay({ host: world.slotA.host, port: world.slotA.imap }, world.slotA.host);
    const routes = worldRoutes(world);
    // One slot: IMAP through the relay that holds logins, POP3 and LMTP straight to Dovecot.
    routes.slots.slotA = { ...routes.slots.slotA!, imap: String(hold.port) };
    const file = `${tempDir('storm')}/routes.yaml`;
    writeRoutesFile(file, routes);
    proxy = await startProxy({
      listeners: [{ protocol: 'imap', address: '127.0.0.1' }, { protocol: 'pop3' }, { protocol: 'lmtp' }],
      lookup: { file },
      limits: OPEN_LIMITS,
      backend: { logins_per_slot: 1, login_queue_per_slot: 0 },
    });
  }, 30_000);
  afterAll(async () => {
    hold?.release();
    await proxy?.close();
    await hold?.close();
  });

  it('IMAP NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP], LMTP 451 while the one place is taken', { timeout: 60_000 }, async () => {
    hold.hold(/LOGIN|AUTHENTICATE/i);
    const first = await connectLines({ host: '127.0.0.1', port: proxy.ports.imap! });
    try {
      await first.readLine();
      first.send('a LOGIN alice@example.com alicepw');
      await waitUntil(async () => hold.holding === 1, { what: 'the first login held at the backend' });
      expect(proxy.server.ctx.slotLogins.load('slotA')).toEqual({ active: 1, waiting: 0 });

      const second = await connectLines({ host: '127.0.0.1', port: proxy.ports.imap! });
      await second.readLine();
      second.send('a LOGIN carol@example.com carolpw');
      expect((await second.readUntil(/^a /)).at(-1)).toMatch(/^a NO \[UNAVAILABLE\] /);
      second.close();

      const pop = await connectLines({ host: '127.0.0.1', port: proxy.ports.pop3! });
      await pop.readLine();
      pop.send('USER carol@example.com');
      await pop.readLine();
      pop.send('PASS carolpw');
      expect(await pop.readLine()).toMatch(/^-ERR \[SYS\/TEMP\] /);
      pop.close();

      const r = await lmtpSend('127.0.0.1', proxy.ports.lmtp!, ['carol@example.com'], 'Subject: storm\r\n\r\nx\r\n');
      expect(r.dataReplies).toEqual([expect.stringMatching(/^451 4\.\d\.\d /)]);

      hold.release();
      expect((await first.readUntil(/^a /)).at(-1)).toMatch(/^a OK /);
    } finally {
      first.close();
    }
  });
});
