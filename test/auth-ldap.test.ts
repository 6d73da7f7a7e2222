import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeCA, makeCert } from './harness/certs.js';
import { imapSubjects, pop3Uidls } from './harness/clients.js';
import { CYRUS_ADMIN, startCyrusSlot, type CyrusSlot } from './harness/cyrus.js';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { LDAP_USERS, startSlapd, type Slapd } from './harness/slapd.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { createLogger } from '../src/log.js';
import { writeRoutesFile, type RouteModel } from './support/routes.js';

// Passwords checked at the proxy against a real slapd, and the backend identity rule
// against a real Cyrus 3.6 (admin in proxyservers) and a real Dovecot (master user):
// alice@example.com lives on the Cyrus slot (which knows her as `alice`, no virtdomains),
// bob@example.com on the Dovecot slot. The directory is the slapd harness's: alice has
// the aliases alice.smith@example.com and ali@example.org (mailAlternateAddress).
// carol (Cyrus) and dave (Dovecot) have other passwords on their backends than in the
// directory: only a login as the admin/master user gets them in, never passthrough.

const MASTER = { name: 'proxymaster', password: 'masterpw' };

let tmp: string;
let cyrus: CyrusSlot;
let dove: DovecotSlot;
let ldap: Slapd;
let routesFile: string;
let seq = 0;
const proxies: TestProxy[] = [];

function message(subject: string): string {
  return [
    'From: sender@example.net',
    'To: someone@example.com',
    `Subject: ${subject}`,
    `Message-ID: <auth-ldap-${++seq}-${process.pid}@example.net>`,
    'Date: Mon, 1 Jan 2024 00:00:00 +0000',
    '',
    `Body of ${subject}.`,
    '',
  ].join('\r\n');
}

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-auth-ldap-'));
  await chmod(tmp, 0o755); // Cyrus and Dovecot run as their own users
  [cyrus, dove, ldap] = await Promise.all([
    startCyrusSlot({
      id: 'cyrus1',
      host: '127.0.0.71',
      users: [{ name: 'alice', password: 'alicepw' }, { name: 'carol', password: 'carol-on-cyrus-only' }],
      dir: path.join(tmp, 'cyrus1'),
    }),
    startDovecotSlot({
      id: 'dove1',
      host: '127.0.0.72',
      users: [{ name: 'bob@example.com', password: 'bobpw' }, { name: 'dave@example.com', password: 'dave-on-dovecot-only' }],
      masterUsers: [MASTER],
      dir: path.join(tmp, 'dove1'),
    }),
    startSlapd({ dir: path.join(tmp, 'slapd'), users: [...LDAP_USERS, { uid: 'carol', password: 'carolpw' }, { uid: 'dave', password: 'davepw' }] }),
  ]);
  await writeFile(path.join(tmp, 'ldap-pw'), `${ldap.adminPassword}\n`, { mode: 0o600 });
  await writeFile(path.join(tmp, 'cyrus-admin-pw'), `${CYRUS_ADMIN.password}\n`, { mode: 0o600 });
  await writeFile(path.join(tmp, 'dove-master-pw'), MASTER.password, { mode: 0o600 });
  const slot = (s: { host: string; imap: number; pop3: number; lmtp: number }) => ({ host: s.host, imap: String(s.imap), pop3: String(s.pop3), lmtp: String(s.lmtp), status: 'up' });
  // No backend_login anywhere: the Cyrus group's login_name rule gives `alice`.
  const routes: RouteModel = {
    users: {
      'alice@example.com': { store: 'cstore' },
      'carol@example.com': { store: 'cstore' },
      'bob@example.com': { store: 'dstore' },
      'dave@example.com': { store: 'dstore' },
    },
    stores: {
      cstore: { master: 'cyrus1', replicas: '', status: 'active', epoch: '1' },
      dstore: { master: 'dove1', replicas: '', status: 'active', epoch: '1' },
    },
    slots: { cyrus1: slot(cyrus), dove1: slot(dove) },
  };
  routesFile = path.join(tmp, 'routes.yaml');
  writeRoutesFile(routesFile, routes);
  await cyrus.deliver('alice', message('for alice on cyrus'));
  await dove.deliver('bob@example.com', message('for bob on dovecot'));
  await cyrus.deliver('carol', message('for carol on cyrus'));
  await dove.deliver('dave@example.com', message('for dave on dovecot'));
});

