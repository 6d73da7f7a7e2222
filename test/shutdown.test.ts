import { copyFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
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
    const routes = join(dir, 'routes.yaml');
    copyFileSync(resolve(import.meta.dirname, '../deploy/routes.example.yaml'), routes);
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
      lmtpClient = await openLmtp({ host: HOST, port: lmtp });
      expect(await lmtpClient.line()).toMatch(/^220 /);

      const exited = new Promise<number | null>((res) => proxy!.child.once('exit', (code) => res(code)));
      proxy.child.kill('SIGTERM');

      expect(await idleImap.readLine(20_000)).toMatch(/^\* BYE \[UNAVAILABLE\] Server shutting down/);
      expect(await halfCommand.readLine(20_000)).toMatch(/^\* BYE \[UNAVAILABLE\] Server shutting down/);
      expect(await idlePop.readLine(20_000)).toMatch(/^-ERR \[SYS\/TEMP\] Server shutting down/);
      expect(await lmtpClient.line(20_000)).toMatch(/^421 4\.3\.2 /);
      expect(await exited).toBe(0);
      expect(proxy.log()).toMatch(/"stopping"/);
    } finally {
      for (const c of clients) c.close();
      lmtpClient?.close();
    }
  });
});
