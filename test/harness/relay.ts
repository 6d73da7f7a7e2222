import net from 'node:net';

/**
 * A TCP relay between a client under test (a proxy) and a real server (Redis), to make the
 * network faults that a real server will not make on demand:
 * - `stall()`: every connection stays up but nothing moves either way (a hung relay, a
 *   half-dead path); `flow()` lets bytes through again, nothing lost;
 * - `cut()`: every connection is reset; new ones are still accepted.
 */
export interface Relay {
  host: string;
  port: number;
  /** redis://host:port, for pointing a Redis client through the relay. */
  url: string;
  /** Open client connections through the relay. */
  readonly connections: number;
  stall(): void;
  flow(): void;
  cut(): void;
  close(): Promise<void>;
}

export async function startRelay(target: { host: string; port: number }, host = '127.0.0.1'): Promise<Relay> {
  const pairs = new Set<[net.Socket, net.Socket]>();
  let stalled = false;

  const server = net.createServer({ allowHalfOpen: false }, (client) => {
    const upstream = net.connect({ host: target.host, port: target.port });
    const pair: [net.Socket, net.Socket] = [client, upstream];
    pairs.add(pair);
    const gone = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', gone).on('close', gone);
    upstream.on('error', gone).on('close', gone);
    client.pipe(upstream);
    upstream.pipe(client);
    if (stalled) {
      client.pause();
      upstream.pause();
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port: 0 }, () => resolve());
  });
  const addr = server.address() as net.AddressInfo;

  return {
    host,
    port: addr.port,
    url: `redis://${host}:${addr.port}`,
    get connections() {
      return pairs.size;
    },
    stall() {
      stalled = true;
      // Unpipe as well as pause: a paused source still hands over what it already read.
      for (const [c, u] of pairs) {
        c.unpipe(u);
        u.unpipe(c);
        c.pause();
        u.pause();
      }
    },
    flow() {
      stalled = false;
      for (const [c, u] of pairs) {
        c.pipe(u);
        u.pipe(c);
        c.resume();
        u.resume();
      }
    },
    cut() {
      for (const [c, u] of [...pairs]) {
        c.resetAndDestroy();
        u.destroy();
      }
      pairs.clear();
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const [c, u] of pairs) {
          c.destroy();
          u.destroy();
        }
        pairs.clear();
        server.close(() => resolve());
      }),
  };
}
