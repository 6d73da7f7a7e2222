import { execFile } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { ImapFlow } from 'imapflow';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse, stringify } from 'yaml';
import { parseConfig } from '../src/config.js';
import { createLogger } from '../src/log.js';
import { backendTlsFor } from '../src/net/backend.js';
import { startServer, type RunningServer } from '../src/server.js';
import { makeCA, makeCert, type CertFiles } from './harness/certs.js';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { freePorts } from './harness/ports.js';
import { spawnDaemon, waitUntil } from './harness/proc.js';
import { seedMessage, startWorld, type World } from './harness/world.js';
import { tempDir } from './support/tmp.js';

// TLS on every side of the proxy, with real clients and real Dovecot:
// - listeners: implicit TLS (IMAPS, POP3S) and STARTTLS, SNI (exact and wildcard), minimum
//   version, certificate reload (RunningServer.reload() and SIGHUP to a real process);
// - STARTTLS command injection;
// - TLS to backends per slot group: STARTTLS and implicit against a Dovecot with
//   ssl=required, the right CA, a wrong CA, a name check, and no TLS at all.

const execFileP = promisify(execFile);
const HOST = '127.0.0.1';
const ROOT = fileURLToPath(new URL('..', import.meta.url));

let world: World;
let slotT: DovecotSlot; // ssl = required, certificate from backendCa
let server: RunningServer;
let dir: string;
let ca: CertFiles; // signs the proxy's listener certificates
let backendCa: CertFiles;
let otherCa: CertFiles;
let rotatingCa: string;
/** The files the listeners are configured with; tests overwrite them and reload. */
let listenerCert: { certFile: string; keyFile: string };
const logs: string[] = [];
const port = { imaps: 0, imapStarttls: 0, pop3s: 0, imap: 0, pop3: 0, imapsTls13: 0 };

/** Users on slotT, one per backend TLS setting; all have password "pw". */
const T_USERS = ['starttls', 'implicit', 'named', 'wrongca', 'wrongname', 'cleartext'].map((u) => `${u}@example.com`);

