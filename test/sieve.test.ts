import { execFile } from 'node:child_process';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeCA, makeCert, type CertFiles } from './harness/certs.js';
import { imapSubjects } from './harness/clients.js';
import { startCyrusSlot, type CyrusSlot } from './harness/cyrus.js';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { lmtpTransaction } from './harness/lmtp.js';
import { startOauthIssuer, type OauthIssuer } from './harness/oauth-issuer.js';
import { waitUntil } from './harness/proc.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { writeRoutesFile, type RouteModel } from './support/routes.js';

// ManageSieve (RFC 5804) through mailsplice to Dovecot's managesieved and Cyrus's
// timsieved: a script put and activated through the proxy files a delivery made through
// the proxy's LMTP, as seen over IMAP through the proxy. alice lives on Dovecot (store
// dstore, master sieveA, replica sieveB), carol on Cyrus (no virtdomains: `carol`).

const execFileP = promisify(execFile);
const MASTER = { name: 'proxymaster', password: 'masterpw' };
const SCRIPT = 'require ["fileinto"];\r\nif header :contains "subject" "sievetest" {\r\n  fileinto "Filtered";\r\n}\r\n';

let tmp: string;
let sieveA: DovecotSlot;
let sieveB: DovecotSlot;
let cyrus: CyrusSlot;
let issuer: OauthIssuer;
let proxy: TestProxy;
let routesFile: string;
let routes: RouteModel;
let ca: CertFiles;

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-sieve-'));
  await chmod(tmp, 0o755);
  issuer = await startOauthIssuer();
  const users = [{ name: 'alice@example.com', password: 'alicepw' }];
  [sieveA, sieveB, cyrus] = await Promise.all([
    startDovecotSlot({ id: 'sieveA', host: '127.0.0.91', users, masterUsers: [MASTER], sieve: true, dir: path.join(tmp, 'sieveA') }),
    startDovecotSlot({ id: 'sieveB', host: '127.0.0.92', users, masterUsers: [MASTER], sieve: true, dir: path.join(tmp, 'sieveB') }),
    startCyrusSlot({ id: 'cysieve', host: '127.0.0.93', users: [{ name: 'carol', password: 'carolpw' }], dir: path.join(tmp, 'cyrus') }),
  ]);
  await writeFile(path.join(tmp, 'master-pw'), MASTER.password, { mode: 0o600 });
  const slot = (s: { host: string; imap: number; pop3: number; lmtp: number; sieve?: number }) => ({
    host: s.host,
    imap: String(s.imap),
    pop3: String(s.pop3),
    lmtp: String(s.lmtp),
    ...(s.sieve ? { sieve: String(s.sieve) } : {}),
    status: 'up',
  });
  routes = {
    users: { 'alice@example.com': { store: 'dstore' }, 'carol@example.com': { store: 'cstore' }, 'nosieve@example.com': { store: 'nstore' } },
    stores: {
      dstore: { master: 'sieveA', replicas: 'sieveB', status: 'active', epoch: '1' },
      cstore: { master: 'cysieve', replicas: '', status: 'active', epoch: '1' },
      nstore: { master: 'plain', replicas: '', status: 'active', epoch: '1' },
    },
    // `plain`: sieveA's address without a sieve port.
    slots: { sieveA: slot(sieveA), sieveB: slot(sieveB), cysieve: slot(cyrus), plain: slot({ ...sieveA, sieve: undefined }) },
  };
  routesFile = path.join(tmp, 'routes.yaml');
  writeRoutesFile(routesFile, routes);
  ca = await makeCA(path.join(tmp, 'certs'));
  const cert = await makeCert(path.join(tmp, 'certs'), { ca, cn: 'localhost', altNames: ['localhost', '127.0.0.1'], name: 'server' });
  proxy = await startProxy({
    listeners: [
      { protocol: 'imap' },
      { protocol: 'lmtp' },
      { protocol: 'sieve' },
      { protocol: 'sieve', tls: 'starttls', cert: cert.certFile, key: cert.keyFile },
    ],
    lookup: { file: routesFile },
    limits: { auth_failure_delay_ms: 0 },
    auth: { oauth: { issuer: issuer.issuer, audience: issuer.audience, jwt: { jwks_url: issuer.jwksUrl } } },
    backend: {
      identity_groups: [
        // Dovecot: passwords passthrough, tokens checked here and the master user logs in.
        { slots: ['sieve?'], oauth: 'check', admin_user: MASTER.name, admin_password_file: path.join(tmp, 'master-pw') },
        { slots: ['cysieve'], login_name: 'local_part' },
      ],
    },
  });
}, 90_000);

afterAll(async () => {
  await proxy?.close();
  await Promise.allSettled([sieveA?.destroy(), sieveB?.destroy(), cyrus?.destroy(), issuer?.close()]);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

/** A ManageSieve client through the proxy, past the greeting (capability lines up to OK). */
async function sieveClient(): Promise<{ c: LineClient; greeting: string[] }> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.sieve! });
  const greeting = await c.readUntil(/^(OK|NO|BYE)/);
  return { c, greeting };
}

