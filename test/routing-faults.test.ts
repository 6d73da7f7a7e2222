import net from 'node:net';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { parseConfig } from '../src/config.js';
import { createLogger } from '../src/log.js';
import { createMetrics } from '../src/metrics.js';
import type { Route } from '../src/lookup/model.js';
import { startServer, type RunningServer } from '../src/server.js';
import { lmtpSend } from './harness/clients.js';
import { startHoldRelay, type HoldRelay } from './harness/hold-relay.js';
import { freePort } from './harness/ports.js';
import { startWorld, type World } from './harness/world.js';
import { changeInRedis, seedRedis, worldRoutes } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Routing under faults (issue 13), against real Dovecot and Redis: a login that races a
// failover, clients that leave during the backend login, a BYE that must not land inside a
// literal, half-closed sessions, and a slot that points back at the proxy. slotA is reached
// through a relay that can hold the login or stop a response at a line end.

let world: World;
let server: RunningServer;
let imapPort: number;
let pop3Port: number;
let lmtpPort: number;
let relayImap: HoldRelay;
let relayPop3: HoldRelay;
const logLines: string[] = [];
let epoch = 1;

beforeAll(async () => {
  world = await startWorld({ redis: true });
  relayImap = await startHoldRelay({ host: world.slotA.host, port: world.slotA.imap });
  relayPop3 = await startHoldRelay({ host: world.slotA.host, port: world.slotA.pop3 });
  imapPort = await freePort('127.0.0.1');
  pop3Port = await freePort('127.0.0.1');
  lmtpPort = await freePort('127.0.0.1');
  const routes = worldRoutes(world);
  routes.slots.slotA = { host: '127.0.0.1', imap: String(relayImap.port), pop3: String(relayPop3.port), status: 'up' };
  // A slot record that points back at the proxy's own listeners.
  routes.slots.slotLoop = { host: '127.0.0.1', imap: String(imapPort), pop3: String(pop3Port), lmtp: String(lmtpPort), status: 'up' };
  routes.stores.store3 = { master: 'slotLoop', replicas: '', status: 'active', epoch: '1' };
  routes.users['loop@example.com'] = { store: 'store3' };
  await seedRedis(world.redis!.url, routes);
  const cfg = parseConfig(
    {
      listeners: [
        { protocol: 'imap', address: '127.0.0.1', port: imapPort },
        { protocol: 'pop3', address: '127.0.0.1', port: pop3Port },
        { protocol: 'lmtp', address: '127.0.0.1', port: lmtpPort },
      ],
      lookup: { redis: { url: world.redis!.url } },
      limits: { half_close_timeout_ms: 300, connections_per_ip: 100 },
    },
    'test config',
    tempDir('faults'),
  );
  server = await startServer(cfg, createLogger('info', (l) => void logLines.push(l)));
});

afterAll(async () => {
  await server?.close();
  await relayImap?.close();
  await relayPop3?.close();
  await world?.stop();
});

/** Points store1 at `slot` (epoch raised) and waits until the proxy has applied it. */
async function setMaster(slot: 'slotA' | 'slotB', status = 'active'): Promise<void> {
  const before = server.router.stats.events;
  epoch++;
  await changeInRedis(world.redis!.url, 'store', 'store1', { master: slot, replicas: slot === 'slotA' ? 'slotB' : 'slotA', status, epoch: String(epoch) });
  await expect.poll(() => server.router.stats.events, { timeout: 10_000 }).toBeGreaterThan(before);
}

beforeEach(async () => {
  relayImap.release();
  relayPop3.release();
  relayImap.stallAtLineEnd(Infinity);
  await setMaster('slotA');
});

/** A raw client that keeps every byte it was sent, and knows when the server ended. */
class Raw {
  readonly sock: net.Socket;
  buf = Buffer.alloc(0);
  ended = false;
  closed = false;
  private constructor(sock: net.Socket) {
    this.sock = sock;
    sock.on('data', (d: Buffer) => (this.buf = Buffer.concat([this.buf, d])));
    sock.on('end', () => (this.ended = true));
    sock.on('close', () => (this.closed = true));
    sock.on('error', () => undefined);
  }
  static connect(port: number): Promise<Raw> {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: '127.0.0.1', port, allowHalfOpen: true });
      sock.once('connect', () => resolve(new Raw(sock)));
      sock.once('error', reject);
    });
  }
  get text(): string {
    return this.buf.toString('latin1');
  }
  async until(re: RegExp, timeout = 15_000): Promise<void> {
    await expect.poll(() => re.test(this.text), { timeout }).toBe(true);
  }
  write(s: string): void {
    this.sock.write(s);
  }
}