beforeAll(async () => {
  dir = tempDir('tls');
  [ca, backendCa, otherCa] = await Promise.all([makeCA(join(dir, 'ca')), makeCA(join(dir, 'backend-ca'), 'backend CA'), makeCA(join(dir, 'other-ca'), 'unrelated CA')]);
  const [def, exact, wild, backendCert] = await Promise.all([
    makeCert(dir, { ca, cn: 'mail.example.test', altNames: ['mail.example.test', 'localhost', HOST], name: 'default' }),
    makeCert(dir, { ca, cn: 'imap.example.org', name: 'exact' }),
    makeCert(dir, { ca, cn: 'wild.example.net', altNames: ['*.example.net'], name: 'wild' }),
    makeCert(join(dir, 'backend'), { ca: backendCa, cn: 'backend.example.test', altNames: ['backend.example.test', '127.0.0.13'], name: 'slotT' }),
  ]);
  listenerCert = { certFile: join(dir, 'listener.crt'), keyFile: join(dir, 'listener.key') };
  copyFileSync(def.certFile, listenerCert.certFile);
  copyFileSync(def.keyFile, listenerCert.keyFile);

  world = await startWorld();
  const users = T_USERS.map((name) => ({ name, password: 'pw' }));
  slotT = await startDovecotSlot({ id: 'slotT', host: '127.0.0.13', users, tls: { certFile: backendCert.certFile, keyFile: backendCert.keyFile, required: true }, dir: join(world.tmpDir, 'slotT') });
  for (const u of T_USERS) await slotT.deliver(u, seedMessage('slotT', u));

  const slot = (host: string, imap: number, pop3: number) => ({ host, imap, pop3 });
  const routes = {
    users: {
      'alice@example.com': { store: 'store1' },
      'bob@example.com': { store: 'store2' },
      ...Object.fromEntries(T_USERS.map((u) => [u, { store: `st-${u.split('@')[0]}` }])),
    },
    stores: {
      store1: { master: 'slotA', epoch: 1 },
      store2: { master: 'slotB', epoch: 1 },
      ...Object.fromEntries(T_USERS.map((u) => [`st-${u.split('@')[0]}`, { master: `slotT-${u.split('@')[0]}`, epoch: 1 }])),
    },
    slots: {
      slotA: slot(world.slotA.host, world.slotA.imap, world.slotA.pop3),
      slotB: slot(world.slotB.host, world.slotB.imap, world.slotB.pop3),
      'slotT-starttls': slot(slotT.host, slotT.imap, slotT.pop3),
      'slotT-implicit': slot(slotT.host, slotT.imaps!, slotT.pop3s!),
      'slotT-named': slot(slotT.host, slotT.imaps!, slotT.pop3s!),
      'slotT-wrongca': slot(slotT.host, slotT.imap, slotT.pop3),
      'slotT-wrongname': slot(slotT.host, slotT.imaps!, slotT.pop3s!),
      'slotT-cleartext': slot(slotT.host, slotT.imap, slotT.pop3),
    },
  };
  // The wrong CA at first; a later test puts the right one in and reloads.
  rotatingCa = join(dir, 'rotating-ca.pem');
  copyFileSync(otherCa.certFile, rotatingCa);
  const routesFile = join(dir, 'routes.yaml');
  writeFileSync(routesFile, stringify(routes));

  [port.imaps, port.imapStarttls, port.pop3s, port.imap, port.pop3, port.imapsTls13] = (await freePorts(HOST, 6)) as [number, number, number, number, number, number];
  const files = { cert: listenerCert.certFile, key: listenerCert.keyFile };
  const cfg = parseConfig(
    {
      listeners: [
        { protocol: 'imap', address: HOST, port: port.imaps, tls: 'implicit', ...files, sni: { 'imap.example.org': { cert: exact.certFile, key: exact.keyFile }, '*.example.net': { cert: wild.certFile, key: wild.keyFile } } },
        { protocol: 'imap', address: HOST, port: port.imapStarttls, tls: 'starttls', ...files },
        { protocol: 'pop3', address: HOST, port: port.pop3s, tls: 'implicit', ...files },
        { protocol: 'imap', address: HOST, port: port.imap },
        { protocol: 'pop3', address: HOST, port: port.pop3 },
        { protocol: 'imap', address: HOST, port: port.imapsTls13, tls: 'implicit', min_tls_version: 'TLSv1.3', ...files },
      ],
      lookup: { file: routesFile },
      limits: { login_timeout_ms: 3000 },
      backend: {
        // A slot in no group would use backend.tls: none here.
        tls_groups: [
          { slots: ['slotT-starttls'], mode: 'starttls', ca: backendCa.certFile },
          { slots: ['slotT-impl*'], mode: 'implicit', ca: backendCa.certFile },
          { slots: ['slotT-named'], mode: 'implicit', ca: backendCa.certFile, servername: 'backend.example.test' },
          { slots: ['slotT-wrongca'], mode: 'starttls', ca: rotatingCa },
          { slots: ['slotT-wrongname'], mode: 'implicit', ca: backendCa.certFile, servername: 'other.example.test' },
        ],
      },
    },
    'tls test config',
    dir,
  );
  server = await startServer(cfg, createLogger('debug', (l) => void logs.push(l)));
});

afterAll(async () => {
  await server?.close();
  await slotT?.stop();
  await world?.stop();
});

/** Handshakes with a listener and returns the CN of the certificate it presented. */
function peerCn(p: number, servername?: string, opts: tls.ConnectionOptions = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: HOST, port: p, ca: ca.certPem, ...(servername ? { servername } : {}), checkServerIdentity: () => undefined, ...opts }, () => {
      const cn = s.getPeerCertificate().subject?.CN;
      s.destroy();
      resolve(Array.isArray(cn) ? cn.join(',') : (cn ?? ''));
    });
    s.once('error', reject);
  });
}

function imapflow(p: number, user: string, pass: string, extra: Partial<ConstructorParameters<typeof ImapFlow>[0]> = {}): ImapFlow {
  return new ImapFlow({ host: HOST, port: p, secure: true, servername: 'mail.example.test', tls: { ca: ca.certPem }, auth: { user, pass }, logger: false, ...extra });
}

