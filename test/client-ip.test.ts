import { chmod, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDovecotSlot, type DovecotSlot } from './harness/dovecot.js';
import { connectLines } from './harness/lines.js';
import { WORLD_USERS } from './harness/world.js';
import { writeRoutesFile } from './support/routes.js';
import { startProxy, type TestProxy } from './support/proxy.js';

// Issue 14 item 2: Dovecot's auth penalty (anvil) is keyed on the client address it sees.
// Unless the proxy forwards the real one, every client shares the proxy's address, and one
// attacker's wrong passwords delay everybody's login. This slot runs with the penalty ON
// (the harness turns it off elsewhere) and trusts loopback, as login_trusted_networks
// trusts the proxy in production. The proxy runs with the DEFAULT backend settings.

let dir: string;
let slot: DovecotSlot;
let proxy: TestProxy;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-clientip-'));
  await chmod(dir, 0o755);
  slot = await startDovecotSlot({
    id: 'penalty',
    host: '127.0.0.13',
    users: WORLD_USERS.map((u) => ({ ...u })),
    dir: path.join(dir, 'slot'),
    // Dovecot's defaults: the penalty socket back, and its default failure delay.
    extraConfig: 'auth_failure_delay = 2 secs\nservice anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0600\n  }\n}\n',
  });
  const routes = path.join(dir, 'routes.yaml');
  writeRoutesFile(routes, {
    users: { 'alice@example.com': { store: 's' }, 'bob@example.com': { store: 's' } },
    stores: { s: { master: 'p', epoch: '1' } },
    slots: { p: { host: slot.host, imap: String(slot.imap), pop3: String(slot.pop3), lmtp: String(slot.lmtp) } },
  });
  proxy = await startProxy({
    listeners: [{ protocol: 'imap' }],
    lookup: { file: routes },
    // Dovecot makes the attacker's own concurrent attempts wait out their penalty too.
    backend: { login_timeout_ms: 20_000 },
    limits: { auth_failure_delay_ms: 0 },
  });
});

afterAll(async () => {
  await proxy?.close();
  await slot?.stop();
  await rm(dir, { recursive: true, force: true });
});

async function login(from: string, user: string, pass: string): Promise<string> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.imap!, localAddress: from, timeoutMs: 30_000 });
  try {
    await c.readLine();
    c.send(`a LOGIN ${user} ${pass}`);
    return (await c.readUntil(/^a /, 30_000)).at(-1)!;
  } finally {
    c.close();
  }
}

describe('the client address reaches the backend by default', () => {
  it("one address's wrong passwords do not delay another address's login", async () => {
    // At once, so that none of them waits out a penalty of its own: afterwards anvil holds
    // the failures against whatever address Dovecot saw.
    const wrong = await Promise.all([1, 2, 3, 4].map(() => login('127.0.0.5', 'alice@example.com', 'wrong')));
    for (const w of wrong) expect(w).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);
    const started = Date.now();
    expect(await login('127.0.0.6', 'bob@example.com', 'bobpw')).toMatch(/^a OK /);
    const took = Date.now() - started;
    // Dovecot saw each client's own address (its log names it), so the penalty earned by
    // 127.0.0.5 is not charged to bob's 127.0.0.6. Without forwarding both are the proxy's
    // 127.0.0.1, and bob waits out the penalty (2 s at least, 15 s at most).
    const log = await readFile(slot.logFile, 'utf8');
    expect(log).toMatch(/passwd-file\(alice@example\.com,127\.0\.0\.5,.*\): Password mismatch/);
    expect(log).toMatch(/Login: user=<bob@example\.com>.*rip=127\.0\.0\.6,/);
    expect(took).toBeLessThan(2000);
  });
});
