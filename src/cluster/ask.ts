import type { Worker } from 'node:cluster';
import type { IpDeltas, IpDenials } from './ip-limits.js';

/**
 * Questions the primary (or the admin code of a one-process proxy) asks every worker, by
 * name: the argument's and the answer's type. A module that answers a question declares it
 * here by declaration merging, next to its handler:
 *
 *     declare module '../cluster/ask.js' {
 *       interface Asks { sessions: { arg: SessionFilter; answer: SessionInfo[] } }
 *     }
 *
 * Arguments and answers cross a process boundary as JSON (the cluster IPC's serialisation,
 * about twice as cheap as the structured clone): plain objects, arrays, strings, numbers,
 * booleans and null; `undefined` fields vanish, and no Maps, Dates or class instances.
 */
// eslint-disable-next-line @typescript-eslint/no-empty-interface
export interface Asks {}

export type AskName = keyof Asks & string;
export type AskArg<K extends AskName> = Asks[K] extends { arg: infer A } ? A : never;
export type AskAnswer<K extends AskName> = Asks[K] extends { answer: infer R } ? R : never;
export type AskHandler<K extends AskName> = (arg: AskArg<K>) => AskAnswer<K> | Promise<AskAnswer<K>>;

/**
 * One worker's answer. `worker` is the worker's number (1..N, kept across restarts; 0 for a
 * proxy that runs in one process); a worker that is down, restarting, too slow or failing
 * is named with the reason instead of being waited for.
 */
export type WorkerAnswer<T> = { worker: number; pid: number; ok: true; value: T } | { worker: number; pid: number | undefined; ok: false; error: string };

export interface AskOptions {
  /** How long to wait for each worker's answer (default 2000 ms). */
  timeoutMs?: number;
}

/** Where a process registers the questions it answers. */
export interface Answerer {
  onAsk<K extends AskName>(name: K, handler: AskHandler<K>): void;
}

/** What the admin side asks through: one answer per worker, never hung on a dead or slow one. */
export interface Asker {
  askWorkers<K extends AskName>(name: K, arg: AskArg<K>, opts?: AskOptions): Promise<WorkerAnswer<AskAnswer<K>>[]>;
  /** True when the answers come from worker processes (metrics then label per-process figures by worker). */
  readonly clustered: boolean;
}

export const DEFAULT_ASK_TIMEOUT_MS = 2000;

type AnyHandler = (arg: unknown) => unknown;

/** The handlers one process registered, and how to run one of them for an answer. */
class Handlers {
  private readonly byName = new Map<string, AnyHandler>();

  set(name: string, handler: AnyHandler): void {
    if (this.byName.has(name)) throw new Error(`a handler for "${name}" is already registered`);
    this.byName.set(name, handler);
  }

  async run(name: string, arg: unknown): Promise<{ ok: true; value: unknown } | { ok: false; error: string }> {
    const h = this.byName.get(name);
    if (!h) return { ok: false, error: `no handler for "${name}"` };
    try {
      return { ok: true, value: await h(arg) };
    } catch (e) {
      return { ok: false, error: e instanceof Error ? e.message : String(e) };
    }
  }
}

/** One process is the whole instance: questions are answered by its own handlers, no IPC. */
export class LocalAsks implements Answerer, Asker {
  readonly clustered = false;
  private readonly handlers = new Handlers();

  onAsk<K extends AskName>(name: K, handler: AskHandler<K>): void {
    this.handlers.set(name, handler as AnyHandler);
  }

  async askWorkers<K extends AskName>(name: K, arg: AskArg<K>): Promise<WorkerAnswer<AskAnswer<K>>[]> {
    const r = await this.handlers.run(name, arg);
    return [r.ok ? { worker: 0, pid: process.pid, ok: true, value: r.value as AskAnswer<K> } : { worker: 0, pid: process.pid, ok: false, error: r.error }];
  }
}

// ---- The messages between primary and workers (over the cluster's IPC channel). ----

/** primary -> worker */
/** `reload` carries the config file as the primary read and checked it again (SIGHUP); without it, only certificates and files are re-read. */
export type ToWorker = { ms: 'ask'; id: number; name: string; arg: unknown } | { ms: 'reload'; config?: unknown } | { ms: 'close' } | { ms: 'ip'; d: IpDenials };
/** worker -> primary */
export type ToPrimary =
  | { ms: 'answer'; id: number; ok: true; value: unknown }
  | { ms: 'answer'; id: number; ok: false; error: string }
  | { ms: 'ready' }
  | { ms: 'failed'; error: string }
  | { ms: 'ip'; d: IpDeltas };

const isObject = (m: unknown): m is Record<string, unknown> => typeof m === 'object' && m !== null;

export function toWorker(m: unknown): ToWorker | undefined {
  if (!isObject(m)) return undefined;
  if (m.ms === 'ask' && typeof m.id === 'number' && typeof m.name === 'string') return { ms: 'ask', id: m.id, name: m.name, arg: m.arg };
  if (m.ms === 'reload') return m.config === undefined ? { ms: 'reload' } : { ms: 'reload', config: m.config };
  if (m.ms === 'close') return { ms: m.ms };
  if (m.ms === 'ip' && isObject(m.d) && isObject(m.d.deny) && isObject(m.d.allow)) {
    const d = m.d as unknown as IpDenials;
    const lists = [d.deny.connections, d.deny.logins, d.allow.connections, d.allow.logins];
    if (lists.every((l) => Array.isArray(l) && l.every((ip) => typeof ip === 'string'))) return { ms: 'ip', d: { full: d.full === true, deny: d.deny, allow: d.allow } };
  }
  return undefined;
}

