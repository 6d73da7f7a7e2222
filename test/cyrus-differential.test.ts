import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pop3Uidls } from './harness/clients.js';
import { startCyrusSlot, type CyrusSlot } from './harness/cyrus.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { writeRoutesFile, type RouteModel } from './support/routes.js';

// The differential check of test/imap-more.test.ts, against a Cyrus 3.6 slot in passthrough
// mode: the client's own password, the backend login the bare name (Cyrus runs without
// virtdomains, so `carol@example.com` is not a login there). After login, a client must
// see the same lines from Cyrus spoken to directly and through the proxy; POP3 likewise.

const carol = { name: 'carol', password: 'carolpw' };
const dave = { name: 'dave', password: 'davepw' };

let tmp: string;
let cyrus: CyrusSlot;
let proxy: TestProxy;

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-cyrus-diff-'));
  await chmod(tmp, 0o755); // Cyrus's services run as `cyrus`
  cyrus = await startCyrusSlot({ id: 'cyrusDiff', host: '127.0.0.63', users: [carol, dave], dir: path.join(tmp, 'cyrus') });
  const slot = { host: cyrus.host, imap: String(cyrus.imap), pop3: String(cyrus.pop3), lmtp: String(cyrus.lmtp), status: 'up' };
  const routes: RouteModel = {
    users: {
      'carol@example.com': { store: 'cstore', backend_login: carol.name },
      'dave@example.com': { store: 'cstore', backend_login: dave.name },
    },
    stores: { cstore: { master: 'cyrusDiff', replicas: '', status: 'active', epoch: '1' } },
    slots: { cyrusDiff: slot },
  };
  const routesFile = path.join(tmp, 'routes.yaml');
  writeRoutesFile(routesFile, routes);
  proxy = await startProxy({ listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }], lookup: { file: routesFile } });
  for (let i = 1; i <= 3; i++) {
    await cyrus.deliver(dave.name, `From: a@example.com\r\nSubject: pop ${i}\r\nMessage-ID: <cyrus-diff-pop-${i}@example.net>\r\n\r\nbody ${i}\r\n.dot-stuffed line\r\n`);
  }
});

afterAll(async () => {
  await proxy?.close();
  await cyrus?.destroy();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

async function open(host: string, port: number): Promise<LineClient> {
  const c = await connectLines({ host, port });
  await c.readLine(); // greetings differ by design: the proxy's vs Cyrus's
  return c;
}

/**
 * What legitimately differs between two runs of the same script on one Cyrus, each on a
 * freshly re-created mailbox, and nothing else:
 * - Cyrus's per-session id in the login OK (`SESSIONID=<cyrus-...>`);
 * - the re-created mailbox's identity and counters: UIDVALIDITY, APPENDUID's validity,
 *   MAILBOXID and HIGHESTMODSEQ (Cyrus's modseq counter is per user and keeps growing);
 * - Cyrus's timings on tagged OKs (`Completed (0.001 sec)`, `(1 msgs in 0.000 secs)`).
 */
function normaliseImap(line: string): string {
  return line
    .replace(/SESSIONID=<[^>]*>/g, 'SESSIONID=<s>')
    .replace(/UIDVALIDITY \d+/g, 'UIDVALIDITY n')
    .replace(/APPENDUID \d+/g, 'APPENDUID n')
    .replace(/MAILBOXID \([^)]*\)/g, 'MAILBOXID (id)')
    .replace(/HIGHESTMODSEQ \d+/g, 'HIGHESTMODSEQ n')
    .replace(/\(\d+\.\d+ secs?\)/g, '(t secs)')
    .replace(/ in \d+\.\d+ secs?\)/g, ' in t secs)');
}

type LoginForm = 'LOGIN' | 'AUTHENTICATE PLAIN';

function loginCommand(form: LoginForm, login: string): string {
  if (form === 'LOGIN') return `t0 LOGIN ${login} ${carol.password}`;
  return `t0 AUTHENTICATE PLAIN ${Buffer.from(`\0${login}\0${carol.password}`).toString('base64')}`;
}

/** Runs a fixed IMAP session after logging in as `login`; returns every line after the greeting. */
async function imapScript(host: string, port: number, form: LoginForm, login: string): Promise<string[]> {
  const c = await open(host, port);
  const out: string[] = [];
  const step = async (cmd: string, tag: string) => {
    c.send(cmd);
    out.push(...(await c.readUntil(new RegExp(`^${tag} `))));
  };
  try {
    await step(loginCommand(form, login), 't0');
    c.send('p1 DELETE difftest');
    await c.readUntil(/^p1 /); // preparation, not compared (fails the first time)
    await step('t1 CREATE difftest', 't1');
    const msg = 'From: a@example.com\r\nSubject: differential\r\n\r\nbody line\r\n';
    c.send(`t2 APPEND difftest (\\Seen) "01-Jan-2024 00:00:00 +0000" {${Buffer.byteLength(msg)}}`);
    out.push(await c.readLine()); // the continuation
    c.write(`${msg}\r\n`);
    out.push(...(await c.readUntil(/^t2 /)));
    await step('t3 SELECT difftest', 't3');
    await step('t4 FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE BODY[] INTERNALDATE)', 't4');
    await step('t5 STORE 1 +FLAGS (\\Flagged)', 't5');
    await step('t6 SEARCH FLAGGED', 't6');
    await step('t7 UID SEARCH SUBJECT differential', 't7');
    c.send('t8 IDLE');
    out.push(await c.readLine());
    c.send('DONE');
    out.push(...(await c.readUntil(/^t8 /)));
    await step('t9 LOGOUT', 't9');
  } finally {
    c.close();
  }
  return out.map(normaliseImap);
}

