import { execFile } from 'node:child_process';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { ImapFlow } from 'imapflow';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { startOauthIssuer, type OauthIssuer } from './harness/oauth-issuer.js';
import { createLogger } from '../src/log.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { writeRoutesFile, type RouteModel } from './support/routes.js';

// OAUTHBEARER (RFC 7628) and XOAUTH2 through mailsplice, with tokens from a local issuer
// (test/harness/oauth-issuer.ts). Two Dovecot slots:
// - `passslot` checks tokens itself (Dovecot's oauth2 passdb, introspection at the same
//   issuer): its group is `oauth: passthrough`, the proxy hands the exchange on;
// - `checkslot` knows no tokens: its group is `oauth: check`, the proxy checks the token
//   (JWKS or introspection) and logs in as the slot's master user for the token's user.
// alice lives on passslot, carol on checkslot.

const execFileP = promisify(execFile);
const MASTER = { name: 'proxymaster', password: 'masterpw' };

let tmp: string;
let issuer: OauthIssuer;
let passSlot: DovecotSlot;
let checkSlot: DovecotSlot;
let jwtProxy: TestProxy;
let introProxy: TestProxy;
/** Everything the JWT proxy logged, at debug level. */
const logLines: string[] = [];

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');
const bearerMsg = (user: string, token: string): string => b64(`n,a=${user},\x01host=localhost\x01port=143\x01auth=Bearer ${token}\x01\x01`);
const xoauth2Msg = (user: string, token: string): string => b64(`user=${user}\x01auth=Bearer ${token}\x01\x01`);

function message(subject: string): string {
  return ['From: a@example.net', 'To: b@example.com', `Subject: ${subject}`, 'Date: Mon, 1 Jan 2024 00:00:00 +0000', '', 'body', ''].join('\r\n');
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-oauth-'));
  await chmod(tmp, 0o755);
  issuer = await startOauthIssuer();
  const oauthConf = path.join(tmp, 'dovecot-oauth2.conf.ext');
  // Dovecot's oauth2 passdb (Debian's dovecot-core): introspection by POST, the login must be the token's email.
  await writeFile(
    oauthConf,
    [`introspection_mode = post`, `introspection_url = ${issuer.introspectionUrl}`, 'username_attribute = email', 'active_attribute = active', 'active_value = true', ''].join('\n'),
    { mode: 0o644 },
  );
  [passSlot, checkSlot] = await Promise.all([
    startDovecotSlot({
      id: 'passslot',
      host: '127.0.0.81',
      users: [{ name: 'alice@example.com', password: 'alice-password-unused' }],
      dir: path.join(tmp, 'passslot'),
      extraConfig: `auth_mechanisms = plain login oauthbearer xoauth2\npassdb {\n  driver = oauth2\n  args = ${oauthConf}\n}\n`,
    }),
    startDovecotSlot({
      id: 'checkslot',
      host: '127.0.0.82',
      users: [{ name: 'carol@example.com', password: 'carol-password-unused' }, { name: 'dave@example.com', password: 'dave-password-unused' }],
      masterUsers: [MASTER],
      dir: path.join(tmp, 'checkslot'),
    }),
  ]);
  await passSlot.deliver('alice@example.com', message('alice via passthrough'));
  await checkSlot.deliver('carol@example.com', message('carol via check'));
  await writeFile(path.join(tmp, 'master-pw'), MASTER.password, { mode: 0o600 });
  const slot = (s: DovecotSlot) => ({ host: s.host, imap: String(s.imap), pop3: String(s.pop3), lmtp: String(s.lmtp), status: 'up' });
  const routes: RouteModel = {
    users: { 'alice@example.com': { store: 'pstore' }, 'carol@example.com': { store: 'cstore' }, 'dave@example.com': { store: 'cstore' } },
    stores: { pstore: { master: 'passslot', replicas: '', status: 'active', epoch: '1' }, cstore: { master: 'checkslot', replicas: '', status: 'active', epoch: '1' } },
    slots: { passslot: slot(passSlot), checkslot: slot(checkSlot) },
  };
  const routesFile = path.join(tmp, 'routes.yaml');
  writeRoutesFile(routesFile, routes);
  const groups = [{ slots: ['checkslot'], oauth: 'check', admin_user: MASTER.name, admin_password_file: path.join(tmp, 'master-pw') }];
  const base = {
    lookup: { file: routesFile },
    limits: { auth_failure_delay_ms: 0 },
    backend: { identity_groups: groups },
  };
  const common = { issuer: issuer.issuer, audience: issuer.audience, scope: 'email', openid_configuration: `${issuer.issuer}/.well-known/openid-configuration` };
  // Fresh listener objects each: startProxy fills in their ports.
  jwtProxy = await startProxy(
    { ...base, listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }], auth: { oauth: { ...common, jwt: { jwks_url: issuer.jwksUrl } } } },
    createLogger('debug', (l) => void logLines.push(l)),
  );
  introProxy = await startProxy({ ...base, listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }], auth: { oauth: { ...common, introspection: { url: issuer.introspectionUrl } } } });
}, 60_000);