export function toPrimary(m: unknown): ToPrimary | undefined {
  if (!isObject(m)) return undefined;
  if (m.ms === 'answer' && typeof m.id === 'number') {
    return m.ok === true ? { ms: 'answer', id: m.id, ok: true, value: m.value } : { ms: 'answer', id: m.id, ok: false, error: String(m.error) };
  }
  if (m.ms === 'ready') return { ms: 'ready' };
  if (m.ms === 'failed') return { ms: 'failed', error: String(m.error) };
  if (m.ms === 'ip' && isObject(m.d) && Array.isArray(m.d.connections) && Array.isArray(m.d.logins)) {
    return { ms: 'ip', d: { connections: m.d.connections as [string, number][], logins: m.d.logins as [string, number][] } };
  }
  return undefined;
}

/** In a worker process: answers the primary's questions with this process's handlers. */
export class WorkerAsks implements Answerer {
  private readonly handlers = new Handlers();

  constructor(private readonly send: (m: ToPrimary) => void) {}

  onAsk<K extends AskName>(name: K, handler: AskHandler<K>): void {
    this.handlers.set(name, handler as AnyHandler);
  }

  /** Called for each 'ask' message from the primary. */
  async answer(m: Extract<ToWorker, { ms: 'ask' }>): Promise<void> {
    const r = await this.handlers.run(m.name, m.arg);
    try {
      this.send({ ms: 'answer', id: m.id, ...r });
    } catch (e) {
      // An answer that cannot be serialised still gets one, so the primary does not wait for it.
      this.send({ ms: 'answer', id: m.id, ok: false, error: `answer not sendable: ${(e as Error).message}` });
    }
  }
}

/** A worker as the primary sees it: its number, and its process while one runs and is ready. */
export interface WorkerSlot {
  readonly index: number;
  /** The running process, once it said it is ready; undefined while (re)starting. */
  worker: Worker | undefined;
  /** Why there is no ready process, for answers naming it. */
  state: string;
}

interface Pending {
  slot: WorkerSlot;
  worker: Worker;
  settle(a: WorkerAnswer<unknown>): void;
}

/**
 * In the primary: sends a question to every ready worker and collects one answer per worker
 * slot. A slot without a ready process, a worker that exits, and one that does not answer in
 * time each yield an error answer naming it.
 */
export class PrimaryAsks implements Asker {
  readonly clustered = true;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();

  constructor(private readonly slots: readonly WorkerSlot[]) {}

  askWorkers<K extends AskName>(name: K, arg: AskArg<K>, opts: AskOptions = {}): Promise<WorkerAnswer<AskAnswer<K>>[]> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_ASK_TIMEOUT_MS;
    return Promise.all(this.slots.map((slot) => this.askOne(slot, name, arg, timeoutMs) as Promise<WorkerAnswer<AskAnswer<K>>>));
  }

  private askOne(slot: WorkerSlot, name: string, arg: unknown, timeoutMs: number): Promise<WorkerAnswer<unknown>> {
    const worker = slot.worker;
    if (!worker || !worker.isConnected()) return Promise.resolve({ worker: slot.index, pid: worker?.process.pid, ok: false, error: slot.state });
    const id = this.nextId++;
    const pid = worker.process.pid;
    return new Promise((resolve) => {
      const timer = setTimeout(() => settle({ worker: slot.index, pid, ok: false, error: `no answer in ${timeoutMs} ms` }), timeoutMs);
      const settle = (a: WorkerAnswer<unknown>) => {
        if (!this.pending.delete(id)) return;
        clearTimeout(timer);
        resolve(a);
      };
      this.pending.set(id, { slot, worker, settle });
      const msg: ToWorker = { ms: 'ask', id, name, arg };
      try {
        worker.send(msg, (e: Error | null) => {
          if (e) settle({ worker: slot.index, pid, ok: false, error: `not sent: ${e.message}` });
        });
      } catch (e) {
        settle({ worker: slot.index, pid, ok: false, error: `not sent: ${(e as Error).message}` });
      }
    });
  }

  /** An 'answer' message from a worker. */
  answered(from: Worker, m: Extract<ToPrimary, { ms: 'answer' }>): void {
    const p = this.pending.get(m.id);
    if (!p || p.worker !== from) return;
    const pid = from.process.pid;
    p.settle(m.ok ? { worker: p.slot.index, pid: pid ?? 0, ok: true, value: m.value } : { worker: p.slot.index, pid, ok: false, error: m.error });
  }

  /** A worker exited: whatever it was asked is answered for it. */
  exited(worker: Worker, why: string): void {
    for (const p of [...this.pending.values()]) {
      if (p.worker === worker) p.settle({ worker: p.slot.index, pid: worker.process.pid, ok: false, error: why });
    }
  }
}
