import { createHash } from 'node:crypto';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Bulk data through the splice must arrive byte for byte, whatever the pace of the client:
// fast readers and slow ones (which make writes queue up, the case where the shared read
// buffer is handed over to a pending write) at the same time.

let world: World;
let proxy: TestProxy;

beforeAll(async () => {
  world = await startWorld();
  const dir = tempDir('splice');
  const routesFile = join(dir, 'routes.yaml');
  writeRoutesFile(routesFile, worldRoutes(world));
  proxy = await startProxy({ listeners: [{ protocol: 'imap' }], lookup: { file: routesFile } });
  // 4 MiB of lines that differ from each other, so any reordering or reuse shows.
  const lines: string[] = ['From: bulk@example.net', 'Subject: bulk', ''];
  for (let i = 0, size = 0; size < 4 * 1024 * 1024; i++) {
    const line = `${i.toString(36).padStart(8, '0')} ${createHash('sha1').update(String(i)).digest('hex')}`.repeat(2);
    lines.push(line);
    size += line.length + 2;
  }
  await world.slotA.deliver('alice@example.com', lines.join('\r\n') + '\r\n', 'Bulk');
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

/** FETCHes the bulk message's BODY[] `times` times on one session; returns each literal's sha256. */
function fetchBodies(host: string, port: number, times: number, slow: boolean): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host, port });
    let buf = Buffer.alloc(0);
    let stage = 0;
    const hashes: string[] = [];
    const send = (s: string) => sock.write(`${s}\r\n`);
    const check = () => {
      for (;;) {
        if (stage === 0 && buf.includes('\r\n')) {
          buf = buf.subarray(buf.indexOf('\r\n') + 2);
          send('a LOGIN alice@example.com alicepw');
          stage = 1;
        } else if (stage === 1 && /\r\na OK|^a OK/.test(buf.toString('latin1'))) {
          buf = Buffer.alloc(0);
          send('b SELECT Bulk');
          stage = 2;
        } else if (stage === 2 && buf.toString('latin1').includes('b OK')) {
          buf = Buffer.alloc(0);
          send('f FETCH 1 BODY.PEEK[]');
          stage = 3;
        } else if (stage === 3) {
          const m = /\{(\d+)\}\r\n/.exec(buf.subarray(0, 200).toString('latin1'));
          if (!m) return;
          const start = m.index + m[0].length;
          const size = Number(m[1]);
          const end = buf.indexOf('f OK', start + size);
          if (end < 0) return;
          hashes.push(createHash('sha256').update(buf.subarray(start, start + size)).digest('hex'));
          buf = Buffer.alloc(0);
          if (hashes.length === times) {
            sock.destroy();
            return resolve(hashes);
          }
          send('f FETCH 1 BODY.PEEK[]');
        } else return;
      }
    };
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (slow) {
        // Read in fits and starts, so the proxy's writes to us back up.
        sock.pause();
        setTimeout(() => sock.resume(), 2);
      }
      check();
    });
    sock.on('error', reject);
    setTimeout(() => reject(new Error(`timed out after ${hashes.length} bodies`)), 90_000).unref();
  });
}

describe('splice', () => {
  it('delivers bulk data intact to fast and slow readers at once', async () => {
    const [reference] = await fetchBodies(world.slotA.host, world.slotA.imap, 1, false);
    const results = await Promise.all([
      fetchBodies('127.0.0.1', proxy.ports.imap!, 3, false),
      fetchBodies('127.0.0.1', proxy.ports.imap!, 3, false),
      fetchBodies('127.0.0.1', proxy.ports.imap!, 2, true),
      fetchBodies('127.0.0.1', proxy.ports.imap!, 2, true),
    ]);
    for (const hashes of results) for (const h of hashes) expect(h).toBe(reference);
  });
});
