import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../src/log.js';
import { encodeProxyV2 } from '../src/net/proxy-protocol.js';
import { startHaproxy, type Haproxy } from './harness/haproxy.js';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { freePorts } from './harness/ports.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// PROXY protocol in, through Debian's HAProxy on loopback (send-proxy and send-proxy-v2) in
// front of mailsplice in front of real Dovecot. HAProxy connects from 127.0.0.9 (the only
// trusted network); clients connect to HAProxy from 127.0.0.5 / .6 / .7, so the address each
// part sees shows who believed the header: Dovecot's log (rip=), mailsplice's per-address
// limits and throttle, its log. Raw sockets play the spoofer, the truncated header and the
// garbage.

const LB = '127.0.0.9';
let world: World;
let proxy: TestProxy;
let haproxy: Haproxy;
/** A Dovecot whose listeners take PROXY v2 (haproxy = yes) and trust no ID: only a header can name the client. */
let slotH: DovecotSlot;
const hPorts = { imap: 0, pop3: 0, imaps: 0 };
const logs: string[] = [];

beforeAll(async () => {
  const dir = tempDir('proxy-protocol');
  world = await startWorld({ tls: true });
  [hPorts.imap, hPorts.pop3, hPorts.imaps] = (await freePorts('127.0.0.14', 3)) as [number, number, number];
  const listenerH = (name: string, port: number, ssl = false) => `  inet_listener ${name} {\n    address = 127.0.0.14\n    port = ${port}\n    haproxy = yes\n${ssl ? '    ssl = yes\n' : ''}  }\n`;
  slotH = await startDovecotSlot({
    id: 'slotH',
    host: '127.0.0.14',
    users: [...world.users, { name: 'dave@example.com', password: 'davepw' }, { name: 'erin@example.com', password: 'erinpw' }],
    tls: { certFile: world.tls!.cert.certFile, keyFile: world.tls!.cert.keyFile },
    trustedNetworks: '',
    dir: join(world.tmpDir, 'slotH'),
    extraConfig: `haproxy_trusted_networks = 127.0.0.0/8\nservice imap-login {\n${listenerH('imap_pp', hPorts.imap)}${listenerH('imaps_pp', hPorts.imaps, true)}}\nservice pop3-login {\n${listenerH('pop3_pp', hPorts.pop3)}}\n`,
  });
  const routes = join(dir, 'routes.yaml');
  const model = worldRoutes(world);
  model.users['dave@example.com'] = { store: 'storeH' };
  model.users['erin@example.com'] = { store: 'storeHtls' };
  model.stores['storeH'] = { master: 'slotH', epoch: '1' };
  model.stores['storeHtls'] = { master: 'slotHtls', epoch: '1' };
  model.slots['slotH'] = { host: '127.0.0.14', imap: String(hPorts.imap), pop3: String(hPorts.pop3), lmtp: String(slotH.lmtp) };
  model.slots['slotHtls'] = { host: '127.0.0.14', imap: String(hPorts.imaps), pop3: String(hPorts.pop3), lmtp: String(slotH.lmtp) };
  writeRoutesFile(routes, model);
  const pp = { proxy_protocol: 'required', trusted_networks: [`${LB}/32`, '::ffff:127.0.0.250/128'] };
  const cert = { cert: world.tls!.cert.certFile, key: world.tls!.cert.keyFile };
  proxy = await startProxy(
    {
      listeners: [
        { name: 'imap-pp', protocol: 'imap', ...pp },
        { name: 'pop3-pp', protocol: 'pop3', ...pp },
        { name: 'imaps-pp', protocol: 'imap', tls: 'implicit', ...cert, ...pp },
        { name: 'lmtp-pp', protocol: 'lmtp', ...pp },
        { name: 'imap-mixed', protocol: 'imap', proxy_protocol: 'from_trusted', trusted_networks: [LB] },
        { name: 'imap-v6', protocol: 'imap', address: '::1', proxy_protocol: 'required', trusted_networks: ['::1/128'] },
      ],
      lookup: { file: routes },
      limits: { auth_failure_delay_ms: 0, auth_failures_per_ip_per_minute: 3, login_timeout_ms: 3000 },
      lmtp: { connections_per_ip: 2 },
      backend: {
        proxy_protocol_groups: [{ slots: ['slotH*'] }],
        tls_groups: [{ slots: ['slotHtls'], imap: { mode: 'implicit' }, ca: world.tls!.ca.certFile, servername: 'mail.example.test' }],
      },
    },
    createLogger('debug', (l) => void logs.push(l)),
  );
  const port = (name: string) => proxy.server.proxies.find((p) => p.cfg.name === name)?.address().port ?? proxy.server.lmtp.find((l) => l.cfg.name === name)!.address()!.port;
  const to = (name: string) => ({ host: '127.0.0.1', port: port(name) });
  haproxy = await startHaproxy({
    dir: join(dir, 'haproxy'),
    source: LB,
    routes: [
      { name: 'imap_v1', send: 'v1', to: to('imap-pp') },
      { name: 'imap_v2', send: 'v2', to: to('imap-pp') },
      { name: 'pop3_v2', send: 'v2', to: to('pop3-pp') },
      { name: 'imaps_v2', send: 'v2', to: to('imaps-pp') },
      { name: 'lmtp_v1', send: 'v1', to: to('lmtp-pp') },
      { name: 'mixed_v2', send: 'v2', to: to('imap-mixed') },
      { name: 'v6_v2', send: 'v2', to: { host: '::1', port: port('imap-v6') }, source: '::1' },
    ],
  });
}, 90_000);

