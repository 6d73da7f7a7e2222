import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { runCtl } from '../src/ctl.js';
import { FileSource, parseModel } from '../src/lookup/file.js';
import { MalformedRecord } from '../src/lookup/model.js';
import type { RouteEvent } from '../src/lookup/source.js';
import { tempDir } from './support/tmp.js';

// `mailsplice ctl --file`: the same commands against the embedded routes file, which is
// rewritten atomically and which a running FileSource (the proxy's) picks up as events.

const FIXTURE = resolve(import.meta.dirname, 'fixtures/production.dat');

const ROUTES = `# routes for the ctl file tests
users:
  alice@example.com: { store: store1 }   # the first user
  Bob@Example.com: { store: store1, backend_login: bob }
stores:
  # the only store
  store1: { master: slotA, replicas: [slotB, slotC], epoch: 5 }
slots:
  slotA: { host: 127.0.0.11, imap: 143, pop3: 110, lmtp: 24 }
  slotB: { host: 127.0.0.12, imap: 143, pop3: 110, lmtp: 24 }
  slotC: { host: 127.0.0.13, imap: 143, pop3: 110, lmtp: 24, status: down }
`;

function routesFile(text = ROUTES, name = 'routes.yaml'): { dir: string; file: string } {
  const dir = tempDir('ctl-file');
  const file = join(dir, name);
  writeFileSync(file, text);
  return { dir, file };
}

async function ctl(file: string, ...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await runCtl([...args, '--file', file], { stdout: (t) => (out += t), stderr: (t) => (err += t), env: {} });
  return { code, out, err };
}