afterAll(async () => {
  await Promise.allSettled(proxies.map((p) => p.close()));
  await Promise.allSettled([cyrus?.destroy(), dove?.destroy(), ldap?.destroy()]);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

/** auth.ldap as an operator would write it: search as a service DN, map aliases to `mail`. */
function ldapConfig(): Record<string, unknown> {
  return {
    url: ldap.url,
    bind_dn: ldap.adminDn,
    bind_password_file: path.join(tmp, 'ldap-pw'),
    base_dn: ldap.peopleDn,
    filter: '(|(mail=%u)(mailAlternateAddress=%u))',
    login_attribute: 'mail',
    pool_size: 2,
    timeout_ms: 3000,
    connect_timeout_ms: 1000,
  };
}

type Groups = Record<string, unknown>[];

async function proxyWith(groups: Groups, opts: { ldap?: boolean; limits?: Record<string, unknown>; logTo?: string[] } = {}): Promise<TestProxy> {
  const logTo = opts.logTo;
  const p = await startProxy({
    listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }],
    lookup: { file: routesFile },
    limits: { auth_failure_delay_ms: 0, ...opts.limits },
    backend: { identity_groups: groups },
    ...(opts.ldap === false ? {} : { auth: { ldap: ldapConfig() } }),
  }, logTo && createLogger('info', (l) => void logTo.push(l)));
  proxies.push(p);
  return p;
}

const ADMIN_GROUPS: Groups = [
  { slots: ['cyrus*'], identity: 'admin', admin_user: CYRUS_ADMIN.name, admin_password_file: 'CYRUS', login_name: 'local_part' },
  { slots: ['dove*'], identity: 'admin', admin_user: MASTER.name, admin_password_file: 'DOVE' },
];

/** Group documents with the password files' real paths. */
function groups(g: Groups): Groups {
  return g.map((x) => ({
    ...x,
    ...(x.admin_password_file === 'CYRUS' ? { admin_password_file: path.join(tmp, 'cyrus-admin-pw') } : {}),
    ...(x.admin_password_file === 'DOVE' ? { admin_password_file: path.join(tmp, 'dove-master-pw') } : {}),
  }));
}

async function open(p: TestProxy, protocol: 'imap' | 'pop3'): Promise<LineClient> {
  const c = await connectLines({ host: p.host, port: p.ports[protocol]! });
  await c.readLine(); // greeting
  return c;
}

/** Sends a tagged IMAP command; answers each `+` continuation with the next of `then`; resolves with the tagged reply. */
async function imap(c: LineClient, tag: string, command: string, then: string[] = [], untagged: string[] = []): Promise<string> {
  c.send(`${tag} ${command}`);
  for (const line of then) {
    const cont = await c.readLine();
    if (!cont.startsWith('+')) return cont;
    c.send(line);
  }
  const lines = await c.readUntil(new RegExp(`^${tag} `));
  untagged.push(...lines.slice(0, -1));
  return lines.at(-1)!;
}

/** After a login on `c`: the Subjects of INBOX, to see whose mailbox this is. */
async function inboxSubjects(c: LineClient): Promise<string> {
  expect(await imap(c, 's1', 'EXAMINE INBOX')).toMatch(/^s1 OK /);
  const fetched: string[] = [];
  expect(await imap(c, 's2', 'FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])', [], fetched)).toMatch(/^s2 OK /);
  return fetched.join('\n');
}

