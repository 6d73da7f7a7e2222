import cluster, { type Worker } from 'node:cluster';
import type { Server as HttpServer } from 'node:http';
import type { Config } from '../config.js';
import { removeStaleSocket } from '../lmtp/server.js';
import { gateLimits } from '../net/gate.js';
import type { Logger } from '../log.js';
import { PrimaryAsks, toPrimary, type Asker, type ToWorker, type WorkerSlot } from './ask.js';
import { primaryRegistry, startInstanceSide, type InstanceSide } from './instance.js';
import { IpLedger, type IpDenials } from './ip-limits.js';
import { WORKER_CONFIG_ENV, WORKER_ENV } from './worker.js';
import { nextInForce } from '../reload.js';

/** A worker that ran at least this long before it died is restarted at once. */
const STABLE_MS = 10_000;
/** Quick deaths in a row wait 0.5 s, 1 s, 2 s ... up to this before the next start. */
const MAX_RESTART_DELAY_MS = 30_000;

export interface RunningPrimary {
  readonly asker: Asker;
  readonly admin: HttpServer | undefined;
  /** The worker slots (number, process while ready), for tests and logs. */
  readonly slots: readonly WorkerSlot[];
  /** SIGHUP: every ready worker reloads (with `next`, the config file read again). */
  reload(next?: Config): void;
  /** SIGTERM: every worker runs its close() (BYE to everyone, LMTP transactions finish), then the admin listener closes. */
  close(): Promise<void>;
}

interface SlotLife extends WorkerSlot {
  startedAt: number;
  quickDeaths: number;
  restartTimer: NodeJS.Timeout | undefined;
}

/**
 * The primary of a multi-process instance. It forks `n` workers that share the listening
 * sockets (node:cluster), holds no session and no lookup, serves the admin listener for the
 * whole instance (answers gathered from every worker with askWorkers), restarts a worker that
 * dies (with a growing delay while they keep dying at once), and passes SIGHUP and SIGTERM on.
 *
 * Resolves once every worker is listening; rejects with the first worker's start error (a
 * port taken, a certificate that does not load) after stopping the others.
 */