afterAll(async () => {
  await haproxy?.stop();
  await proxy?.close();
  await slotH?.stop();
  await world?.stop();
});

const viaLb = (route: string, from: string): Promise<LineClient> => connectLines({ host: haproxy.host, port: haproxy.ports[route]!, localAddress: from });
const direct = (name: string, from: string): Promise<LineClient> =>
  connectLines({ host: '127.0.0.1', port: proxy.server.proxies.find((p) => p.cfg.name === name)!.address().port, localAddress: from });

async function imapLogin(c: LineClient, user: string, pass: string): Promise<string> {
  expect(await c.readLine()).toMatch(/^\* OK /);
  c.send(`a LOGIN ${user} ${pass}`);
  return (await c.readUntil(/^a /)).at(-1)!;
}

function dovecotLog(): Promise<string> {
  return readFile(world.slotA.logFile, 'utf8');
}

/** Resolves when the peer closes; with what it sent before (nothing, for a refused header). */
function closedWith(sock: net.Socket): Promise<string> {
  let got = '';
  sock.on('data', (d: Buffer) => (got += d.toString('latin1')));
  sock.on('error', () => undefined);
  return new Promise((resolve) => sock.once('close', () => resolve(got)));
}

function rawFrom(from: string, name: string): Promise<net.Socket> {
  const port = proxy.server.proxies.find((p) => p.cfg.name === name)!.address().port;
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port, localAddress: from }, () => resolve(s));
    s.once('error', reject);
  });
}

const counters = () => proxy.server.ctx.counters.proxyHeaders;