afterAll(async () => {
  await Promise.allSettled([jwtProxy?.close(), introProxy?.close()]);
  await Promise.allSettled([passSlot?.destroy(), checkSlot?.destroy(), issuer?.close()]);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

async function imap(p: TestProxy): Promise<LineClient> {
  const c = await connectLines({ host: p.host, port: p.ports.imap! });
  const greeting = await c.readLine();
  expect(greeting).toMatch(/^\* OK \[CAPABILITY .*AUTH=OAUTHBEARER AUTH=XOAUTH2/);
  return c;
}

async function pop3(p: TestProxy): Promise<LineClient> {
  const c = await connectLines({ host: p.host, port: p.ports.pop3! });
  expect(await c.readLine()).toMatch(/^\+OK/);
  return c;
}

/** The JSON in a `+ <base64>` challenge line. */
function challengeJson(line: string): Record<string, unknown> {
  expect(line).toMatch(/^\+ [A-Za-z0-9+/=]+$/);
  return JSON.parse(Buffer.from(line.slice(2), 'base64').toString('utf8')) as Record<string, unknown>;
}

/** Logs in with IMAP AUTHENTICATE (SASL-IR) and returns the tagged answer, after SELECT when it worked. */
async function imapLogin(p: TestProxy, mech: 'OAUTHBEARER' | 'XOAUTH2', user: string, token: string): Promise<{ tagged: string; lines: string[] }> {
  const c = await imap(p);
  try {
    c.send(`a AUTHENTICATE ${mech} ${mech === 'OAUTHBEARER' ? bearerMsg(user, token) : xoauth2Msg(user, token)}`);
    const lines = await c.readUntil(/^(a |\+)/);
    const last = lines.at(-1)!;
    if (last.startsWith('+')) {
      // The error exchange: the client acknowledges (%x01, or an empty line for XOAUTH2).
      c.send(mech === 'OAUTHBEARER' ? 'AQ==' : '');
      const rest = await c.readUntil(/^a /);
      return { tagged: rest.at(-1)!, lines: [...lines, ...rest] };
    }
    c.send('b SELECT INBOX');
    lines.push(...(await c.readUntil(/^b /)));
    return { tagged: last, lines };
  } finally {
    c.close();
  }
}

describe('OAuth checked at the proxy (oauth: check)', () => {
  it('accepts a good JWT (RS256 and ES256) over OAUTHBEARER and XOAUTH2, and logs in as the master user for the token\'s user', async () => {
    for (const alg of ['RS256', 'ES256'] as const) {
      for (const mech of ['OAUTHBEARER', 'XOAUTH2'] as const) {
        const { tagged, lines } = await imapLogin(jwtProxy, mech, 'carol@example.com', issuer.issue({ email: 'carol@example.com', alg }));
        expect(tagged, `${alg} ${mech}`).toMatch(/^a OK /);
        expect(lines.at(-1)).toMatch(/^b OK/);
        expect(lines.some((l) => /^\* 1 EXISTS/.test(l))).toBe(true);
      }
    }
  });

  it.each([
    ['expired', { email: 'carol@example.com', expiresIn: -120 }],
    ['not yet valid', { email: 'carol@example.com', notBeforeIn: 3600 }],
    ['for another audience', { email: 'carol@example.com', aud: 'calendar' }],
    ['from another issuer', { email: 'carol@example.com', iss: 'https://evil.example' }],
    ['with a bad signature', { email: 'carol@example.com', forged: true }],
    ['for another user', { email: 'dave@example.com' }],
  ])('refuses a token %s with the RFC 7628 error exchange (IMAP and POP3)', async (_what, claims) => {
    const token = issuer.issue(claims);
    const { lines, tagged } = await imapLogin(jwtProxy, 'OAUTHBEARER', 'carol@example.com', token);
    const json = challengeJson(lines.find((l) => l.startsWith('+'))!);
    expect(json).toEqual({ status: 'invalid_token', scope: 'email', 'openid-configuration': `${issuer.issuer}/.well-known/openid-configuration` });
    expect(tagged).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);

    const x = await imapLogin(jwtProxy, 'XOAUTH2', 'carol@example.com', token);
    expect(challengeJson(x.lines.find((l) => l.startsWith('+'))!)).toEqual({ status: '401', schemes: 'bearer', scope: 'email' });
    expect(x.tagged).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);

    const c = await pop3(jwtProxy);
    try {
      c.send('AUTH OAUTHBEARER');
      expect(await c.readLine()).toBe('+ ');
      c.send(bearerMsg('carol@example.com', token));
      expect(challengeJson(await c.readLine()).status).toBe('invalid_token');
      c.send('AQ==');
      expect(await c.readLine()).toMatch(/^-ERR \[AUTH\]/);
    } finally {
      c.close();
    }
  });

  it('POP3 AUTH OAUTHBEARER and XOAUTH2 log in with a good token', async () => {
    for (const mech of ['OAUTHBEARER', 'XOAUTH2'] as const) {
      const c = await pop3(jwtProxy);
      try {
        const token = issuer.issue({ email: 'carol@example.com' });
        c.send(`AUTH ${mech}`);
        expect(await c.readLine()).toBe('+ ');
        c.send(mech === 'OAUTHBEARER' ? bearerMsg('carol@example.com', token) : xoauth2Msg('carol@example.com', token));
        expect(await c.readLine()).toMatch(/^\+OK/);
        c.send('STAT');
        expect(await c.readLine()).toMatch(/^\+OK 1 /);
      } finally {
        c.close();
      }
    }
  });

  it('introspection: an active token logs in, its verdict is cached, an expired one is refused', async () => {
    const token = issuer.issue({ email: 'carol@example.com' });
    const before = issuer.introspections();
    expect((await imapLogin(introProxy, 'OAUTHBEARER', 'carol@example.com', token)).tagged).toMatch(/^a OK/);
    expect(issuer.introspections()).toBe(before + 1);
    expect((await imapLogin(introProxy, 'XOAUTH2', 'carol@example.com', token)).tagged).toMatch(/^a OK/);
    expect(issuer.introspections()).toBe(before + 1); // the cached verdict, no second request

    const expired = await imapLogin(introProxy, 'OAUTHBEARER', 'carol@example.com', issuer.issue({ email: 'carol@example.com', expiresIn: -5 }));
    expect(challengeJson(expired.lines.find((l) => l.startsWith('+'))!).status).toBe('invalid_token');
    expect(expired.tagged).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);
    expect(issuer.introspections()).toBe(before + 2);
  });
});

