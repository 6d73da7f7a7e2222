import { join } from 'node:path';
import { parseConfig } from '../../src/config.js';
import { createLogger, silentLogger, type Logger } from '../../src/log.js';
import { startServer, type RunningServer } from '../../src/server.js';
import { freePorts } from '../harness/ports.js';
import { tempDir } from './tmp.js';

export interface TestProxy {
  server: RunningServer;
  host: string;
  /** Port of the first listener of each protocol/tls combination, e.g. ports['imap'], ports['imap:implicit']. */
  ports: Record<string, number>;
  close(): Promise<void>;
}

type ListenerDoc = Record<string, unknown> & { protocol: string; tls?: string };

/**
 * Starts mailsplice in this process from a config document. Listener ports are filled in
 * with free ones when absent. Set MAILSPLICE_TEST_LOG=debug to see the proxy's log, or
 * pass a logger to read it in the test.
 */
export async function startProxy(doc: { listeners?: ListenerDoc[] } & Record<string, unknown>, logger?: Logger): Promise<TestProxy> {
  const host = '127.0.0.1';
  const listeners = doc.listeners ?? [{ protocol: 'imap' }];
  const ports: Record<string, number> = {};
  // All at once: ports asked for one by one may come back the same (each is free again once probed).
  const free = await freePorts(host, listeners.filter((l) => l.port === undefined).length);
  for (const l of listeners) {
    l.address ??= host;
    l.port ??= free.shift()!;
    const key = l.tls && l.tls !== 'none' ? `${l.protocol}:${l.tls}` : l.protocol;
    ports[key] ??= l.port as number;
  }
  const cfg = parseConfig({ ...doc, listeners }, 'test config', tempDir('cfg'));
  const level = process.env.MAILSPLICE_TEST_LOG;
  const log = logger ?? (level === 'debug' || level === 'info' ? createLogger(level) : silentLogger);
  const server = await startServer(cfg, log);
  return { server, host, ports, close: () => server.close() };
}
