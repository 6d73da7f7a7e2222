import { copyFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { ImapFlow } from 'imapflow';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../src/log.js';
import { makeCA, makeCert, type CertFiles } from './harness/certs.js';
import { connectLines } from './harness/lines.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// The one accept pipeline every listener goes through (src/net/accept.ts): limits, TLS under
// the shared sweep, then the dialogue, with one ClientInfo carried to the end. IMAP/POP3 and
// LMTP used to have an accept path each; these check what LMTP gained by sharing it and that
// the client info reaches the log.

const HOST = '127.0.0.1';
let world: World;
let proxy: TestProxy;
let ca: CertFiles;
let dir: string;
let cert: { certFile: string; keyFile: string };
const logs: string[] = [];

beforeAll(async () => {
  dir = tempDir('accept');
  ca = await makeCA(join(dir, 'ca'));
  const first = await makeCert(join(dir, 'first'), { ca, cn: 'first.example.test', altNames: ['first.example.test', HOST], name: 'first' });
  cert = { certFile: join(dir, 'listener.crt'), keyFile: join(dir, 'listener.key') };
  copyFileSync(first.certFile, cert.certFile);
  copyFileSync(first.keyFile, cert.keyFile);
  world = await startWorld();
  const routes = join(dir, 'routes.yaml');
  writeRoutesFile(routes, worldRoutes(world));
  const tlsFiles = { cert: cert.certFile, key: cert.keyFile };
  proxy = await startProxy(
    {
      listeners: [
        { protocol: 'imap', tls: 'implicit', ...tlsFiles },
        { protocol: 'imap', tls: 'starttls', ...tlsFiles },
        { protocol: 'lmtp', tls: 'implicit', ...tlsFiles },
      ],
      lookup: { file: routes },
      lmtp: { timeout_ms: 2000 },
    },
    createLogger('debug', (l) => void logs.push(l)),
  );
}, 60_000);

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

function peerCn(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: HOST, port, ca: [ca.certPem], servername: 'first.example.test', rejectUnauthorized: false }, () => {
      const cn = s.getPeerCertificate().subject?.CN;
      s.destroy();
      resolve(String(cn));
    });
    s.once('error', reject);
  });
}

function loginLine(login: string, listenerPort: number): Record<string, unknown> | undefined {
  const line = logs.find((l) => l.includes('"msg":"login"') && l.includes(login) && l.includes(`:${listenerPort}"`));
  return line ? (JSON.parse(line) as Record<string, unknown>) : undefined;
}

describe('client info', () => {
  it('implicit TLS and STARTTLS: the login log names the listener, the address and the TLS version', async () => {
    for (const [port, secure] of [
      [proxy.ports['imap:implicit']!, true],
      [proxy.ports['imap:starttls']!, false],
    ] as const) {
      const client = new ImapFlow({
        host: HOST,
        port,
        secure,
        doSTARTTLS: secure ? undefined : true,
        tls: { ca: [ca.certPem], servername: 'first.example.test' },
        auth: { user: 'alice@example.com', pass: 'alicepw' },
        logger: false,
      });
      await client.connect();
      await client.logout();
      await expect.poll(() => loginLine('alice@example.com', port)).toBeDefined();
      const line = loginLine('alice@example.com', port)!;
      expect(line).toMatchObject({ ip: '127.0.0.1', listener: `imap:${port}`, sni: 'first.example.test' });
      expect(line['tls']).toMatch(/^TLSv1\.[23]$/);
      expect(line['via']).toBeUndefined();
    }
  });
});

describe('LMTP on the shared pipeline', () => {
  it('reload() reads the LMTP listener certificate again, like the IMAP ones', async () => {
    const port = proxy.ports['lmtp:implicit']!;
    expect(await peerCn(port)).toBe('first.example.test');
    const renewed = await makeCert(join(dir, 'renewed'), { ca, cn: 'renewed.example.test', altNames: ['first.example.test', HOST], name: 'renewed' });
    copyFileSync(renewed.certFile, cert.certFile);
    copyFileSync(renewed.keyFile, cert.keyFile);
    proxy.server.reload();
    expect(await peerCn(port)).toBe('renewed.example.test');
    expect(await peerCn(proxy.ports['imap:implicit']!)).toBe('renewed.example.test');
    // And the dialogue still starts after the handshake.
    const lmtp = await connectLines({ host: HOST, port, tls: { ca: [ca.certPem], servername: 'first.example.test' } });
    expect(await lmtp.readLine()).toMatch(/^220 /);
    lmtp.close();
  });

  it('a client that never completes the handshake is cut off at lmtp.timeout_ms by the sweep', async () => {
    const sock = net.connect({ host: HOST, port: proxy.ports['lmtp:implicit']! });
    const before = proxy.server.ctx.sweep.size;
    await new Promise<void>((resolve) => sock.once('connect', () => resolve()));
    // The handshake waits in the shared sweep, not on a timer of its own.
    await expect.poll(() => proxy.server.ctx.sweep.size).toBeGreaterThan(before);
    const started = Date.now();
    await new Promise<void>((resolve) => sock.once('close', () => resolve()));
    expect(Date.now() - started).toBeLessThan(6000);
  });
});
