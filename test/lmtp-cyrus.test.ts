import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { lmtpTotals } from '../src/lmtp/metrics.js';
import { createLogger } from '../src/log.js';
import { createMetrics } from '../src/metrics.js';
import { makeCA, makeCert } from './harness/certs.js';
import { imapSubjects } from './harness/clients.js';
import { CYRUS_ADMIN, startCyrusSlot, type CyrusSlot } from './harness/cyrus.js';
import { openLmtp, wireBody } from './harness/lmtp.js';
import { startPostfix, type PostfixInstance } from './harness/postfix.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile, type RouteModel } from './support/routes.js';

// LMTP through mailsplice to real Cyrus 3.6 (issue 8) beside real Dovecot:
// - cyrusP: cleartext; its routed LMTP port is the one that demands AUTH (lmtpd without -a);
// - cyrusT: IMAP over implicit TLS (imaps) and LMTP over STARTTLS + AUTH, one slot record;
// - cyrusNoAdmin: cyrusP's AUTH-demanding port under a slot id with no admin configured,
//   so Cyrus answers MAIL with 430;
// - alice (store1, master slotA) and bob (store2, master slotB) on Dovecot.

let world: World;
let cyrusP: CyrusSlot;
let cyrusT: CyrusSlot;
let proxy: TestProxy;
let tmp: string;
let seq = 0;
const logLines: string[] = [];

const ann = { name: 'ann', password: 'annpw' };
const tim = { name: 'tim', password: 'timpw' };
const full = { name: 'full', password: 'fullpw' };
const WRONG_PASSWORD = 'not-the-admin-password';

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-lmtp-cyrus-'));
  await chmod(tmp, 0o755); // Cyrus's services run as `cyrus`
  const ca = await makeCA(path.join(tmp, 'certs'));
  const cert = await makeCert(path.join(tmp, 'certs'), { ca, cn: 'cyrust.test', altNames: ['cyrust.test', '127.0.0.92'] });
  [world, cyrusP, cyrusT] = await Promise.all([
    startWorld(),
    startCyrusSlot({ id: 'cyrusP', host: '127.0.0.91', users: [ann, full], dir: path.join(tmp, 'cyrusP') }),
    startCyrusSlot({ id: 'cyrusT', host: '127.0.0.92', users: [tim], dir: path.join(tmp, 'cyrusT'), tls: cert }),
  ]);
  const routes: RouteModel = worldRoutes(world);
  const cyrus = (s: CyrusSlot, imap: number) => ({ host: s.host, imap: String(imap), pop3: String(s.pop3), lmtp: String(s.lmtpAuth), status: 'up' });
  routes.slots.cyrusP = cyrus(cyrusP, cyrusP.imap);
  routes.slots.cyrusT = cyrus(cyrusT, cyrusT.imaps!);
  routes.slots.cyrusNoAdmin = cyrus(cyrusP, cyrusP.imap);
  routes.slots.cyrusBadPw = cyrus(cyrusP, cyrusP.imap);
  routes.stores.cstoreP = { master: 'cyrusP', replicas: '', status: 'active', epoch: '1' };
  routes.stores.cstoreT = { master: 'cyrusT', replicas: '', status: 'active', epoch: '1' };
  routes.stores.cstoreN = { master: 'cyrusNoAdmin', replicas: '', status: 'active', epoch: '1' };
  routes.stores.cstoreB = { master: 'cyrusBadPw', replicas: '', status: 'active', epoch: '1' };
  // Cyrus runs without virtdomains: the backend's name for a user is the bare one.
  routes.users['ann@example.com'] = { store: 'cstoreP', backend_login: 'ann' };
  routes.users['full@example.com'] = { store: 'cstoreP', backend_login: 'full' };
  // Routed, but no such mailbox on the Cyrus: Cyrus's own (multi-line) 550.
  routes.users['ghost@example.com'] = { store: 'cstoreP', backend_login: 'ghost' };
  routes.users['tim@example.com'] = { store: 'cstoreT', backend_login: 'tim' };
  routes.users['nina@example.com'] = { store: 'cstoreN', backend_login: 'ann' };
  routes.users['bea@example.com'] = { store: 'cstoreB', backend_login: 'ann' };
  // Routed, but slotA's userdb lacks it: Dovecot's single-line 550 5.1.1.
  routes.users['ghost2@example.com'] = { store: 'store1' };
  const routesFile = path.join(tmp, 'routes.yaml');
  writeRoutesFile(routesFile, routes);
  const adminPw = path.join(tmp, 'cyrus-admin.pw');
  await writeFile(adminPw, `${CYRUS_ADMIN.password}\n`, { mode: 0o600 });
  const wrongPw = path.join(tmp, 'wrong.pw');
  await writeFile(wrongPw, WRONG_PASSWORD, { mode: 0o600 });
  proxy = await startProxy(
    {
      listeners: [{ protocol: 'lmtp' }, { protocol: 'imap' }],
      lookup: { file: routesFile },
      backend: {
        // IMAP/POP3 over implicit TLS, LMTP over STARTTLS to the same host: one slot record.
        tls_groups: [{ slots: ['cyrusT'], mode: 'implicit', ca: ca.certFile, servername: 'cyrust.test', lmtp: { mode: 'starttls' } }],
        // The IMAP identity stays passthrough; LMTP authenticates as the admin all the same.
        identity_groups: [
          { slots: ['cyrusP', 'cyrusT'], identity: 'passthrough', admin_user: CYRUS_ADMIN.name, admin_password_file: adminPw, login_name: 'local_part' },
          { slots: ['cyrusBadPw'], admin_user: CYRUS_ADMIN.name, admin_password_file: wrongPw },
        ],
      },
      lmtp: { timeout_ms: 10_000 },
    },
    createLogger('info', (line) => void logLines.push(line)),
  );
});