async function plainLogin(c: LineClient, user: string, password: string): Promise<string> {
  c.send(`AUTHENTICATE "PLAIN" "${b64(`\0${user}\0${password}`)}"`);
  return c.readLine();
}

/** PUTSCRIPT + SETACTIVE over an authenticated connection; both must answer OK. */
async function putAndActivate(c: LineClient, name: string, script: string): Promise<void> {
  c.write(`PUTSCRIPT "${name}" {${Buffer.byteLength(script)}+}\r\n${script}\r\n`);
  expect(await c.readLine()).toMatch(/^OK/);
  c.send(`SETACTIVE "${name}"`);
  expect(await c.readLine()).toMatch(/^OK/);
}

function message(subject: string): string {
  return ['From: sender@example.net', 'To: someone@example.com', `Subject: ${subject}`, 'Date: Mon, 1 Jan 2024 00:00:00 +0000', '', 'body', ''].join('\r\n');
}

/** Creates a folder over IMAP through the proxy (Cyrus files only into folders that exist). */
async function createFolder(user: string, password: string, folder: string): Promise<void> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.imap! });
  try {
    await c.readLine();
    c.send(`a LOGIN ${user} ${password}`);
    expect((await c.readUntil(/^a /)).at(-1)).toMatch(/^a OK/);
    c.send(`b CREATE ${folder}`);
    await c.readUntil(/^b /);
  } finally {
    c.close();
  }
}

describe('ManageSieve front end', () => {
  it('greets with its capabilities, answers CAPABILITY, NOOP with a tag, refuses commands before login, and LOGOUT', async () => {
    const { c, greeting } = await sieveClient();
    try {
      expect(greeting).toContain('"IMPLEMENTATION" "mailsplice"');
      expect(greeting).toContain('"SASL" "PLAIN OAUTHBEARER XOAUTH2"');
      expect(greeting.at(-1)).toMatch(/^OK/);
      c.send('NOOP "abc"');
      expect(await c.readLine()).toBe('OK (TAG "abc") "NOOP completed"');
      c.send('LISTSCRIPTS');
      expect(await c.readLine()).toMatch(/^NO /);
      c.send('CAPABILITY');
      expect((await c.readUntil(/^OK/)).some((l) => l.startsWith('"SIEVE" "fileinto'))).toBe(true);
      c.send('LOGOUT');
      expect(await c.readLine()).toMatch(/^OK/);
    } finally {
      c.close();
    }
  });

  it('refuses a literal over the pre-auth limit with BYE, before reading it', async () => {
    const { c } = await sieveClient();
    try {
      c.send('AUTHENTICATE "PLAIN" {999999+}');
      expect(await c.readLine()).toBe('BYE "Literal too large"');
    } finally {
      c.close();
    }
  });

  it('a wrong password is NO; a slot without a sieve port is NO (TRYLATER)', async () => {
    const { c } = await sieveClient();
    try {
      expect(await plainLogin(c, 'alice@example.com', 'wrong')).toMatch(/^NO "Authentication failed"/);
      expect(await plainLogin(c, 'nosieve@example.com', 'x')).toMatch(/^NO \(TRYLATER\)/);
    } finally {
      c.close();
    }
  });
});