async function subjects(client: ImapFlow): Promise<string[]> {
  const lock = await client.getMailboxLock('INBOX');
  try {
    const out: string[] = [];
    for await (const m of client.fetch('1:*', { envelope: true })) out.push(m.envelope?.subject ?? '');
    return out;
  } finally {
    lock.release();
  }
}

async function imapSubjectsVia(p: number, user: string, pass: string, extra: Partial<ConstructorParameters<typeof ImapFlow>[0]> = {}): Promise<string[]> {
  const client = imapflow(p, user, pass, extra);
  await client.connect();
  try {
    return await subjects(client);
  } finally {
    await client.logout();
  }
}

async function rawImap(p: number): Promise<LineClient> {
  const c = await connectLines({ host: HOST, port: p });
  expect(await c.readLine()).toMatch(/^\* OK /);
  return c;
}

function upgrade(c: LineClient): Promise<LineClient> {
  return connectLines({ host: HOST, port: 0, tls: { socket: c.socket, ca: ca.certPem, servername: 'mail.example.test' } });
}

describe('listeners', () => {
  it('IMAPS with imapflow reaches the right slot', async () => {
    expect(await imapSubjectsVia(port.imaps, 'alice@example.com', 'alicepw')).toEqual(['on slotA']);
  });

  it('IMAP STARTTLS with imapflow (doSTARTTLS), LOGINDISABLED before TLS', async () => {
    const c = await rawImap(port.imapStarttls);
    c.send('a CAPABILITY');
    const caps = (await c.readUntil(/^a /))[0]!;
    expect(caps).toMatch(/STARTTLS/);
    expect(caps).toMatch(/LOGINDISABLED/);
    expect(caps).not.toMatch(/AUTH=PLAIN/);
    c.send('b LOGIN alice@example.com alicepw');
    expect(await c.readLine()).toMatch(/^b NO \[PRIVACYREQUIRED\]/);
    c.close();
    expect(await imapSubjectsVia(port.imapStarttls, 'bob@example.com', 'bobpw', { secure: false, doSTARTTLS: true })).toEqual(['on slotB']);
  });

  it('POP3S with curl', async () => {
    const { stdout } = await execFileP('curl', ['-s', '--max-time', '20', '--cacert', ca.certFile, '--user', 'alice@example.com:alicepw', `pop3s://${HOST}:${port.pop3s}/1`]);
    expect(stdout).toContain('Subject: on slotA');
  });

  it('SNI picks the certificate: exact name, wildcard, default', async () => {
    expect(await peerCn(port.imaps, 'imap.example.org')).toBe('imap.example.org');
    expect(await peerCn(port.imaps, 'IMAP.Example.ORG')).toBe('imap.example.org');
    expect(await peerCn(port.imaps, 'mx1.example.net')).toBe('wild.example.net');
    expect(await peerCn(port.imaps, 'a.b.example.net')).toBe('mail.example.test'); // a wildcard covers one label
    expect(await peerCn(port.imaps, 'unknown.example.com')).toBe('mail.example.test');
    expect(await peerCn(port.imaps)).toBe('mail.example.test'); // no SNI at all
    // And the certificates verify for those names with a normal client.
    expect(await peerCn(port.imaps, 'mx1.example.net', { checkServerIdentity: tls.checkServerIdentity })).toBe('wild.example.net');
  });

  it('enforces the minimum TLS version', async () => {
    await expect(peerCn(port.imapsTls13, undefined, { maxVersion: 'TLSv1.2' })).rejects.toThrow();
    // The operator can see why with log level debug.
    await expect.poll(() => logs.filter((l) => l.includes('tls handshake failed')).join('\n')).toMatch(/unsupported protocol|version/i);
    expect(await peerCn(port.imapsTls13, undefined, { minVersion: 'TLSv1.3' })).toBe('mail.example.test');
    expect(await peerCn(port.imaps, undefined, { maxVersion: 'TLSv1.2' })).toBe('mail.example.test'); // TLSv1.2 is the default floor
    await expect(peerCn(port.imaps, undefined, { minVersion: 'TLSv1', maxVersion: 'TLSv1.1', ciphers: 'DEFAULT@SECLEVEL=0' })).rejects.toThrow();
  });

  it('a client that never completes the handshake is cut off at the login deadline', async () => {
    const sock = net.connect({ host: HOST, port: port.imaps });
    const started = Date.now();
    await new Promise<void>((resolve) => sock.once('close', () => resolve()));
    expect(Date.now() - started).toBeGreaterThan(2000); // login_timeout_ms: 3000
    expect(Date.now() - started).toBeLessThan(6000);
  });
});

