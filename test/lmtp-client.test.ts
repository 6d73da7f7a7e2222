import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LmtpClient, type LmtpClientOptions } from '../src/lmtp/client.js';
import { freePort } from './harness/ports.js';
import { startWorld, type World } from './harness/world.js';

// Our backend LMTP client against a real Dovecot LMTP (slotA), plus two hostile peers that
// no real server is: one that never answers, one that sends an endless line.

let world: World;
let seq = 0;

beforeAll(async () => {
  world = await startWorld();
});
afterAll(async () => {
  await world?.stop();
});

function opts(over: Partial<LmtpClientOptions> = {}): LmtpClientOptions {
  return {
    host: world.slotA.host,
    port: world.slotA.lmtp,
    connectTimeoutMs: 2000,
    timeoutMs: 5000,
    tls: { mode: 'none', verify: true },
    lhlo: 'client.test',
    ...over,
  };
}

describe('LmtpClient against Dovecot', () => {
  it('reads the multi-line LHLO reply into capabilities', async () => {
    const c = await LmtpClient.connect(opts());
    expect(c.has('PIPELINING')).toBe(true);
    expect(c.has('ENHANCEDSTATUSCODES')).toBe(true);
    expect(c.has('8BITMIME')).toBe(true);
    // Dovecot 2.3 offers no SIZE: the client must then not send SIZE= (Dovecot says 555).
    expect(c.has('SIZE')).toBe(false);
    c.quit();
  });

  it('pipelines MAIL and RCPTs, streams the message, and returns one reply per accepted recipient', async () => {
    const subject = `client-test-${++seq}`;
    const c = await LmtpClient.connect(opts());
    const env = await c.envelope('sender@example.net', ['alice@example.com', 'nobody@example.com', 'carol@example.com'], { size: 100, body8bit: true });
    expect(env.mail.code).toBe(250);
    expect(env.rcpts.map((r) => r.code)).toEqual([250, 550, 250]);
    expect(env.rcpts[1]).toMatchObject({ enhanced: '5.1.1', lines: [expect.stringContaining('nobody@example.com')] });
    expect((await c.data()).code).toBe(354);
    // Dot lines and a bare LF "." LF (which Dovecot 2.3 would take as the end) in odd chunks.
    const content = `Subject: ${subject}\r\n\r\n.one\r\n..two\r\nx\n.\ny\r\n.`;
    for (const piece of content.match(/[\s\S]{1,3}/g)!) c.write(Buffer.from(piece));
    const end = await c.endData(2);
    expect(end.error).toBeUndefined();
    expect(end.replies.map((r) => `${r.code} ${r.enhanced}`)).toEqual(['250 2.0.0', '250 2.0.0']);
    expect(end.replies[0]!.lines[0]).toMatch(/^<alice@example\.com> /);
    expect(end.replies[1]!.lines[0]).toMatch(/^<carol@example\.com> /);
    // A second transaction on the same connection.
    expect((await c.rset()).code).toBe(250);
    c.quit();
    const [m] = (await world.slotA.messages('alice@example.com')).filter((x) => x.includes(`Subject: ${subject}\n`));
    // The message ended without CRLF: the client adds one before the dot.
    expect(m).toMatch(/\n\n\.one\n\.\.two\nx\n\.\ny\n\.\n?$/);
  });

  it('waits for drain on a large message and never holds more than the socket buffer', async () => {
    const c = await LmtpClient.connect(opts());
    await c.envelope('', ['bob@example.com']);
    expect((await c.data()).code).toBe(354);
    const chunk = Buffer.from(`${'z'.repeat(1022)}\r\n`.repeat(64)); // 64 KiB
    let waits = 0;
    for (let i = 0; i < 160; i++) {
      if (!c.write(chunk)) {
        waits++;
        await c.drained();
      }
    }
    const end = await c.endData(1);
    expect(end.replies[0]!.code).toBe(250);
    expect(waits).toBeGreaterThan(0);
    c.quit();
  });

  it('refuses a connection that is not there, in bounded time', async () => {
    const port = await freePort('127.0.0.1');
    await expect(LmtpClient.connect(opts({ host: '127.0.0.1', port }))).rejects.toThrow(/ECONNREFUSED/);
  });
});

describe('LmtpClient against hostile peers', () => {
  async function peer(onConn: (s: net.Socket) => void): Promise<{ port: number; close(): void }> {
    const srv = net.createServer(onConn);
    const port = await freePort('127.0.0.1');
    await new Promise<void>((r) => srv.listen(port, '127.0.0.1', () => r()));
    return { port, close: () => srv.close() };
  }

  it('gives up on a peer that never answers after timeoutMs', async () => {
    const p = await peer(() => undefined);
    try {
      const t = Date.now();
      await expect(LmtpClient.connect(opts({ host: '127.0.0.1', port: p.port, timeoutMs: 300 }))).rejects.toThrow(/did not answer within 300 ms/);
      expect(Date.now() - t).toBeLessThan(2000);
    } finally {
      p.close();
    }
  });

  it('bounds the reply line length', async () => {
    const p = await peer((s) => {
      s.on('error', () => undefined);
      s.write(`220 ${'a'.repeat(100_000)}`);
    });
    try {
      await expect(LmtpClient.connect(opts({ host: '127.0.0.1', port: p.port }))).rejects.toThrow(/longer than 2048 bytes/);
    } finally {
      p.close();
    }
  });

  it('fails on a reply that is not a reply', async () => {
    const p = await peer((s) => {
      s.on('error', () => undefined);
      s.write('220 hi\r\n');
      s.on('data', () => s.write('HTTP/1.1 400 Bad Request\r\n'));
    });
    try {
      await expect(LmtpClient.connect(opts({ host: '127.0.0.1', port: p.port }))).rejects.toThrow(/malformed reply line/);
    } finally {
      p.close();
    }
  });
});
