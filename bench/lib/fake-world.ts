import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { stringify } from 'yaml';
import { forkTs, nextMessage } from './procs.js';

export interface FakeWorld {
  fake: ChildProcess;
  backend: { host: string; port: number };
  users: { name: string; pass: string }[];
  /** A routes file sending every user to the fake backend. */
  routes: string;
}

/**
 * The fake IMAP backend on 127.0.0.21 and a routes file with `count` users on it: what the
 * single-proxy tools measure against (the proxy's cost does not depend on the backend).
 */
export async function startFakeWorld(dir: string, count: number, prefix: string): Promise<FakeWorld> {
  const fake = forkTs('servers/fake-imap.ts', ['127.0.0.21:0', '600']);
  const [backend] = await nextMessage(fake, (m) => (m as { addresses?: { host: string; port: number }[] }).addresses, 30_000, 'fake backend');
  const users = Array.from({ length: count }, (_, i) => ({ name: `${prefix}${i}@bench.example`, pass: 'x' }));
  const routes = join(dir, 'routes.yaml');
  writeFileSync(
    routes,
    stringify({
      users: Object.fromEntries(users.map((u) => [u.name, { store: 's' }])),
      stores: { s: { master: 'f', epoch: 1 } },
      slots: { f: { host: backend!.host, imap: backend!.port } },
    }),
  );
  return { fake, backend: backend!, users, routes };
}