/** POP3 command; answers `+` continuations with `then`; resolves with the final status line. */
async function pop3(c: LineClient, command: string, then: string[] = []): Promise<string> {
  c.send(command);
  for (const line of then) {
    const cont = await c.readLine();
    if (!cont.startsWith('+ ')) return cont;
    c.send(line);
  }
  return c.readLine();
}

describe('admin identity (Cyrus proxyservers, Dovecot master user) with passwords checked in LDAP', () => {
  let p: TestProxy;
  const logged: string[] = [];
  beforeAll(async () => {
    p = await proxyWith(groups(ADMIN_GROUPS), { logTo: logged });
  });

  it('logs carol in on Cyrus as the admin for `carol` (local part) and dave on Dovecot as the master user, over IMAP', async () => {
    // Their directory passwords are not their backends': only the admin identity gets in.
    expect(await imapSubjects({ host: p.host, port: p.ports.imap!, user: 'carol@example.com', password: 'carolpw' })).toContain('for carol on cyrus');
    expect(await imapSubjects({ host: p.host, port: p.ports.imap!, user: 'dave@example.com', password: 'davepw' })).toContain('for dave on dovecot');
  });

  it('does the same over POP3', async () => {
    expect(await pop3Uidls({ host: p.host, port: p.ports.pop3!, user: 'carol@example.com', password: 'carolpw' })).toEqual(
      await pop3Uidls({ host: cyrus.host, port: cyrus.pop3, user: 'carol', password: 'carol-on-cyrus-only' }),
    );
    expect(await pop3Uidls({ host: p.host, port: p.ports.pop3!, user: 'dave@example.com', password: 'davepw' })).toEqual(
      await pop3Uidls({ host: dove.host, port: dove.pop3, user: 'dave@example.com', password: 'dave-on-dovecot-only' }),
    );
  });

  it('refuses a wrong password with NO [AUTHENTICATIONFAILED] / -ERR [AUTH], although the backend would take the admin', async () => {
    const c = await open(p, 'imap');
    try {
      expect(await imap(c, 'a', 'LOGIN alice@example.com wrongpw')).toBe('a NO [AUTHENTICATIONFAILED] Authentication failed');
      expect(await imap(c, 'b', `AUTHENTICATE PLAIN ${b64('\0bob@example.com\0alicepw')}`)).toBe('b NO [AUTHENTICATIONFAILED] Authentication failed');
    } finally {
      c.close();
    }
    const d = await open(p, 'pop3');
    try {
      expect(await pop3(d, 'USER bob@example.com')).toMatch(/^\+OK/);
      expect(await pop3(d, 'PASS nope')).toBe('-ERR [AUTH] Authentication failed');
      // An empty password would be an unauthenticated LDAP bind, which the directory accepts.
      expect(await pop3(d, `AUTH PLAIN ${b64('\0bob@example.com\0')}`)).toBe('-ERR [AUTH] Authentication failed');
    } finally {
      d.close();
    }
  });

  it("refuses a client's own authzid: the directory checks a password, not who may act for whom", async () => {
    const c = await open(p, 'imap');
    try {
      expect(await imap(c, 'a', `AUTHENTICATE PLAIN ${b64('bob@example.com\0alice@example.com\0alicepw')}`)).toBe('a NO [AUTHENTICATIONFAILED] Authentication failed');
    } finally {
      c.close();
    }
  });

  it("lands an alias login (mailAlternateAddress) on the canonical user's slot", async () => {
    expect(await imapSubjects({ host: p.host, port: p.ports.imap!, user: 'ali@example.org', password: 'alicepw' })).toContain('for alice on cyrus');
    expect((await pop3Uidls({ host: p.host, port: p.ports.pop3!, user: 'Alice.Smith@example.com', password: 'alicepw' })).length).toBeGreaterThan(0);
  });

  it('offers AUTH=LOGIN (IMAP) and SASL LOGIN (POP3), and both work', async () => {
    const c = await open(p, 'imap');
    try {
      const caps: string[] = [];
      expect(await imap(c, 'c', 'CAPABILITY', [], caps)).toMatch(/^c OK/);
      expect(caps.join(' ')).toMatch(/ AUTH=PLAIN AUTH=LOGIN\b/);
      expect(await imap(c, 'a', 'AUTHENTICATE LOGIN', [b64('alice@example.com'), b64('alicepw')])).toMatch(/^a OK /);
      expect(await inboxSubjects(c)).toContain('for alice on cyrus');
    } finally {
      c.close();
    }
    const d = await open(p, 'pop3');
    try {
      d.send('CAPA');
      expect(await d.readUntil(/^\.$/)).toContain('SASL PLAIN LOGIN');
      // With an initial response (the user name), then the password.
      expect(await pop3(d, `AUTH LOGIN ${b64('bob@example.com')}`, [b64('bobpw')])).toMatch(/^\+OK/);
      expect(await pop3(d, 'STAT')).toMatch(/^\+OK [1-9]/);
    } finally {
      d.close();
    }
  });

  it('says NO [UNAVAILABLE] / -ERR [SYS/TEMP] while the directory is down, never a pass, and recovers', async () => {
    await ldap.stop();
    try {
      const c = await open(p, 'imap');
      try {
        expect(await imap(c, 'a', 'LOGIN alice@example.com alicepw')).toMatch(/^a NO \[UNAVAILABLE\] /);
        expect(await imap(c, 'b', 'AUTHENTICATE LOGIN', [b64('bob@example.com'), b64('bobpw')])).toMatch(/^b NO \[UNAVAILABLE\] /);
      } finally {
        c.close();
      }
      const d = await open(p, 'pop3');
      try {
        expect(await pop3(d, `AUTH PLAIN ${b64('\0bob@example.com\0bobpw')}`)).toMatch(/^-ERR \[SYS\/TEMP\] /);
      } finally {
        d.close();
      }
    } finally {
      await ldap.start();
    }
    // The pool drops the dead connections and opens new ones.
    expect(await imapSubjects({ host: p.host, port: p.ports.imap!, user: 'alice@example.com', password: 'alicepw' })).toContain('for alice on cyrus');
    // Three failed checks, one outage: one line when it went down, one when it came back
    // (and never a password in either).
    const outage = logged.map((l) => JSON.parse(l) as { msg: string; level: string; reason?: string }).filter((l) => l.msg.startsWith('LDAP directory'));
    expect(outage.map((l) => `${l.level} ${l.msg}`)).toEqual([
      `warn LDAP directory ldap://${ldap.host}:${ldap.port} unreachable; logins whose password the proxy checks get UNAVAILABLE`,
      `info LDAP directory ldap://${ldap.host}:${ldap.port} reachable again`,
    ]);
    expect(outage[0]!.reason).toBeTruthy();
    expect(logged.join('\n')).not.toMatch(/alicepw|bobpw/);
  });
});

