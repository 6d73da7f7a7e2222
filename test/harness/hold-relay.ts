import net from 'node:net';

/**
 * A TCP relay in front of a real backend (a Dovecot slot) that makes the two timings a real
 * server will not make on demand, for the proxy under test:
 * - `hold(re)`: a chunk from the proxy that matches `re` (a LOGIN or AUTHENTICATE) and all
 *   that follows it on that connection wait until `release()`: a backend that answers the
 *   login as late as the test wants;
 * - `stallAtLineEnd(n)`: after `n` more bytes towards the proxy, the stream stops right after
 *   the next LF and stays stopped: a response cut off at a line end (inside a literal).
 */
export interface HoldRelay {
  host: string;
  port: number;
  /** Open connections through the relay (each is one backend connection of the proxy). */
  readonly connections: number;
  /** Connections with a held chunk. */
  readonly holding: number;
  hold(re: RegExp | undefined): void;
  release(): void;
  stallAtLineEnd(afterBytes: number): void;
  /** Bytes passed towards the proxy since the last stallAtLineEnd(), and whether it has stopped. */
  readonly sentSinceStall: number;
  readonly stalled: boolean;
  close(): Promise<void>;
}

interface Pair {
  client: net.Socket;
  upstream: net.Socket;
  /** Chunks from the proxy waiting for release(), in order; undefined when not holding. */
  held: Buffer[] | undefined;
}

export async function startHoldRelay(target: { host: string; port: number }, host = '127.0.0.1'): Promise<HoldRelay> {
  const pairs = new Set<Pair>();
  let holdRe: RegExp | undefined;
  let stallAfter: number | undefined;
  let sent = 0;
  let stalled = false;

  // Half-open both ways, each end passed on: a client's FIN after a pipelined LOGOUT must not cut off the answer.
  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    const upstream = net.connect({ host: target.host, port: target.port, allowHalfOpen: true });
    const pair: Pair = { client, upstream, held: undefined };
    pairs.add(pair);
    const gone = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', gone).on('close', gone);
    upstream.on('error', gone).on('close', gone);
    client.on('data', (c: Buffer) => {
      if (!pair.held && holdRe?.test(c.toString('latin1'))) pair.held = [];
      if (pair.held) pair.held.push(c);
      else upstream.write(c);
    });
    client.on('end', () => upstream.end());
    upstream.on('data', (c: Buffer) => {
      if (stalled) return;
      if (stallAfter !== undefined && sent + c.length > stallAfter) {
        const lf = c.indexOf(10, Math.max(0, stallAfter - sent));
        if (lf >= 0) {
          client.write(c.subarray(0, lf + 1));
          sent += lf + 1;
          stalled = true;
          upstream.pause();
          return;
        }
      }
      sent += c.length;
      client.write(c);
    });
    upstream.on('end', () => client.end());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port: 0 }, () => resolve());
  });
  const addr = server.address() as net.AddressInfo;

  return {
    host,
    port: addr.port,
    get connections() {
      return pairs.size;
    },
    get holding() {
      return [...pairs].filter((p) => p.held).length;
    },
    hold(re) {
      holdRe = re;
    },
    release() {
      holdRe = undefined;
      for (const p of pairs) {
        const chunks = p.held ?? [];
        p.held = undefined;
        for (const c of chunks) p.upstream.write(c);
      }
    },
    stallAtLineEnd(afterBytes) {
      stallAfter = afterBytes;
      sent = 0;
      stalled = false;
    },
    get sentSinceStall() {
      return sent;
    },
    get stalled() {
      return stalled;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const p of pairs) {
          p.client.destroy();
          p.upstream.destroy();
        }
        pairs.clear();
        server.close(() => resolve());
      }),
  };
}
