import type { Server as HttpServer } from 'node:http';
import { AggregatorRegistry, collectDefaultMetrics, Gauge, Registry } from 'prom-client';
import { startAdmin, type AdminSources } from '../admin.js';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';
import type { Answerer, Asker, WorkerAnswer } from './ask.js';
import type { IpLedger } from './ip-limits.js';
import { fleetAdminSources } from '../fleet/admin.js';
import { startHeartbeat, type Heartbeat } from '../fleet/heartbeat.js';
import { normalizeLogin } from '../lookup/model.js';

// What the admin listener says about the whole instance, read through askWorkers: with one
// process the answers come from its own handlers, with workers one per worker. The admin code
// never reads a worker's registry, router or sweep itself.

type MetricsJson = Awaited<ReturnType<Registry['getMetricsAsJSON']>>;

/** One process's health, as its 'health' handler answers. */
export interface ProcessHealth {
  /** Route events are flowing (the cache is trusted). */
  lookupLive: boolean;
  /** Spliced sessions. */
  sessions: number;
  /** Connections before login. */
  preauth: number;
}

declare module './ask.js' {
  interface Asks {
    /** This process's metrics, as prom-client JSON (aggregated by the primary). */
    metrics: { arg: null; answer: MetricsJson };
    health: { arg: null; answer: ProcessHealth };
  }
}

/** Registers the questions every serving process answers for the admin listener. */
export function answerAdminQuestions(asks: Answerer, registry: Registry, health: () => ProcessHealth): void {
  asks.onAsk('metrics', () => registry.getMetricsAsJSON());
  asks.onAsk('health', () => health());
}

/** Per-process metrics (CPU, memory, event loop, fds): summing them would hide one process's trouble. */
export const PROCESS_METRIC_PREFIX = 'mailsplice_process_';

/**
 * Adds `worker="<n>"` to every per-process metric of one worker's answer, so that the
 * aggregation keeps one series per process instead of summing (or averaging) them.
 */
function labelProcessMetrics(metrics: MetricsJson, worker: string): MetricsJson {
  return metrics.map((m) =>
    m.name.startsWith(PROCESS_METRIC_PREFIX)
      ? // 'omit' metrics (the start time) are dropped by the aggregator whatever their labels: keep them per worker too.
        { ...m, aggregator: m.aggregator === 'omit' ? 'first' : m.aggregator, values: m.values.map((v) => ({ ...v, labels: { ...v.labels, worker } })) }
      : m,
  );
}

/**
 * The primary's own metrics: its process figures, labelled `worker="primary"` (it holds no
 * sessions, but it has a memory and a CPU), and the addresses held at a per-address limit
 * over all workers.
 */
export function primaryRegistry(ledger: IpLedger): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: PROCESS_METRIC_PREFIX, labels: { worker: 'primary' } });
  new Gauge({
    name: 'mailsplice_client_addresses_at_limit',
    help: 'Client addresses at limits.connections_per_ip (limit="connections") or limits.concurrent_logins_per_ip (limit="logins"), counted over all workers',
    labelNames: ['limit'],
    registers: [registry],
    collect() {
      for (const k of ['connections', 'logins'] as const) this.set({ limit: k }, ledger.atLimit(k));
    },
  });
  return registry;
}

/**
 * The admin endpoints over the instance. `/metrics` is the sum over workers (each metric's
 * `aggregator` says otherwise where a sum would lie, e.g. min for "events live"), with the
 * per-process metrics kept per worker; a worker that does not answer is left out and counted
 * in `mailsplice_workers_unanswered`. `/healthz` is 200 while every worker answers and has
 * live route events, 503 otherwise, with each worker's state in the body.
 */
