import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { lmtpTransaction, openLmtp } from './harness/lmtp.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { writeRoutesFile } from './support/routes.js';

// Issue 14, items 4, 5, 6 and two parts of 9: what a hostile client or backend can send
// before login, against real Dovecot where a real backend is involved. The misbehaving
// backends are tiny net.Servers: no real server floods or says OKAY, so only a fake can.

/** latin-1 "pässé": not valid UTF-8, as an old client in a latin-1 locale sends it. */
const LATIN1_PASSWORD = Buffer.from('p\xe4ss\xe9', 'latin1');

let slot: DovecotSlot;
let proxy: TestProxy;
let dir: string;
const fakes: FakeBackend[] = [];

interface FakeBackend {
  server: net.Server;
  port: number;
  /** Bytes written to the proxy on the connection that closed last, and when it closed. */
  closes: { sent: number; finished: boolean }[];
  /** Resolves at the next close of a connection from the proxy. */
  nextClose(): Promise<{ sent: number; finished: boolean }>;
}

/** A backend that answers the proxy's lines with `answer` (which may flood through `flood`). */
async function fakeBackend(greeting: string, answer: (line: string, sock: net.Socket, flood: () => void) => string | undefined): Promise<FakeBackend> {
  const closes: FakeBackend['closes'] = [];
  let waiters: ((c: { sent: number; finished: boolean }) => void)[] = [];
  const server = net.createServer((sock) => {
    let sent = 0;
    let finished = false;
    let buf = '';
    sock.on('error', () => undefined);
    sock.on('close', () => {
      const c = { sent, finished };
      closes.push(c);
      for (const w of waiters) w(c);
      waiters = [];
    });
    // 64 MB of untagged lines, as fast as the proxy reads them: bounded here, so that a proxy
    // without a cap ends up holding all of it and the test sees `finished` (or its timeout).
    const line = `* OK ${'x'.repeat(1000)}\r\n`;
    const flood = (): void => {
      while (!sock.destroyed && sent < 64 * 1024 * 1024) {
        sent += line.length;
        if (!sock.write(line)) {
          sock.once('drain', flood);
          return;
        }
      }
      finished = true;
    };
    sock.write(greeting);
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      buf += d;
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        const l = buf.slice(0, i).replace(/\r$/, '');
        buf = buf.slice(i + 1);
        const out = answer(l, sock, flood);
        if (out !== undefined) sock.write(out);
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const fake: FakeBackend = {
    server,
    port: (server.address() as net.AddressInfo).port,
    closes,
    nextClose: () => new Promise((r) => waiters.push(r)),
  };
  fakes.push(fake);
  return fake;
}

const IMAP_GREETING = '* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] fake\r\n';
const POP3_GREETING = '+OK fake\r\n';
const pop3Capa = (l: string): string | undefined => (l === 'CAPA' ? '+OK\r\nSASL PLAIN\r\nUSER\r\n.\r\n' : undefined);

let imapFlood: FakeBackend;
let imapOkay: FakeBackend;
let pop3Flood: FakeBackend;
let pop3InUse: FakeBackend;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'mailsplice-hostile-'));
  chmodSync(dir, 0o755); // Dovecot's unprivileged processes traverse into the slot dir
  slot = await startDovecotSlot({
    id: 'hostile',
    host: '127.0.0.11',
    dir: join(dir, 'slot'),
    users: [
      { name: 'alice@example.com', password: 'alicepw' },
      { name: 'latin@example.com', password: 'unused', passwordBytes: LATIN1_PASSWORD },
    ],
  });
  imapFlood = await fakeBackend(IMAP_GREETING, (l, _s, flood) => (l.startsWith('L ') ? void flood() : undefined));
  imapOkay = await fakeBackend(IMAP_GREETING, (l) => (l.startsWith('L ') ? 'L OKAY [CAPABILITY IMAP4rev1] Logged in\r\n' : undefined));
  // An endless CAPA answer: the POP3 dialogue reads multi-line answers only there.
  pop3Flood = await fakeBackend(POP3_GREETING, (l, sock, flood) => {
    if (l === 'CAPA') {
      sock.write('+OK\r\n');
      flood();
    }
    return undefined;
  });
  pop3InUse = await fakeBackend(POP3_GREETING, (l) =>
    pop3Capa(l) ?? (l.startsWith('AUTH ') || l.startsWith('PASS ') ? '-ERR [IN-USE] \x1b[2J\x1b]0;owned\x07 mailbox \x9b31m locked\r\n' : l.startsWith('USER ') ? '+OK\r\n' : undefined),
  );
  const fakeSlot = (f: FakeBackend) => ({ host: '127.0.0.1', imap: String(f.port), pop3: String(f.port), lmtp: String(f.port), status: 'up' });
  const routes = {
    users: {
      'alice@example.com': { store: 'real' },
      'latin@example.com': { store: 'real' },
      'flood@example.com': { store: 'imapflood' },
      'okay@example.com': { store: 'imapokay' },
      'capaflood@example.com': { store: 'pop3flood' },
      'inuse@example.com': { store: 'pop3inuse' },
    },
    stores: {
      real: { master: 'real', status: 'active', epoch: '1' },
      imapflood: { master: 'imapflood', status: 'active', epoch: '1' },
      imapokay: { master: 'imapokay', status: 'active', epoch: '1' },
      pop3flood: { master: 'pop3flood', status: 'active', epoch: '1' },
      pop3inuse: { master: 'pop3inuse', status: 'active', epoch: '1' },
    },
    slots: {
      real: { host: slot.host, imap: String(slot.imap), pop3: String(slot.pop3), lmtp: String(slot.lmtp), status: 'up' },
      imapflood: fakeSlot(imapFlood),
      imapokay: fakeSlot(imapOkay),
      pop3flood: fakeSlot(pop3Flood),
      pop3inuse: fakeSlot(pop3InUse),
    },
  };
  const routesFile = join(dir, 'routes.yaml');
  writeRoutesFile(routesFile, routes);
  // limits.line_length is left at its default on purpose (item 9).
  proxy = await startProxy({
    listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }, { protocol: 'lmtp' }],
    lookup: { file: routesFile, default_domain: 'example.com' },
    // Long enough that a proxy without the dialogue cap is still reading when the test gives up.
    backend: { login_timeout_ms: 60_000 },
  });
}, 60_000);