describe('passthrough identity with passwords checked in LDAP', () => {
  it("sends the client's own password: alice as `alice` to Cyrus, bob to Dovecot, IMAP and POP3", async () => {
    const p = await proxyWith([{ slots: ['cyrus*'], login_name: 'local_part' }]);
    // carol's directory password is not her backend's: the backend, asked with it, says no.
    expect(await imapSubjects({ host: p.host, port: p.ports.imap!, user: 'carol@example.com', password: 'carolpw' }).catch((e: Error) => e.message)).toMatch(/AUTHENTICATIONFAILED/);
    expect(await imapSubjects({ host: p.host, port: p.ports.imap!, user: 'alice@example.com', password: 'alicepw' })).toContain('for alice on cyrus');
    expect(await imapSubjects({ host: p.host, port: p.ports.imap!, user: 'bob@example.com', password: 'bobpw' })).toContain('for bob on dovecot');
    expect((await pop3Uidls({ host: p.host, port: p.ports.pop3!, user: 'ali@example.org', password: 'alicepw' })).length).toBeGreaterThan(0);
    expect((await pop3Uidls({ host: p.host, port: p.ports.pop3!, user: 'bob@example.com', password: 'bobpw' })).length).toBeGreaterThan(0);
  });
});

describe("Dovecot master user in the `user*master` LOGIN form", () => {
  it('logs dave in as dave@example.com*proxymaster, IMAP and POP3', async () => {
    const p = await proxyWith(groups([{ slots: ['dove*'], identity: 'admin', admin_user: MASTER.name, admin_password_file: 'DOVE', master_login_form: 'separator' }]));
    expect(await imapSubjects({ host: p.host, port: p.ports.imap!, user: 'dave@example.com', password: 'davepw' })).toContain('for dave on dovecot');
    expect((await pop3Uidls({ host: p.host, port: p.ports.pop3!, user: 'dave@example.com', password: 'davepw' })).length).toBeGreaterThan(0);
  });
});