describe('OAuth passed through to a backend that checks tokens (Dovecot oauth2 passdb)', () => {
  it('a good token logs in on Dovecot; an expired one gets the error exchange', async () => {
    for (const mech of ['OAUTHBEARER', 'XOAUTH2'] as const) {
      const good = await imapLogin(jwtProxy, mech, 'alice@example.com', issuer.issue({ email: 'alice@example.com' }));
      expect(good.tagged, mech).toMatch(/^a OK/);
      expect(good.lines.some((l) => /^\* 1 EXISTS/.test(l))).toBe(true);
      const bad = await imapLogin(jwtProxy, mech, 'alice@example.com', issuer.issue({ email: 'alice@example.com', expiresIn: -5 }));
      expect(bad.lines.some((l) => l.startsWith('+'))).toBe(true);
      expect(bad.tagged).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);
    }
  });

  it('POP3 passes the token through too', async () => {
    const c = await pop3(jwtProxy);
    try {
      c.send('AUTH XOAUTH2');
      expect(await c.readLine()).toBe('+ ');
      c.send(xoauth2Msg('alice@example.com', issuer.issue({ email: 'alice@example.com' })));
      expect(await c.readLine()).toMatch(/^\+OK/);
      c.send('STAT');
      expect(await c.readLine()).toMatch(/^\+OK 1 /);
    } finally {
      c.close();
    }
  });
});

