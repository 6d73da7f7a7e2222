import { readFileSync } from 'node:fs';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { imapSubjects } from './harness/clients.js';
import { startCyrusSlot, type CyrusSlot } from './harness/cyrus.js';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { openLmtp, wireBody } from './harness/lmtp.js';

// The backend settings the README and deploy/ give operators, run as written against a
// real Cyrus 3.6 and a real Dovecot: what a slot must trust for mailsplice's passthrough
// and admin identities and for its LMTP deliveries.

const DEPLOY = path.resolve(import.meta.dirname, '../deploy');
const proxyAccount = { name: 'mailsplice', password: 'mailsplice-secret' };
const alice = { name: 'alice', password: 'alicepw' };
const bob = { name: 'bob', password: 'bobpw' };

let tmp: string;
let cyrus: CyrusSlot;
let dovecot: DovecotSlot;

/**
 * deploy/cyrus-backend.conf's setting lines. The harness runs two LMTP services: "lmtp"
 * (lmtpd -a, for its own deliveries) and "lmtpauth" (lmtpd demanding AUTH), so the
 * file's lmtp_admins applies here as lmtpauth_admins: same setting, this harness's
 * service name.
 */
function cyrusSettings(): string {
  const lines = readFileSync(path.join(DEPLOY, 'cyrus-backend.conf'), 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '' && !l.trimStart().startsWith('#'));
  expect(lines).toEqual(expect.arrayContaining(['proxyservers: mailsplice', 'lmtp_admins: mailsplice']));
  return lines.map((l) => l.replace(/^lmtp_admins:/, 'lmtpauth_admins:')).join('\n');
}

/** deploy/dovecot-backend.conf with this machine's addresses and master-user file in place of the examples. */
function dovecotSettings(masterFile: string): string {
  const text = readFileSync(path.join(DEPLOY, 'dovecot-backend.conf'), 'utf8');
  expect(text).toContain('login_trusted_networks = 10.0.0.21 10.0.0.22');
  expect(text).toContain('args = /etc/dovecot/master-users');
  return text.replace('10.0.0.21 10.0.0.22', '127.0.0.0/8').replace('/etc/dovecot/master-users', masterFile);
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-backend-configs-'));
  await chmod(tmp, 0o755); // Cyrus's and Dovecot's services run as other users
  const masterFile = path.join(tmp, 'master-users');
  await writeFile(masterFile, `${proxyAccount.name}:{PLAIN}${proxyAccount.password}\n`, { mode: 0o644 });
  [cyrus, dovecot] = await Promise.all([
    startCyrusSlot({
      id: 'cyrusConf',
      host: '127.0.0.64',
      users: [alice, bob],
      proxyUsers: [proxyAccount],
      dir: path.join(tmp, 'cyrus'),
      extraImapdConf: cyrusSettings(),
    }),
    startDovecotSlot({
      id: 'dovecotConf',
      host: '127.0.0.65',
      users: [{ name: 'alice@example.com', password: 'alicepw' }],
      dir: path.join(tmp, 'dovecot'),
      extraConfig: dovecotSettings(masterFile),
    }),
  ]);
  await cyrus.deliver(alice.name, 'From: a@example.net\r\nSubject: for alice on cyrus\r\n\r\nbody\r\n');
  await dovecot.deliver('alice@example.com', 'From: a@example.net\r\nSubject: for alice on dovecot\r\n\r\nbody\r\n');
});