export function instanceAdminSources(asker: Asker, own?: Registry): AdminSources {
  return {
    async metrics() {
      const answers = await asker.askWorkers('metrics', null);
      const parts: MetricsJson[] = [];
      for (const a of answers) if (a.ok) parts.push(asker.clustered ? labelProcessMetrics(a.value, String(a.worker)) : a.value);
      if (own) parts.push(await own.getMetricsAsJSON());
      if (asker.clustered) parts.push(await workerCountMetrics(answers));
      const aggregated = AggregatorRegistry.aggregate(parts);
      return { contentType: aggregated.contentType, text: await aggregated.metrics() };
    },
    async health() {
      const answers = await asker.askWorkers('health', null);
      return mergeHealth(answers, asker.clustered);
    },
  };
}

function workerCountMetrics(answers: WorkerAnswer<unknown>[]): Promise<MetricsJson> {
  const r = new Registry();
  new Gauge({ name: 'mailsplice_workers', help: 'Worker processes configured', registers: [r] }).set(answers.length);
  new Gauge({
    name: 'mailsplice_workers_unanswered',
    help: 'Workers that did not answer this scrape (down, restarting or too slow): their figures are missing from the sums',
    registers: [r],
  }).set(answers.filter((a) => !a.ok).length);
  return r.getMetricsAsJSON();
}

/** The instance's health from every process's answer: healthy only when every one is. */
export function mergeHealth(answers: WorkerAnswer<ProcessHealth>[], clustered: boolean): { live: boolean; body: Record<string, unknown> } {
  if (!clustered && answers.length === 1 && answers[0]!.ok) {
    const h = answers[0]!.value;
    return { live: h.lookupLive, body: { ...h } };
  }
  let sessions = 0;
  let preauth = 0;
  let live = answers.length > 0;
  const workers = answers.map((a) => {
    if (!a.ok) {
      live = false;
      return { worker: a.worker, pid: a.pid, down: a.error };
    }
    sessions += a.value.sessions;
    preauth += a.value.preauth;
    if (!a.value.lookupLive) live = false;
    return { worker: a.worker, pid: a.pid, ...a.value };
  });
  return { live, body: { lookupLive: answers.every((a) => a.ok && a.value.lookupLive), sessions, preauth, workers } };
}

/** What runs once per instance (not per worker): the admin listener, the heartbeat record, and whatever else reads the instance through askWorkers. */
export interface InstanceSide {
  readonly admin: HttpServer | undefined;
  /** The heartbeat record's writer, once `serving()` ran (none with the routes-file lookup). */
  readonly heartbeat: Heartbeat | undefined;
  /**
   * Every serving process is up (listeners bound, workers ready): the heartbeat starts now,
   * so that its first record tells their state rather than an instance with nothing in it.
   */
  serving(): void;
  /**
   * The instance is going away: its heartbeat record goes first (a clean stop is not read as
   * a proxy that died), while the admin listener still answers until `close()`.
   */
  stopping(): Promise<void>;
  close(): Promise<void>;
}

export interface InstanceSideOptions {
  /** Metrics of this process that no worker reports (the primary's). */
  own?: Registry;
  /** Serving processes (the heartbeat record says how many). */
  workers: number;
}

/**
 * Starts the instance-wide services in the process that owns the instance: the primary with
 * workers, the only process without. They see the sessions only through `asker`.
 */
export async function startInstanceSide(cfg: Config, log: Logger, asker: Asker, opts: InstanceSideOptions): Promise<InstanceSide> {
  let admin: HttpServer | undefined;
  let heartbeat: Heartbeat | undefined;
  let closed = false;
  if (cfg.admin) {
    admin = await startAdmin(cfg.admin, {
      ...instanceAdminSources(asker, opts.own),
      ...fleetAdminSources(asker, (l) => normalizeLogin(l, cfg.lookup.default_domain)),
    });
    log.info('listening', { protocol: 'admin', address: cfg.admin.address, port: cfg.admin.port, auth: cfg.admin.token_file ? 'bearer' : 'none' });
  }
  const stopping = async (): Promise<void> => {
    closed = true;
    await heartbeat?.close();
  };
  return {
    admin,
    get heartbeat() {
      return heartbeat;
    },
    serving() {
      if (!closed && !heartbeat) heartbeat = startHeartbeat(cfg, asker, log, opts.workers);
    },
    stopping,
    async close() {
      await stopping();
      admin?.close();
    },
  };
}