describe('through mailsplice to the backends', () => {
  it('Dovecot managesieved: PUTSCRIPT + SETACTIVE (literal SASL response), then a delivery through mailsplice LMTP is filed by the script', async () => {
    await createFolder('alice@example.com', 'alicepw', 'Filtered');
    const { c } = await sieveClient();
    try {
      // No initial response: the server's empty challenge, then the response as a literal.
      c.send('AUTHENTICATE "PLAIN"');
      expect(await c.readLine()).toBe('""');
      const msg = b64('\0alice@example.com\0alicepw');
      c.write(`{${msg.length}+}\r\n${msg}\r\n`);
      expect(await c.readLine()).toMatch(/^OK/);
      await putAndActivate(c, 'proxied', SCRIPT);
      c.send('LISTSCRIPTS');
      expect(await c.readUntil(/^OK/)).toContain('"proxied" ACTIVE');
      c.send('LOGOUT');
      await c.readLine();
    } finally {
      c.close();
    }
    const t = await lmtpTransaction({ host: proxy.host, port: proxy.ports.lmtp! }, 'sender@example.net', ['alice@example.com'], message('sievetest dovecot'));
    expect(t.results).toEqual([expect.stringMatching(/^250/)]);
    await waitUntil(async () => (await sieveA.messages('alice@example.com', 'Filtered')).length === 1, { what: 'the script filed the message', timeoutMs: 10_000 });
    expect(await imapSubjects({ host: proxy.host, port: proxy.ports.imap!, user: 'alice@example.com', password: 'alicepw', folder: 'Filtered' })).toEqual(['sievetest dovecot']);
  });

  it('Cyrus timsieved: PUTSCRIPT + SETACTIVE, then lmtpd files the delivery by the script', async () => {
    await createFolder('carol@example.com', 'carolpw', 'Filtered');
    const { c } = await sieveClient();
    try {
      expect(await plainLogin(c, 'carol@example.com', 'carolpw')).toMatch(/^OK/);
      await putAndActivate(c, 'proxied', SCRIPT);
      c.send('LOGOUT');
      await c.readLine();
    } finally {
      c.close();
    }
    const t = await lmtpTransaction({ host: proxy.host, port: proxy.ports.lmtp! }, 'sender@example.net', ['carol@example.com'], message('sievetest cyrus'));
    expect(t.results).toEqual([expect.stringMatching(/^250/)]);
    expect(await imapSubjects({ host: proxy.host, port: proxy.ports.imap!, user: 'carol@example.com', password: 'carolpw', folder: 'Filtered' })).toEqual(['sievetest cyrus']);
  });

  it('OAUTHBEARER and XOAUTH2 on ManageSieve (checked here, then the master user logs in); a refused token gets the error exchange', async () => {
    for (const [mech, msg] of [
      ['OAUTHBEARER', (t: string) => b64(`n,a=alice@example.com,\x01auth=Bearer ${t}\x01\x01`)],
      ['XOAUTH2', (t: string) => b64(`user=alice@example.com\x01auth=Bearer ${t}\x01\x01`)],
    ] as const) {
      const { c } = await sieveClient();
      try {
        c.send(`AUTHENTICATE "${mech}" "${msg(issuer.issue({ email: 'alice@example.com', expiresIn: -60 }))}"`);
        const challenge = await c.readLine();
        expect(challenge).toMatch(/^"[A-Za-z0-9+/=]+"$/);
        expect(JSON.parse(Buffer.from(challenge.slice(1, -1), 'base64').toString()).status).toBe(mech === 'OAUTHBEARER' ? 'invalid_token' : '401');
        c.send(mech === 'OAUTHBEARER' ? '"AQ=="' : '""');
        expect(await c.readLine()).toMatch(/^NO /);
        c.send(`AUTHENTICATE "${mech}" "${msg(issuer.issue({ email: 'alice@example.com' }))}"`);
        expect(await c.readLine()).toMatch(/^OK/);
        c.send('LISTSCRIPTS');
        expect((await c.readUntil(/^(OK|NO)/)).at(-1)).toMatch(/^OK/);
      } finally {
        c.close();
      }
    }
  });

  it('sieve-connect (Debian) uploads a script through mailsplice, over STARTTLS', async () => {
    const file = path.join(tmp, 'from-sieve-connect.sieve');
    await writeFile(file, SCRIPT);
    const args = ['--server', 'localhost', '--port', String(proxy.ports['sieve:starttls']), '--tlscafile', ca.certFile, '--user', 'alice@example.com', '--passwordfd', '0', '--authmech', 'PLAIN'];
    const run = (script: string, extra: string[]) =>
      execFileP('sh', ['-c', `printf %s alicepw | sieve-connect ${script}`, ...extra], { timeout: 30_000 }).catch((e: { stderr?: string; message: string }) => {
        throw new Error(`sieve-connect failed: ${e.stderr ?? e.message}`);
      });
    await run('"$@" --localsieve "$0" --remotesieve viaclient --upload', [file, ...args]);
    const { stdout } = await run('"$0" "$@" --list', args);
    expect(stdout).toMatch(/viaclient/);
  });

  it('a failover ends the ManageSieve session; the next one goes to the new master', async () => {
    const { c } = await sieveClient();
    expect(await plainLogin(c, 'alice@example.com', 'alicepw')).toMatch(/^OK/);
    c.send('LISTSCRIPTS');
    expect(await c.readUntil(/^OK/)).toContain('"proxied" ACTIVE'); // on sieveA
    routes.stores.dstore = { master: 'sieveB', replicas: 'sieveA', status: 'active', epoch: '2' };
    writeRoutesFile(routesFile, routes);
    // The proxy closes it: a read then fails once the close arrives.
    await waitUntil(async () => c.socket.destroyed || c.socket.readableEnded || (await c.readLine(500).then(() => false, (e: Error) => /closed/.test(e.message))), {
      what: 'the sieve session ended by the failover',
      timeoutMs: 10_000,
    });
    c.close();
    const next = await sieveClient();
    try {
      expect(await plainLogin(next.c, 'alice@example.com', 'alicepw')).toMatch(/^OK/);
      next.c.send('LISTSCRIPTS');
      expect(await next.c.readUntil(/^OK/)).not.toContain('"proxied" ACTIVE'); // sieveB has no script
    } finally {
      next.c.close();
    }
  });
});