describe('through HAProxy', () => {
  it('v1 and v2: the backend logs the client address from the header, and so does mailsplice', async () => {
    for (const [route, from] of [
      ['imap_v1', '127.0.0.5'],
      ['imap_v2', '127.0.0.6'],
    ] as const) {
      const c = await viaLb(route, from);
      try {
        expect(await imapLogin(c, 'alice@example.com', 'alicepw')).toMatch(/^a OK /);
      } finally {
        c.close();
      }
      // Dovecot takes it from mailsplice's ID x-originating-ip (login_trusted_networks).
      await expect.poll(dovecotLog).toMatch(new RegExp(`Login: user=<alice@example.com>.*rip=${from.replace(/\./g, '\\.')}`));
      const line = logs.find((l) => l.includes('"msg":"login"') && l.includes(`"ip":"${from}"`));
      expect(line && JSON.parse(line)).toMatchObject({ ip: from, via: LB, listener: 'imap-pp' });
    }
  });

  it('POP3 (XCLIENT to Dovecot) and implicit TLS after the header', async () => {
    const p = await viaLb('pop3_v2', '127.0.0.7');
    try {
      expect(await p.readLine()).toMatch(/^\+OK /);
      p.send('USER bob@example.com');
      expect(await p.readLine()).toMatch(/^\+OK/);
      p.send('PASS bobpw');
      expect(await p.readLine()).toMatch(/^\+OK/);
    } finally {
      p.close();
    }
    await expect.poll(() => readFile(world.slotB.logFile, 'utf8')).toMatch(/pop3-login: Info: Login: user=<bob@example.com>.*rip=127\.0\.0\.7/);

    const s = await connectLines({
      host: haproxy.host,
      port: haproxy.ports['imaps_v2']!,
      localAddress: '127.0.0.8',
      tls: { ca: [world.tls!.ca.certPem], servername: 'mail.example.test' } as tls.ConnectionOptions,
    });
    try {
      expect(await imapLogin(s, 'carol@example.com', 'carolpw')).toMatch(/^a OK /);
    } finally {
      s.close();
    }
    await expect.poll(dovecotLog).toMatch(/Login: user=<carol@example.com>.*rip=127\.0\.0\.8/);
    const line = logs.find((l) => l.includes('"msg":"login"') && l.includes('"ip":"127.0.0.8"'));
    expect(JSON.parse(line!)).toMatchObject({ via: LB, listener: 'imaps-pp', sni: 'mail.example.test' });
  });

  it('the failed-login throttle counts the address from the header, not the balancer', async () => {
    for (let i = 0; i < 3; i++) {
      const c = await viaLb('imap_v2', '127.0.0.21');
      try {
        expect(await imapLogin(c, 'alice@example.com', 'wrong')).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);
      } finally {
        c.close();
      }
    }
    const c = await viaLb('imap_v1', '127.0.0.21');
    try {
      expect(await imapLogin(c, 'alice@example.com', 'alicepw')).toMatch(/^a NO \[UNAVAILABLE\] Too many login attempts/);
    } finally {
      c.close();
    }
    // Everyone else behind the same balancer still logs in.
    const other = await viaLb('imap_v2', '127.0.0.22');
    try {
      expect(await imapLogin(other, 'alice@example.com', 'alicepw')).toMatch(/^a OK /);
    } finally {
      other.close();
    }
  });

  it('LMTP: delivers through HAProxy, and its per-address connection limit applies to the header address', async () => {
    const lmtpVia = (from: string) =>
      new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect({ host: haproxy.host, port: haproxy.ports['lmtp_v1']!, localAddress: from }, () => resolve(s));
        s.once('error', reject);
      });
    const first = await lmtpVia('127.0.0.31');
    const second = await lmtpVia('127.0.0.31');
    const greeting = (s: net.Socket) => new Promise<string>((resolve) => s.once('data', (d: Buffer) => resolve(d.toString())));
    // Both admitted (greeted) before the third comes.
    expect(await greeting(first)).toMatch(/^220 /);
    expect(await greeting(second)).toMatch(/^220 /);
    const third = await lmtpVia('127.0.0.31');
    expect(await closedWith(third)).toMatch(/^421 4\.7\.0 .*from your address/);
    // Another client behind the same balancer is not refused, and its message is delivered.
    const fresh = await connectLines({ host: haproxy.host, port: haproxy.ports['lmtp_v1']!, localAddress: '127.0.0.32' });
    try {
      expect(await fresh.readLine()).toMatch(/^220 /);
      fresh.send('LHLO test');
      await fresh.readUntil(/^250 /);
      fresh.send('MAIL FROM:<x@example.org>');
      expect(await fresh.readLine()).toMatch(/^250 /);
      fresh.send('RCPT TO:<bob@example.com>');
      expect(await fresh.readLine()).toMatch(/^250 /);
      fresh.send('DATA');
      expect(await fresh.readLine()).toMatch(/^354 /);
      fresh.write('Subject: via haproxy\r\n\r\nhello\r\n.\r\n');
      expect(await fresh.readLine()).toMatch(/^250 /);
    } finally {
      fresh.close();
      first.destroy();
      second.destroy();
    }
    await expect.poll(() => readFile(world.slotB.logFile, 'utf8')).toMatch(/lmtp\(bob@example.com\).*saved mail/);
  });

  it('a listener that reads headers only from the balancer still serves clients that connect directly', async () => {
    const viaBalancer = await viaLb('mixed_v2', '127.0.0.41');
    try {
      expect(await imapLogin(viaBalancer, 'alice@example.com', 'alicepw')).toMatch(/^a OK /);
    } finally {
      viaBalancer.close();
    }
    // A direct client's "header" is not one: it is an IMAP line like any other, and its own
    // address stands.
    const spoofer = await direct('imap-mixed', '127.0.0.42');
    try {
      expect(await spoofer.readLine()).toMatch(/^\* OK /);
      spoofer.send('PROXY TCP4 10.66.66.66 127.0.0.1 1234 143');
      expect(await spoofer.readLine()).toMatch(/^PROXY BAD /);
      spoofer.send('a LOGIN alice@example.com alicepw');
      expect((await spoofer.readUntil(/^a /)).at(-1)).toMatch(/^a OK /);
    } finally {
      spoofer.close();
    }
    await expect.poll(() => logs.some((l) => l.includes('"msg":"login"') && l.includes('"ip":"127.0.0.42"') && !l.includes('"via"'))).toBe(true);
    await expect.poll(() => logs.some((l) => l.includes('"msg":"login"') && l.includes('"ip":"127.0.0.41"') && l.includes(`"via":"${LB}"`))).toBe(true);
    expect(logs.some((l) => l.includes('10.66.66.66'))).toBe(false);
  });
});

