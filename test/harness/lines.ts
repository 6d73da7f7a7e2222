import net from 'node:net';
import tls from 'node:tls';

/**
 * Minimal line-oriented TCP client for talking raw protocol in tests
 * (Redis inline commands, LMTP, IMAP, POP3). Lines are returned without CRLF.
 */
export interface LineClient {
  /** Next line from the server; rejects on timeout or if the socket closes first. */
  readLine(timeoutMs?: number): Promise<string>;
  /** Read lines until one matches `done`; returns all lines read (including the last). */
  readUntil(done: RegExp, timeoutMs?: number): Promise<string[]>;
  /** Write `line` followed by CRLF. */
  send(line: string): void;
  /** Write raw data as is. */
  write(data: string): void;
  close(): void;
  readonly socket: net.Socket;
}

export interface ConnectOptions {
  host: string;
  port: number;
  /** Connect with implicit TLS using these options (e.g. { ca, servername }). */
  tls?: tls.ConnectionOptions;
  timeoutMs?: number;
  /** Source address to connect from (e.g. 127.0.0.5), to look like another client to a per-IP limit. */
  localAddress?: string;
}

export function connectLines(opts: ConnectOptions): Promise<LineClient> {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  return new Promise((resolve, reject) => {
    const socket: net.Socket = opts.tls
      ? tls.connect({ host: opts.host, port: opts.port, ...(opts.localAddress ? { localAddress: opts.localAddress } : {}), ...opts.tls })
      : net.connect({ host: opts.host, port: opts.port, ...(opts.localAddress ? { localAddress: opts.localAddress } : {}) });
    const connectEvent = opts.tls ? 'secureConnect' : 'connect';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`connect ${opts.host}:${opts.port} timed out`));
    }, timeoutMs);

    let buf = '';
    const lines: string[] = [];
    let waiter: (() => void) | undefined;
    let closed: Error | undefined;

    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buf += chunk;
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        lines.push(buf.slice(0, i).replace(/\r$/, ''));
        buf = buf.slice(i + 1);
      }
      waiter?.();
    });
    socket.on('close', () => {
      closed ??= new Error(`connection to ${opts.host}:${opts.port} closed`);
      waiter?.();
    });
    socket.on('error', (err) => {
      closed = err;
      clearTimeout(timer);
      reject(err);
      waiter?.();
    });

    const readLine = (ms = timeoutMs): Promise<string> =>
      new Promise((res, rej) => {
        const t = setTimeout(() => {
          waiter = undefined;
          rej(new Error(`timed out waiting for a line from ${opts.host}:${opts.port}`));
        }, ms);
        const check = (): void => {
          const line = lines.shift();
          if (line !== undefined) {
            clearTimeout(t);
            waiter = undefined;
            res(line);
          } else if (closed) {
            clearTimeout(t);
            waiter = undefined;
            rej(closed);
          } else {
            waiter = check;
          }
        };
        check();
      });

    socket.once(connectEvent, () => {
      clearTimeout(timer);
      resolve({
        socket,
        readLine,
        async readUntil(done, ms) {
          const out: string[] = [];
          for (;;) {
            const line = await readLine(ms);
            out.push(line);
            if (done.test(line)) return out;
          }
        },
        send: (line) => void socket.write(line + '\r\n'),
        write: (data) => void socket.write(data),
        close: () => socket.destroy(),
      });
    });
  });
}
