import net from 'node:net';

/**
 * A TCP relay in front of an IMAP backend that counts the logins in progress at the backend:
 * a connection counts from its TCP connect until the backend's tagged answer to the client's
 * LOGIN or AUTHENTICATE (or until it closes). `max` is the most there ever were at once, as
 * the backend saw it. Lines are read only until the login's answer; after that bytes just pass.
 */
export interface LoginRelay {
  host: string;
  port: number;
  /** Logins in progress now. */
  readonly inProgress: number;
  /** The most logins in progress at once so far. */
  readonly max: number;
  /** Logins the backend answered (OK, NO or BAD). */
  readonly answered: number;
  close(): Promise<void>;
}

export async function startLoginRelay(target: { host: string; port: number }, host = '127.0.0.1'): Promise<LoginRelay> {
  let inProgress = 0;
  let max = 0;
  let answered = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect({ host: target.host, port: target.port });
    sockets.add(client).add(upstream);
    inProgress++;
    max = Math.max(max, inProgress);
    let counting = true;
    let tag: string | undefined;
    let fromClient = '';
    let fromBackend = '';
    const done = () => {
      if (!counting) return;
      counting = false;
      inProgress--;
    };
    const gone = () => {
      done();
      sockets.delete(client);
      sockets.delete(upstream);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', gone).on('close', gone);
    upstream.on('error', gone).on('close', gone);
    client.on('data', (d: Buffer) => {
      if (counting && tag === undefined) {
        fromClient += d.toString('latin1');
        const m = /^(\S+) (?:LOGIN|AUTHENTICATE)\b/im.exec(fromClient);
        if (m) tag = m[1];
        else fromClient = fromClient.slice(-4096);
      }
      upstream.write(d);
    });
    upstream.on('data', (d: Buffer) => {
      if (counting) {
        fromBackend += d.toString('latin1');
        let i: number;
        while (counting && (i = fromBackend.indexOf('\n')) >= 0) {
          const line = fromBackend.slice(0, i);
          fromBackend = fromBackend.slice(i + 1);
          if (tag !== undefined && line.startsWith(`${tag} `)) {
            answered++;
            done(); // before the answer is passed on: the proxy cannot see it earlier
          }
        }
      }
      client.write(d);
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port: 0, backlog: 4096 }, () => resolve());
  });
  const addr = server.address() as net.AddressInfo;
  return {
    host,
    port: addr.port,
    get inProgress() {
      return inProgress;
    },
    get max() {
      return max;
    },
    get answered() {
      return answered;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
