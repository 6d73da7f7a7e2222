import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../src/config.js';
import { createLogger } from '../src/log.js';
import { startServer, type RunningServer } from '../src/server.js';
import { makeCA, makeCert, type CertFiles } from './harness/certs.js';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { freePorts } from './harness/ports.js';
import { seedMessage, startWorld, type World } from './harness/world.js';
import { tempDir } from './support/tmp.js';

// POP3 through the proxy to real Dovecot slots, checked with Python's poplib, curl and raw
// sockets. alice and carol live on store1 (master slotA), bob on store2 (master slotB);
// each slot's copy of a user's message says which slot it is on.

const execFileP = promisify(execFile);
const HOST = '127.0.0.1';

let world: World;
let slotC: DovecotSlot; // holds POP3 sessions' mailbox locks, for IN-USE
let server: RunningServer;
let ca: CertFiles;
const logs: string[] = [];
const port = { plain: 0, stls: 0, pop3s: 0, open: 0 };

/** Routes in Redis as a failover tool writes them (the design's key layout). */
async function seed(): Promise<void> {
  const r = new Redis(world.redis!.url);
  const slot = (s: DovecotSlot) => ({ host: s.host, imap: String(s.imap), pop3: String(s.pop3), lmtp: String(s.lmtp), status: 'up' });
  try {
    await r
      .multi()
      .hset('ms:user:alice@example.com', { store: 'store1' })
      .hset('ms:user:carol@example.com', { store: 'store1' })
      .hset('ms:user:bob@example.com', { store: 'store2' })
      .hset('ms:user:locked@example.com', { store: 'store1', status: 'locked' })
      .hset('ms:user:dave@example.com', { store: 'store3' })
      .hset('ms:store:store1', { master: 'slotA', replicas: 'slotB', status: 'active', epoch: '1' })
      .hset('ms:store:store2', { master: 'slotB', replicas: 'slotA', status: 'active', epoch: '1' })
      .hset('ms:store:store3', { master: 'slotC', status: 'active', epoch: '1' })
      .hset('ms:slot:slotA', slot(world.slotA))
      .hset('ms:slot:slotB', slot(world.slotB))
      .hset('ms:slot:slotC', slot(slotC))
      .exec();
  } finally {
    r.disconnect();
  }
}

async function publishChange(kind: 'store', id: string, fields: Record<string, string>): Promise<void> {
  const r = new Redis(world.redis!.url);
  try {
    await r.multi().hset(`ms:${kind}:${id}`, fields).publish('ms:events', JSON.stringify({ kind, id })).exec();
  } finally {
    r.disconnect();
  }
}

beforeAll(async () => {
  world = await startWorld({ redis: true });
  const dave = [{ name: 'dave@example.com', password: 'davepw' }];
  // A third slot whose POP3 sessions lock the mailbox, so a second session gets IN-USE.
  slotC = await startDovecotSlot({
    id: 'slotC',
    host: '127.0.0.13',
    users: dave,
    dir: join(world.tmpDir, 'slotC'),
    extraConfig: 'protocol pop3 {\n  pop3_lock_session = yes\n}\n',
  });
  await slotC.deliver('dave@example.com', seedMessage('slotC', 'dave@example.com'));
  await seed();

  const dir = tempDir('pop3');
  ca = await makeCA(join(dir, 'ca'));
  const cert = await makeCert(dir, { ca, cn: 'pop.example.test', altNames: ['pop.example.test', 'localhost', HOST] });
  [port.plain, port.stls, port.pop3s, port.open] = (await freePorts(HOST, 4)) as [number, number, number, number];
  const tlsFiles = { cert: cert.certFile, key: cert.keyFile };
  const cfg = parseConfig(
    {
      listeners: [
        { protocol: 'pop3', address: HOST, port: port.plain },
        { protocol: 'pop3', address: HOST, port: port.stls, tls: 'starttls', ...tlsFiles },
        { protocol: 'pop3', address: HOST, port: port.pop3s, tls: 'implicit', ...tlsFiles },
        { protocol: 'pop3', address: HOST, port: port.open, tls: 'starttls', plaintext_auth: true, ...tlsFiles },
      ],
      lookup: { redis: { url: world.redis!.url }, max_stale_ms: 0 },
      limits: { login_timeout_ms: 2000, bad_commands: 3, line_length: 1024, auth_failures: 2, auth_failure_delay_ms: 0 },
      log: { level: 'debug' },
    },
    'pop3 test config',
    dir,
  );
  server = await startServer(cfg, createLogger('debug', (l) => void logs.push(l)));
  // The first Redis connection takes a moment; logins before it would (rightly) get SYS/TEMP.
  for (let i = 0; i < 100 && !server.router.stats.live; i++) await sleep(100);
});