export async function startPrimary(cfg: Config, log: Logger, n: number): Promise<RunningPrimary> {
  // JSON on the IPC channel, not 'advanced' (structured clone): measured with one worker
  // asking its primary 20,000 times, 16 at a time, on this 2-core machine, a round trip cost
  // ~8 us of CPU on each side with JSON and ~15 us with 'advanced', which also took 3-5x as long.
  //
  // The workers accept from the shared socket themselves (SCHED_NONE), rather than the
  // primary accepting every connection and passing it on (round-robin, node's default on
  // Linux). Measured with bench/tools/cluster-sched.ts (2 workers, IMAP logins against the fake
  // backend, 16 at a time, both variants alternating, medians of 5 runs of 4 s, a loaded
  // 2-core machine): round-robin 1,149 logins/s at 387 us of instance CPU per login (69 us in
  // the primary); SCHED_NONE 2,130 logins/s at 211 us per login (2 us in the primary), the
  // workers' CPU within 0.75-1.0 of each other. NODE_CLUSTER_SCHED_POLICY=rr|none overrides.
  if (process.env.NODE_CLUSTER_SCHED_POLICY === undefined) cluster.schedulingPolicy = cluster.SCHED_NONE;
  // A stale LMTP socket file is removed once, here: a worker removing it would remove the live one.
  for (const l of cfg.listeners) if (l.protocol === 'lmtp' && l.path !== undefined) removeStaleSocket(l.path);

  const slots: SlotLife[] = Array.from({ length: n }, (_, i) => ({ index: i + 1, worker: undefined, state: 'starting', startedAt: 0, quickDeaths: 0, restartTimer: undefined }));
  const asks = new PrimaryAsks(slots);
  const ipMsg = (d: IpDenials): ToWorker => ({ ms: 'ip', d });
  const ledger = new IpLedger(gateLimits(cfg), (d) => {
    const msg = ipMsg(d);
    for (const s of slots) if (s.worker?.isConnected()) s.worker.send(msg);
  });
  const bySlot = new Map<Worker, SlotLife>();
  let configJson = JSON.stringify(cfg);
  let stopping = false;
  let started = false;
  let failStart: ((e: Error) => void) | undefined;
  let readyCount = 0;
  /** When the last SIGHUP came: a worker forked before it and ready after it still gets it. */
  let reloadAt = 0;
  /** The config file as the last SIGHUP read it: a worker forked before it and ready after gets it too. */
  let lastReload: Config | undefined;
  let allReady: (() => void) | undefined;

  const fork = (slot: SlotLife) => {
    slot.restartTimer = undefined;
    slot.state = 'starting';
    slot.startedAt = Date.now();
    const w = cluster.fork({ [WORKER_ENV]: String(slot.index), [WORKER_CONFIG_ENV]: configJson });
    bySlot.set(w, slot);
    w.on('message', (raw: unknown) => {
      const m = toPrimary(raw);
      if (!m) return;
      if (m.ms === 'answer') asks.answered(w, m);
      else if (m.ms === 'ip') ledger.apply(slot.index, m.d);
      else if (m.ms === 'ready') {
        slot.worker = w;
        slot.state = 'ready';
        w.send(ipMsg(ledger.snapshot()));
        if (slot.startedAt <= reloadAt) w.send((lastReload ? { ms: 'reload', config: lastReload } : { ms: 'reload' }) satisfies ToWorker);
        log.info('worker started', { worker: slot.index, pid: w.process.pid });
        if (!started && ++readyCount === n) allReady?.();
      } else if (m.ms === 'failed') {
        slot.state = `failed to start: ${m.error}`;
        if (!started) failStart?.(new Error(m.error));
        else log.error('worker failed to start', { worker: slot.index, pid: w.process.pid, error: m.error });
      }
    });
    w.on('exit', (code: number | null, signal: string | null) => {
      bySlot.delete(w);
      const how = signal ? `killed by ${signal}` : `exited with ${code}`;
      asks.exited(w, `worker ${how}`);
      ledger.forget(slot.index);
      if (slot.worker === w) slot.worker = undefined;
      if (stopping) {
        slot.state = 'stopped';
        return;
      }
      if (!started) {
        failStart?.(new Error(slot.state.startsWith('failed to start: ') ? slot.state.slice('failed to start: '.length) : `worker ${slot.index} ${how} while starting`));
        return;
      }
      const lived = Date.now() - slot.startedAt;
      slot.quickDeaths = lived >= STABLE_MS ? 0 : slot.quickDeaths + 1;
      const delay = slot.quickDeaths === 0 ? 0 : Math.min(MAX_RESTART_DELAY_MS, 250 * 2 ** slot.quickDeaths);
      slot.state = `restarting (${how})`;
      log.error('worker died; restarting it', { worker: slot.index, pid: w.process.pid, how, lived_ms: lived, restart_in_ms: delay });
      slot.restartTimer = setTimeout(() => fork(slot), delay);
    });
  };

  let instance: InstanceSide | undefined;
  const stopWorkers = async () => {
    stopping = true;
    for (const s of slots) {
      if (s.restartTimer) clearTimeout(s.restartTimer);
      s.restartTimer = undefined;
    }
    const live = [...bySlot.keys()].filter((w) => !w.isDead());
    const exits = live.map((w) => new Promise<void>((res) => (w.isDead() ? res() : w.once('exit', () => res()))));
    const msg: ToWorker = { ms: 'close' };
    for (const w of live) {
      try {
        if (w.isConnected()) w.send(msg);
        else w.kill('SIGTERM');
      } catch {
        w.kill('SIGTERM');
      }
    }
    // A worker drains over shutdown.drain_ms (an LMTP transaction without a drain may take up
    // to lmtp.timeout_ms); past that a worker that still has not exited is stuck, and is
    // killed rather than waited for.
    const limit = setTimeout(() => {
      for (const w of live) if (!w.isDead()) w.process.kill('SIGKILL');
    }, Math.max(cfg.lmtp.timeout_ms, cfg.shutdown.drain_ms) + 10_000);
    await Promise.all(exits);
    clearTimeout(limit);
  };

  try {
    instance = await startInstanceSide(cfg, log, asks, { own: primaryRegistry(ledger), workers: n });
    await new Promise<void>((resolve, reject) => {
      allReady = resolve;
      failStart = reject;
      for (const s of slots) fork(s);
    });
    started = true;
    instance.serving();
  } catch (e) {
    await stopWorkers();
    await instance?.close();
    throw e;
  }
  log.info('workers started', { workers: n, scheduling: cluster.schedulingPolicy === cluster.SCHED_RR ? 'round-robin' : 'kernel' });

  return {
    asker: asks,
    admin: instance?.admin,
    slots,
    reload(next?: Config) {
      reloadAt = Date.now();
      // Workers forked from now on (a restart after a crash) start with what the others run.
      if (next) {
        lastReload = next;
        configJson = JSON.stringify(nextInForce(cfg, next));
        ledger.setLimits(gateLimits(nextInForce(cfg, next)));
      }
      const msg: ToWorker = next ? { ms: 'reload', config: next } : { ms: 'reload' };
      for (const s of slots) if (s.worker?.isConnected()) s.worker.send(msg);
      log.info('reload sent to workers', { workers: slots.filter((s) => s.worker).length });
    },
    async close() {
      await instance?.stopping();
      await stopWorkers();
      await instance?.close();
    },
  };
}