afterAll(async () => {
  await proxy?.close();
  await Promise.allSettled([world?.stop(), cyrusP?.destroy(), cyrusT?.destroy()]);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

const target = () => ({ host: '127.0.0.1', port: proxy.ports.lmtp! });

function message(size = 0): { subject: string; body: string } {
  const subject = `lmtp-cyrus-${process.pid}-${++seq}`;
  const filler = size > 0 ? `${'x'.repeat(70)}\n`.repeat(Math.ceil(size / 71)) : '';
  return { subject, body: `From: sender@example.net\nSubject: ${subject}\nMessage-ID: <${subject}@example.net>\n\nHello.\n${filler}` };
}

interface Outcome {
  /** Each RCPT's whole reply (every line). */
  rcpt: string[][];
  data: string;
  /** After the dot, one whole reply per accepted RCPT, in RCPT order. */
  results: string[][];
}

/** One pipelined transaction over a raw socket; `rcpts` may carry parameters ("a@b IGNOREQUOTA"). */
async function transaction(rcpts: string[], body: string): Promise<Outcome> {
  const c = await openLmtp(target());
  try {
    expect(await c.line()).toMatch(/^220 /);
    const rcptLines = rcpts.map((r) => {
      const [address, ...params] = r.split(' ');
      return `RCPT TO:<${address}>${params.map((p) => ` ${p}`).join('')}`;
    });
    c.write(['LHLO test.example', 'MAIL FROM:<sender@example.net>', ...rcptLines, 'DATA'].map((l) => `${l}\r\n`).join(''));
    expect((await c.reply()).join('\n')).toMatch(/^250 IGNOREQUOTA$/m);
    expect(await c.line()).toMatch(/^250 /);
    const rcpt: string[][] = [];
    for (const _ of rcpts) rcpt.push(await c.reply());
    const data = await c.line();
    const results: string[][] = [];
    if (data.startsWith('354')) {
      c.write(wireBody(body));
      for (const r of rcpt) if (r.at(-1)!.startsWith('250')) results.push(await c.reply());
    }
    c.send('QUIT');
    await c.line().catch(() => '');
    return { rcpt, data, results };
  } finally {
    c.close();
  }
}

const cyrusImap = (slot: CyrusSlot, user: { name: string; password: string }) => imapSubjects({ host: slot.host, port: slot.imap, user: user.name, password: user.password });

describe('LMTP to Cyrus', () => {
  it('authenticates as the group admin (AUTH PLAIN, STARTTLS where configured) and answers every recipient across Cyrus and Dovecot in RCPT order', async () => {
    const { subject, body } = message();
    const t = await transaction(['ann@example.com', 'alice@example.com', 'tim@example.com', 'ghost@example.com', 'bob@example.com'], body);
    expect(t.rcpt.map((r) => r.at(-1))).toEqual(Array(5).fill(expect.stringMatching(/^250 2\.1\.5 /)));
    expect(t.data).toMatch(/^354 /);
    const last = t.results.map((r) => r.at(-1));
    expect(last[0]).toMatch(/^250 2\.1\.5 /); // Cyrus (cyrusP, AUTH on cleartext)
    expect(last[1]).toMatch(/^250 2\.0\.0 <alice@example\.com> /); // Dovecot slotA
    expect(last[2]).toMatch(/^250 2\.1\.5 /); // Cyrus (cyrusT, STARTTLS + AUTH)
    expect(last[3]).toMatch(/^550 5\.1\.1 /); // Cyrus: no such mailbox
    expect(last[4]).toMatch(/^250 2\.0\.0 <bob@example\.com> /); // Dovecot slotB
    expect(await cyrusImap(cyrusP, ann)).toContain(subject);
    expect((await world.slotA.messages('alice@example.com')).some((m) => m.includes(`Subject: ${subject}\n`))).toBe(true);
    expect((await world.slotB.messages('bob@example.com')).some((m) => m.includes(`Subject: ${subject}\n`))).toBe(true);
    // The TLS slot, read through the proxy: its IMAP goes over implicit TLS, its LMTP took STARTTLS.
    expect(await imapSubjects({ host: proxy.host, port: proxy.ports.imap!, user: 'tim@example.com', password: tim.password })).toContain(subject);
  });

  it("keeps the backend's 5.1.1 for an unknown mailbox, on every line of Cyrus's multi-line reply and on Dovecot's single line", async () => {
    const { body } = message();
    const t = await transaction(['ghost@example.com', 'ghost2@example.com', 'nobody@example.com'], body);
    // Not routed at all: the proxy's own answer at RCPT.
    expect(t.rcpt[2]).toEqual(['550 5.1.1 <nobody@example.com> User unknown']);
    const [cyrus, dovecot] = t.results;
    expect(cyrus!.length).toBeGreaterThan(1);
    for (const line of cyrus!.slice(0, -1)) expect(line).toMatch(/^550-5\.1\.1 /);
    expect(cyrus!.at(-1)).toMatch(/^550 5\.1\.1 User unknown/);
    expect(dovecot).toEqual([expect.stringMatching(/^550 5\.1\.1 <ghost2@example\.com> User doesn't exist/)]);
    expect([...cyrus!, ...dovecot!].join('\n')).not.toMatch(/5\.0\.0/);
  });

  it('gives an over-quota Cyrus mailbox its own 452 4.2.2 while the others get 250, and 250 with IGNOREQUOTA', async () => {
    // Cyrus checks what is stored already: the delivery that crosses the limit is accepted.
    await cyrusP.adminImap(['SETQUOTA user/full (STORAGE 1)']);
    const big = message(4096);
    await cyrusP.deliver(full.name, big.body.replace(/\n/g, '\r\n'));
    const { subject, body } = message();
    const t = await transaction(['ann@example.com', 'full@example.com', 'alice@example.com'], body);
    expect(t.results.map((r) => r.at(-1))).toEqual([
      expect.stringMatching(/^250 /),
      expect.stringMatching(/^452 4\.2\.2 Over quota/),
      expect.stringMatching(/^250 2\.0\.0 <alice@example\.com> /),
    ]);
    expect(await cyrusImap(cyrusP, full)).not.toContain(subject);

    // IGNOREQUOTA goes to Cyrus, which announced it, and is left off for Dovecot, which did not.
    const again = message();
    const u = await transaction(['ann@example.com IGNOREQUOTA', 'full@example.com IGNOREQUOTA', 'alice@example.com IGNOREQUOTA'], again.body);
    expect(u.rcpt.map((r) => r.at(-1))).toEqual(Array(3).fill(expect.stringMatching(/^250 2\.1\.5 /)));
    expect(u.results.map((r) => r.at(-1))).toEqual([expect.stringMatching(/^250 /), expect.stringMatching(/^250 /), expect.stringMatching(/^250 2\.0\.0 <alice@example\.com> /)]);
    expect(await cyrusImap(cyrusP, full)).toContain(again.subject);
    expect((await world.slotA.messages('alice@example.com')).some((m) => m.includes(`Subject: ${again.subject}\n`))).toBe(true);
  });

  it('refuses a RCPT parameter it does not offer, and a value on IGNOREQUOTA', async () => {
    const c = await openLmtp(target());
    try {
      expect(await c.line()).toMatch(/^220 /);
      c.send('LHLO test.example');
      await c.reply();
      c.send('MAIL FROM:<sender@example.net>');
      expect(await c.line()).toMatch(/^250 /);
      c.send('RCPT TO:<ann@example.com> NOTIFY=NEVER');
      expect(await c.line()).toBe('555 5.5.4 Unsupported parameter NOTIFY');
      c.send('RCPT TO:<ann@example.com> IGNOREQUOTA=yes');
      expect(await c.line()).toBe('501 5.5.4 IGNOREQUOTA takes no value');
      c.send('RCPT TO:<ann@example.com> ignorequota');
      expect(await c.line()).toMatch(/^250 2\.1\.5 /);
    } finally {
      c.close();
    }
  });

  it("answers a backend's refusal of MAIL (Cyrus's 430 without an admin) with 451 for its recipients, counted and logged, while the others are delivered", async () => {
    const refusals = lmtpTotals.backendMailRefusals;
    const failures = lmtpTotals.backendFailures;
    const { subject, body } = message();
    const t = await transaction(['nina@example.com', 'alice@example.com'], body);
    expect(t.results.map((r) => r.at(-1))).toEqual([
      '451 4.3.0 <nina@example.com> Mail store refused the transaction, try again later',
      expect.stringMatching(/^250 2\.0\.0 <alice@example\.com> /),
    ]);
    expect(lmtpTotals.backendMailRefusals).toBe(refusals + 1);
    expect(lmtpTotals.backendFailures).toBe(failures + 1);
    expect(logLines.join('')).toMatch(/lmtp backend failed.*cyrusNoAdmin.*MAIL refused: 430/);
    expect(await cyrusImap(cyrusP, ann)).not.toContain(subject);
    // The metric as scraped.
    expect(await createMetrics(proxy.server.ctx).metrics()).toMatch(/^mailsplice_lmtp_backend_mail_refusals_total [1-9]/m);
  });

  it('answers 451 for the recipients of a backend that refuses our AUTH, counted, and never logs the password', async () => {
    const failures = lmtpTotals.backendFailures;
    const t = await transaction(['bea@example.com', 'ann@example.com'], message().body);
    expect(t.results.map((r) => r.at(-1))).toEqual(['451 4.4.2 <bea@example.com> Connection to mail store failed, try again later', expect.stringMatching(/^250 /)]);
    expect(lmtpTotals.backendFailures).toBe(failures + 1);
    const log = logLines.join('');
    expect(log).toMatch(/lmtp backend failed.*cyrusBadPw.*AUTH PLAIN as cyrusadmin: 5\d\d /); // Cyrus 3.6 says "501 5.5.4 undefined error!"
    for (const secret of [WRONG_PASSWORD, CYRUS_ADMIN.password]) {
      expect(log).not.toContain(secret);
      expect(log).not.toContain(Buffer.from(`\0${CYRUS_ADMIN.name}\0${secret}`).toString('base64'));
    }
  });
});

describe('Postfix -> mailsplice -> Cyrus', () => {
  let postfix: PostfixInstance;

  beforeAll(async () => {
    postfix = await startPostfix({ lmtp: `inet:127.0.0.1:${proxy.ports.lmtp}` });
  });

  afterAll(async () => {
    await postfix?.stop();
  });

  it("logs Cyrus's own codes: dsn=5.1.1 for an unknown mailbox, dsn=4.2.2 for a full one, delivered for the rest", async () => {
    const subject = `postfix-cyrus-${process.pid}-${++seq}`;
    const { execFile } = await import('node:child_process');
    const stdout = await new Promise<string>((resolve, reject) =>
      execFile(
        'swaks',
        ['--server', '127.0.0.1', '--port', String(postfix.smtpPort), '--from', 'sender@example.net', '--to', 'ghost@example.com,full@example.com,ann@example.com',
          '--header', `Subject: ${subject}`, '--body', 'via postfix'],
        { timeout: 30_000 },
        (e, out) => (e ? reject(e) : resolve(out)),
      ),
    );
    const queueId = /250 2\.0\.0 Ok: queued as ([0-9A-F]+)/.exec(stdout)?.[1];
    expect(queueId, stdout).toBeDefined();
    const log = await postfix.waitForLog(new RegExp(`${queueId}: to=<full@example.com>.*status=deferred`));
    await postfix.waitForLog(new RegExp(`${queueId}: to=<ghost@example.com>.*status=bounced`));
    const final = await postfix.waitForLog(new RegExp(`${queueId}: to=<ann@example.com>.*status=sent`));
    expect(final).toMatch(new RegExp(`${queueId}: to=<ghost@example.com>, .*dsn=5\\.1\\.1, status=bounced`));
    expect(log).toMatch(new RegExp(`${queueId}: to=<full@example.com>, .*dsn=4\\.2\\.2, status=deferred`));
    expect(await cyrusImap(cyrusP, ann)).toContain(subject);
  });
});