afterAll(async () => {
  await server?.close();
  await slotC?.stop();
  await world?.stop();
});

interface PopResult {
  count?: number;
  subject?: string;
  error?: string;
}

/** Python's poplib: log in (USER/PASS or AUTH PLAIN), STAT, RETR 1, QUIT. */
const POPLIB = `
import sys, json, ssl, poplib, base64
t = json.loads(sys.argv[1])
ctx = ssl.create_default_context(cafile=t['caFile']) if t.get('caFile') else None
try:
    p = poplib.POP3_SSL(t['host'], t['port'], context=ctx, timeout=20) if t.get('implicit') else poplib.POP3(t['host'], t['port'], timeout=20)
    if t.get('stls'):
        p.stls(ctx)
    if t.get('auth') == 'plain':
        p._shortcmd('AUTH PLAIN ' + base64.b64encode(('\\0' + t['user'] + '\\0' + t['password']).encode()).decode())
    else:
        p.user(t['user'])
        p.pass_(t['password'])
    count, size = p.stat()
    resp, lines, octets = p.retr(1)
    subject = next(l.decode() for l in lines if l.lower().startswith(b'subject:'))
    p.quit()
    print(json.dumps({'count': count, 'subject': subject}))
except poplib.error_proto as e:
    print(json.dumps({'error': e.args[0].decode()}))
`;

async function poplib(target: { port: number; user: string; password: string; implicit?: boolean; stls?: boolean; auth?: 'plain' }): Promise<PopResult> {
  const args = { host: HOST, caFile: target.implicit || target.stls ? ca.certFile : undefined, ...target };
  const { stdout } = await execFileP('python3', ['-c', POPLIB, JSON.stringify(args)], { timeout: 30_000 });
  return JSON.parse(stdout) as PopResult;
}

async function raw(p = port.plain): Promise<LineClient> {
  const c = await connectLines({ host: HOST, port: p });
  expect(await c.readLine()).toMatch(/^\+OK /);
  return c;
}

async function capa(c: LineClient): Promise<string[]> {
  c.send('CAPA');
  const lines = await c.readUntil(/^\.$/);
  expect(lines[0]).toBe('+OK Capability list follows');
  return lines.slice(1, -1);
}

/** Upgrades a raw client after STLS/STARTTLS; returns a line client over TLS. */
function upgrade(c: LineClient): Promise<LineClient> {
  return connectLines({ host: HOST, port: 0, tls: { socket: c.socket, ca: ca.certPem, servername: 'pop.example.test' } });
}

const plain = (user: string, pass: string, authz = '') => Buffer.from(`${authz}\0${user}\0${pass}`).toString('base64');

describe('routing with real clients', () => {
  it('poplib USER/PASS reaches the slot of the user’s store', async () => {
    expect(await poplib({ port: port.plain, user: 'alice@example.com', password: 'alicepw' })).toEqual({ count: 1, subject: 'Subject: on slotA' });
    expect(await poplib({ port: port.plain, user: 'bob@example.com', password: 'bobpw' })).toEqual({ count: 1, subject: 'Subject: on slotB' });
  });

  it('poplib AUTH PLAIN with an initial response', async () => {
    expect(await poplib({ port: port.plain, user: 'Carol@Example.com', password: 'carolpw', auth: 'plain' })).toEqual({ count: 1, subject: 'Subject: on slotA' });
  });

  it('poplib over STLS and over implicit TLS (POP3S)', async () => {
    expect(await poplib({ port: port.stls, stls: true, user: 'bob@example.com', password: 'bobpw' })).toEqual({ count: 1, subject: 'Subject: on slotB' });
    expect(await poplib({ port: port.pop3s, implicit: true, user: 'alice@example.com', password: 'alicepw' })).toEqual({ count: 1, subject: 'Subject: on slotA' });
  });

  it('curl pop3:// (plain), pop3:// with STLS required, and pop3s://', async () => {
    const get = async (url: string, ...extra: string[]) =>
      (await execFileP('curl', ['-s', '--max-time', '20', '--cacert', ca.certFile, '--user', 'bob@example.com:bobpw', ...extra, url])).stdout;
    expect(await get(`pop3://${HOST}:${port.plain}/1`)).toContain('Subject: on slotB');
    expect(await get(`pop3://${HOST}:${port.stls}/1`, '--ssl-reqd')).toContain('Subject: on slotB');
    expect(await get(`pop3s://${HOST}:${port.pop3s}/1`)).toContain('Subject: on slotB');
  });
});

