import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ImapFlow } from 'imapflow';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeCA, makeCert, type CertFiles } from './harness/certs.js';
import { imapSubjects, pop3Uidls } from './harness/clients.js';
import { startCyrusSlot, type CyrusSlot } from './harness/cyrus.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { openLmtp, wireBody } from './harness/lmtp.js';
import { run } from './harness/proc.js';
import { startSlapd, type Slapd } from './harness/slapd.js';
import { writeRoutesFile, type RouteModel } from './support/routes.js';
import { startProxy, type TestProxy } from './support/proxy.js';

// The Cyrus 3.6 and slapd test harness against the real daemons (installed by
// .ci/run through test/harness/setup-cyrus.sh), then one routing smoke test
// through mailsplice in front of a Cyrus slot.

const USERS = [
  { name: 'alice', password: 'alicepw' },
  // Bytes a shell's printf would expand: saslpasswd2 must get them as they are.
  { name: 'bob', password: 'bob\\tpw%s' },
];
const alice = USERS[0]!;
const bob = USERS[1]!;
/** In proxyservers only: may act as any user without being an admin. */
const proxyUser = { name: 'mailsplice', password: 'proxypw' };

let tmp: string;
let cyrusA: CyrusSlot;
let cyrusB: CyrusSlot;
let ldap: Slapd;
let ca: CertFiles;
let seq = 0;

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-cyrus-test-'));
  await chmod(tmp, 0o755); // Cyrus's services run as `cyrus`
  ca = await makeCA(path.join(tmp, 'certs'));
  const cert = await makeCert(path.join(tmp, 'certs'), { ca, cn: 'cyrusb.test', altNames: ['cyrusb.test', '127.0.0.62'] });
  [cyrusA, cyrusB, ldap] = await Promise.all([
    startCyrusSlot({ id: 'cyrusA', host: '127.0.0.61', users: USERS, proxyUsers: [proxyUser], dir: path.join(tmp, 'cyrusA') }),
    startCyrusSlot({ id: 'cyrusB', host: '127.0.0.62', users: USERS, dir: path.join(tmp, 'cyrusB'), tls: cert }),
    startSlapd({ dir: path.join(tmp, 'slapd') }),
  ]);
});

afterAll(async () => {
  await Promise.allSettled([cyrusA?.destroy(), cyrusB?.destroy(), ldap?.destroy()]);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

function message(subject: string, to = 'someone@example.com'): string {
  return [
    'From: sender@example.net',
    `To: ${to}`,
    `Subject: ${subject}`,
    `Message-ID: <cyrus-harness-${++seq}-${process.pid}@example.net>`,
    'Date: Mon, 1 Jan 2024 00:00:00 +0000',
    '',
    `Body of ${subject}.`,
    '',
  ].join('\r\n');
}

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

async function imapOpen(slot: CyrusSlot): Promise<LineClient> {
  const c = await connectLines({ host: slot.host, port: slot.imap });
  expect(await c.readLine()).toMatch(/^\* OK /);
  return c;
}

/** Sends a tagged command; resolves with the tagged reply line (untagged ones are in `untagged`). */
async function imapCommand(c: LineClient, tag: string, command: string, untagged: string[] = []): Promise<string> {
  c.send(`${tag} ${command}`);
  const lines = await c.readUntil(new RegExp(`^${tag} `));
  untagged.push(...lines.slice(0, -1));
  return lines.at(-1)!;
}

function refused(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    s.setTimeout(2000, () => (s.destroy(), resolve(false)));
    s.once('connect', () => (s.destroy(), resolve(false)));
    s.once('error', () => resolve(true));
  });
}