describe('ctl against the routes file', () => {
  it('runs the same commands, keeps comments, and leaves the file valid for the proxy', async () => {
    const { dir, file } = routesFile();
    const fo = await ctl(file, 'failover', 'store1', '--to', 'slotB');
    expect(fo.code).toBe(0);
    expect(fo.out).toMatch(/master slotA -> slotB, replicas slotA,slotC, epoch 5 -> 7/);
    expect((await ctl(file, 'failover', 'store1', '--to', 'slotC')).err).toMatch(/slot slotC is down/);
    expect((await ctl(file, 'slot', 'set', 'slotD', '--host', '127.0.0.14')).code).toBe(0);
    expect((await ctl(file, 'store', 'set', 'store2', '--master', 'slotD', '--replicas', 'slotA')).code).toBe(0);
    expect((await ctl(file, 'move-user', 'alice@example.com', '--to', 'store2')).code).toBe(0);
    expect((await ctl(file, 'lock', 'user', 'bob@example.com')).code).toBe(0);
    expect((await ctl(file, 'user', 'get', 'BOB@example.com', '--json')).out).toMatch(/"status": "locked"/);
    expect((await ctl(file, 'user', 'get', 'nobody@example.com')).code).toBe(3);
    expect((await ctl(file, 'store', 'set', 'store3', '--master', 'slotZ')).code).toBe(2);

    const text = readFileSync(file, 'utf8');
    expect(text).toMatch(/^# routes for the ctl file tests$/m);
    expect(text).toMatch(/^ {2}# the only store$/m);
    // A user spelt in another case is rewritten under its normal form, once.
    expect(text).toMatch(/^ {2}bob@example.com: \{ store: store1, status: locked, backend_login: bob \}$/m);
    expect(text).not.toMatch(/Bob@Example.com/);
    const model = parseModel(text);
    expect(model.stores.get('store1')).toEqual({ master: 'slotB', replicas: ['slotA', 'slotC'], status: 'active', epoch: 7 });
    expect(model.stores.get('store2')).toEqual({ master: 'slotD', replicas: ['slotA'], status: 'active', epoch: 1 });
    expect(model.users.get('alice@example.com')).toEqual({ store: 'store2', status: 'active' });
    expect(model.slots.get('slotD')).toEqual({ host: '127.0.0.14', ports: { imap: 143, pop3: 110, lmtp: 24 }, status: 'up' });
    // No temp or lock file left behind.
    expect(readdirSync(dir)).toEqual(['routes.yaml']);
  });

  it('is seen by a running FileSource as events', async () => {
    const { file } = routesFile();
    const src = new FileSource(file, undefined);
    const seen: RouteEvent[] = [];
    src.watch((ev) => seen.push(ev), () => undefined);
    try {
      expect((await ctl(file, 'failover', 'store1', '--to', 'slotB', '--force')).code).toBe(0);
      await expect.poll(() => seen, { timeout: 5000 }).toContainEqual({ kind: 'store', id: 'store1' });
      expect(await src.readRoute('alice@example.com')).toMatchObject({ store: { master: 'slotB', epoch: 6 }, slot: { host: '127.0.0.12' } });
      expect((await ctl(file, 'lock', 'user', 'alice@example.com')).code).toBe(0);
      await expect.poll(() => seen, { timeout: 5000 }).toContainEqual({ kind: 'user', id: 'alice@example.com' });
      expect((await src.readRoute('alice@example.com')).user).toMatchObject({ status: 'locked' });
    } finally {
      await src.close();
    }
  });

  it('does not lose edits made by concurrent ctl runs (lock file)', async () => {
    const { file } = routesFile();
    const runs = await Promise.all(Array.from({ length: 20 }, (_, i) => ctl(file, 'user', 'set', `u${i}@example.com`, '--store', 'store1')));
    expect(runs.map((r) => r.code)).toEqual(runs.map(() => 0));
    const model = parseModel(readFileSync(file, 'utf8'));
    expect(model.users.size).toBe(22);
    const locks = await Promise.all(Array.from({ length: 6 }, (_, i) => ctl(file, i % 2 ? 'unlock' : 'lock', 'store', 'store1')));
    const changed = locks.filter((r) => !/already/.test(r.out)).length;
    expect(parseModel(readFileSync(file, 'utf8')).stores.get('store1')).toMatchObject({ epoch: 5 + changed });
  });

  it('creates a new file on import, and writes JSON files back as JSON', async () => {
    const dir = tempDir('ctl-file');
    const file = join(dir, 'new.yaml');
    const imp = await ctl(file, 'import', FIXTURE);
    expect(imp.code).toBe(0);
    expect(imp.out).toMatch(/slots: 8 new.*stores: 3 new/);
    const model = parseModel(readFileSync(file, 'utf8'));
    expect(model.stores.get('store3')).toEqual({ master: 'sloti1t03', replicas: ['sloti2t03', 'sloti2t04'], status: 'active', epoch: 1 });
    expect((await ctl(file, 'export')).out).toMatch(/^store3 i future 80 sloti1t03 sloti2t03 sloti2t04$/m);

    const json = routesFile(JSON.stringify(parseModelAsJson(ROUTES)), 'routes.json').file;
    expect((await ctl(json, 'failover', 'store1', '--to', 'slotB')).code).toBe(0);
    const back = JSON.parse(readFileSync(json, 'utf8')) as { stores: Record<string, unknown> };
    expect(back.stores.store1).toEqual({ master: 'slotB', replicas: ['slotA', 'slotC'], status: 'active', epoch: 7 });
  });

  it('is left alone by a read-only command', async () => {
    const dir = tempDir('ctl');
    const file = join(dir, 'routes.yaml');
    writeFileSync(file, '# hand-written\nusers: {}\n');
    let out = '';
    const code = await runCtl(['list', 'users', '--file', file], { stdout: (t) => (out += t), stderr: () => undefined, env: {} });
    expect(code).toBe(0);
    expect(out).toBe('');
    expect(readFileSync(file, 'utf8')).toBe('# hand-written\nusers: {}\n');
  });

  it('refuses a file that does not parse, and changes nothing', async () => {
    const { file } = routesFile('users: [not, a, mapping\n');
    const res = await ctl(file, 'user', 'set', 'x@example.com', '--store', 'store1');
    expect(res.code).toBe(1);
    expect(res.err).toMatch(/not valid YAML/);
    expect(readFileSync(file, 'utf8')).toBe('users: [not, a, mapping\n');
  });
});

/** The ROUTES document as plain JSON (what a .json routes file holds). */
function parseModelAsJson(yamlText: string): unknown {
  const model = parseModel(yamlText);
  const ok = <T>(m: Map<string, T | MalformedRecord>) => [...m].map(([k, v]): [string, T] => {
    if (v instanceof MalformedRecord) throw new Error(`${v.key}: ${v.problem}`);
    return [k, v];
  });
  const lines = { users: ok(model.users), stores: ok(model.stores), slots: ok(model.slots) };
  const obj = (m: Map<string, object>) => Object.fromEntries(m);
  return {
    users: Object.fromEntries([...lines.users].map(([k, u]) => [k, { store: u.store, ...(u.backendLogin ? { backend_login: u.backendLogin } : {}) }])),
    stores: obj(new Map([...lines.stores].map(([k, s]) => [k, { master: s.master, replicas: s.replicas, epoch: s.epoch }]))),
    slots: obj(new Map([...lines.slots].map(([k, s]) => [k, { host: s.host, ...s.ports, status: s.status }]))),
  };
}