describe('pre-auth dialogue', () => {
  it('answers CAPA, NOOP and QUIT itself', async () => {
    const c = await raw();
    const caps = await capa(c);
    expect(caps).toEqual(expect.arrayContaining(['USER', 'SASL PLAIN', 'RESP-CODES', 'AUTH-RESP-CODE', 'PIPELINING', 'TOP', 'UIDL']));
    expect(caps).not.toContain('STLS'); // no TLS on this listener
    c.send('NOOP');
    expect(await c.readLine()).toBe('+OK');
    c.send('AUTH');
    expect(await c.readUntil(/^\.$/)).toEqual(['+OK', 'PLAIN', '.']);
    c.send('QUIT');
    expect(await c.readLine()).toMatch(/^\+OK /);
    await expect(c.readLine()).rejects.toThrow(/closed/);
  });

  it('AUTH PLAIN with a continuation, and `*` cancels', async () => {
    const c = await raw();
    c.send('AUTH PLAIN');
    expect(await c.readLine()).toBe('+ ');
    c.send('*');
    expect(await c.readLine()).toMatch(/^-ERR /);
    c.send('AUTH PLAIN');
    expect(await c.readLine()).toBe('+ ');
    c.send(plain('bob@example.com', 'bobpw'));
    expect(await c.readLine()).toMatch(/^\+OK/);
    // Spliced to Dovecot now.
    c.send('STAT');
    expect(await c.readLine()).toMatch(/^\+OK 1 \d+$/);
    c.send('QUIT');
    expect(await c.readLine()).toMatch(/^\+OK/);
    c.close();
  });

  it('passes commands pipelined after PASS on to the backend', async () => {
    const c = await raw();
    c.write('USER alice@example.com\r\nPASS alicepw\r\nSTAT\r\nQUIT\r\n');
    expect(await c.readLine()).toMatch(/^\+OK/);
    expect(await c.readLine()).toMatch(/^\+OK/);
    expect(await c.readLine()).toMatch(/^\+OK 1 \d+$/);
    expect(await c.readLine()).toMatch(/^\+OK/);
    c.close();
  });

  it('refuses PASS without USER and commands that need a login', async () => {
    const c = await raw();
    c.send('PASS alicepw');
    expect(await c.readLine()).toMatch(/^-ERR /);
    c.send('STAT');
    expect(await c.readLine()).toBe('-ERR Command not valid before login');
    c.send('FROBNICATE');
    // bad_commands: 3 -> the third is answered, then the connection ends
    expect(await c.readLine()).toBe('-ERR Unknown command');
    await expect(c.readLine()).rejects.toThrow(/closed/);
  });

  it('ends a connection whose line is too long', async () => {
    const c = await raw();
    c.write(`USER ${'x'.repeat(5000)}`);
    expect(await c.readLine()).toBe('-ERR Line too long');
    await expect(c.readLine()).rejects.toThrow(/closed/);
  });

  it('closes, without a word, a connection that does not log in in time', async () => {
    const c = await raw();
    const started = Date.now();
    await expect(c.readLine(6000)).rejects.toThrow(/closed/);
    expect(Date.now() - started).toBeGreaterThan(1000);
  });
});

