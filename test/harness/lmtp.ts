import net from 'node:net';

/**
 * A raw LMTP client for tests: reads whole (multi-line) replies, can pipeline, and lets a
 * test write the message in pieces (to stop a backend mid-DATA). Deliberately independent of
 * src/lmtp so a shared misunderstanding cannot hide a bug.
 */
export interface RawLmtp {
  /** The next complete reply, as its lines ("250-a", "250 b"). */
  reply(timeoutMs?: number): Promise<string[]>;
  /** The next complete reply's last line. */
  line(timeoutMs?: number): Promise<string>;
  send(line: string): void;
  write(data: string | Buffer): boolean;
  /** Resolves when the socket's write buffer drained. */
  drained(): Promise<void>;
  /** Resolves once the server closed the connection. */
  closed: Promise<void>;
  close(): void;
  socket: net.Socket;
}

export type LmtpTarget = { host: string; port: number } | { path: string };

export function openLmtp(target: LmtpTarget, timeoutMs = 10_000): Promise<RawLmtp> {
  return new Promise((resolve, reject) => {
    const socket = 'path' in target ? net.connect({ path: target.path }) : net.connect({ host: target.host, port: target.port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error('LMTP connect timed out'));
    }, timeoutMs);
    let buf = '';
    let current: string[] = [];
    const replies: string[][] = [];
    let head = 0; // index of the next unread reply (shift() on a long array is slow)
    let waiter: (() => void) | undefined;
    let gone: Error | undefined;
    let onClosed!: () => void;
    const closed = new Promise<void>((r) => (onClosed = r));
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => {
      buf += chunk;
      let start = 0;
      let i: number;
      while ((i = buf.indexOf('\n', start)) >= 0) {
        const line = buf.slice(start, i > start && buf[i - 1] === '\r' ? i - 1 : i);
        start = i + 1;
        current.push(line);
        if (line[3] !== '-') {
          replies.push(current);
          current = [];
        }
      }
      buf = buf.slice(start);
      waiter?.();
    });
    const end = (e: Error) => {
      gone ??= e;
      onClosed();
      waiter?.();
    };
    socket.on('error', (e) => end(e));
    socket.on('close', () => end(new Error('connection closed')));
    socket.once('connect', () => {
      clearTimeout(timer);
      const reply = async (ms = 30_000): Promise<string[]> => {
        const deadline = Date.now() + ms;
        for (;;) {
          const r = replies[head];
          if (r) {
            replies[head++] = [];
            if (head > 4096 && head * 2 > replies.length) {
              replies.splice(0, head);
              head = 0;
            }
            return r;
          }
          if (gone) throw new Error(`no reply: ${gone.message}`);
          await new Promise<void>((res, rej) => {
            const t = setTimeout(() => rej(new Error(`no LMTP reply within ${ms} ms`)), Math.max(0, deadline - Date.now()));
            waiter = () => {
              clearTimeout(t);
              waiter = undefined;
              res();
            };
          });
        }
      };
      resolve({
        reply,
        line: async (ms) => (await reply(ms)).at(-1)!,
        send: (l) => void socket.write(`${l}\r\n`),
        write: (d) => socket.write(d),
        drained: () => (socket.writableNeedDrain ? new Promise((r) => socket.once('drain', () => r())) : Promise.resolve()),
        closed,
        close: () => socket.destroy(),
        socket,
      });
    });
    socket.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/** CRLF line ends and dot-stuffing for a test message written with \n. */
export function wireBody(body: string): string {
  const crlf = body.replace(/\r?\n/g, '\r\n');
  return crlf.replace(/^\./gm, '..') + (crlf.endsWith('\r\n') ? '' : '\r\n') + '.\r\n';
}

export interface Transaction {
  greeting: string;
  rcpt: string[];
  /** Reply to DATA (354, or the refusal). */
  data: string;
  /** One reply (last line) per accepted recipient after the dot. */
  results: string[];
}

/**
 * A whole transaction, every command pipelined in one write up to DATA (as Postfix does),
 * then the message, then one reply per 250 to RCPT.
 */
export async function lmtpTransaction(target: LmtpTarget, from: string, rcpts: string[], body: string): Promise<Transaction> {
  const c = await openLmtp(target);
  try {
    const greeting = await c.line();
    c.write(['LHLO test.example', `MAIL FROM:<${from}>`, ...rcpts.map((r) => `RCPT TO:<${r}>`), 'DATA'].map((l) => `${l}\r\n`).join(''));
    const lhlo = await c.line();
    if (!lhlo.startsWith('250')) throw new Error(`LHLO: ${lhlo}`);
    const mail = await c.line();
    if (!mail.startsWith('250')) throw new Error(`MAIL: ${mail}`);
    const rcpt: string[] = [];
    for (const _ of rcpts) rcpt.push(await c.line());
    const data = await c.line();
    const results: string[] = [];
    if (data.startsWith('354')) {
      c.write(wireBody(body));
      for (const r of rcpt) if (r.startsWith('250')) results.push(await c.line());
    }
    c.send('QUIT');
    await c.line().catch(() => '');
    return { greeting, rcpt, data, results };
  } finally {
    c.close();
  }
}
