import { writeFileSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { afterAll, describe, expect, it } from 'vitest';
import { connectLines, type LineClient } from './harness/lines.js';
import { openLmtp, type RawLmtp } from './harness/lmtp.js';
import { freePorts } from './harness/ports.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { tempDir } from './support/tmp.js';

// Issue 14 item 9: SIGTERM to a real `mailsplice serve` process. Connections before login
// used to be left to their login timeout (60 s), so systemd's TimeoutStopSec=30 ended every
// stop with SIGKILL. They must get the protocol's goodbye at once, and the process must exit.

const HOST = '127.0.0.1';
let proxy: ProxyProcess | undefined;
afterAll(() => {
  if (proxy?.child.exitCode === null) proxy.child.kill('SIGKILL');
});

describe('SIGTERM', () => {
  it('says goodbye to every connection before login at once, and the process exits 0', { timeout: 40_000 }, async () => {
    const dir = tempDir('shutdown');
    // A backend that accepts and never says a word: a login to it is in flight until its
    // backend deadline (15 s), so the stop must cut it short too.
    const held: Socket[] = [];
    const silent = createServer((s) => held.push(s.on('error', () => {})));
    await new Promise<void>((res) => silent.listen(0, HOST, res));
    const silentPort = (silent.address() as { port: number }).port;
    const routes = join(dir, 'routes.yaml');
    writeFileSync(
      routes,
      stringify({
        users: { 'alice@example.com': { store: 'store1' } },
        stores: { store1: { master: 'mute', replicas: '', epoch: 1 } },
        slots: { mute: { host: HOST, imap: silentPort, pop3: silentPort, lmtp: silentPort } },
      }),
    );
    const [imap, pop3, lmtp] = (await freePorts(HOST, 3)) as [number, number, number];
    proxy = await startProxyProcess({
      listeners: [
        { protocol: 'imap', address: HOST, port: imap },
        { protocol: 'pop3', address: HOST, port: pop3 },
        { protocol: 'lmtp', address: HOST, port: lmtp },
      ],
      lookup: { file: routes },
      // The default login timeout: far longer than this test may take.
      limits: { login_timeout_ms: 60_000 },
    });
    const clients: LineClient[] = [];
    let lmtpClient: RawLmtp | undefined;
    try {
      const idleImap = await connectLines({ host: HOST, port: imap });
      const halfCommand = await connectLines({ host: HOST, port: imap });
      const idlePop = await connectLines({ host: HOST, port: pop3 });
      clients.push(idleImap, halfCommand, idlePop);
      for (const c of clients) await c.readLine(); // the greetings
      halfCommand.write('a1 LOGIN alice@example.com'); // no line end: the proxy waits for the rest
      const loggingIn = await connectLines({ host: HOST, port: imap });
      clients.push(loggingIn);
      await loggingIn.readLine();
      loggingIn.send('a2 LOGIN alice@example.com secret');
      for (let i = 0; i < 200 && held.length === 0; i++) await new Promise((r) => setTimeout(r, 50));
      expect(held).toHaveLength(1); // the login is waiting for the backend now
      lmtpClient = await openLmtp({ host: HOST, port: lmtp });
      expect(await lmtpClient.line()).toMatch(/^220 /);

      const exited = new Promise<number | null>((res) => proxy!.child.once('exit', (code) => res(code)));
      proxy.child.kill('SIGTERM');

      expect(await idleImap.readLine(20_000)).toMatch(/^\* BYE \[UNAVAILABLE\] Server shutting down/);
      expect(await halfCommand.readLine(20_000)).toMatch(/^\* BYE \[UNAVAILABLE\] Server shutting down/);
      expect(await idlePop.readLine(20_000)).toMatch(/^-ERR \[SYS\/TEMP\] Server shutting down/);
      expect(await loggingIn.readLine(20_000)).toMatch(/^\* BYE \[UNAVAILABLE\] Server shutting down/);
      expect(await lmtpClient.line(20_000)).toMatch(/^421 4\.3\.2 /);
      expect(await exited).toBe(0);
      expect(proxy.log()).toMatch(/"stopping"/);
    } finally {
      for (const c of clients) c.close();
      lmtpClient?.close();
      for (const h of held) h.destroy();
      silent.close();
    }
  });
});