const routeOnA = (login: string): Route => ({
  login,
  backendLogin: login,
  store: 'store1',
  slot: 'slotA',
  host: '127.0.0.1',
  ports: { imap: relayImap.port, pop3: relayPop3.port },
});

describe('a login that races a failover', () => {
  it('IMAP: logs in again on the new master; nothing the client pipelined reaches the old one', async () => {
    const msg = `Subject: race ${Date.now()}\r\n\r\nraced\r\n`;
    const onA = (await world.slotA.messages('alice@example.com')).length;
    const ended = server.ctx.registry.endedByEvents;
    relayImap.hold(/AUTHENTICATE|LOGIN/);
    const c = await Raw.connect(imapPort);
    await c.until(/^\* OK/);
    c.write(`a1 LOGIN alice@example.com alicepw\r\na2 APPEND INBOX {${msg.length}+}\r\n${msg}\r\na3 NOOP\r\n`);
    await expect.poll(() => relayImap.holding, { timeout: 10_000 }).toBe(1);
    await setMaster('slotB');
    expect(server.router.stillValid(routeOnA('alice@example.com'), 'imap')).toBe(false);
    relayImap.release();
    await c.until(/\r\na3 (OK|NO|BAD)/);
    expect(c.text).toMatch(/\r\na1 OK /);
    expect(c.text).toMatch(/\r\na2 OK /);
    expect(c.text).toMatch(/\r\na3 OK /);
    expect(c.text).not.toContain('* BYE');
    // The APPEND went to the new master only; the old backend session was logged out.
    expect((await world.slotB.messages('alice@example.com')).some((m) => m.includes(msg.split('\r\n')[0]!))).toBe(true);
    expect((await world.slotA.messages('alice@example.com')).length).toBe(onA);
    await expect.poll(() => relayImap.connections, { timeout: 10_000 }).toBe(0);
    // The abandoned login counts as a session ended by an event.
    expect(server.ctx.registry.endedByEvents).toBe(ended + 1);
    expect(await metricValue('mailsplice_sessions_ended_by_events_total')).toBe(ended + 1);
    expect(logLines.some((l) => l.includes('"route changed during login"'))).toBe(true);
    c.sock.destroy();
  });

  it('IMAP: a store locked during the login gets NO [UNAVAILABLE], and the pipelined APPEND reaches no one', async () => {
    const msg = `Subject: locked race ${Date.now()}\r\n\r\nraced\r\n`;
    const onA = (await world.slotA.messages('alice@example.com')).length;
    const onB = (await world.slotB.messages('alice@example.com')).length;
    relayImap.hold(/AUTHENTICATE|LOGIN/);
    const c = await Raw.connect(imapPort);
    await c.until(/^\* OK/);
    c.write(`a1 LOGIN alice@example.com alicepw\r\na2 APPEND INBOX {${msg.length}+}\r\n${msg}\r\na3 NOOP\r\n`);
    await expect.poll(() => relayImap.holding, { timeout: 10_000 }).toBe(1);
    await setMaster('slotA', 'locked');
    relayImap.release();
    await c.until(/\r\na3 /);
    expect(c.text).toMatch(/\r\na1 NO \[UNAVAILABLE\] /);
    expect(c.text).not.toMatch(/a1 OK|a2 OK/);
    await expect.poll(() => relayImap.connections, { timeout: 10_000 }).toBe(0);
    expect((await world.slotA.messages('alice@example.com')).length).toBe(onA);
    expect((await world.slotB.messages('alice@example.com')).length).toBe(onB);
    c.sock.destroy();
  });

  it('POP3: logs in again on the new master; the pipelined DELE and QUIT act there only', async () => {
    await world.slotA.deliver('carol@example.com', 'Subject: pop race\r\n\r\nx\r\n');
    await world.slotB.deliver('carol@example.com', 'Subject: pop race\r\n\r\nx\r\n');
    const onA = (await world.slotA.messages('carol@example.com')).length;
    const onB = (await world.slotB.messages('carol@example.com')).length;
    relayPop3.hold(/AUTH|PASS/);
    const c = await Raw.connect(pop3Port);
    await c.until(/^\+OK/);
    c.write('USER carol@example.com\r\nPASS carolpw\r\nDELE 1\r\nQUIT\r\n');
    await expect.poll(() => relayPop3.holding, { timeout: 10_000 }).toBe(1);
    await setMaster('slotB');
    relayPop3.release();
    await expect.poll(() => c.ended, { timeout: 15_000 }).toBe(true);
    // USER, PASS (the new master's +OK), DELE, QUIT: four +OK after the greeting, no error.
    expect(c.text.match(/^\+OK/gm)?.length).toBe(5);
    expect(c.text).not.toContain('-ERR');
    await expect.poll(async () => (await world.slotB.messages('carol@example.com')).length, { timeout: 10_000 }).toBe(onB - 1);
    expect((await world.slotA.messages('carol@example.com')).length).toBe(onA);
    await expect.poll(() => relayPop3.connections, { timeout: 10_000 }).toBe(0);
    c.sock.destroy();
  });
});

