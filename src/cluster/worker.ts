import { parseConfig, type Config } from '../config.js';
import type { Level, Logger, LogFields } from '../log.js';
import { gateLimits } from '../net/gate.js';
import type { RunningServer, ServerRole } from '../server.js';
import { toWorker, WorkerAsks, type ToPrimary } from './ask.js';
import { SharedClientGate } from './ip-limits.js';

/** The environment a worker is forked with: its number and the primary's parsed config. */
export const WORKER_ENV = 'MAILSPLICE_WORKER';
export const WORKER_CONFIG_ENV = 'MAILSPLICE_WORKER_CONFIG';

/**
 * The config a worker runs with: the one the primary loaded and checked (as JSON in its
 * environment), not the file read again. A worker restarted after a crash then serves what
 * its siblings serve, even if the file was edited since.
 */
export function workerConfig(): Config {
  const json = process.env[WORKER_CONFIG_ENV];
  if (json === undefined) throw new Error(`${WORKER_CONFIG_ENV} is not set: a worker is started by its primary`);
  return parseConfig(JSON.parse(json), 'the primary config');
}

export function workerIndex(): number {
  return Number(process.env[WORKER_ENV] ?? 0);
}

/** A logger whose every line also carries `fields` (the worker's number). */
export function withFields(log: Logger, fields: LogFields): Logger {
  return {
    debug: (m, f) => log.debug(m, { ...fields, ...f }),
    info: (m, f) => log.info(m, { ...fields, ...f }),
    warn: (m, f) => log.warn(m, { ...fields, ...f }),
    error: (m, f) => log.error(m, { ...fields, ...f }),
    ...(log.setLevel ? { setLevel: (l: Level) => log.setLevel?.(l) } : {}),
  };
}

/**
 * Node's own message for a taken port, also when the bind happened in the primary (which
 * reports `bind EADDRINUSE 127.0.0.1:143` to the worker): `serve` says it the same way with
 * or without workers.
 */
export function describeStartError(e: unknown): string {
  const err = e as NodeJS.ErrnoException & { address?: string; port?: number };
  if (err?.code === 'EADDRINUSE' && err.address !== undefined) {
    return `listen EADDRINUSE: address already in use ${err.address}${err.port !== undefined ? `:${err.port}` : ''}`;
  }
  return e instanceof Error ? e.message : String(e);
}

/**
 * The life of one worker process: start the proxy (listeners, lookup, subscription, sessions
 * of its own), say "ready" to the primary, answer its questions, reload on its word or on
 * SIGHUP, and close on its word or on SIGTERM/SIGINT (systemd and a terminal's Ctrl-C signal
 * the whole process group, so a worker may hear the stop both ways: it closes once).
 */
export async function runWorker(cfg: Config, log: Logger, start: (role: Required<ServerRole>) => Promise<RunningServer>): Promise<void> {
  const send = (m: ToPrimary): void => {
    if (process.send && process.connected) process.send(m);
  };
  const asks = new WorkerAsks(send);
  const gate = new SharedClientGate(gateLimits(cfg), (d) => send({ ms: 'ip', d }));
  let server: RunningServer | undefined;
  let closing = false;
  // SIGTERM and the primary's word drain (BYEs spread over shutdown.drain_ms); SIGINT ends at once.
  const close = (why: string, drain = true) => {
    if (closing) return;
    closing = true;
    log.info('worker stopping', { why });
    if (!server) process.exit(0);
    (drain ? server.drain() : server.close()).then(
      () => {
        gate.close();
        process.exit(0);
      },
      (e: Error) => {
        log.error('worker close failed', { error: e.message });
        process.exit(1);
      },
    );
  };
  const reload = (doc: unknown) => {
    let next: Config | undefined;
    try {
      next = doc === undefined ? undefined : parseConfig(doc, 'the primary config');
    } catch (e) {
      log.error('config reload refused; the running config stays', { error: (e as Error).message });
      return;
    }
    server?.reload(next).catch((e: unknown) => log.error('config reload failed', { error: e instanceof Error ? e.message : String(e) }));
  };
  process.on('message', (raw: unknown) => {
    const m = toWorker(raw);
    if (!m) return;
    if (m.ms === 'ask') void asks.answer(m);
    else if (m.ms === 'ip') gate.applyDenials(m.d);
    else if (m.ms === 'reload') reload(m.config);
    else close('primary');
  });
  process.on('SIGTERM', () => close('SIGTERM'));
  process.on('SIGINT', () => close('SIGINT', false));
  process.on('SIGHUP', () => server?.reload());
  try {
    server = await start({ worker: asks, gate });
  } catch (e) {
    const failed: ToPrimary = { ms: 'failed', error: describeStartError(e) };
    // Exit once the message has reached the primary (the failed start may leave handles open).
    if (process.send && process.connected) process.send(failed, () => process.exit(1));
    else process.exit(1);
    return;
  }
  if (closing) {
    await server.close();
    process.exit(0);
  }
  send({ ms: 'ready' });
  log.debug('worker ready', { workers: cfg.workers === 'auto' ? 'auto' : cfg.workers });
}
