import { execFile, spawn } from 'node:child_process';
import { chmodSync, copyFileSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { stringify } from 'yaml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../src/config.js';
import { preflight } from '../src/preflight.js';
import { connectLines } from './harness/lines.js';
import { openLmtp } from './harness/lmtp.js';
import { freePort } from './harness/ports.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { tempDir } from './support/tmp.js';

// Issue 14 item 7: settings that expose the proxy are refused, or safe by default, or warned
// about. Real listeners; the lookup is the embedded routes file (no login gets that far).

const execFileP = promisify(execFile);
const CLI = resolve(import.meta.dirname, '../src/cli.ts');
const dir = tempDir('exposure');
const routes = join(dir, 'routes.yaml');
copyFileSync(resolve(import.meta.dirname, '../deploy/routes.example.yaml'), routes);
const TOKEN = 'f3a9c1e07b5d42e8a6c0d9b1e2f37a48';
const tokenFile = join(dir, 'admin.token');
writeFileSync(tokenFile, `${TOKEN}\n`, { mode: 0o600 });

async function http(port: number, method: string, path: string, headers: Record<string, string> = {}): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`, { method, headers });
  await res.arrayBuffer();
  return res.status;
}

describe('admin listener', () => {
  let proxy: TestProxy;
  let adminPort: number;
  beforeAll(async () => {
    adminPort = await freePort('127.0.0.1');
    proxy = await startProxy({ lookup: { file: routes }, admin: { port: adminPort } });
  });
  afterAll(() => proxy?.close());

  it('answers GET and refuses every other method with 405', async () => {
    expect(await http(adminPort, 'GET', '/healthz')).toBe(200);
    expect(await http(adminPort, 'GET', '/metrics')).toBe(200);
    expect(await http(adminPort, 'POST', '/metrics')).toBe(405);
    expect(await http(adminPort, 'DELETE', '/healthz')).toBe(405);
    expect(await http(adminPort, 'PUT', '/anything')).toBe(405);
    expect(await http(adminPort, 'GET', '/nothing')).toBe(404);
  });

  it('is refused on a non-loopback address without a token file', () => {
    const doc = { listeners: [{ protocol: 'imap', port: 1143 }], lookup: { file: routes }, admin: { address: '0.0.0.0', port: 9143 } };
    expect(() => parseConfig(doc, 'x')).toThrow(/admin\.token_file: admin\.address 0\.0\.0\.0 is not loopback/);
    expect(() => parseConfig({ ...doc, admin: { ...doc.admin, token_file: tokenFile } }, 'x')).not.toThrow();
  });
});

describe('admin listener with a token, on every address', () => {
  let proxy: TestProxy;
  let adminPort: number;
  let configFile: string;
  beforeAll(async () => {
    adminPort = await freePort('0.0.0.0');
    const doc = { lookup: { file: routes }, admin: { address: '0.0.0.0', port: adminPort, token_file: tokenFile } };
    proxy = await startProxy(structuredClone(doc));
    configFile = join(dir, 'with-token.yaml');
    writeFileSync(configFile, stringify({ listeners: [{ protocol: 'imap', port: proxy.ports.imap }], ...doc }));
  });
  afterAll(() => proxy?.close());

  it('wants Authorization: Bearer <token> on every request', async () => {
    expect(await http(adminPort, 'GET', '/healthz')).toBe(401);
    expect(await http(adminPort, 'GET', '/metrics', { authorization: 'Bearer wrong' })).toBe(401);
    expect(await http(adminPort, 'POST', '/metrics')).toBe(401);
    expect(await http(adminPort, 'GET', '/metrics', { authorization: `Bearer ${TOKEN}` })).toBe(200);
    expect(await http(adminPort, 'POST', '/metrics', { authorization: `Bearer ${TOKEN}` })).toBe(405);
  });

  it('`mailsplice healthcheck` reads the token from the config and exits 0', async () => {
    const { stdout } = await execFileP(process.execPath, ['--import', 'tsx', CLI, 'healthcheck', '--config', configFile]);
    expect(stdout).toBe('healthz: 200\n');
  });
});

describe('cleartext passwords', () => {
  let proxy: TestProxy;
  let ports: { imap: number; pop3: number; imapOpen: number };
  beforeAll(async () => {
    ports = { imap: await freePort('0.0.0.0'), pop3: await freePort('0.0.0.0'), imapOpen: await freePort('0.0.0.0') };
    proxy = await startProxy({
      listeners: [
        { protocol: 'imap', address: '0.0.0.0', port: ports.imap },
        { protocol: 'pop3', address: '0.0.0.0', port: ports.pop3 },
        { protocol: 'imap', address: '0.0.0.0', port: ports.imapOpen, plaintext_auth: true },
      ],
      lookup: { file: routes },
    });
  });
  afterAll(() => proxy?.close());

  it('are refused by default on a tls: none IMAP listener off loopback', async () => {
    const c = await connectLines({ host: '127.0.0.1', port: ports.imap });
    try {
      const greeting = await c.readLine();
      expect(greeting).toMatch(/LOGINDISABLED/);
      expect(greeting).not.toMatch(/AUTH=PLAIN/);
      c.send('a LOGIN alice@example.com secret');
      expect(await c.readLine()).toMatch(/^a NO \[PRIVACYREQUIRED\]/);
    } finally {
      c.close();
    }
  });

  it('are refused by default on a tls: none POP3 listener off loopback', async () => {
    const c = await connectLines({ host: '127.0.0.1', port: ports.pop3 });
    try {
      expect(await c.readLine()).toMatch(/^\+OK/);
      c.send('USER alice@example.com');
      expect(await c.readLine()).toMatch(/^-ERR/);
    } finally {
      c.close();
    }
  });

  it('are allowed with an explicit plaintext_auth: true, with a warning', async () => {
    const c = await connectLines({ host: '127.0.0.1', port: ports.imapOpen });
    try {
      expect(await c.readLine()).toMatch(/AUTH=PLAIN/);
    } finally {
      c.close();
    }
    const { warnings } = preflight(parseConfig({ listeners: [{ protocol: 'imap', address: '0.0.0.0', port: 143, plaintext_auth: true }], lookup: { file: routes } }, 'x'));
    expect(warnings.join('\n')).toMatch(/plaintext_auth on 0\.0\.0\.0 without TLS: passwords cross the network in clear/);
  });
});

describe('LMTP unix socket', () => {
  const NOBODY = 65534;
  const socketDir = tempDir('lmtp-sock');
  chmodSync(socketDir, 0o755); // the unprivileged client must reach the socket to be refused by its mode
  const proxies: TestProxy[] = [];
  afterAll(() => Promise.all(proxies.map((p) => p.close())));

  /** Connects as the unprivileged user `nobody` and prints the greeting or the error code. */
  function connectAsNobody(path: string): Promise<string> {
    const script = `const s=require('net').connect(process.argv[1]);s.on('data',d=>{process.stdout.write(String(d).slice(0,3));s.destroy()});s.on('error',e=>process.stdout.write(e.code))`;
    return new Promise((res, rej) => {
      const child = spawn(process.execPath, ['-e', script, path], { uid: NOBODY, gid: NOBODY, stdio: ['ignore', 'pipe', 'inherit'] });
      let out = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()));
      child.on('error', rej);
      child.on('exit', () => res(out));
    });
  }

  const isRoot = process.getuid?.() === 0;

  it.skipIf(!isRoot)('is 0660 by default: another local user cannot deliver through it', async () => {
    const path = join(socketDir, 'default.sock');
    proxies.push(await startProxy({ listeners: [{ protocol: 'lmtp', path }], lookup: { file: routes } }));
    expect(statSync(path).mode & 0o777).toBe(0o660);
    expect(await connectAsNobody(path)).toBe('EACCES');
    // The owner (this process) still gets the greeting.
    const c = await openLmtp({ path });
    expect(await c.line()).toMatch(/^220 /);
    c.close();
  });

  it.skipIf(!isRoot)('takes socket_mode, socket_owner and socket_group: the MTA group can deliver', async () => {
    const path = join(socketDir, 'group.sock');
    proxies.push(await startProxy({ listeners: [{ protocol: 'lmtp', path, socket_mode: '0660', socket_owner: 'root', socket_group: 'nogroup' }], lookup: { file: routes } }));
    const st = statSync(path);
    expect([st.mode & 0o777, st.uid, st.gid]).toEqual([0o660, 0, NOBODY]);
    expect(await connectAsNobody(path)).toBe('220');
  });

  it('refuses an unquoted or non-octal mode and an unknown group', () => {
    const lmtp = (extra: Record<string, unknown>) => ({ listeners: [{ protocol: 'lmtp', path: '/run/x.sock', ...extra }], lookup: { file: routes } });
    expect(() => parseConfig(lmtp({ socket_mode: 660 }), 'x')).toThrow(/socket_mode/);
    expect(() => parseConfig(lmtp({ socket_mode: '0968' }), 'x')).toThrow(/an octal mode in quotes/);
    expect(preflight(parseConfig(lmtp({ socket_group: 'no-such-group-here' }), 'x')).errors.join('\n')).toMatch(/socket_group: no group named "no-such-group-here"/);
    expect(preflight(parseConfig(lmtp({ socket_mode: '0666' }), 'x')).warnings.join('\n')).toMatch(/every local user/);
  });
});