describe('real clients', () => {
  it.each([
    ['passthrough', 'alice@example.com', 'alice via passthrough'],
    ['check', 'carol@example.com', 'carol via check'],
  ])('imapflow auth { user, accessToken } (%s)', async (_mode, user, subject) => {
    const client = new ImapFlow({ host: jwtProxy.host, port: jwtProxy.ports.imap!, secure: false, auth: { user, accessToken: issuer.issue({ email: user }) }, logger: false });
    await client.connect();
    try {
      const lock = await client.getMailboxLock('INBOX');
      try {
        const subjects: string[] = [];
        for await (const m of client.fetch('1:*', { envelope: true })) subjects.push(m.envelope?.subject ?? '');
        expect(subjects).toContain(subject);
      } finally {
        lock.release();
      }
    } finally {
      await client.logout();
    }
  });

  it('imapflow with an expired token fails to log in, with the server\'s refusal', async () => {
    const client = new ImapFlow({
      host: jwtProxy.host,
      port: jwtProxy.ports.imap!,
      secure: false,
      auth: { user: 'carol@example.com', accessToken: issuer.issue({ email: 'carol@example.com', expiresIn: -60 }) },
      logger: false,
    });
    client.on('error', () => {});
    await expect(client.connect()).rejects.toMatchObject({ authenticationFailed: true });
  });

  it.each([
    ['imap', 'alice@example.com'],
    ['imap', 'carol@example.com'],
    ['pop3', 'alice@example.com'],
    ['pop3', 'carol@example.com'],
  ])('curl --oauth2-bearer on %s as %s', async (proto, user) => {
    const port = jwtProxy.ports[proto]!;
    const url = proto === 'imap' ? `imap://${jwtProxy.host}:${port}/INBOX?ALL` : `pop3://${jwtProxy.host}:${port}/`;
    const { stdout } = await execFileP('curl', ['-sS', '--max-time', '20', '--user', `${user}:`, '--oauth2-bearer', issuer.issue({ email: user }), url], { timeout: 30_000 });
    expect(stdout).toMatch(proto === 'imap' ? /SEARCH 1/ : /^1 \d+/m);
    // And an expired token is refused (curl exit 67: login denied).
    const bad = await execFileP('curl', ['-sS', '--max-time', '20', '--user', `${user}:`, '--oauth2-bearer', issuer.issue({ email: user, expiresIn: -60 }), url], { timeout: 30_000 }).catch((e: { code?: number }) => e);
    expect((bad as { code?: number }).code).toBe(67);
  });
});

describe('logs', () => {
  it('never hold a token, at debug level, after every login above (good and refused, checked and passed through)', () => {
    expect(logLines.some((l) => /login failed/.test(l))).toBe(true); // the refusals above were logged
    // Every token the issuer makes is a JWT, whose base64url header starts with "eyJ".
    expect(logLines.filter((l) => /eyJ[A-Za-z0-9_-]{8,}/.test(l))).toEqual([]);
  });
});
