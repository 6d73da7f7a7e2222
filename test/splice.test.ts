import { createHash } from 'node:crypto';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startWorld, type World } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Bulk data through the splice must arrive byte for byte, whatever the pace of the client:
// fast readers and slow ones (which make writes queue up, the case where the shared read
// buffer is handed over to a pending write) at the same time. IMAP and POP3 both read their
// backends into the shared landing buffer (src/net/read-buffer.ts).

let world: World;
let proxy: TestProxy;
/** The same routes through `mailsplice serve` with two worker processes (issue 11). */
let workers: ProxyProcess;

beforeAll(async () => {
  world = await startWorld();
  const dir = tempDir('splice');
  const routesFile = join(dir, 'routes.yaml');
  writeRoutesFile(routesFile, worldRoutes(world));
  proxy = await startProxy({ listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }], lookup: { file: routesFile } });
  workers = await startProxyProcess({ workers: 2, lookup: { file: routesFile } });
  // 4 MiB of lines that differ from each other, so any reordering or reuse shows.
  const lines: string[] = ['From: bulk@example.net', 'Subject: bulk', ''];
  for (let i = 0, size = 0; size < 4 * 1024 * 1024; i++) {
    const line = `${i.toString(36).padStart(8, '0')} ${createHash('sha1').update(String(i)).digest('hex')}`.repeat(2);
    lines.push(line);
    size += line.length + 2;
  }
  await world.slotA.deliver('alice@example.com', lines.join('\r\n') + '\r\n', 'Bulk');
  // POP3 RETR of the same kind of message (with lines a dot starts, which RETR stuffs).
  await world.slotA.deliver('carol@example.com', lines.map((l, i) => (i % 7 === 3 ? `.${l}` : l)).join('\r\n') + '\r\n');
});

afterAll(async () => {
  await proxy?.close();
  await workers?.stop();
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

/** RETRs message 1 `times` times on one POP3 session; returns the sha256 of each whole answer. */
function retrBodies(host: string, port: number, times: number, slow: boolean): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host, port });
    let buf = Buffer.alloc(0);
    let stage = 0;
    const hashes: string[] = [];
    const send = (s: string) => sock.write(`${s}\r\n`);
    const check = () => {
      for (;;) {
        const nl = buf.indexOf('\r\n');
        if (stage < 3 && nl < 0) return;
        if (stage < 3 && !buf.subarray(0, 3).equals(Buffer.from('+OK'))) return reject(new Error(`POP3: ${buf.subarray(0, nl).toString('latin1')}`));
        if (stage === 0) {
          send('USER carol@example.com');
        } else if (stage === 1) {
          send('PASS carolpw');
        } else if (stage === 2) {
          send('RETR 1');
        } else {
          const end = buf.indexOf('\r\n.\r\n');
          if (end < 0) return;
          hashes.push(createHash('sha256').update(buf.subarray(0, end + 5)).digest('hex'));
          buf = buf.subarray(end + 5);
          if (hashes.length === times) {
            sock.destroy();
            return resolve(hashes);
          }
          send('RETR 1');
          continue;
        }
        buf = buf.subarray(nl + 2);
        stage++;
      }
    };
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (slow) {
        sock.pause();
        setTimeout(() => sock.resume(), 2);
      }
      check();
    });
    sock.on('error', reject);
    setTimeout(() => reject(new Error(`timed out after ${hashes.length} RETRs`)), 90_000).unref();
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

  it('delivers POP3 RETR intact to fast and slow readers, beside IMAP FETCHes', async () => {
    const [reference] = await retrBodies(world.slotA.host, world.slotA.pop3, 1, false);
    const [imapReference] = await fetchBodies(world.slotA.host, world.slotA.imap, 1, false);
    const [pop3, imap] = await Promise.all([
      Promise.all([retrBodies('127.0.0.1', proxy.ports.pop3!, 3, false), retrBodies('127.0.0.1', proxy.ports.pop3!, 2, true)]),
      Promise.all([fetchBodies('127.0.0.1', proxy.ports.imap!, 2, true), fetchBodies('127.0.0.1', proxy.ports.imap!, 2, false)]),
    ]);
    for (const hashes of pop3) for (const h of hashes) expect(h).toBe(reference);
    for (const hashes of imap) for (const h of hashes) expect(h).toBe(imapReference);
  });

  it('delivers IMAP bulk data intact through a proxy with two worker processes (the new byte path in each worker)', async () => {
    const [reference] = await fetchBodies(world.slotA.host, world.slotA.imap, 1, false);
    const results = await Promise.all([
      fetchBodies('127.0.0.1', workers.port, 2, false),
      fetchBodies('127.0.0.1', workers.port, 2, false),
      fetchBodies('127.0.0.1', workers.port, 2, true),
      fetchBodies('127.0.0.1', workers.port, 2, true),
    ]);
    for (const hashes of results) for (const h of hashes) expect(h).toBe(reference);
  });
});