describe('Cyrus slot', () => {
  it('lets a user log in over IMAP and see INBOX, and delivers over the preauthenticated LMTP port', async () => {
    const client = new ImapFlow({ host: cyrusA.host, port: cyrusA.imap, secure: false, auth: { user: alice.name, pass: alice.password }, logger: false });
    await client.connect();
    try {
      expect((await client.list()).map((m) => m.path)).toContain('INBOX');
    } finally {
      await client.logout();
    }
    expect(await cyrusA.deliver(alice.name, message('first for alice'))).toMatch(/^250 /);
    expect(await imapSubjects({ host: cyrusA.host, port: cyrusA.imap, user: alice.name, password: alice.password })).toContain('first for alice');
    // The password with a backslash and a percent sign was stored byte for byte.
    expect(await imapSubjects({ host: cyrusA.host, port: cyrusA.imap, user: bob.name, password: bob.password })).toEqual([]);
  });

  it.each([
    ['the admin', () => cyrusA.admin],
    ['a proxyservers user', () => proxyUser],
  ])("lets %s AUTHENTICATE PLAIN with authzid = a user and get that user's session", async (_, who) => {
    const { name, password } = who();
    await cyrusA.deliver(alice.name, message(`for ${name} to see`));
    const c = await imapOpen(cyrusA);
    try {
      const ok = await imapCommand(c, 'a1', `AUTHENTICATE PLAIN ${b64(`${alice.name}\0${name}\0${password}`)}`);
      expect(ok).toMatch(/^a1 OK /);
      const fetched: string[] = [];
      expect(await imapCommand(c, 'a2', 'EXAMINE INBOX')).toMatch(/^a2 OK /);
      expect(await imapCommand(c, 'a3', 'FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])', fetched)).toMatch(/^a3 OK /);
      expect(fetched.join('\n')).toContain(`Subject: for ${name} to see`);
    } finally {
      c.close();
    }
  });

  it('refuses authzid = another user to a plain user', async () => {
    // A plain user is no proxy server: bob may not act as alice.
    const d = await imapOpen(cyrusA);
    try {
      expect(await imapCommand(d, 'b1', `AUTHENTICATE PLAIN ${b64(`${alice.name}\0${bob.name}\0${bob.password}`)}`)).toMatch(/^b1 NO /);
    } finally {
      d.close();
    }
  });

  it('pushes a delivery to an IDLE session at once (idled runs; without it imapd polls every 60 s)', async () => {
    const c = await imapOpen(cyrusA);
    try {
      expect(await imapCommand(c, 'i1', `AUTHENTICATE PLAIN ${b64(`\0${alice.name}\0${alice.password}`)}`)).toMatch(/^i1 OK /);
      expect(await imapCommand(c, 'i2', 'SELECT INBOX')).toMatch(/^i2 OK /);
      c.send('i3 IDLE');
      expect(await c.readLine()).toMatch(/^\+ /);
      await cyrusA.deliver(alice.name, message('while idling'));
      await c.readUntil(/^\* \d+ EXISTS$/, 10_000);
      c.send('DONE');
      expect((await c.readUntil(/^i3 /)).at(-1)).toMatch(/^i3 OK /);
    } finally {
      c.close();
    }
  });

  it('lets a user log in over POP3 and refuses a wrong password', async () => {
    await cyrusA.deliver(bob.name, message('pop for bob'));
    expect((await pop3Uidls({ host: cyrusA.host, port: cyrusA.pop3, user: bob.name, password: bob.password })).length).toBeGreaterThan(0);
    await expect(pop3Uidls({ host: cyrusA.host, port: cyrusA.pop3, user: bob.name, password: 'wrong' })).rejects.toThrow(/Invalid login|ERR/);
  });

  it('demands AUTH on the authenticated LMTP port (430 at MAIL FROM) and delivers after AUTH PLAIN as the admin', async () => {
    const c = await openLmtp({ host: cyrusA.host, port: cyrusA.lmtpAuth });
    try {
      expect(await c.line()).toMatch(/^220 /);
      c.send('LHLO harness.test');
      expect((await c.reply()).join('\n')).toMatch(/^250-AUTH PLAIN LOGIN$/m);
      c.send('MAIL FROM:<sender@example.net>');
      expect(await c.line()).toMatch(/^430 /);
      c.send(`AUTH PLAIN ${b64(`\0${cyrusA.admin.name}\0${cyrusA.admin.password}`)}`);
      expect(await c.line()).toMatch(/^235 /);
      c.send('MAIL FROM:<sender@example.net>');
      expect(await c.line()).toMatch(/^250 /);
      // With virtdomains off, the domain part is dropped: this is user/bob.
      c.send('RCPT TO:<bob@example.com>');
      expect(await c.line()).toMatch(/^250 /);
      c.send('DATA');
      expect(await c.line()).toMatch(/^354 /);
      c.write(wireBody(message('authenticated lmtp')));
      expect(await c.line()).toMatch(/^250 /);
      c.send('QUIT');
    } finally {
      c.close();
    }
    expect(await imapSubjects({ host: cyrusA.host, port: cyrusA.imap, user: bob.name, password: bob.password })).toContain('authenticated lmtp');
  });

  it('keeps its data across stop() and start(), also when master was SIGKILLed and its services survived', async () => {
    await cyrusA.deliver(alice.name, message('before restart'));
    await cyrusA.stop();
    expect(await refused(cyrusA.host, cyrusA.imap)).toBe(true);
    await cyrusA.start();
    expect(await imapSubjects({ host: cyrusA.host, port: cyrusA.imap, user: alice.name, password: alice.password })).toContain('before restart');

    // A busy imapd outlives a SIGKILLed master and keeps the port; stop() ends it too.
    const busy = await imapOpen(cyrusA);
    process.kill(Number((await readFile(cyrusA.pidFile, 'utf8')).trim()), 'SIGKILL');
    expect(await imapCommand(busy, 'n1', 'NOOP')).toMatch(/^n1 OK /);
    busy.close();
    await cyrusA.stop();
    expect(await refused(cyrusA.host, cyrusA.imap)).toBe(true);
    expect(await refused(cyrusA.host, cyrusA.lmtp)).toBe(true);
    await cyrusA.start();
    expect(await imapSubjects({ host: cyrusA.host, port: cyrusA.imap, user: alice.name, password: alice.password })).toContain('before restart');
  });

  it('offers STARTTLS on LMTP and implicit TLS on imaps when given a certificate', async () => {
    // s_client does LHLO and STARTTLS itself; what we send runs inside TLS. Cyrus ends
    // the TLS session without close_notify after QUIT.
    const out = await run('timeout', ['20', 'openssl', 's_client', '-quiet', '-crlf', '-ignore_unexpected_eof', '-starttls', 'lmtp',
      '-connect', `${cyrusB.host}:${cyrusB.lmtpAuth}`, '-CAfile', ca.certFile, '-verify_return_error', '-verify_hostname', 'cyrusb.test'],
    { input: 'LHLO harness.test\nQUIT\n' });
    expect(out).toMatch(/^250-AUTH PLAIN LOGIN\r?$/m);
    // bob: alice's mailbox on this slot is the replica of the sync test below.
    await cyrusB.deliver(bob.name, message('over imaps'));
    expect(await imapSubjects({ host: cyrusB.host, port: cyrusB.imaps!, user: bob.name, password: bob.password, caFile: ca.certFile })).toContain('over imaps');
  });

  it('replicates one user to another slot with sync_client -u', async () => {
    await cyrusA.deliver(alice.name, message('replicated'));
    await cyrusA.syncUser(alice.name, cyrusB);
    expect(await imapSubjects({ host: cyrusB.host, port: cyrusB.imap, user: alice.name, password: alice.password })).toContain('replicated');
    expect(await imapSubjects({ host: cyrusB.host, port: cyrusB.imap, user: alice.name, password: alice.password })).toEqual(
      await imapSubjects({ host: cyrusA.host, port: cyrusA.imap, user: alice.name, password: alice.password }),
    );
  });
});