describe('without a password checker', () => {
  it('logs in to a Cyrus without virtdomains by local part (no backend_login), and offers no AUTH=LOGIN', async () => {
    const p = await proxyWith([{ slots: ['cyrus*'], login_name: 'local_part' }], { ldap: false });
    expect(await imapSubjects({ host: p.host, port: p.ports.imap!, user: 'alice@example.com', password: 'alicepw' })).toContain('for alice on cyrus');
    expect((await pop3Uidls({ host: p.host, port: p.ports.pop3!, user: 'alice@example.com', password: 'alicepw' })).length).toBeGreaterThan(0);
    const c = await open(p, 'imap');
    try {
      const caps: string[] = [];
      await imap(c, 'c', 'CAPABILITY', [], caps);
      expect(caps.join(' ')).toContain('AUTH=PLAIN');
      expect(caps.join(' ')).not.toContain('AUTH=LOGIN');
      expect(await imap(c, 'a', 'AUTHENTICATE LOGIN')).toBe('a NO Unsupported authentication mechanism');
    } finally {
      c.close();
    }
  });
});

describe('failure delay and throttle', () => {
  it('count a password the directory refused like one a backend refused', async () => {
    const p = await proxyWith(groups(ADMIN_GROUPS), { limits: { auth_failure_delay_ms: 300, auth_failures_per_ip_per_minute: 2 } });
    const c = await open(p, 'imap');
    try {
      const started = Date.now();
      expect(await imap(c, 'a', 'LOGIN alice@example.com wrong1')).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);
      expect(Date.now() - started).toBeGreaterThanOrEqual(300);
      expect(await imap(c, 'b', 'LOGIN alice@example.com wrong2')).toMatch(/^b NO \[AUTHENTICATIONFAILED\]/);
    } finally {
      c.close();
    }
    // Two failures used the address's allowance: even the right password is turned away now.
    const d = await open(p, 'imap');
    try {
      expect(await imap(d, 'c', 'LOGIN alice@example.com alicepw')).toMatch(/^c NO \[UNAVAILABLE\] Too many login attempts/);
    } finally {
      d.close();
    }
  });
});

