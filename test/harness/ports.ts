import net from 'node:net';

/**
 * Ask the kernel for a currently free TCP port on `host` by binding port 0
 * and closing again. There is an unavoidable small race (someone else may
 * grab the port before we use it), which is fine for tests on loopback.
 */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen({ host, port: 0, exclusive: true }, () => {
      const addr = srv.address();
      if (addr === null || typeof addr === 'string') {
        srv.close();
        reject(new Error(`freePort: unexpected address for ${host}`));
        return;
      }
      srv.close((err) => (err ? reject(err) : resolve(addr.port)));
    });
  });
}

/**
 * `n` distinct free ports on `host`. All listeners are held open until every
 * port is known, so the kernel cannot hand out the same port twice.
 */
export async function freePorts(host: string, n: number): Promise<number[]> {
  const servers: net.Server[] = [];
  try {
    const ports: number[] = [];
    for (let i = 0; i < n; i++) {
      const srv = net.createServer();
      servers.push(srv);
      ports.push(
        await new Promise<number>((resolve, reject) => {
          srv.once('error', reject);
          srv.listen({ host, port: 0, exclusive: true }, () => {
            const addr = srv.address();
            if (addr === null || typeof addr === 'string') reject(new Error('freePorts: no port'));
            else resolve(addr.port);
          });
        }),
      );
    }
    return ports;
  } finally {
    await Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
  }
}
