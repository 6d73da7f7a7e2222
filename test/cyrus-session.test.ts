import { chmod, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { CYRUS_ADMIN, startCyrusSlot, type CyrusSlot } from './harness/cyrus.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { writeRoutesFile, type RouteModel } from './support/routes.js';
import { startProxy, type TestProxy } from './support/proxy.js';

// A session never changes identity or framing behind the proxy's back (issue 8), against a
// real Cyrus 3.6, which offers UNAUTHENTICATE to admins and COMPRESS=DEFLATE to everyone
// after login.

const alice = { name: 'alice', password: 'alicepw' };

let tmp: string;
let cyrus: CyrusSlot;
let proxy: TestProxy;
let routesFile: string;

function routes(storeStatus: 'active' | 'locked'): RouteModel {
  const slot = { host: cyrus.host, imap: String(cyrus.imap), pop3: String(cyrus.pop3), lmtp: String(cyrus.lmtp), status: 'up' };
  return {
    users: {
      'alice@example.com': { store: 'cstore', backend_login: alice.name },
      // The slot's admin, logged in with its own password: Cyrus offers it UNAUTHENTICATE.
      'admin@example.com': { store: 'cstore', backend_login: CYRUS_ADMIN.name },
    },
    stores: { cstore: { master: 'cyrusA', replicas: '', status: storeStatus, epoch: '1' } },
    slots: { cyrusA: slot },
  };
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-cyrus-session-'));
  await chmod(tmp, 0o755); // Cyrus's services run as `cyrus`
  cyrus = await startCyrusSlot({ id: 'cyrusA', host: '127.0.0.63', users: [alice], dir: path.join(tmp, 'cyrusA') });
  routesFile = path.join(tmp, 'routes.yaml');
  writeRoutesFile(routesFile, routes('active'));
  proxy = await startProxy({ listeners: [{ protocol: 'imap' }], lookup: { file: routesFile } });
});

