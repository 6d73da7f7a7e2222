// Driving the load generator processes (bench/load/worker.ts) from the bench.

import type { ChildProcess } from 'node:child_process';
import type { FetchResult, HoldReady, HoldReport, Job, LoginResult, WorkerMessage } from '../load/worker.js';
import { forkTs, nextMessage, stopChild } from './procs.js';

function pick<T extends WorkerMessage['type']>(type: T) {
  return (m: unknown): Extract<WorkerMessage, { type: T }> | undefined => {
    const msg = m as WorkerMessage;
    if (msg.type === 'error') throw new Error(`load worker failed: ${msg.message}`);
    return msg.type === type ? (msg as Extract<WorkerMessage, { type: T }>) : undefined;
  };
}

/** A worker that has loaded and waits for its job (so clocks start with the job, not with tsx). */
export async function loadedWorker(): Promise<ChildProcess> {
  const c = forkTs('load/worker.ts');
  await nextMessage(c, pick('loaded'), 30_000, 'load worker start');
  return c;
}

function expect<T extends WorkerMessage['type']>(c: ChildProcess, type: T, job: Job, what: string) {
  return new Promise<Extract<WorkerMessage, { type: T }>>((resolve, reject) => {
    const onMsg = (m: unknown) => {
      try {
        const v = pick(type)(m);
        if (v) {
          cleanup();
          resolve(v);
        }
      } catch (e) {
        cleanup();
        reject(e);
      }
    };
    const onExit = (code: number | null) => {
      cleanup();
      reject(new Error(`${what}: worker exited (${code})`));
    };
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`${what}: no answer within the worker's hard stop`));
    }, (job.hardStopSeconds + 5) * 1000);
    const cleanup = () => {
      clearTimeout(timer);
      c.off('message', onMsg);
      c.off('exit', onExit);
    };
    c.on('message', onMsg);
    c.once('exit', onExit);
  });
}

/** Runs a logins job on a loaded worker; `before`/`after` bracket exactly the job. */
export async function runLogins(c: ChildProcess, job: Job): Promise<LoginResult> {
  const answer = expect(c, 'logins', job, `logins against ${job.host}:${job.port}`);
  c.send(job);
  try {
    return (await answer).result;
  } finally {
    await stopChild(c, 2000);
  }
}

export async function runFetch(c: ChildProcess, job: Job): Promise<FetchResult> {
  const answer = expect(c, 'fetch', job, `fetch against ${job.host}:${job.port}`);
  c.send(job);
  try {
    return (await answer).result;
  } finally {
    await stopChild(c, 2000);
  }
}

/** A worker holding idle sessions until released. */
export interface Holder {
  ready: HoldReady;
  report(): Promise<HoldReport>;
  release(): Promise<void>;
}

export async function hold(job: Job): Promise<Holder> {
  const c = await loadedWorker();
  const ready = expect(c, 'ready', job, `opening sessions to ${job.host}:${job.port}`);
  c.send(job);
  let r: HoldReady;
  try {
    r = (await ready).result;
  } catch (e) {
    await stopChild(c, 2000);
    throw e;
  }
  return {
    ready: r,
    async report() {
      const answer = expect(c, 'report', job, 'session report');
      c.send({ type: 'report' });
      return (await answer).result;
    },
    async release() {
      if (c.connected) c.send({ type: 'release' });
      await stopChild(c, 5000);
    },
  };
}
