import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import tls from 'node:tls';
import { stringify } from 'yaml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeCA, makeCert, type CertFiles } from './harness/certs.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { freePorts } from './harness/ports.js';
import { waitUntil } from './harness/proc.js';
import { startWorld, type World } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Issue 10, SIGHUP re-reads the whole config: a real `mailsplice serve` gets a new file that
// adds a listener, changes a limit, sets the log level and swaps the LMTP listener's
// certificate. An IMAP session open across it keeps working. A file that does not validate
// changes nothing and the log names the key; a new lookup source is refused with a log line.

const HOST = '127.0.0.1';
let world: World;
let proxy: ProxyProcess | undefined;
let ca: CertFiles;
let certA: CertFiles;
let certB: CertFiles;
let dir: string;
let routes: string;
let ports: { imap: number; lmtp: number; added: number };

function config(over: { certB?: boolean; added?: boolean; limits?: object; log?: object; lookup?: object } = {}): Record<string, unknown> {
  const cert = over.certB ? certB : certA;
  return {
    workers: 1,
    shutdown: { drain_ms: 0 },
    listeners: [
      { protocol: 'imap', address: HOST, port: ports.imap },
      { protocol: 'lmtp', address: HOST, port: ports.lmtp, tls: 'implicit', cert: cert.certFile, key: cert.keyFile },
      ...(over.added ? [{ name: 'added', protocol: 'imap', address: HOST, port: ports.added }] : []),
    ],
    lookup: over.lookup ?? { file: routes },
    limits: { auth_failure_delay_ms: 0, ...over.limits },
    log: over.log ?? { level: 'info' },
  };
}

beforeAll(async () => {
  world = await startWorld();
  dir = tempDir('reload');
  ca = await makeCA(join(dir, 'ca'));
  certA = await makeCert(join(dir, 'a'), { ca, cn: 'lmtp-a.example.test', altNames: ['lmtp.example.test', '127.0.0.1'], name: 'a' });
  certB = await makeCert(join(dir, 'b'), { ca, cn: 'lmtp-b.example.test', altNames: ['lmtp.example.test', '127.0.0.1'], name: 'b' });
  routes = join(dir, 'routes.yaml');
  writeRoutesFile(routes, worldRoutes(world));
  const [imap, lmtp, added] = (await freePorts(HOST, 3)) as [number, number, number];
  ports = { imap, lmtp, added };
  proxy = await startProxyProcess(config());
}, 60_000);

afterAll(async () => {
  await proxy?.stop();
  await world?.stop();
});

/** The CN of the certificate the LMTP listener shows now. */
function lmtpCertificate(): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: HOST, port: ports.lmtp, ca: ca.certPem, servername: 'lmtp.example.test' }, () => {
      const cn = s.getPeerCertificate().subject.CN;
      s.destroy();
      resolve(String(cn));
    });
    s.on('error', reject);
  });
}

/** Rewrites the config file, sends SIGHUP and waits for the reload's log line. */
async function hup(doc: object | string, expectLine: RegExp): Promise<string> {
  const p = proxy!;
  writeFileSync(p.configFile, typeof doc === 'string' ? doc : stringify(doc));
  const from = p.log().length;
  p.child.kill('SIGHUP');
  await waitUntil(async () => expectLine.test(p.log().slice(from)), { what: `log line ${expectLine}`, describe: () => p.log().slice(from) });
  return p.log().slice(from);
}