afterAll(async () => {
  await Promise.allSettled([cyrus?.destroy(), dovecot?.stop()]);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

async function greeted(host: string, port: number): Promise<LineClient> {
  const c = await connectLines({ host, port });
  expect(await c.readLine()).toMatch(/^(\* OK|\+OK) /);
  return c;
}

/** One IMAP command after the greeting; resolves with every line up to the tagged one. */
async function imapRun(c: LineClient, tag: string, command: string): Promise<string[]> {
  c.send(`${tag} ${command}`);
  return c.readUntil(new RegExp(`^${tag} `));
}

/** Logs in with `login` (a full command after the tag), then fetches INBOX's subjects. */
async function imapSession(host: string, port: number, login: string): Promise<{ login: string; subjects: string[] }> {
  const c = await greeted(host, port);
  try {
    const answer = (await imapRun(c, 'a', login)).at(-1)!;
    if (!answer.startsWith('a OK')) return { login: answer, subjects: [] };
    await imapRun(c, 'b', 'EXAMINE INBOX');
    const subjects = (await imapRun(c, 'c', 'FETCH 1:* BODY.PEEK[HEADER.FIELDS (SUBJECT)]')).filter((l) => l.startsWith('Subject:'));
    return { login: answer, subjects };
  } finally {
    c.close();
  }
}

async function pop3Session(host: string, port: number, commands: string[]): Promise<string[]> {
  const c = await greeted(host, port);
  const out: string[] = [];
  try {
    for (const cmd of commands) {
      c.send(cmd);
      out.push(await c.readLine());
    }
    return out;
  } finally {
    c.close();
  }
}

describe('deploy/cyrus-backend.conf on a real Cyrus 3.6', () => {
  const asProxyFor = (user: string): string => `AUTHENTICATE PLAIN ${b64(`${user}\0${proxyAccount.name}\0${proxyAccount.password}`)}`;

  it("proxyservers: the proxy's account gets alice's IMAP session with authzid = alice", async () => {
    const s = await imapSession(cyrus.host, cyrus.imap, asProxyFor(alice.name));
    expect(s.login).toMatch(/^a OK /);
    expect(s.subjects).toEqual(['Subject: for alice on cyrus']);
  });

  it('proxyservers: and her POP3 session (AUTH PLAIN with authzid)', async () => {
    const [auth, stat] = await pop3Session(cyrus.host, cyrus.pop3, [`AUTH PLAIN ${b64(`${alice.name}\0${proxyAccount.name}\0${proxyAccount.password}`)}`, 'STAT']);
    expect(auth).toMatch(/^\+OK /);
    expect(stat).toMatch(/^\+OK 1 \d+$/);
  });

  it('a plain user may not act for another', async () => {
    const s = await imapSession(cyrus.host, cyrus.imap, `AUTHENTICATE PLAIN ${b64(`${alice.name}\0${bob.name}\0${bob.password}`)}`);
    expect(s.login).toMatch(/^a NO /);
  });

  it('the proxy account is no IMAP admin: no UNAUTHENTICATE, no CREATE user/…, unlike a real admin', async () => {
    const own = await greeted(cyrus.host, cyrus.imap);
    try {
      const ok = (await imapRun(own, 'a', `AUTHENTICATE PLAIN ${b64(`\0${proxyAccount.name}\0${proxyAccount.password}`)}`)).at(-1)!;
      expect(ok).toMatch(/^a OK \[CAPABILITY /);
      expect(ok).not.toContain('UNAUTHENTICATE');
      expect((await imapRun(own, 'b', 'CREATE user/zed')).at(-1)).toMatch(/^b NO /);
    } finally {
      own.close();
    }
    const admin = await greeted(cyrus.host, cyrus.imap);
    try {
      const ok = (await imapRun(admin, 'a', `AUTHENTICATE PLAIN ${b64(`\0${cyrus.admin.name}\0${cyrus.admin.password}`)}`)).at(-1)!;
      expect(ok).toContain('UNAUTHENTICATE');
    } finally {
      admin.close();
    }
  });

  it('lmtp_admins: the proxy account delivers over the LMTP port that demands AUTH; a plain user may not', async () => {
    const attempt = async (who: { name: string; password: string }, subject: string): Promise<string[]> => {
      const c = await openLmtp({ host: cyrus.host, port: cyrus.lmtpAuth });
      const out: string[] = [];
      try {
        expect(await c.line()).toMatch(/^220 /);
        c.send('LHLO mailsplice.test');
        expect((await c.reply()).join('\n')).toMatch(/^250-AUTH PLAIN/m);
        c.send(`AUTH PLAIN ${b64(`\0${who.name}\0${who.password}`)}`);
        out.push(await c.line());
        c.send('MAIL FROM:<sender@example.net>');
        const mail = await c.line();
        out.push(mail);
        if (!mail.startsWith('250')) return out;
        c.send(`RCPT TO:<${bob.name}@example.com>`);
        out.push(await c.line());
        c.send('DATA');
        out.push(await c.line());
        c.write(wireBody(`From: sender@example.net\r\nSubject: ${subject}\r\n\r\nbody\r\n`));
        out.push(await c.line());
        c.send('QUIT');
        return out;
      } finally {
        c.close();
      }
    };
    const byProxy = await attempt(proxyAccount, 'lmtp as mailsplice');
    expect(byProxy[0]).toMatch(/^235 /);
    expect(byProxy.slice(1)).toEqual([expect.stringMatching(/^250 /), expect.stringMatching(/^250 /), expect.stringMatching(/^354 /), expect.stringMatching(/^250 /)]);
    expect(await imapSubjects({ host: cyrus.host, port: cyrus.imap, user: bob.name, password: bob.password })).toContain('lmtp as mailsplice');
    // Being in proxyservers is not enough for LMTP; being admin for LMTP gives nothing over IMAP (above).
    const byUser = await attempt(alice, 'lmtp as alice');
    expect(byUser[0]).not.toMatch(/^235 /);
    expect(byUser[1]).toMatch(/^430 /);
  });

  it('virtdomains off: the bare name logs in, the full address does not', async () => {
    expect((await imapSession(cyrus.host, cyrus.imap, `LOGIN ${alice.name} ${alice.password}`)).login).toMatch(/^a OK /);
    expect((await imapSession(cyrus.host, cyrus.imap, `LOGIN ${alice.name}@example.com ${alice.password}`)).login).toMatch(/^a NO /);
  });
});

describe('deploy/dovecot-backend.conf on a real Dovecot', () => {
  it('master user: SASL PLAIN with authzid = the user gets her IMAP session', async () => {
    const s = await imapSession(dovecot.host, dovecot.imap, `AUTHENTICATE PLAIN ${b64(`alice@example.com\0${proxyAccount.name}\0${proxyAccount.password}`)}`);
    expect(s.login).toMatch(/^a OK /);
    expect(s.subjects).toEqual(['Subject: for alice on dovecot']);
  });

  it('master user: LOGIN as user*master (IMAP) and USER user*master (POP3)', async () => {
    const s = await imapSession(dovecot.host, dovecot.imap, `LOGIN alice@example.com*${proxyAccount.name} ${proxyAccount.password}`);
    expect(s.subjects).toEqual(['Subject: for alice on dovecot']);
    const [user, pass, stat] = await pop3Session(dovecot.host, dovecot.pop3, [`USER alice@example.com*${proxyAccount.name}`, `PASS ${proxyAccount.password}`, 'STAT']);
    expect(user).toMatch(/^\+OK/);
    expect(pass).toMatch(/^\+OK/);
    expect(stat).toMatch(/^\+OK 1 \d+$/);
  });

  it('pass = yes: a master login for a user the passdb does not know fails', async () => {
    const s = await imapSession(dovecot.host, dovecot.imap, `AUTHENTICATE PLAIN ${b64(`nobody@example.com\0${proxyAccount.name}\0${proxyAccount.password}`)}`);
    expect(s.login).toMatch(/^a NO /);
  });

  it('the master password is no password of its own user, and a wrong one fails', async () => {
    expect((await imapSession(dovecot.host, dovecot.imap, `LOGIN ${proxyAccount.name} ${proxyAccount.password}`)).login).toMatch(/^a NO /);
    expect((await imapSession(dovecot.host, dovecot.imap, `LOGIN alice@example.com*${proxyAccount.name} wrong`)).login).toMatch(/^a NO /);
  });

  it('login_trusted_networks: the client address sent with ID before login is taken (rip= in the log)', async () => {
    const c = await greeted(dovecot.host, dovecot.imap);
    try {
      expect((await imapRun(c, 'i', 'ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "4711")')).at(-1)).toMatch(/^i OK/);
      expect((await imapRun(c, 'a', 'LOGIN alice@example.com alicepw')).at(-1)).toMatch(/^a OK/);
    } finally {
      c.close();
    }
    await expect.poll(() => readFileSync(dovecot.logFile, 'utf8')).toMatch(/Login: user=<alice@example.com>.*rip=192\.0\.2\.7/);
  });
});