afterAll(async () => {
  await proxy?.close();
  await cyrus?.destroy();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

beforeEach(() => {
  writeRoutesFile(routesFile, routes('active'));
  proxy.server.reload();
});

/** Logs in; resolves with the client and every line of the login's answer. */
async function login(host: string, port: number, user: string, password: string): Promise<{ c: LineClient; answer: string[] }> {
  const c = await connectLines({ host, port });
  await c.readLine();
  c.send(`a LOGIN ${user} ${password}`);
  const answer = await c.readUntil(/^a /);
  expect(answer.at(-1)).toMatch(/^a OK/);
  return { c, answer };
}

describe('UNAUTHENTICATE', () => {
  it('is not shown at login, though Cyrus offers it to this login', async () => {
    const direct = await login(cyrus.host, cyrus.imap, CYRUS_ADMIN.name, CYRUS_ADMIN.password);
    expect(direct.answer.join('\n')).toMatch(/\bUNAUTHENTICATE\b/); // what the proxy hides
    direct.c.close();
    const via = await login(proxy.host, proxy.ports.imap!, 'admin@example.com', CYRUS_ADMIN.password);
    const shown = via.answer.join('\n');
    expect(shown).toMatch(/CAPABILITY .*IDLE/i); // the list is there, without it
    expect(shown).not.toMatch(/UNAUTHENTICATE/i);
    // Nor COMPRESS for this login: UNAUTHENTICATE inside deflate would pass unseen.
    expect(shown).not.toMatch(/COMPRESS/i);
    via.c.close();
    // A user Cyrus does not offer UNAUTHENTICATE keeps COMPRESS.
    const user = await login(proxy.host, proxy.ports.imap!, 'alice@example.com', alice.password);
    expect(user.answer.join('\n')).toMatch(/CAPABILITY .*COMPRESS=DEFLATE/i);
    user.c.close();
  });

  it('ends a session that was offered it and sends COMPRESS, in plaintext', async () => {
    const { c } = await login(proxy.host, proxy.ports.imap!, 'admin@example.com', CYRUS_ADMIN.password);
    c.send('z COMPRESS DEFLATE');
    expect(await c.readLine()).toBe('* BYE [UNAVAILABLE] COMPRESS is not available through this proxy');
    await expect(c.readLine()).rejects.toThrow(/closed/);
  });

  it('ends a session that uses it anyway, before the backend runs it', async () => {
    const { c } = await login(proxy.host, proxy.ports.imap!, 'admin@example.com', CYRUS_ADMIN.password);
    c.send('b NOOP');
    expect((await c.readUntil(/^b /)).at(-1)).toMatch(/^b OK/);
    // Pipelined with a login as another user: none of it may reach the backend.
    c.write(`u UNAUTHENTICATE\r\nl LOGIN ${alice.name} ${alice.password}\r\n`);
    const rest: string[] = [];
    await expect(
      (async () => {
        for (;;) rest.push(await c.readLine());
      })(),
    ).rejects.toThrow(/closed/);
    expect(rest).toEqual(['* BYE [UNAVAILABLE] UNAUTHENTICATE is not available through this proxy']);
  });

  it('is found after a synchronising literal the server refused (the literal never came)', async () => {
    const { c } = await login(proxy.host, proxy.ports.imap!, 'admin@example.com', CYRUS_ADMIN.password);
    c.send('l APPEND nosuchfolder {40}');
    expect(await c.readLine()).toMatch(/^l NO /); // Cyrus refuses before its "+"
    c.send('u UNAUTHENTICATE');
    expect(await c.readLine()).toBe('* BYE [UNAVAILABLE] UNAUTHENTICATE is not available through this proxy');
    await expect(c.readLine()).rejects.toThrow(/closed/);
  });

  it('is not looked for inside literals: an APPEND whose message holds the word goes through', async () => {
    const { c } = await login(proxy.host, proxy.ports.imap!, 'alice@example.com', alice.password);
    const msg = 'Subject: x\r\n\r\nu UNAUTHENTICATE\r\n';
    c.send(`m APPEND INBOX {${msg.length}}`);
    expect(await c.readLine()).toMatch(/^\+/);
    c.write(`${msg}\r\n`);
    expect((await c.readUntil(/^m /)).at(-1)).toMatch(/^m OK/);
    c.write(`n APPEND INBOX {${msg.length}+}\r\n${msg}\r\n`);
    expect((await c.readUntil(/^n /)).at(-1)).toMatch(/^n OK/);
    c.send('i IDLE');
    expect(await c.readLine()).toMatch(/^\+/);
    c.send('DONE');
    expect((await c.readUntil(/^i /)).at(-1)).toMatch(/^i OK/);
    c.close();
  });
});

/** A raw client whose stream is deflate after COMPRESS: every byte it received after the OK, as received. */
async function compressedSession(): Promise<{ received: () => Buffer; closed: Promise<void>; sendDeflated: (s: string) => void }> {
  const sock = net.connect({ host: proxy.host, port: proxy.ports.imap! });
  let buf = Buffer.alloc(0);
  let wake: (() => void) | undefined;
  sock.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    wake?.();
  });
  const closed = new Promise<void>((res) => sock.once('close', () => res()));
  /** Waits for a line matching `re` in plaintext and drops everything up to its end. */
  const until = async (re: RegExp): Promise<void> => {
    const deadline = Date.now() + 10_000;
    for (;;) {
      const text = buf.toString('latin1');
      const m = re.exec(text);
      if (m) {
        const end = text.indexOf('\n', m.index) + 1;
        buf = buf.subarray(end);
        return;
      }
      if (Date.now() > deadline) throw new Error(`no ${re} in ${JSON.stringify(text)}`);
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, 200);
      });
    }
  };
  await until(/^\* OK/m);
  sock.write(`a LOGIN alice@example.com ${alice.password}\r\n`);
  await until(/^a OK/m);
  sock.write('z COMPRESS DEFLATE\r\n');
  await until(/^z OK/m);
  const deflate = zlib.createDeflateRaw();
  deflate.on('data', (d: Buffer) => sock.write(d));
  return {
    received: () => buf,
    closed,
    sendDeflated: (s) => {
      deflate.write(s);
      deflate.flush(zlib.constants.Z_SYNC_FLUSH);
    },
  };
}

/** Everything received, inflated; throws if it is not one valid deflate stream so far. */
function inflated(raw: Buffer): string {
  try {
    return zlib.inflateRawSync(raw, { finishFlush: zlib.constants.Z_SYNC_FLUSH }).toString("latin1");
  } catch (e) {
    throw new Error(`${(e as Error).message}: ${raw.toString("hex")}`);
  }
}


describe('COMPRESS', () => {
  it('an event right after COMPRESS closes the connection without writing plaintext into it', async () => {
    const s = await compressedSession();
    writeRoutesFile(routesFile, routes('locked'));
    proxy.server.reload();
    await s.closed;
    const raw = s.received();
    expect(raw.includes('BYE')).toBe(false);
    expect(inflated(raw)).not.toMatch(/BYE/);
  });

  it('an event after compressed traffic closes the connection; what the client got stays valid deflate', async () => {
    const s = await compressedSession();
    s.sendDeflated('n NOOP\r\n');
    const until = Date.now() + 10_000;
    while (!/^n OK/m.test(inflated(s.received()))) {
      if (Date.now() > until) throw new Error(`no answer to a compressed NOOP: ${JSON.stringify(inflated(s.received()))}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    writeRoutesFile(routesFile, routes('locked'));
    proxy.server.reload();
    await s.closed;
    const raw = s.received();
    expect(raw.includes('BYE')).toBe(false);
    const text = inflated(raw);
    expect(text).toMatch(/^n OK/m);
    expect(text).not.toMatch(/BYE/);
  });
});
