// A deliberately small IMAP client on a raw socket for the load generators: it reads
// response lines, skips literals by count (a 1 MiB FETCH is never copied or decoded), and
// resolves a command when its tagged line arrives. No parsing beyond that.

import type { ChildProcess } from 'node:child_process';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { stopChild } from './procs.js';

export class ImapError extends Error {}

interface Waiter {
  match: (line: string) => boolean;
  resolve: (line: string) => void;
  reject: (e: Error) => void;
}

export class ImapClient {
  /** Bytes received inside literals (message data), for throughput. */
  literalBytes = 0;
  /** Every complete line (outside literals) is shown here first, e.g. to spot `* BYE`. */
  onLine: ((line: string) => void) | undefined;
  onClose: (() => void) | undefined;
  private pending: Buffer | undefined;
  private skip = 0;
  private waiter: Waiter | undefined;
  private failure: Error | undefined;
  closed = false;

  private readonly dataListener = (c: Buffer) => this.onData(c);

  private constructor(readonly socket: net.Socket) {
    socket.on('data', this.dataListener);
    socket.on('error', (e) => this.fail(e));
    socket.on('close', () => {
      this.closed = true;
      this.fail(new ImapError('connection closed'));
      this.onClose?.();
    });
  }

  static connect(host: string, port: number, timeoutMs: number, localAddress?: string): Promise<ImapClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host, port, noDelay: true, ...(localAddress ? { localAddress } : {}) });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new ImapError(`connect ${host}:${port} timed out`));
      }, timeoutMs);
      socket.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new ImapClient(socket));
      });
    });
  }

  private onData(chunk: Buffer): void {
    let c = chunk;
    for (;;) {
      if (this.skip > 0) {
        const n = Math.min(this.skip, c.length);
        this.skip -= n;
        this.literalBytes += n;
        c = c.subarray(n);
        if (c.length === 0) return;
      }
      const nl = c.indexOf(10);
      if (nl < 0) {
        this.pending = this.pending ? Buffer.concat([this.pending, c]) : c;
        if (this.pending.length > 1 << 20) this.fail(new ImapError('line too long'));
        return;
      }
      let lineBuf = c.subarray(0, nl);
      if (this.pending) {
        lineBuf = Buffer.concat([this.pending, lineBuf]);
        this.pending = undefined;
      }
      c = c.subarray(nl + 1);
      const line = lineBuf.toString('latin1').replace(/\r$/, '');
      const lit = /\{(\d+)\}$/.exec(line);
      if (lit) this.skip = Number(lit[1]);
      this.line(line);
      if (c.length === 0) return;
    }
  }

  private line(line: string): void {
    this.onLine?.(line);
    const w = this.waiter;
    if (w && w.match(line)) {
      this.waiter = undefined;
      w.resolve(line);
    }
  }

  private fail(e: Error): void {
    this.failure ??= e;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(e);
  }

  /**
   * Stops parsing: from now on every chunk goes to `onChunk` as it is. For sessions that only
   * wait (the failover clients), so that the clients' own work stays small.
   */
  raw(onChunk: (c: Buffer) => void): void {
    this.socket.off('data', this.dataListener);
    this.socket.on('data', onChunk);
  }

  /** The next line that `match` accepts. */
  waitFor(match: (line: string) => boolean): Promise<string> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.waiter = { match, resolve, reject }));
  }

  greeting(): Promise<string> {
    return this.waitFor(() => true).then((l) => {
      if (!l.startsWith('* OK')) throw new ImapError(`greeting: ${l}`);
      return l;
    });
  }

  /** Sends `tag text` and resolves with the tagged reply line; rejects unless it is OK. */
  command(tag: string, text: string): Promise<string> {
    const p = this.waitFor((l) => l.startsWith(`${tag} `));
    this.socket.write(`${tag} ${text}\r\n`);
    return p.then((l) => {
      if (!l.startsWith(`${tag} OK`)) throw new ImapError(`${text.split(' ', 1)[0]}: ${l}`);
      return l;
    });
  }

  /** LOGOUT, then wait for the server to close (the server closes first, so TIME_WAIT stays on its side). */
  async logout(timeoutMs: number): Promise<void> {
    const closed = new Promise<void>((r) => (this.closed ? r() : this.socket.once('close', () => r())));
    this.socket.write('z LOGOUT\r\n');
    const timer = setTimeout(() => this.socket.destroy(), timeoutMs);
    await closed;
    clearTimeout(timer);
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** Connect, greeting, LOGIN: a logged-in client. */
export async function openSession(host: string, port: number, user: string, pass: string, timeoutMs: number, localAddress?: string): Promise<ImapClient> {
  const c = await ImapClient.connect(host, port, timeoutMs, localAddress);
  const timer = setTimeout(() => c.destroy(), timeoutMs);
  try {
    await c.greeting();
    await c.command('a', `LOGIN ${user} ${pass}`);
    return c;
  } catch (e) {
    c.destroy();
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * One POP3 login on the same line reader (POP3 answers are lines): connect, greeting, USER,
 * PASS, QUIT, then wait for the server to close.
 */
export async function pop3Login(host: string, port: number, user: string, pass: string, timeoutMs: number, localAddress?: string): Promise<void> {
  const c = await ImapClient.connect(host, port, timeoutMs, localAddress);
  const timer = setTimeout(() => c.destroy(), timeoutMs);
  const ok = async (what: string, send?: string): Promise<void> => {
    const p = c.waitFor(() => true);
    if (send !== undefined) c.socket.write(`${send}\r\n`);
    const l = await p;
    if (!l.startsWith('+OK')) throw new ImapError(`POP3 ${what}: ${l}`);
  };
  try {
    await ok('greeting');
    await ok('USER', `USER ${user}`);
    await ok('PASS', `PASS ${pass}`);
    const closed = new Promise<void>((r) => (c.closed ? r() : c.socket.once('close', () => r())));
    c.socket.write('QUIT\r\n');
    await closed;
  } catch (e) {
    c.destroy();
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Waits until `host:port` gives an IMAP greeting: how the bench knows a proxy it started is
 * serving. Throws `describe()` (the child's output) if `child` exits first, and stops the
 * child and throws if `deadline` (ms since epoch) passes.
 */
export async function waitForGreeting(child: ChildProcess, host: string, port: number, deadline: number, name: string, describe: () => string): Promise<void> {
  for (;;) {
    if (child.exitCode !== null) throw new Error(`${name} exited (${child.exitCode}): ${describe()}`);
    try {
      const c = await ImapClient.connect(host, port, 1000);
      try {
        await c.greeting();
        return;
      } finally {
        c.destroy();
      }
    } catch {
      if (Date.now() > deadline) {
        await stopChild(child);
        throw new Error(`${name} did not listen on ${host}:${port}: ${describe()}`);
      }
      await sleep(50);
    }
  }
}