describe('the directory over TLS, and a directory that hangs', () => {
  let tlsLdap: Slapd;
  let caFile: string;
  let otherCaFile: string;

  beforeAll(async () => {
    const certs = path.join(tmp, 'ldap-certs');
    const ca = await makeCA(certs);
    caFile = ca.certFile;
    otherCaFile = (await makeCA(path.join(tmp, 'other-ca'), 'some other CA')).certFile;
    const cert = await makeCert(certs, { ca, cn: 'ldap.test', altNames: ['ldap.test', '127.0.0.73'] });
    tlsLdap = await startSlapd({ host: '127.0.0.73', dir: path.join(tmp, 'slapd-tls'), tls: cert });
  });

  afterAll(async () => {
    await tlsLdap?.destroy();
  });

  async function tlsProxy(ldapDoc: Record<string, unknown>): Promise<TestProxy> {
    const p = await startProxy({
      listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }],
      lookup: { file: routesFile },
      limits: { auth_failure_delay_ms: 0 },
      backend: { identity_groups: [{ slots: ['cyrus*'], login_name: 'local_part' }] },
      auth: { ldap: { ...ldapConfig(), ...ldapDoc } },
    });
    proxies.push(p);
    return p;
  }

  async function login(p: TestProxy, user: string, password: string): Promise<string> {
    const c = await open(p, 'imap');
    try {
      return await imap(c, 'a', `LOGIN ${user} ${password}`);
    } finally {
      c.close();
    }
  }

  it('checks passwords over ldaps:// and over StartTLS, verified against the configured CA', async () => {
    const ldaps = await tlsProxy({ url: tlsLdap.ldapsUrl, ca: caFile });
    expect(await login(ldaps, 'alice@example.com', 'alicepw')).toMatch(/^a OK /);
    expect(await login(ldaps, 'alice@example.com', 'wrong')).toBe('a NO [AUTHENTICATIONFAILED] Authentication failed');
    // login_attribute in another case than the directory's `mail`: attribute names are case-insensitive.
    const starttls = await tlsProxy({ url: tlsLdap.url, starttls: true, ca: caFile, login_attribute: 'MAIL' });
    expect(await login(starttls, 'ali@example.org', 'alicepw')).toMatch(/^a OK /);
  });

  it('searches anonymously when no bind_dn is set, also on a connection a user bound last', async () => {
    const p = await tlsProxy({ url: tlsLdap.url, bind_dn: undefined, bind_password_file: undefined, pool_size: 1 });
    expect(await login(p, 'alice@example.com', 'alicepw')).toMatch(/^a OK /);
    expect(await login(p, 'ali@example.org', 'wrong')).toBe('a NO [AUTHENTICATIONFAILED] Authentication failed');
    expect(await login(p, 'alice.smith@example.com', 'alicepw')).toMatch(/^a OK /);
  });

  it('is UNAVAILABLE when the certificate does not verify', async () => {
    const ldaps = await tlsProxy({ url: tlsLdap.ldapsUrl, ca: otherCaFile });
    expect(await login(ldaps, 'alice@example.com', 'alicepw')).toMatch(/^a NO \[UNAVAILABLE\] /);
    const starttls = await tlsProxy({ url: tlsLdap.url, starttls: true, ca: otherCaFile });
    expect(await login(starttls, 'alice@example.com', 'alicepw')).toMatch(/^a NO \[UNAVAILABLE\] /);
  });

  it('is UNAVAILABLE when the directory accepts connections but never answers', async () => {
    const p = await tlsProxy({ url: tlsLdap.url, timeout_ms: 500, connect_timeout_ms: 500 });
    expect(await login(p, 'alice@example.com', 'alicepw')).toMatch(/^a OK /); // a pooled connection exists now
    const pid = Number((await readFile(path.join(tlsLdap.dir, 'slapd.pid'), 'utf8')).trim());
    process.kill(pid, 'SIGSTOP');
    try {
      expect(await login(p, 'alice@example.com', 'alicepw')).toMatch(/^a NO \[UNAVAILABLE\] /);
      const d = await open(p, 'pop3');
      try {
        expect(await pop3(d, `AUTH PLAIN ${b64('\0alice@example.com\0alicepw')}`)).toMatch(/^-ERR \[SYS\/TEMP\] /);
      } finally {
        d.close();
      }
    } finally {
      process.kill(pid, 'SIGCONT');
    }
    expect(await login(p, 'alice@example.com', 'alicepw')).toMatch(/^a OK /);
  });
});