describe('SIGHUP', () => {
  it('adds a listener, changes a limit and swaps the LMTP certificate; an open IMAP session keeps working', { timeout: 60_000 }, async () => {
    const open: LineClient[] = [];
    try {
      const session = await connectLines({ host: HOST, port: ports.imap });
      open.push(session);
      await session.readLine();
      session.send('a LOGIN alice@example.com alicepw');
      expect((await session.readUntil(/^a /)).at(-1)).toMatch(/^a OK /);
      session.send('b SELECT INBOX');
      expect((await session.readUntil(/^b /)).at(-1)).toMatch(/^b OK /);
      expect(await lmtpCertificate()).toBe('lmtp-a.example.test');

      // One connection per address from now on: the open session is the one of 127.0.0.1.
      const log = await hup(config({ certB: true, added: true, limits: { connections_per_ip: 1 }, log: { level: 'debug' } }), /"msg":"reloaded"/);
      expect(log).toMatch(/"msg":"listener added"/);

      expect(await lmtpCertificate()).toBe('lmtp-b.example.test');
      const refused = await connectLines({ host: HOST, port: ports.imap });
      open.push(refused);
      expect(await refused.readLine()).toMatch(/^\* BYE \[UNAVAILABLE\] Too many connections/);
      // The new listener, from another address; the new log level shows debug lines (of its login).
      const fromHere = proxy!.log().length;
      const added = await connectLines({ host: HOST, port: ports.added, localAddress: '127.0.0.2' });
      open.push(added);
      expect(await added.readLine()).toMatch(/^\* OK /);
      added.send('a LOGIN bob@example.com bobpw');
      expect((await added.readUntil(/^a /)).at(-1)).toMatch(/^a OK /);
      await waitUntil(async () => /"level":"debug","msg":"login spliced".*"login":"bob@example.com"/.test(proxy!.log().slice(fromHere)), { what: 'a debug line', describe: () => proxy!.log().slice(fromHere) });

      // The session from before the reload is untouched.
      session.send('c FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])');
      const fetched = await session.readUntil(/^c /);
      expect(fetched.at(-1)).toMatch(/^c OK /);
      expect(fetched.join('\n')).toContain('Subject: on slotA');
    } finally {
      for (const c of open) c.close();
    }
  });

  it('keeps the running config when the file does not validate, and names the key', { timeout: 30_000 }, async () => {
    const log = await hup(stringify({ ...config({ certB: true, added: true }), limits: { bad_commands: -1 } }), /config reload refused/);
    expect(log).toMatch(/limits\.bad_commands/);
    // Still as before: the added listener listens, the limit of one connection per address holds.
    const added = await connectLines({ host: HOST, port: ports.added, localAddress: '127.0.0.3' });
    try {
      expect(await added.readLine()).toMatch(/^\* OK /);
    } finally {
      added.close();
    }
  });

  it('refuses a new lookup source with a log line and applies the rest (a listener removed)', { timeout: 30_000 }, async () => {
    const other = join(dir, 'other-routes.yaml');
    writeRoutesFile(other, worldRoutes(world));
    const log = await hup(config({ certB: true, lookup: { file: other } }), /"msg":"reloaded"/);
    expect(log).toMatch(/"msg":"config change needs a restart; the running setting stays","key":"lookup.file"/);
    expect(log).toMatch(/"msg":"listener removed \(open sessions stay\)"/);
    await expect(connectLines({ host: HOST, port: ports.added, timeoutMs: 2000 })).rejects.toThrow();
  });
});

describe('SIGHUP with workers', () => {
  it('the primary reads the file and every worker applies it: a listener added, then removed', { timeout: 60_000 }, async () => {
    const [imap, added] = (await freePorts(HOST, 2)) as [number, number];
    const doc = (withAdded: boolean) => ({
      workers: 2,
      shutdown: { drain_ms: 0 },
      listeners: [{ protocol: 'imap', address: HOST, port: imap }, ...(withAdded ? [{ protocol: 'imap', address: HOST, port: added }] : [])],
      lookup: { file: routes },
      limits: { auth_failure_delay_ms: 0 },
    });
    const p = await startProxyProcess(doc(false));
    try {
      const reloaded = async (d: object) => {
        writeFileSync(p.configFile, stringify(d));
        const from = p.log().length;
        p.child.kill('SIGHUP');
        // One "reloaded" line per worker.
        await waitUntil(async () => (p.log().slice(from).match(/"msg":"reloaded"/g) ?? []).length === 2, { what: 'both workers reloaded', describe: () => p.log().slice(from) });
      };
      await reloaded(doc(true));
      for (let i = 0; i < 4; i++) {
        const c = await connectLines({ host: HOST, port: added });
        expect(await c.readLine()).toMatch(/^\* OK /);
        c.close();
      }
      await reloaded(doc(false));
      await waitUntil(async () => !(await connectLines({ host: HOST, port: added, timeoutMs: 1000 }).then((c) => (c.close(), true), () => false)), { what: 'the removed listener closed' });
    } finally {
      await p.stop();
    }
  });
});