describe('a client that leaves during the backend login', () => {
  it('leaves no backend session behind, whether it half-closed or closed', async () => {
    relayImap.hold(/AUTHENTICATE|LOGIN/);
    const clients: Raw[] = [];
    for (let i = 0; i < 10; i++) {
      const c = await Raw.connect(imapPort);
      await c.until(/^\* OK/);
      c.write('a LOGIN alice@example.com alicepw\r\n');
      if (i % 2 === 0) c.sock.end(); // shutdown(SHUT_WR)
      else c.sock.destroy();
      clients.push(c);
    }
    await expect.poll(() => relayImap.holding, { timeout: 10_000 }).toBe(10);
    relayImap.release();
    // Every backend connection is closed: none stays logged in on the slot.
    await expect.poll(() => relayImap.connections, { timeout: 10_000 }).toBe(0);
    // The half-closed ones were still told their login worked, and then saw the end.
    for (const c of clients.filter((_, i) => i % 2 === 0)) {
      await expect.poll(() => c.ended, { timeout: 10_000 }).toBe(true);
      expect(c.text).toMatch(/\r\na OK /);
    }
    // A session leaves the registry when its last socket closes, which may come a moment
    // after the client saw its end: waited for, not sampled.
    await expect.poll(() => server.ctx.registry.size, { timeout: 10_000 }).toBe(0);
  });

  it('still answers a pipelined LOGOUT after a half-close', async () => {
    relayImap.hold(/AUTHENTICATE|LOGIN/);
    const c = await Raw.connect(imapPort);
    await c.until(/^\* OK/);
    c.write('a LOGIN alice@example.com alicepw\r\nb LOGOUT\r\n');
    c.sock.end();
    await expect.poll(() => relayImap.holding, { timeout: 10_000 }).toBe(1);
    relayImap.release();
    await expect.poll(() => c.ended, { timeout: 10_000 }).toBe(true);
    expect(c.text).toMatch(/\r\na OK [^\r]*\r\n\* BYE [^\r]*\r\nb OK /);
    await expect.poll(() => relayImap.connections, { timeout: 10_000 }).toBe(0);
  });
});