afterAll(async () => {
  for (const c of clients) c.close();
  await proxy?.close();
  for (const f of fakes) f.server.close();
  await slot?.destroy();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Every client a test opened: closed in afterAll even when the test failed half way. */
const clients: { close(): void }[] = [];

async function imap(): Promise<LineClient> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.imap! });
  clients.push(c);
  expect(await c.readLine()).toMatch(/^\* OK /);
  return c;
}

async function pop3(): Promise<LineClient> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.pop3! });
  clients.push(c);
  expect(await c.readLine()).toMatch(/^\+OK /);
  return c;
}

const latin1 = (s: string): Buffer => Buffer.from(s, 'latin1');
const plain = (user: string, pass: Buffer): string => Buffer.concat([Buffer.from([0]), Buffer.from(user), Buffer.from([0]), pass]).toString('base64');

/** Races `p` against a deadline, so a test fails with a reason rather than the suite's timeout. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([p, new Promise<T>((_, rej) => (t = setTimeout(() => rej(new Error(`${what} within ${ms} ms`)), ms)))]).finally(() => clearTimeout(t));
}

describe('item 4: a backend cannot grow the proxy memory during the login', () => {
  it('IMAP: a backend streaming untagged lines fails the login as UNAVAILABLE and is disconnected', async () => {
    const closed = imapFlood.nextClose();
    const c = await imap();
    c.send('a1 LOGIN flood@example.com pw');
    expect(await c.readLine(20_000)).toMatch(/^a1 NO \[UNAVAILABLE\] /);
    const close = await within(closed, 20_000, 'the proxy did not close the flooding backend');
    // Closed while the backend still had most of its 64 MB to send: the proxy stopped at its cap.
    expect(close.finished).toBe(false);
    expect(close.sent).toBeLessThan(16 * 1024 * 1024);
    c.send('a2 NOOP');
    expect(await c.readLine()).toBe('a2 OK NOOP completed');
    c.close();
  });

  it('POP3: an endless CAPA answer fails the login as SYS/TEMP and is disconnected', async () => {
    const closed = pop3Flood.nextClose();
    const c = await pop3();
    c.send(`AUTH PLAIN ${plain('capaflood@example.com', Buffer.from('pw'))}`);
    expect(await c.readLine(20_000)).toMatch(/^-ERR \[SYS\/TEMP\] /);
    const close = await within(closed, 20_000, 'the proxy did not close the flooding backend');
    expect(close.finished).toBe(false);
    c.close();
  });
});

describe('item 5: passwords that are not UTF-8 reach the backend byte for byte', () => {
  it('the latin-1 user logs in to Dovecot directly (the fixture is right)', async () => {
    const c = await connectLines({ host: slot.host, port: slot.imap });
    await c.readLine();
    c.socket.write(Buffer.concat([latin1('a1 LOGIN latin@example.com "'), LATIN1_PASSWORD, latin1('"\r\n')]));
    expect((await c.readUntil(/^a1 /)).at(-1)).toMatch(/^a1 OK /);
    c.close();
  });

  it('IMAP LOGIN with the password in a quoted string, an atom and a literal', async () => {
    for (const pass of [Buffer.concat([latin1('"'), LATIN1_PASSWORD, latin1('"')]), LATIN1_PASSWORD]) {
      const c = await imap();
      c.socket.write(Buffer.concat([latin1('a1 LOGIN latin@example.com '), pass, latin1('\r\n')]));
      expect((await c.readUntil(/^a1 /)).at(-1)).toMatch(/^a1 OK /);
      c.close();
    }
    const c = await imap();
    c.socket.write(Buffer.concat([latin1(`a1 LOGIN latin@example.com {${LATIN1_PASSWORD.length}+}\r\n`), LATIN1_PASSWORD, latin1('\r\n')]));
    expect((await c.readUntil(/^a1 /)).at(-1)).toMatch(/^a1 OK /);
    c.close();
  });

  it('IMAP AUTHENTICATE PLAIN', async () => {
    const c = await imap();
    c.send(`a1 AUTHENTICATE PLAIN ${plain('latin@example.com', LATIN1_PASSWORD)}`);
    expect((await c.readUntil(/^a1 /)).at(-1)).toMatch(/^a1 OK /);
    c.close();
  });

  it('POP3 USER/PASS and AUTH PLAIN', async () => {
    const c = await pop3();
    c.send('USER latin@example.com');
    expect(await c.readLine()).toMatch(/^\+OK/);
    c.socket.write(Buffer.concat([latin1('PASS '), LATIN1_PASSWORD, latin1('\r\n')]));
    expect(await c.readLine()).toMatch(/^\+OK/);
    c.close();
    const d = await pop3();
    d.send(`AUTH PLAIN ${plain('latin@example.com', LATIN1_PASSWORD)}`);
    expect(await d.readLine()).toMatch(/^\+OK/);
    d.close();
  });
});

describe('item 6: strict input, strict backend answers', () => {
  it('IMAP: a tag with control characters is never echoed', async () => {
    const c = await imap();
    c.write('a\x01b NOOP\r\n');
    expect(await c.readLine()).toBe('* BAD bad character in atom');
    c.write('a\x1b[2Jb NOOP\r\n');
    expect(await c.readLine()).toBe('* BAD bad character in atom');
    c.write('a\x7f NOOP\r\n');
    expect(await c.readLine()).toBe('* BAD bad character in atom');
    c.write('a+b NOOP\r\n');
    expect(await c.readLine()).toBe('* BAD Missing or invalid tag');
    c.send('a2 NOOP');
    expect(await c.readLine()).toBe('a2 OK NOOP completed');
    c.close();
  });

  it('IMAP: "literal too large" does not echo a tag with a CR in it', async () => {
    const c = await imap();
    c.write('x\r* OK [ALERT] pwned {99999}\r\n');
    expect(await c.readLine()).toBe('* BAD [LIMIT] Literal too large');
    c.write('x\r* OK [ALERT] pwned "unterminated\r\n');
    expect(await c.readLine()).toBe('* BAD bad character in atom');
    c.close();
  });

  it('IMAP: a fifth literal is refused as too many literals, not as too large', async () => {
    const c = await imap();
    c.send('a1 ID ("a" {1}');
    for (let i = 0; i < 4; i++) {
      expect(await c.readLine()).toMatch(/^\+ /);
      c.send(i < 3 ? `x "b" {1}` : 'x {1}');
    }
    expect(await c.readLine()).toBe('a1 BAD [LIMIT] Too many literals');
    c.close();
  });

  it("IMAP: a backend's tagged OKAY is not an OK", async () => {
    const c = await imap();
    c.send('a1 LOGIN okay@example.com pw');
    expect(await c.readLine()).toMatch(/^a1 NO \[UNAVAILABLE\] /);
    c.close();
  });

  it("POP3: a backend's IN-USE text reaches the client as printable ASCII only", async () => {
    for (const login of [
      (c: LineClient) => c.send(`AUTH PLAIN ${plain('inuse@example.com', Buffer.from('pw'))}`),
      (c: LineClient) => c.write('USER inuse@example.com\r\nPASS pw\r\n'),
    ]) {
      const c = await pop3();
      login(c);
      let line = await c.readLine();
      if (line === '+OK Send your password') line = await c.readLine();
      expect(line).toMatch(/^-ERR \[IN-USE\] /);
      expect(line).toMatch(/^[\x20-\x7e]*$/);
      c.close();
    }
  });

  it('LMTP: <"alice"@example.com> is alice, and a +detail in quotes reaches her too', async () => {
    for (const [rcpt, canonical] of [
      ['"alice"@example.com', 'alice@example.com'],
      ['"alice+tag"@example.com', 'alice+tag@example.com'],
    ] as const) {
      const subject = `quoted-${process.pid}-${canonical}`;
      const t = await lmtpTransaction({ host: proxy.host, port: proxy.ports.lmtp! }, 'a@b.example', [rcpt], `Subject: ${subject}\n\nhi\n`);
      expect(t.rcpt).toEqual([`250 2.1.5 <${canonical}> Recipient OK`]);
      expect(t.results).toEqual([expect.stringMatching(/^250 /)]);
      expect((await slot.messages('alice@example.com')).filter((m) => m.includes(`Subject: ${subject}`))).toHaveLength(1);
    }
  });

  it('LMTP: a +detail with "@" or quotes is refused at RCPT, not after DATA', async () => {
    const c = await openLmtp({ host: proxy.host, port: proxy.ports.lmtp! });
    clients.push(c);
    await c.line();
    c.write('LHLO t\r\nMAIL FROM:<a@b.example>\r\n');
    await c.reply();
    await c.line();
    for (const bad of ['alice+a@b@example.com', 'alice+"x"@example.com', 'alice+"a@b"@example.com', '"alice"x@example.com', 'alice@exa mple.com', 'alice@-x.example']) {
      c.send(`RCPT TO:<${bad}>`);
      expect(await c.line(), bad).toMatch(/^501 5\.1\.3 /);
    }
    c.close();
  });
});

describe('item 9: limits that fit legal input', () => {
  it('IMAP: an RFC 2971 ID of 30 fields with 1024-octet values passes the default line length', async () => {
    const fields = Array.from({ length: 30 }, (_, i) => `"field${i}" "${'v'.repeat(1024)}"`).join(' ');
    const c = await imap();
    c.send(`a1 ID (${fields})`);
    expect(await c.readUntil(/^a1 /)).toEqual(['* ID ("name" "mailsplice")', 'a1 OK ID completed']);
    c.close();
  });

  it('LMTP: RCPT TO:<alice> gets lookup.default_domain and is delivered to alice@example.com', async () => {
    const subject = `bare-${process.pid}`;
    const t = await lmtpTransaction({ host: proxy.host, port: proxy.ports.lmtp! }, 'a@b.example', ['alice', 'Alice'], `Subject: ${subject}\n\nhi\n`);
    expect(t.rcpt).toEqual(['250 2.1.5 <alice@example.com> Recipient OK', '250 2.1.5 <alice@example.com> Recipient OK']);
    expect(t.results).toHaveLength(2);
    expect(t.results.every((r) => r.startsWith('250 '))).toBe(true);
    expect((await slot.messages('alice@example.com')).filter((m) => m.includes(`Subject: ${subject}`))).toHaveLength(1);
  });
});