describe('differential against Cyrus (passthrough, backend_login = bare name)', () => {
  it.each<LoginForm>(['AUTHENTICATE PLAIN', 'LOGIN'])('IMAP (%s): the same lines from login to LOGOUT as Cyrus spoken to directly', async (form) => {
    const direct = await imapScript(cyrus.host, cyrus.imap, form, carol.name);
    const proxied = await imapScript(proxy.host, proxy.ports.imap!, form, 'carol@example.com');
    expect(direct.length).toBeGreaterThan(15);
    expect(direct[0]).toMatch(/^t0 OK \[CAPABILITY /);
    expect(direct.at(-1)).toMatch(/^t9 OK /);
    if (form === 'LOGIN') {
      // The proxy logs in to the backend with AUTHENTICATE PLAIN whatever the client used,
      // and passes Cyrus's tagged OK on: its capability list is the same, its text is
      // Cyrus's answer to AUTHENTICATE ("Success (no protection)"), not to LOGIN
      // ("User logged in").
      expect(proxied[0]).toBe(direct[0]!.replace(/\] User logged in /, '] Success (no protection) '));
      expect(proxied.slice(1)).toEqual(direct.slice(1));
    } else {
      expect(proxied).toEqual(direct);
    }
  });

  /** A POP3 session that changes nothing: DELE is undone by RSET, so both runs see one state. */
  async function pop3Script(host: string, port: number, login: string): Promise<string[]> {
    const c = await open(host, port);
    const out: string[] = [];
    const single = async (cmd: string) => {
      c.send(cmd);
      out.push(await c.readLine());
    };
    const multi = async (cmd: string) => {
      c.send(cmd);
      const first = await c.readLine();
      out.push(first);
      if (first.startsWith('+OK')) out.push(...(await c.readUntil(/^\.$/)));
    };
    try {
      await single(`USER ${login}`);
      await single(`PASS ${dave.password}`);
      await single('STAT');
      await multi('LIST');
      await multi('UIDL');
      await single('UIDL 2');
      await multi('RETR 1');
      await multi('TOP 2 0');
      await single('DELE 1');
      await multi('LIST');
      await single('RETR 1');
      await single('RSET');
      await single('STAT');
      await single('QUIT');
    } finally {
      c.close();
    }
    // Cyrus's PASS reply carries its session id. The USER reply is the proxy's own (it
    // holds the name until PASS, then logs in to the backend): only its +OK is compared.
    return out.map((l, i) => (i === 0 ? l.replace(/^\+OK .*/, '+OK (user)') : l.replace(/SESSIONID=<[^>]*>/g, 'SESSIONID=<s>')));
  }

  it('POP3: the same STAT, LIST, UIDL, RETR, TOP, DELE and RSET replies as Cyrus spoken to directly', async () => {
    const direct = await pop3Script(cyrus.host, cyrus.pop3, dave.name);
    const proxied = await pop3Script(proxy.host, proxy.ports.pop3!, 'dave@example.com');
    expect(direct.join('\n')).toContain('Subject: pop 1');
    expect(direct.join('\n')).toContain('..dot-stuffed line');
    expect(direct.at(-1)).toMatch(/^\+OK/);
    expect(proxied).toEqual(direct);
  });

  it('POP3: a DELE through the proxy is committed on Cyrus at QUIT', async () => {
    const before = await pop3Uidls({ host: cyrus.host, port: cyrus.pop3, user: dave.name, password: dave.password });
    expect(before).toHaveLength(3);
    const c = await open(proxy.host, proxy.ports.pop3!);
    try {
      c.send('USER dave@example.com');
      expect(await c.readLine()).toMatch(/^\+OK/);
      c.send(`PASS ${dave.password}`);
      expect(await c.readLine()).toMatch(/^\+OK/);
      c.send('DELE 1');
      expect(await c.readLine()).toMatch(/^\+OK/);
      c.send('QUIT');
      expect(await c.readLine()).toMatch(/^\+OK/);
    } finally {
      c.close();
    }
    const after = await pop3Uidls({ host: cyrus.host, port: cyrus.pop3, user: dave.name, password: dave.password });
    expect(after).toEqual(before.slice(1));
  });
});