describe('errors (RFC 3206)', () => {
  it('-ERR [AUTH] for a wrong password or unknown user; closes after too many', async () => {
    const c = await raw();
    c.send('USER alice@example.com');
    expect(await c.readLine()).toMatch(/^\+OK/);
    c.send('PASS wrong');
    expect(await c.readLine()).toBe('-ERR [AUTH] Authentication failed');
    c.send(`AUTH PLAIN ${plain('nobody@example.com', 'x')}`);
    expect(await c.readLine()).toBe('-ERR [AUTH] Authentication failed');
    await expect(c.readLine()).rejects.toThrow(/closed/); // auth_failures: 2
    expect(await poplib({ port: port.plain, user: 'alice@example.com', password: 'nope' })).toEqual({ error: '-ERR [AUTH] Authentication failed' });
  });

  it('-ERR [SYS/TEMP] for a locked user', async () => {
    const c = await raw();
    c.send(`AUTH PLAIN ${plain('locked@example.com', 'lockedpw')}`);
    expect(await c.readLine()).toMatch(/^-ERR \[SYS\/TEMP\] /);
    c.close();
  });

  it('passes the backend’s -ERR [IN-USE] through', async () => {
    // Dovecot waits ~10 s for the other session's lock before it says IN-USE: this needs a
    // proxy with more patient timeouts than the suite's 2 s login deadline.
    const [p] = (await freePorts(HOST, 1)) as [number];
    const patient = await startServer(
      parseConfig(
        { listeners: [{ protocol: 'pop3', address: HOST, port: p }], lookup: { redis: { url: world.redis!.url } }, limits: { login_timeout_ms: 30_000 }, backend: { login_timeout_ms: 30_000 } },
        'patient',
      ),
      createLogger('error', () => {}),
    );
    const first = await raw(p);
    const second = await raw(p);
    try {
      first.send(`AUTH PLAIN ${plain('dave@example.com', 'davepw')}`);
      expect(await first.readLine()).toMatch(/^\+OK/);
      second.send(`AUTH PLAIN ${plain('dave@example.com', 'davepw')}`);
      expect(await second.readLine(25_000)).toMatch(/^-ERR \[IN-USE\] /);
      first.send('QUIT');
      expect(await first.readLine()).toMatch(/^\+OK/);
    } finally {
      first.close();
      second.close();
      await patient.close();
    }
  }, 40_000);

  it('-ERR [SYS/TEMP] when the backend does not answer before the login deadline, then closes', async () => {
    // Dovecot keeps the second session of a locked mailbox waiting ~10 s: longer than the
    // suite's 2 s login deadline, which bounds the backend dialogue too.
    const first = await raw();
    const second = await raw();
    try {
      first.send(`AUTH PLAIN ${plain('dave@example.com', 'davepw')}`);
      expect(await first.readLine()).toMatch(/^\+OK/);
      const started = Date.now();
      second.send(`AUTH PLAIN ${plain('dave@example.com', 'davepw')}`);
      expect(await second.readLine(6000)).toMatch(/^-ERR \[SYS\/TEMP\] /);
      await expect(second.readLine(3000)).rejects.toThrow(/closed/);
      expect(Date.now() - started).toBeLessThan(5000);
      expect(logs.some((l) => l.includes('backend did not answer in time'))).toBe(true);
    } finally {
      first.close();
      second.close();
    }
  });

  it('-ERR [SYS/TEMP] when the backend is down', async () => {
    await world.slotB.stop();
    try {
      expect(await poplib({ port: port.plain, user: 'bob@example.com', password: 'bobpw' })).toEqual({ error: expect.stringMatching(/^-ERR \[SYS\/TEMP\] /) });
    } finally {
      await world.slotB.start();
    }
    expect(await poplib({ port: port.plain, user: 'bob@example.com', password: 'bobpw' })).toMatchObject({ subject: 'Subject: on slotB' });
  });

  it('-ERR [SYS/TEMP] when Redis is down, and logins work again once it is back', async () => {
    await world.redis!.stop();
    try {
      expect(await poplib({ port: port.plain, user: 'alice@example.com', password: 'alicepw' })).toEqual({ error: expect.stringMatching(/^-ERR \[SYS\/TEMP\] /) });
    } finally {
      await world.redis!.start();
    }
    await seed();
    await expect
      .poll(() => poplib({ port: port.plain, user: 'alice@example.com', password: 'alicepw' }), { timeout: 10_000 })
      .toMatchObject({ subject: 'Subject: on slotA' });
  });
});