describe('STARTTLS command injection', () => {
  it('IMAP: nothing pipelined after STARTTLS is executed', async () => {
    const c = await rawImap(port.imapStarttls);
    c.write('a STARTTLS\r\nb LOGIN alice@example.com alicepw\r\nc NOOP\r\n');
    expect(await c.readLine()).toBe('a OK Begin TLS negotiation now');
    const s = await upgrade(c);
    s.send('d CAPABILITY');
    // The first thing after the handshake answers d: b and c were dropped, not run.
    const lines = await s.readUntil(/^d /);
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(/^\* CAPABILITY .*AUTH=PLAIN/);
    expect(lines[0]).not.toMatch(/STARTTLS|LOGINDISABLED/);
    expect(lines[1]).toMatch(/^d OK/);
    s.send('e SELECT INBOX'); // not logged in: the injected LOGIN did not happen
    expect(await s.readLine()).toMatch(/^e BAD /);
    s.close();
  });
});

describe('certificate reload', () => {
  it('server.reload(): open sessions stay up, the next handshake sees the new certificate', async () => {
    const client = imapflow(port.imaps, 'alice@example.com', 'alicepw');
    await client.connect();
    try {
      expect(await subjects(client)).toEqual(['on slotA']);
      const renewed = await makeCert(join(dir, 'renewed'), { ca, cn: 'renewed.example.test', altNames: ['mail.example.test', HOST], name: 'renewed' });
      copyFileSync(renewed.certFile, listenerCert.certFile);
      copyFileSync(renewed.keyFile, listenerCert.keyFile);
      expect(await peerCn(port.imaps)).toBe('mail.example.test'); // files alone change nothing
      server.reload();
      expect(await peerCn(port.imaps)).toBe('renewed.example.test');
      expect(await peerCn(port.pop3s)).toBe('renewed.example.test');
      expect(await peerCn(port.imaps, 'imap.example.org')).toBe('imap.example.org'); // SNI map still there
      expect(await subjects(client)).toEqual(['on slotA']); // the old session still works
      expect(client.usable).toBe(true);

      // A broken file: the reload fails, is logged, and the current certificate stays.
      writeFileSync(listenerCert.certFile, 'not a certificate');
      server.reload();
      expect(logs.some((l) => l.includes('certificate reload failed'))).toBe(true);
      expect(await peerCn(port.imaps)).toBe('renewed.example.test');
      copyFileSync(renewed.certFile, listenerCert.certFile);
    } finally {
      await client.logout();
    }
  });

  it('SIGHUP to a running mailsplice process does the same', async () => {
    const pdir = tempDir('hup');
    const cert = join(pdir, 'cert.pem');
    const key = join(pdir, 'key.pem');
    const first = await makeCert(pdir, { ca, cn: 'before-hup.example.test', altNames: ['mail.example.test', HOST], name: 'before' });
    const second = await makeCert(pdir, { ca, cn: 'after-hup.example.test', altNames: ['mail.example.test', HOST], name: 'after' });
    copyFileSync(first.certFile, cert);
    copyFileSync(first.keyFile, key);
    const [p] = (await freePorts(HOST, 1)) as [number];
    const routes = join(pdir, 'routes.yaml');
    writeFileSync(routes, stringify({ users: { 'alice@example.com': { store: 's' } }, stores: { s: { master: 'slotA', epoch: 1 } }, slots: { slotA: { host: world.slotA.host, imap: world.slotA.imap } } }));
    const config = join(pdir, 'mailsplice.yaml');
    writeFileSync(config, stringify({ listeners: [{ protocol: 'imap', address: HOST, port: p, tls: 'implicit', cert, key }], lookup: { file: routes }, log: { level: 'info' } }));
    const proc = spawnDaemon(process.execPath, ['--import', 'tsx', join(ROOT, 'src/cli.ts'), 'serve', '--config', config], ROOT);
    try {
      await waitUntil(async () => (await peerCn(p)) === 'before-hup.example.test', { what: 'mailsplice child', daemon: proc, timeoutMs: 30_000 });
      const c = await connectLines({ host: HOST, port: p, tls: { ca: ca.certPem, servername: 'mail.example.test' } });
      expect(await c.readLine()).toMatch(/^\* OK /);
      c.send('a LOGIN alice@example.com alicepw');
      expect((await c.readUntil(/^a /)).at(-1)).toMatch(/^a OK/);

      copyFileSync(second.certFile, cert);
      copyFileSync(second.keyFile, key);
      process.kill(proc.child.pid!, 'SIGHUP');
      await waitUntil(async () => (await peerCn(p)) === 'after-hup.example.test', { what: 'new certificate after SIGHUP', daemon: proc, timeoutMs: 10_000 });
      c.send('b NOOP');
      expect((await c.readUntil(/^b /)).at(-1)).toMatch(/^b OK/);
      c.close();
    } finally {
      await proc.stop();
    }
    expect(proc.output()).toContain('reloaded');
  });
});