describe('IPv6 trusted networks', () => {
  it('a balancer on ::1 (trusted_networks ::1/128) carries an IPv4 client to Dovecot', async () => {
    const c = await viaLb('v6_v2', '127.0.0.61');
    try {
      expect(await imapLogin(c, 'alice@example.com', 'alicepw')).toMatch(/^a OK /);
    } finally {
      c.close();
    }
    await expect.poll(() => logs.some((l) => l.includes('"msg":"login"') && l.includes('"ip":"127.0.0.61"') && l.includes('"via":"::1"'))).toBe(true);
    await expect.poll(dovecotLog).toMatch(/Login: user=<alice@example.com>.*rip=127\.0\.0\.61/);
  });
});

describe('PROXY v2 out', () => {
  it('a slot group that takes the header: Dovecot (haproxy = yes) logs the client address from HAProxy, for IMAP, POP3 and IMAP over TLS', async () => {
    const c = await viaLb('imap_v2', '127.0.0.51');
    try {
      expect(await imapLogin(c, 'dave@example.com', 'davepw')).toMatch(/^a OK /);
    } finally {
      c.close();
    }
    const hLog = () => readFile(slotH.logFile, 'utf8');
    // Dovecot trusts no ID here (login_trusted_networks is empty): only the header names the client.
    await expect.poll(hLog).toMatch(/imap-login: Info: Login: user=<dave@example.com>.*rip=127\.0\.0\.51/);

    const p = await viaLb('pop3_v2', '127.0.0.52');
    try {
      expect(await p.readLine()).toMatch(/^\+OK /);
      p.send('USER dave@example.com');
      expect(await p.readLine()).toMatch(/^\+OK/);
      p.send('PASS davepw');
      expect(await p.readLine()).toMatch(/^\+OK/);
    } finally {
      p.close();
    }
    await expect.poll(hLog).toMatch(/pop3-login: Info: Login: user=<dave@example.com>.*rip=127\.0\.0\.52/);

    // Implicit TLS to the backend: the header in clear first, then the handshake.
    const t = await viaLb('imap_v1', '127.0.0.53');
    try {
      expect(await imapLogin(t, 'erin@example.com', 'erinpw')).toMatch(/^a OK /);
    } finally {
      t.close();
    }
    await expect.poll(hLog).toMatch(/imap-login: Info: Login: user=<erin@example.com>.*rip=127\.0\.0\.53.*TLS/);
    // Slots outside the group get no header (their listeners would take it for a command).
    expect(await readFile(world.slotA.logFile, 'utf8')).not.toMatch(/haproxy/i);
  });
});

