import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startProxy, type TestProxy } from './support/proxy.js';
import { writeRoutesFile } from './support/routes.js';

// Random and malformed pre-auth input sent to the running proxy over TCP, in random pieces,
// for IMAP, POP3 and LMTP (issue 14, property tests). Whatever arrives, every line the proxy
// answers with is printable ASCII (no echoed control characters), and the listener keeps
// serving. No login is attempted (none of the inputs names a user), so no backend is needed.
// A fixed seed by default; MAILSPLICE_PROPERTY_RUNS=N runs N cases with a fresh seed.

const RUNS = Number(process.env.MAILSPLICE_PROPERTY_RUNS) || 0;
const params = (numRuns: number): fc.Parameters<unknown> => (RUNS > 0 ? { numRuns: RUNS } : { seed: 42, numRuns });

let proxy: TestProxy;
let dir: string;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'mailsplice-wire-'));
  const routesFile = join(dir, 'routes.yaml');
  writeRoutesFile(routesFile, { users: {}, stores: {}, slots: {} });
  proxy = await startProxy({
    listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }, { protocol: 'lmtp' }],
    lookup: { file: routesFile },
    limits: { line_length: 1024, literal_size: 512, bad_commands: 1000, preauth_commands: 1000, connections_per_ip: 1000 },
  });
});

afterAll(async () => {
  await proxy?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/**
 * Sends `pieces` one write at a time, then `probe`, and collects what comes back until a line
 * matches `answered` or the proxy closes the connection (a limit was reached). Bounded by time.
 */
function exchange(port: number, pieces: Buffer[], probe: string, answered: RegExp): Promise<{ text: string; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host: proxy.host, port });
    let text = '';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`no answer to the probe; got ${JSON.stringify(text.slice(-300))}`));
    }, 10_000);
    const done = (closed: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      resolve({ text, closed });
    };
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      text += d;
      if (text.split('\r\n').some((l) => answered.test(l))) done(false);
    });
    sock.on('close', () => done(true));
    sock.on('error', () => undefined);
    sock.once('connect', async () => {
      for (const p of pieces) {
        if (sock.destroyed) return;
        sock.write(p);
        await new Promise((r) => setImmediate(r));
      }
      if (!sock.destroyed) sock.write(probe);
    });
  });
}

const noise = (words: string[]) =>
  fc
    .array(fc.oneof(fc.constantFrom(...words), fc.uint8Array({ maxLength: 40 }).map((a) => Buffer.from(a).toString('latin1'))), { maxLength: 25 })
    .map((parts) => Buffer.from(parts.join(''), 'latin1'));

const cuts = fc.array(fc.integer({ min: 1, max: 64 }), { maxLength: 10 });

function pieces(data: Buffer, sizes: number[]): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  for (const n of sizes) {
    if (at >= data.length) break;
    out.push(data.subarray(at, at + n));
    at += n;
  }
  if (at < data.length) out.push(data.subarray(at));
  return out;
}

/** Every complete line the proxy sent is printable ASCII. */
function expectPrintable(text: string): void {
  for (const line of text.split('\r\n').slice(0, -1)) expect(line).toMatch(/^[\x20-\x7e]*$/);
}

describe('pre-auth input over the wire', () => {
  it('IMAP', async () => {
    const words = [' ', '\r\n', 'a1 ', '* ', 'NOOP', 'CAPABILITY', 'ID ', '(', ')', '"', '\\', '{3}\r\n', '{2+}\r\n', '{999999}\r\n', 'NIL', '\r', '\x00', '\x1b[2J', '\xe4'];
    await fc.assert(
      fc.asyncProperty(noise(words), cuts, async (data, sizes) => {
        // The probe ends any line, fills any literal still open (at most literal_size, 512),
        // ends the command that literal was in, then asks for a tagged answer.
        const r = await exchange(proxy.ports.imap!, pieces(data, sizes), `\r\n${'z'.repeat(600)}\r\nPROBE NOOP\r\n`, /^PROBE /);
        expectPrintable(r.text);
      }),
      params(60),
    );
  });

  it('POP3', async () => {
    const words = [' ', '\r\n', 'CAPA', 'NOOP', 'STLS', 'APOP ', 'AUTH ', 'AUTH PLAIN\r\n', '*\r\n', '=', '\r', '\x00', '\x1b[2J', '\xe4'];
    await fc.assert(
      fc.asyncProperty(noise(words), cuts, async (data, sizes) => {
        const r = await exchange(proxy.ports.pop3!, pieces(data, sizes), '\r\n*\r\nNOOP\r\nCAPA\r\n', /^IMPLEMENTATION /);
        expectPrintable(r.text);
      }),
      params(60),
    );
  });

  it('LMTP', async () => {
    const words = [' ', '\r\n', 'LHLO x\r\n', 'MAIL FROM:', 'RCPT TO:', '<', '>', '@', '"', '\\', '+', 'postmaster', 'SIZE=', 'BODY=8BITMIME', 'RSET\r\n', '\r', '\x00', '\x1b[2J', '\xe4'];
    await fc.assert(
      fc.asyncProperty(noise(words), cuts, async (data, sizes) => {
        // No DATA: its replies wait for a message, which the probe would become.
        const clean = Buffer.from(data.toString('latin1').replace(/DATA/gi, 'DAT'), 'latin1');
        const r = await exchange(proxy.ports.lmtp!, pieces(clean, sizes), '\r\nRSET\r\nVRFY probe\r\n', /^502 5\.5\.1 VRFY/);
        expectPrintable(r.text);
        for (const line of r.text.split('\r\n').slice(0, -1)) expect(line).toMatch(/^\d{3}[ -]/);
      }),
      params(60),
    );
  });

  it('keeps serving afterwards', async () => {
    const r = await exchange(proxy.ports.imap!, [], 'a1 NOOP\r\n', /^a1 /);
    expect(r.text).toMatch(/a1 OK/);
  });
});