describe('an event during a literal', () => {
  it('closes without a BYE when the client has half a message; the BYE never lands in the data', async () => {
    // Short lines, so that any cut falls at a line end inside the literal.
    const lines = ['From: big@example.net', 'Subject: big', ''];
    for (let i = 0; lines.length < 40_000; i++) lines.push(`line ${i}`);
    const body = lines.join('\r\n') + '\r\n';
    await world.slotA.deliver('alice@example.com', body, 'Big');
    const c = await Raw.connect(imapPort);
    await c.until(/^\* OK/);
    c.write('a LOGIN alice@example.com alicepw\r\nb SELECT Big\r\n');
    await c.until(/\r\nb OK/);
    const start = c.buf.length;
    relayImap.stallAtLineEnd(64 * 1024);
    c.write('f FETCH 1 BODY.PEEK[]\r\n');
    // The relay stopped just after a LF inside the literal, and the client has all of it.
    await expect.poll(() => relayImap.stalled && c.buf.length - start === relayImap.sentSinceStall, { timeout: 10_000 }).toBe(true);
    const got = c.buf.subarray(start).toString('latin1');
    const header = /\{(\d+)\}\r\n/.exec(got)!;
    expect(Number(header[1])).toBeGreaterThan(got.length); // well inside the literal
    expect(got.endsWith('\n')).toBe(true);
    await setMaster('slotB');
    await expect.poll(() => c.closed || c.ended, { timeout: 10_000 }).toBe(true);
    const after = c.buf.subarray(start).toString('latin1');
    expect(after.slice(header.index)).not.toContain('* BYE');
    c.sock.destroy();
  });

  it('says BYE when the event comes between responses', async () => {
    const c = await Raw.connect(imapPort);
    await c.until(/^\* OK/);
    c.write('a LOGIN alice@example.com alicepw\r\nb SELECT INBOX\r\n');
    await c.until(/\r\nb OK/);
    await setMaster('slotB');
    await c.until(/\r\n\* BYE \[UNAVAILABLE\] store moved/);
    c.sock.destroy();
  });
});

describe('a half-closed session', () => {
  it('is dropped after half_close_timeout_ms when the client never sends its FIN', async () => {
    const listener = server.proxies.find((p) => p.cfg.protocol === 'imap')!;
    await expect.poll(() => listener.connections, { timeout: 10_000 }).toBe(0);
    const c = await Raw.connect(imapPort);
    await c.until(/^\* OK/);
    c.write('a LOGIN alice@example.com alicepw\r\nb LOGOUT\r\n');
    await expect.poll(() => c.ended, { timeout: 10_000 }).toBe(true);
    expect(c.text).toMatch(/\r\nb OK /);
    expect(listener.connections).toBe(1); // our side is still open: the proxy holds it
    // The proxy lets the socket (and the client's per-IP slot) go.
    await expect.poll(() => listener.connections, { timeout: 10_000 }).toBe(0);
    expect(c.sock.writableEnded).toBe(false);
    c.sock.destroy();
  });
});

describe('a slot that points back at the proxy', () => {
  it('is refused as UNAVAILABLE with an error naming the slot, without nesting connections', async () => {
    const rejected = server.ctx.counters.rejectedConnections;
    const c = await Raw.connect(imapPort);
    await c.until(/^\* OK/);
    c.write('a LOGIN loop@example.com looppw\r\n');
    await c.until(/\r\na /);
    expect(c.text).toMatch(/\r\na NO \[UNAVAILABLE\] /);
    c.sock.destroy();
    const p = await Raw.connect(pop3Port);
    await p.until(/^\+OK/);
    p.write('USER loop@example.com\r\nPASS looppw\r\n');
    await p.until(/\r\n-ERR/);
    expect(p.text).toMatch(/\r\n-ERR \[SYS\/TEMP\] /);
    p.sock.destroy();
    const loops = logLines.filter((l) => l.includes('"routing loop: slot points at this proxy"'));
    expect(loops.some((l) => l.includes('"slot":"slotLoop"') && l.includes('"level":"error"') && l.includes('"protocol":"imap"'))).toBe(true);
    expect(loops.some((l) => l.includes('"protocol":"pop3"'))).toBe(true);
    expect(server.ctx.counters.rejectedConnections).toBe(rejected);
  });

  it('is refused for LMTP too: 451 after DATA, the message stays with the sender', async () => {
    const r = await lmtpSend('127.0.0.1', lmtpPort, ['loop@example.com'], 'Subject: loop\n\nx\n');
    expect(r.rcptReplies[0]).toMatch(/^250/);
    expect(r.dataReplies[0]).toMatch(/^451 /);
    expect(logLines.some((l) => l.includes('"routing loop: slot points at this proxy"') && l.includes('"protocol":"lmtp"') && l.includes('"slot":"slotLoop"'))).toBe(true);
  });
});

/** One counter's value as /metrics would show it. */
async function metricValue(name: string): Promise<number> {
  const text = await createMetrics(server.ctx).getSingleMetricAsString(name);
  return Number(/ (\S+)$/.exec(text.trim())?.[1]);
}