describe('refused before any other byte', () => {
  it('a header from an address outside trusted_networks: closed, nothing said', async () => {
    const before = counters().untrusted;
    const s = await rawFrom('127.0.0.5', 'imap-pp');
    const got = closedWith(s);
    s.write('PROXY TCP4 10.66.66.66 127.0.0.1 1234 143\r\na LOGIN alice@example.com alicepw\r\n');
    expect(await got).toBe('');
    expect(counters().untrusted).toBe(before + 1);
    expect(logs.some((l) => l.includes('"proxy header refused"') && l.includes('"ip":"127.0.0.5"') && l.includes('untrusted'))).toBe(true);
  });

  it('garbage, an oversized v2 header, and a v1 line too long from the balancer: closed at once', async () => {
    const big = encodeProxyV2({ address: '192.0.2.1', port: 1 }, { address: '192.0.2.2', port: 2 });
    big.writeUInt16BE(60_000, 14);
    for (const bytes of [Buffer.from('a LOGIN alice@example.com alicepw\r\n'), big, Buffer.from(`PROXY UNKNOWN ${'x'.repeat(200)}`), Buffer.from('\x16\x03\x01\x00\xa5')]) {
      const before = counters().invalid;
      const s = await rawFrom(LB, 'imap-pp');
      const got = closedWith(s);
      s.write(bytes);
      expect(await got).toBe('');
      expect(counters().invalid).toBe(before + 1);
    }
  });

  it('a truncated header: refused when the peer stops (FIN) or at the shared deadline', async () => {
    const header = encodeProxyV2({ address: '192.0.2.1', port: 1 }, { address: '192.0.2.2', port: 2 });
    const ended = await rawFrom(LB, 'imap-pp');
    const got = closedWith(ended);
    ended.end(header.subarray(0, 20));
    expect(await got).toBe('');

    const before = counters().timeout;
    const stalled = await rawFrom(LB, 'imap-pp');
    const stalledGot = closedWith(stalled);
    stalled.write(header.subarray(0, 10));
    expect(await stalledGot).toBe(''); // login_timeout_ms: 3000, enforced by the sweep
    expect(counters().timeout).toBe(before + 1);
  });

  it('no byte after the header is lost: a command in the same packet is answered; LOCAL keeps the balancer address', async () => {
    const s = await rawFrom(LB, 'imap-pp');
    const c = lineReader(s);
    s.write(Buffer.concat([encodeProxyV2({ address: '192.0.2.77', port: 4242 }, { address: '127.0.0.1', port: 143 }), Buffer.from('a CAPABILITY\r\n')]));
    expect(await c.next()).toMatch(/^\* OK /);
    expect(await c.next()).toMatch(/^\* CAPABILITY /);
    expect(await c.next()).toMatch(/^a OK /);
    s.write('b LOGIN alice@example.com alicepw\r\n');
    await c.until(/^b /);
    s.destroy();
    expect(logs.some((l) => l.includes('"msg":"login"') && l.includes('"ip":"192.0.2.77"') && l.includes('"port":4242'))).toBe(true);

    const before = counters().local;
    const check = await rawFrom(LB, 'imap-pp');
    const h = lineReader(check);
    check.write(Buffer.concat([encodeProxyV2(undefined, undefined), Buffer.from('a LOGIN alice@example.com alicepw\r\n')]));
    expect(await h.next()).toMatch(/^\* OK /);
    expect(await h.until(/^a /)).toMatch(/^a OK /);
    check.destroy();
    expect(counters().local).toBe(before + 1);
    expect(logs.some((l) => l.includes('"msg":"login"') && l.includes(`"ip":"${LB}"`))).toBe(true);
  });
});

/** Lines from a raw socket. */
function lineReader(s: net.Socket): { next(): Promise<string>; until(re: RegExp): Promise<string> } {
  let buf = '';
  const waiting: (() => void)[] = [];
  s.on('data', (d: Buffer) => {
    buf += d.toString('latin1');
    waiting.splice(0).forEach((w) => w());
  });
  const next = async (): Promise<string> => {
    for (;;) {
      const i = buf.indexOf('\r\n');
      if (i >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 2);
        return line;
      }
      await new Promise<void>((resolve, reject) => {
        waiting.push(resolve);
        setTimeout(() => reject(new Error(`no line; have ${JSON.stringify(buf)}`)), 10_000).unref();
      });
    }
  };
  return {
    next,
    async until(re) {
      for (;;) {
        const l = await next();
        if (re.test(l)) return l;
      }
    },
  };
}