describe('slapd', () => {
  /** ldapwhoami as a DN; the password goes through a file (-y), not the command line. */
  async function whoami(dn: string, password: string, url = ldap.url): Promise<string> {
    const pwFile = path.join(tmp, `pw-${++seq}`);
    await writeFile(pwFile, password, { mode: 0o600 });
    try {
      return await run('ldapwhoami', ['-x', '-H', url, '-o', 'nettimeout=5', '-D', dn, '-y', pwFile]);
    } finally {
      await rm(pwFile, { force: true });
    }
  }

  it('binds alice with her password and refuses a wrong one', async () => {
    expect(await whoami(ldap.userDn('alice'), 'alicepw')).toMatch(/^dn:uid=alice,ou=people,dc=example,dc=com/);
    await expect(whoami(ldap.userDn('alice'), 'wrong')).rejects.toThrow(/Invalid credentials \(49\)/);
  });

  it('finds a user by an alias address (mailAlternateAddress) as the admin', async () => {
    const pwFile = path.join(tmp, 'ldap-admin-pw');
    await writeFile(pwFile, ldap.adminPassword, { mode: 0o600 });
    const out = await run('ldapsearch', ['-x', '-LLL', '-H', ldap.url, '-o', 'nettimeout=5', '-D', ldap.adminDn, '-y', pwFile,
      '-b', ldap.peopleDn, '(mailAlternateAddress=ali@example.org)', 'uid', 'mail']);
    expect(out).toMatch(/^dn: uid=alice,ou=people,dc=example,dc=com$/m);
    expect(out).toMatch(/^mail: alice@example.com$/m);
  });

  it('can be stopped and started again on the same port with the same data', async () => {
    await ldap.stop();
    await expect(whoami(ldap.userDn('bob'), 'bobpw')).rejects.toThrow(/Can't contact LDAP server/);
    await ldap.start();
    expect(await whoami(ldap.userDn('bob'), 'bobpw')).toMatch(/^dn:uid=bob,/);
  });
});

describe('mailsplice in front of a Cyrus slot', () => {
  let proxy: TestProxy;

  beforeAll(async () => {
    const slot = (s: CyrusSlot) => ({ host: s.host, imap: String(s.imap), pop3: String(s.pop3), lmtp: String(s.lmtp), status: 'up' });
    // Cyrus runs without virtdomains here: the backend login is the bare name.
    const routes: RouteModel = {
      users: { 'alice@example.com': { store: 'cstore', backend_login: alice.name } },
      stores: { cstore: { master: 'cyrusA', replicas: 'cyrusB', status: 'active', epoch: '1' } },
      slots: { cyrusA: slot(cyrusA), cyrusB: slot(cyrusB) },
    };
    const routesFile = path.join(tmp, 'routes.yaml');
    writeRoutesFile(routesFile, routes);
    proxy = await startProxy({ listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }], lookup: { file: routesFile } });
  });

  afterAll(async () => {
    await proxy?.close();
  });

  it("passes a login with the user's own password through to Cyrus (IMAP and POP3)", async () => {
    await cyrusA.deliver(alice.name, message('through the proxy'));
    const via = { host: proxy.host, user: 'alice@example.com', password: alice.password };
    expect(await imapSubjects({ ...via, port: proxy.ports.imap! })).toContain('through the proxy');
    expect(await pop3Uidls({ ...via, port: proxy.ports.pop3! })).toEqual(
      await pop3Uidls({ host: cyrusA.host, port: cyrusA.pop3, user: alice.name, password: alice.password }),
    );
  });
});