describe('TLS and plaintext policy', () => {
  it('hides USER and SASL PLAIN before STLS and refuses them, offers them after', async () => {
    const c = await raw(port.stls);
    let caps = await capa(c);
    expect(caps).toContain('STLS');
    expect(caps).not.toContain('USER');
    expect(caps.some((l) => l.startsWith('SASL'))).toBe(false);
    c.send('USER alice@example.com');
    expect(await c.readLine()).toMatch(/^-ERR \[AUTH\] .*STLS/);
    c.send(`AUTH PLAIN ${plain('alice@example.com', 'alicepw')}`);
    expect(await c.readLine()).toMatch(/^-ERR \[AUTH\] /);
    c.send('STLS');
    expect(await c.readLine()).toBe('+OK Begin TLS negotiation');
    const s = await upgrade(c);
    caps = await capa(s);
    expect(caps).toEqual(expect.arrayContaining(['USER', 'SASL PLAIN']));
    expect(caps).not.toContain('STLS');
    s.send('STLS');
    expect(await s.readLine()).toBe('-ERR Command not permitted when TLS active');
    s.send('USER alice@example.com');
    expect(await s.readLine()).toMatch(/^\+OK/);
    s.send('PASS alicepw');
    expect(await s.readLine()).toMatch(/^\+OK/);
    s.send('RETR 1');
    expect(await s.readUntil(/^\.$/)).toContain('Subject: on slotA');
    s.close();
  });

  it('a listener with plaintext_auth accepts USER before STLS', async () => {
    const c = await raw(port.open);
    expect(await capa(c)).toEqual(expect.arrayContaining(['USER', 'STLS']));
    c.send('USER bob@example.com');
    expect(await c.readLine()).toMatch(/^\+OK/);
    c.send('PASS bobpw');
    expect(await c.readLine()).toMatch(/^\+OK/);
    c.close();
  });

  it('executes nothing pipelined after STLS (RFC 2595 command injection)', async () => {
    const c = await raw(port.open);
    // A man in the middle appends commands to the client's STLS in the same packet.
    c.write('STLS\r\nUSER alice@example.com\r\nPASS alicepw\r\n');
    expect(await c.readLine()).toBe('+OK Begin TLS negotiation');
    const s = await upgrade(c);
    const caps = await capa(s); // the first answer after TLS is CAPA's: nothing queued ahead
    expect(caps).toContain('USER');
    s.send('PASS alicepw'); // the injected USER must not have been kept
    expect(await s.readLine()).toMatch(/^-ERR /);
    s.send('QUIT');
    expect(await s.readLine()).toMatch(/^\+OK/);
    s.close();
  });

  it('drops USER given before STLS', async () => {
    const c = await raw(port.open);
    c.send('USER alice@example.com');
    expect(await c.readLine()).toMatch(/^\+OK/);
    c.send('STLS');
    expect(await c.readLine()).toMatch(/^\+OK/);
    const s = await upgrade(c);
    s.send('PASS alicepw');
    expect(await s.readLine()).toMatch(/^-ERR /);
    s.close();
  });

  it('ends a connection that says STLS and never shakes hands, at the login deadline', async () => {
    const c = await raw(port.stls);
    c.send('STLS');
    expect(await c.readLine()).toMatch(/^\+OK/);
    await expect(c.readLine(6000)).rejects.toThrow(/closed/);
  });

  it('returns every connection slot once clients are gone', async () => {
    await expect.poll(() => server.proxies.map((p) => p.connections), { timeout: 5000 }).toEqual([0, 0, 0, 0]);
  });
});

describe('client address forwarding', () => {
  it('tells the backend the client’s address with XCLIENT when forward_client_ip is on', async () => {
    const [p] = (await freePorts(HOST, 1)) as [number];
    const forwarding = await startServer(
      parseConfig({ listeners: [{ protocol: 'pop3', address: HOST, port: p }], lookup: { redis: { url: world.redis!.url } }, backend: { forward_client_ip: true } }, 'forwarding'),
      createLogger('error', () => {}),
    );
    try {
      for (let i = 0; i < 100 && !forwarding.router.stats.live; i++) await sleep(100);
      // Connect from 127.0.0.5: the proxy itself reaches Dovecot from 127.0.0.1.
      const sock = connect({ host: HOST, port: p, localAddress: '127.0.0.5' });
      let got = '';
      sock.on('data', (d: Buffer) => (got += d.toString()));
      sock.write('USER bob@example.com\r\nPASS bobpw\r\nSTAT\r\nQUIT\r\n');
      await expect.poll(() => got.split('\r\n').filter((l) => l.startsWith('+OK')).length).toBe(5);
      sock.destroy();
      const lastLogin = async () => (await readFile(world.slotB.logFile, 'utf8')).split('\n').filter((l) => l.includes('pop3-login') && l.includes('user=<bob@example.com>') && l.includes('Login:')).at(-1) ?? '';
      await expect.poll(lastLogin).toMatch(/rip=127\.0\.0\.5/);
    } finally {
      await forwarding.close();
    }
  });
});

describe('spliced sessions', () => {
  it('are closed without a farewell when an event moves the store', async () => {
    const c = await raw();
    c.send(`AUTH PLAIN ${plain('carol@example.com', 'carolpw')}`);
    expect(await c.readLine()).toMatch(/^\+OK/);
    c.send('STAT');
    expect(await c.readLine()).toMatch(/^\+OK 1 /);
    let extra = '';
    c.socket.on('data', (d: Buffer | string) => (extra += d.toString()));
    await publishChange('store', 'store1', { master: 'slotB', epoch: '2' });
    try {
      await expect(c.readLine(5000)).rejects.toThrow(/closed/);
      expect(extra).toBe(''); // POP3 has no unsolicited responses
      expect(await poplib({ port: port.plain, user: 'carol@example.com', password: 'carolpw' })).toMatchObject({ subject: 'Subject: on slotB' });
    } finally {
      await publishChange('store', 'store1', { master: 'slotA', epoch: '3' });
    }
  });

  it('logged failures name the reason', () => {
    expect(logs.some((l) => l.includes('"protocol":"pop3"') && l.includes('login failed'))).toBe(true);
  });
});
