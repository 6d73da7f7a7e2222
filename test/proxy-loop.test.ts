import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../src/log.js';
import { connectLines } from './harness/lines.js';
import { freePort } from './harness/ports.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile, type RouteModel } from './support/routes.js';

// A routing loop through two proxies (issue 13 item 8): A's slot for a store is B, and B's
// is A. A backend connection to a process's own listener is caught by OwnListeners; this one
// is not, and is caught by the hop mark every backend connection carries in its ID.

let world: World;
let tmp: string;
const proxies: TestProxy[] = [];
const logs: Record<'a' | 'b', string[]> = { a: [], b: [] };

/** The world's routes, but store1's master is a slot at the other proxy's IMAP listener. */
function routesTo(otherPort: number): RouteModel {
  const r = worldRoutes(world);
  r.slots.other = { host: '127.0.0.1', imap: String(otherPort), status: 'up' };
  r.stores.store1 = { ...r.stores.store1!, master: 'other' };
  return r;
}

beforeAll(async () => {
  world = await startWorld();
  tmp = await mkdtemp(path.join(os.tmpdir(), 'mailsplice-loop-'));
  const [portA, portB] = [await freePort(), await freePort()];
  for (const [name, own, other] of [['a', portA, portB], ['b', portB, portA]] as const) {
    const file = path.join(tmp, `routes-${name}.yaml`);
    writeRoutesFile(file, routesTo(other));
    proxies.push(
      await startProxy(
        { listeners: [{ protocol: 'imap', port: own }], lookup: { file }, backend: { forward_client_ip: false } },
        createLogger('info', (l) => logs[name].push(l)),
      ),
    );
  }
});

afterAll(async () => {
  await Promise.all(proxies.map((p) => p.close()));
  await world?.stop();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('a routing loop through two proxies', () => {
  it('is refused as UNAVAILABLE, with the loop logged as an error, and no session nested', async () => {
    const [a, b] = proxies;
    const c = await connectLines({ host: a!.host, port: a!.ports.imap! });
    await c.readLine();
    c.send('x LOGIN alice@example.com alicepw');
    expect((await c.readUntil(/^x /)).at(-1)).toMatch(/^x NO \[UNAVAILABLE\] /);
    c.close();
    // B saw A's login carry the hop mark and refused it; A passes the refusal on.
    const loop = logs.b.find((l) => l.includes('routing loop: a login came from another mailsplice'));
    expect(loop).toBeDefined();
    expect(loop).toContain('"level":"error"');
    expect(loop).toContain(`pid ${process.pid}`);
    expect(a!.server.ctx.registry.size + b!.server.ctx.registry.size).toBe(0);
    // Users of the other store are not affected, with or without the ID.
    const ok = await connectLines({ host: a!.host, port: a!.ports.imap! });
    await ok.readLine();
    ok.send('y ID ("name" "test")');
    await ok.readUntil(/^y OK/);
    ok.send('z LOGIN bob@example.com bobpw');
    expect((await ok.readUntil(/^z /)).at(-1)).toMatch(/^z OK/);
    ok.close();
  });
});
