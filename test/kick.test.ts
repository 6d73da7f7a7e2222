import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCtl } from '../src/ctl.js';
import { parseEvent } from '../src/lookup/source.js';
import { connectLines, type LineClient } from './harness/lines.js';
import { freePort } from './harness/ports.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Issue 9: the kick event. Its wire form (parseEvent), the routes file's `kicks:` (written by
// `ctl kick --file`, read by a running proxy), and the admin listener's POST /kick.

describe('the kick event on the wire', () => {
  it('names exactly one of a login, a store or a slot, with an optional ts', () => {
    expect(parseEvent('{"kind":"kick","id":"alice@example.com"}')).toEqual({ kind: 'kick', scope: 'user', id: 'alice@example.com' });
    expect(parseEvent('{"kind":"kick","store":"store1","ts":1796074200123}')).toEqual({ kind: 'kick', scope: 'store', id: 'store1', ts: 1796074200123 });
    expect(parseEvent('{"kind":"kick","slot":"slotA","ts":"soon"}')).toEqual({ kind: 'kick', scope: 'slot', id: 'slotA' });
    expect(parseEvent('{"kind":"store","id":"store1","ts":5}')).toEqual({ kind: 'store', id: 'store1', ts: 5 });
    for (const bad of ['{"kind":"kick"}', '{"kind":"kick","id":"a","store":"s"}', '{"kind":"kick","id":""}', '{"kind":"kick","slot":7}', '[]', 'null']) {
      expect(parseEvent(bad), bad).toBeUndefined();
    }
  });
});

let world: World;
let proxy: TestProxy;
let routes: string;
let tokenFile: string;
let adminPort: number;

beforeAll(async () => {
  world = await startWorld();
  const dir = tempDir('kick');
  routes = join(dir, 'routes.yaml');
  writeRoutesFile(routes, worldRoutes(world));
  tokenFile = join(dir, 'admin.token');
  writeFileSync(tokenFile, 'kick-test-token-0123456789\n', { mode: 0o600 });
  adminPort = await freePort();
  proxy = await startProxy({ lookup: { file: routes }, admin: { port: adminPort, token_file: tokenFile } });
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

async function login(user: string, pass: string): Promise<LineClient> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.imap!, timeoutMs: 20_000 });
  await c.readLine();
  c.send(`a LOGIN ${user} ${pass}`);
  const answer = (await c.readUntil(/^a /)).at(-1)!;
  if (!answer.startsWith('a OK')) throw new Error(`${user}: ${answer}`);
  return c;
}

async function ctl(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await runCtl([...args, '--file', routes], { stdout: (t) => (out += t), stderr: (t) => (err += t), env: {} });
  return { code, out, err };
}

async function stillThere(c: LineClient): Promise<void> {
  c.send('n NOOP');
  expect((await c.readUntil(/^n /)).at(-1)).toMatch(/^n OK/);
}

describe('kick with the routes file', () => {
  it('ctl kick --file ends that login only, on the proxy watching the file; it is not done again', { timeout: 60_000 }, async () => {
    const alice = await login('alice@example.com', 'alicepw');
    const bob = await login('bob@example.com', 'bobpw');
    const r = await ctl('kick', 'Alice@example.com');
    expect(r).toMatchObject({ code: 0, err: '' });
    expect(r.out).toMatch(/^kick alice@example\.com written to file /);
    expect(readFileSync(routes, 'utf8')).toMatch(/kicks:\n\s+- \{ user: alice@example\.com, at: "?\d{4}-\d\d-\d\dT/);
    expect(await alice.readLine(10_000)).toBe('* BYE [UNAVAILABLE] Session ended by the administrator');
    await stillThere(bob);
    // A new session, then another edit of the file: the old kick entry is not applied again.
    const again = await login('alice@example.com', 'alicepw');
    expect((await ctl('kick', '--slot', 'slotB')).code).toBe(0); // bob is on slotB
    expect(await bob.readLine(10_000)).toBe('* BYE [UNAVAILABLE] Session ended by the administrator');
    await stillThere(again);
    again.close();
    expect((await ctl('kick')).code).toBe(2);
    expect((await ctl('kick', 'a@example.com', '--store', 'store1')).code).toBe(2);
  });
});

describe('POST /kick on the admin listener', () => {
  it('ends the sessions it names here, with the token; 401 without it', { timeout: 60_000 }, async () => {
    const carol = await login('carol@example.com', 'carolpw');
    const bob = await login('bob@example.com', 'bobpw');
    const url = `http://127.0.0.1:${adminPort}/kick?store=store1`;
    expect((await fetch(url, { method: 'POST' })).status).toBe(401);
    expect((await fetch(url, { method: 'GET', headers: { authorization: 'Bearer kick-test-token-0123456789' } })).status).toBe(405);
    const bad = await fetch(`http://127.0.0.1:${adminPort}/kick?store=store1&slot=slotA`, { method: 'POST', headers: { authorization: 'Bearer kick-test-token-0123456789' } });
    expect(bad.status).toBe(400);
    const res = await fetch(url, { method: 'POST', headers: { authorization: 'Bearer kick-test-token-0123456789' } });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ ended: 1 });
    expect(await carol.readLine(10_000)).toBe('* BYE [UNAVAILABLE] Session ended by the administrator');
    await stillThere(bob);
    bob.close();
  });
});