describe('TLS to the backends', () => {
  const pop3 = async (user: string, p = port.pop3): Promise<string[]> => {
    const c = await connectLines({ host: HOST, port: p });
    try {
      const out = [await c.readLine()];
      c.send(`AUTH PLAIN ${Buffer.from(`\0${user}\0pw`).toString('base64')}`);
      out.push(await c.readLine());
      if (out[1]!.startsWith('+OK')) {
        c.send('RETR 1');
        out.push(...(await c.readUntil(/^\.$/)).filter((l) => l.startsWith('Subject:')));
        c.send('QUIT');
        out.push(await c.readLine());
      }
      return out;
    } finally {
      c.close();
    }
  };
  const imapLogin = async (user: string): Promise<string> => {
    const c = await rawImap(port.imap);
    try {
      c.send(`a LOGIN ${user} pw`);
      return (await c.readUntil(/^a /)).at(-1)!;
    } finally {
      c.close();
    }
  };

  it('STARTTLS to the backend with the right CA (IMAP and POP3)', async () => {
    const imap = new ImapFlow({ host: HOST, port: port.imap, secure: false, doSTARTTLS: false, auth: { user: 'starttls@example.com', pass: 'pw' }, logger: false });
    await imap.connect();
    try {
      expect(await subjects(imap)).toEqual(['on slotT']);
    } finally {
      await imap.logout();
    }
    expect((await pop3('starttls@example.com')).slice(1)).toEqual([expect.stringMatching(/^\+OK/), 'Subject: on slotT', expect.stringMatching(/^\+OK/)]);
  });

  it('implicit TLS to the backend, by IP and by servername (IMAP and POP3)', async () => {
    for (const user of ['implicit@example.com', 'named@example.com']) {
      expect(await imapLogin(user)).toMatch(/^a OK /);
      expect((await pop3(user))[2]).toBe('Subject: on slotT');
    }
  });

  it('a wrong CA: UNAVAILABLE / SYS/TEMP, and the log names the certificate problem', async () => {
    expect(await imapLogin('wrongca@example.com')).toMatch(/^a NO \[UNAVAILABLE\] /);
    expect((await pop3('wrongca@example.com'))[1]).toMatch(/^-ERR \[SYS\/TEMP\] /);
    const why = logs.filter((l) => l.includes('"login":"wrongca@example.com"'));
    expect(why).toHaveLength(2);
    for (const l of why) expect(l).toMatch(/certificate check failed \((UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)/);
  });

  it('reload() reads backend CA files again', async () => {
    copyFileSync(backendCa.certFile, rotatingCa);
    expect(await imapLogin('wrongca@example.com')).toMatch(/^a NO \[UNAVAILABLE\] /); // still the old CA
    server.reload();
    expect(await imapLogin('wrongca@example.com')).toMatch(/^a OK /);
    expect((await pop3('wrongca@example.com'))[2]).toBe('Subject: on slotT');
  });

  it('a certificate for another name: refused, and the log says so', async () => {
    expect(await imapLogin('wrongname@example.com')).toMatch(/^a NO \[UNAVAILABLE\] /);
    expect((await pop3('wrongname@example.com'))[1]).toMatch(/^-ERR \[SYS\/TEMP\] /);
    expect(logs.filter((l) => l.includes('"login":"wrongname@example.com"') && l.includes('ERR_TLS_CERT_ALTNAME_INVALID'))).toHaveLength(2);
  });

  it('no TLS to a backend that requires it: a temporary error, not a wrong password', async () => {
    expect(await imapLogin('cleartext@example.com')).toMatch(/^a NO \[UNAVAILABLE\] /);
    expect((await pop3('cleartext@example.com'))[1]).toMatch(/^-ERR \[SYS\/TEMP\] /);
    const why = logs.filter((l) => l.includes('"login":"cleartext@example.com"'));
    expect(why.some((l) => l.includes('LOGINDISABLED'))).toBe(true);
    expect(why.some((l) => l.includes('does it need backend TLS'))).toBe(true);
  });
});

describe('configuration', () => {
  it('backend.tls_groups: first matching glob wins, else backend.tls', () => {
    const cfg = parseConfig(
      {
        listeners: [{ protocol: 'imap', port: 143 }],
        lookup: { file: 'routes.yaml' },
        backend: {
          tls: { mode: 'none' },
          tls_groups: [
            { slots: ['sloti30*', 'slotq?'], mode: 'starttls', ca: 'ca.pem' },
            { slots: ['sloti3*'], mode: 'implicit', verify: false },
            { slots: ['exact.slot'], mode: 'implicit' },
          ],
        },
      },
      'unit',
      '/etc/mailsplice',
    );
    const mode = (slot: string) => backendTlsFor(cfg.backend, slot).mode;
    expect(mode('sloti30t01')).toBe('starttls');
    expect(mode('slotq1')).toBe('starttls');
    expect(mode('slotq12')).toBe('none'); // ? is exactly one character
    expect(mode('sloti31t01')).toBe('implicit');
    expect(mode('exact.slot')).toBe('implicit');
    expect(mode('exactXslot')).toBe('none'); // "." is literal
    expect(mode('xsloti30')).toBe('none'); // the whole id must match
    expect(backendTlsFor(cfg.backend, 'sloti30t01').ca).toBe('/etc/mailsplice/ca.pem'); // relative to the config file
    expect(backendTlsFor(cfg.backend, 'sloti31').verify).toBe(false);
    expect(() => parseConfig({ listeners: [{ protocol: 'imap', port: 143 }], lookup: { file: 'r' }, backend: { tls_groups: [{ slots: [], mode: 'starttls' }] } }, 'unit')).toThrow(/tls_groups/);
  });

  it('the TLS example in README.md is a valid config', () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const section = readme.slice(readme.indexOf('\n## TLS\n'));
    const yamlBlock = /```yaml\n([\s\S]*?)```/.exec(section)?.[1];
    expect(yamlBlock).toBeDefined();
    const doc = parse(yamlBlock!) as Record<string, unknown>;
    const cfg = parseConfig({ ...doc, lookup: { file: 'routes.yaml' } }, 'README.md');
    expect(cfg.listeners.map((l) => l.tls)).toEqual(['implicit', 'starttls']);
    expect(backendTlsFor(cfg.backend, 'sloti30t01').mode).toBe('starttls');
  });
});

describe('bookkeeping', () => {
  it('every TLS connection gives its slot back when it closes', async () => {
    await sleep(100);
    await expect.poll(() => server.proxies.map((p) => p.connections), { timeout: 5000 }).toEqual(server.proxies.map(() => 0));
  });
});
