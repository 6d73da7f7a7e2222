import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FileSource } from '../src/lookup/file.js';
import { makeCA, makeCert, type CertFiles } from './harness/certs.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { startWorld, type World } from './harness/world.js';
import { worldRoutes, writeRoutesFile, type RouteModel } from './support/routes.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { tempDir } from './support/tmp.js';

// The IMAP front end on the embedded file lookup: STARTTLS, plaintext policy, connection
// limits, file edits, and a differential check against Dovecot spoken to directly.

let world: World;
let proxy: TestProxy;
let routesFile: string;
let routes: RouteModel;
let ca: CertFiles;

beforeAll(async () => {
  world = await startWorld();
  const dir = tempDir('imap');
  ca = await makeCA(join(dir, 'ca'));
  const cert = await makeCert(join(dir, 'cert'), { ca, cn: 'mail.example.test', altNames: ['mail.example.test', '127.0.0.1'] });
  routes = worldRoutes(world);
  routesFile = join(dir, 'routes.yaml');
  writeRoutesFile(routesFile, routes);
  proxy = await startProxy({
    listeners: [
      { protocol: 'imap', max_connections: 1000 },
      // STARTTLS listener that refuses cleartext logins (the default when TLS is configured)
      { protocol: 'imap', tls: 'starttls', cert: cert.certFile, key: cert.keyFile },
    ],
    lookup: { file: routesFile },
    limits: { connections_per_ip: 40 },
  });
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

async function open(port: number): Promise<LineClient> {
  const c = await connectLines({ host: '127.0.0.1', port });
  await c.readLine();
  return c;
}

async function loginLands(user: string, pass: string): Promise<string> {
  const c = await open(proxy.ports.imap!);
  c.send(`a1 LOGIN ${user} ${pass}`);
  const ok = (await c.readUntil(/^a1 /)).at(-1)!;
  if (!ok.startsWith('a1 OK')) throw new Error(ok);
  c.send('a2 SELECT INBOX');
  await c.readUntil(/^a2 /);
  c.send('a3 FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]');
  const lines = await c.readUntil(/^a3 /);
  c.close();
  return lines.find((l) => l.startsWith('Subject:'))!;
}

describe('STARTTLS', () => {
  it('hides AUTH=PLAIN and says LOGINDISABLED before TLS, and refuses LOGIN', async () => {
    const c = await open(proxy.ports['imap:starttls']!);
    c.send('a1 CAPABILITY');
    const [caps] = await c.readUntil(/^a1 /);
    expect(caps).toContain('STARTTLS');
    expect(caps).toContain('LOGINDISABLED');
    expect(caps).not.toContain('AUTH=PLAIN');
    c.send('a2 LOGIN alice@example.com alicepw');
    expect(await c.readLine()).toMatch(/^a2 NO \[PRIVACYREQUIRED\]/);
    c.close();
  });

  it('upgrades with a test certificate, drops what was pipelined after STARTTLS, then logs in', async () => {
    const c = await open(proxy.ports['imap:starttls']!);
    // The LOGIN after STARTTLS in the same packet must not be executed (CVE-2011-0411 style injection).
    c.write('a1 STARTTLS\r\na2 LOGIN alice@example.com alicepw\r\n');
    expect(await c.readLine()).toBe('a1 OK Begin TLS negotiation now');
    c.socket.removeAllListeners('data');
    const secure = tlsConnect({ socket: c.socket, ca: ca.certPem, servername: 'mail.example.test' });
    await new Promise<void>((resolve, reject) => secure.once('secureConnect', resolve).once('error', reject));
    expect(secure.getPeerCertificate().subject.CN).toBe('mail.example.test');
    const lines: string[] = [];
    let buf = '';
    secure.on('data', (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\r\n')) >= 0) {
        lines.push(buf.slice(0, i));
        buf = buf.slice(i + 2);
      }
    });
    secure.write('b1 CAPABILITY\r\n');
    await expect.poll(() => lines.some((l) => l.startsWith('b1 '))).toBe(true);
    // Nothing came back for the injected a2, and TLS now allows plaintext auth.
    expect(lines.some((l) => l.startsWith('a2'))).toBe(false);
    expect(lines[0]).toContain('AUTH=PLAIN');
    expect(lines[0]).not.toContain('STARTTLS');
    secure.write('b2 LOGIN alice@example.com alicepw\r\n');
    await expect.poll(() => lines.find((l) => l.startsWith('b2 '))).toMatch(/^b2 OK/);
    secure.destroy();
  });
});

describe('embedded file lookup', () => {
  it('routes by the file and follows an edit of it', async () => {
    expect(await loginLands('carol@example.com', 'carolpw')).toBe('Subject: on slotA');
    const moved: RouteModel = structuredClone(routes);
    moved.users['carol@example.com'] = { store: 'store2' };
    writeRoutesFile(routesFile, moved);
    await expect.poll(() => loginLands('carol@example.com', 'carolpw'), { timeout: 5000 }).toBe('Subject: on slotB');
    writeRoutesFile(routesFile, routes);
    await expect.poll(() => loginLands('carol@example.com', 'carolpw'), { timeout: 5000 }).toBe('Subject: on slotA');
  });

  it('keeps the last good routes when the file is broken', async () => {
    const { writeFileSync } = await import('node:fs');
    const file = proxy.server.router.source as FileSource;
    const refused = file.stats.reloadFailures;
    writeFileSync(routesFile, 'users: [this is: not valid');
    // Wait until the proxy has read the broken file and refused it, then check it routes as before.
    await expect.poll(() => file.stats.reloadFailures).toBeGreaterThan(refused);
    expect(await loginLands('alice@example.com', 'alicepw')).toBe('Subject: on slotA');
    const reloads = file.stats.reloads;
    writeRoutesFile(routesFile, routes);
    await expect.poll(() => file.stats.reloads).toBeGreaterThan(reloads);
  });
});

describe('connection limits', () => {
  it('turns away connections past the per-IP limit with BYE', async () => {
    const held: LineClient[] = [];
    try {
      for (let i = 0; i < 40; i++) held.push(await open(proxy.ports.imap!));
      const extra = await connectLines({ host: '127.0.0.1', port: proxy.ports.imap! });
      expect(await extra.readLine()).toMatch(/^\* BYE \[UNAVAILABLE\] Too many connections/);
      extra.close();
    } finally {
      held.forEach((c) => c.close());
    }
    // Released: a new connection is served again.
    await expect.poll(async () => {
      const c = await connectLines({ host: '127.0.0.1', port: proxy.ports.imap! });
      const l = await c.readLine();
      c.close();
      return l;
    }).toMatch(/^\* OK/);
  });
});

/**
 * Runs a fixed session after login and returns every line, with what legitimately differs
 * between two runs (UIDVALIDITY of a re-created mailbox, Dovecot's timings) blanked.
 */
async function scriptedSession(host: string, port: number): Promise<string[]> {
  const c = await connectLines({ host, port });
  await c.readLine(); // greetings differ by design: the proxy's vs Dovecot's
  const out: string[] = [];
  const step = async (cmd: string, tag: string) => {
    c.send(cmd);
    out.push(...(await c.readUntil(new RegExp(`^${tag} `))));
  };
  await step('t0 LOGIN carol@example.com carolpw', 't0');
  c.send('p1 DELETE difftest');
  await c.readUntil(/^p1 /); // preparation, not compared
  await step('t1 CREATE difftest', 't1');
  const msg = 'From: a@example.com\r\nSubject: differential\r\n\r\nbody line\r\n';
  c.send(`t2 APPEND difftest (\\Seen) "01-Jan-2024 00:00:00 +0000" {${Buffer.byteLength(msg)}}`);
  out.push(await c.readLine()); // the continuation
  c.write(`${msg}\r\n`);
  out.push(...(await c.readUntil(/^t2 /)));
  await step('t3 SELECT difftest', 't3');
  await step('t4 FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE BODY[])', 't4');
  await step('t5 STORE 1 +FLAGS (\\Flagged)', 't5');
  await step('t6 SEARCH FLAGGED', 't6');
  c.send('t7 IDLE');
  out.push(await c.readLine());
  c.send('DONE');
  out.push(...(await c.readUntil(/^t7 /)));
  await step('t8 LOGOUT', 't8');
  c.close();
  return out.map((l) =>
    l
      .replace(/UIDVALIDITY \d+/g, 'UIDVALIDITY n')
      .replace(/APPENDUID \d+/g, 'APPENDUID n')
      .replace(/\(\d+\.\d+ \+ \d+\.\d+( \+ \d+\.\d+)? secs\)/g, '(t secs)'),
  );
}

describe('differential', () => {
  it('gives the same responses after login as Dovecot spoken to directly', async () => {
    const direct = await scriptedSession(world.slotA.host, world.slotA.imap);
    const proxied = await scriptedSession('127.0.0.1', proxy.ports.imap!);
    expect(direct.length).toBeGreaterThan(15);
    expect(proxied).toEqual(direct);
  });
});

describe('client address forwarding', () => {
  it('tells the backend the client\'s address with ID when forward_client_ip is on', async () => {
    const forwarding = await startProxy({ listeners: [{ protocol: 'imap' }], lookup: { file: routesFile }, backend: { forward_client_ip: true } });
    try {
      const { connect } = await import('node:net');
      const { readFile } = await import('node:fs/promises');
      // Connect from 127.0.0.5: the proxy itself reaches Dovecot from 127.0.0.1.
      const sock = connect({ host: '127.0.0.1', port: forwarding.ports.imap!, localAddress: '127.0.0.5' });
      let got = '';
      sock.on('data', (d: Buffer) => (got += d.toString()));
      await expect.poll(() => got).toMatch(/^\* OK/);
      sock.write('a1 LOGIN bob@example.com bobpw\r\n');
      await expect.poll(() => got).toMatch(/a1 OK/);
      sock.destroy();
      await expect.poll(async () => (await readFile(world.slotB.logFile, 'utf8')).split('\n').filter((l) => l.includes('user=<bob@example.com>') && l.includes('Login:')).at(-1) ?? '').toMatch(/rip=127\.0\.0\.5/);
    } finally {
      await forwarding.close();
    }
  });
});

