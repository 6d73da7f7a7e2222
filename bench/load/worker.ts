// Load generator, one Node process per use, driven over IPC by bench/run.ts.
//
//   logins  connect, greeting, LOGIN, LOGOUT, wait for the server's close; `concurrency`
//           lanes in parallel until `maxCount` logins were started or `maxSeconds` passed.
//   pop3-logins  the same with POP3: greeting, USER, PASS, QUIT, wait for the close.
//   fetch   `concurrency` logged-in sessions, SELECT INBOX, then FETCH 1 BODY.PEEK[] in a
//           loop until `maxCount` fetches or `maxSeconds`.
//   hold    opens `maxCount` logged-in sessions and keeps them idle; reports when they are
//           open, then timestamps every `* BYE` (process.hrtime: CLOCK_MONOTONIC, which every
//           process on the machine shares) until told to report or `maxSeconds` passes.
//
// Every mode stops by itself: the loops check their bounds, and a hard timer ends the
// process `hardStopSeconds` after it started whatever it is doing.

import { ImapClient, openSession, pop3Login } from '../lib/imap-client.js';

export interface Job {
  mode: 'logins' | 'pop3-logins' | 'fetch' | 'hold';
  host: string;
  port: number;
  users: { name: string; pass: string }[];
  concurrency: number;
  maxCount: number;
  maxSeconds: number;
  hardStopSeconds: number;
  /** Client source addresses to rotate through (more ephemeral ports, spread 4-tuples). */
  localAddresses?: string[];
}

export interface LoginResult {
  /** The generator's own CPU seconds (user+system) for the run. */
  generatorCpuSeconds: number;
  ok: number;
  failed: number;
  firstErrors: string[];
  seconds: number;
  latencyMs: { p50: number; p99: number; max: number };
}

export interface FetchResult {
  /** The generator's own CPU seconds (user+system) for the measured loop. */
  generatorCpuSeconds: number;
  fetches: number;
  bytes: number;
  failed: number;
  firstErrors: string[];
  seconds: number;
}

export interface HoldReady {
  opened: number;
  failed: number;
  firstErrors: string[];
  seconds: number;
}

export interface HoldReport {
  /** hrtime ms of every BYE received, unsorted. */
  byeTimes: number[];
  /** Sessions that closed without a BYE. */
  closedWithoutBye: number;
  /** Sessions still open when the report was asked for. */
  stillOpen: number;
}

export type WorkerMessage =
  | { type: 'loaded' }
  | { type: 'logins'; result: LoginResult }
  | { type: 'fetch'; result: FetchResult }
  | { type: 'ready'; result: HoldReady }
  | { type: 'report'; result: HoldReport }
  | { type: 'error'; message: string };

const send = (m: WorkerMessage): Promise<void> => new Promise((r) => process.send!(m, undefined, undefined, () => r()));
const hrMs = () => Number(process.hrtime.bigint()) / 1e6;
const TIMEOUT = 10_000;

function percentile(sorted: number[], p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]! : 0;
}

function noteError(list: string[], e: unknown): void {
  if (list.length < 5) list.push((e as Error).message ?? String(e));
}

/**
 * Runs `attempt` for one user after another on `job.concurrency` lanes at once, until
 * `job.maxCount` attempts have started or `job.maxSeconds` have passed since `t0`: every load
 * loop here is bounded in count and in time. Lanes take the job's local addresses in turn.
 */
async function inLanes(job: Job, t0: number, attempt: (user: Job['users'][number], local: string | undefined) => Promise<void>): Promise<void> {
  const deadline = t0 + job.maxSeconds * 1000;
  let started = 0;
  await Promise.all(
    Array.from({ length: job.concurrency }, async (_, lane) => {
      const local = job.localAddresses?.[lane % job.localAddresses.length];
      while (started < job.maxCount && performance.now() < deadline) {
        await attempt(job.users[started++ % job.users.length]!, local);
      }
    }),
  );
}

async function logins(job: Job): Promise<LoginResult> {
  const cpu0 = process.cpuUsage();
  let ok = 0;
  let failed = 0;
  const firstErrors: string[] = [];
  const latencies: number[] = [];
  const t0 = performance.now();
  await inLanes(job, t0, async (u, local) => {
    const t = performance.now();
    try {
      if (job.mode === 'pop3-logins') {
        await pop3Login(job.host, job.port, u.name, u.pass, TIMEOUT, local);
      } else {
        const c = await openSession(job.host, job.port, u.name, u.pass, TIMEOUT, local);
        await c.logout(TIMEOUT);
      }
      ok++;
      latencies.push(performance.now() - t);
    } catch (e) {
      failed++;
      noteError(firstErrors, e);
    }
  });
  const seconds = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  const r = (x: number) => Math.round(x * 100) / 100;
  const cpu = process.cpuUsage(cpu0);
  return { generatorCpuSeconds: (cpu.user + cpu.system) / 1e6, ok, failed, firstErrors, seconds, latencyMs: { p50: r(percentile(latencies, 50)), p99: r(percentile(latencies, 99)), max: r(latencies.at(-1) ?? 0) } };
}

async function fetch(job: Job): Promise<FetchResult> {
  const firstErrors: string[] = [];
  let failed = 0;
  const sessions = await Promise.all(
    Array.from({ length: job.concurrency }, async (_, i) => {
      const u = job.users[i % job.users.length]!;
      const c = await openSession(job.host, job.port, u.name, u.pass, TIMEOUT);
      await c.command('s', 'SELECT INBOX');
      await c.command('w', 'FETCH 1 BODY.PEEK[]'); // warm: Dovecot's index and page cache
      c.literalBytes = 0;
      return c;
    }),
  );
  let started = 0;
  let fetches = 0;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const deadline = t0 + job.maxSeconds * 1000;
  await Promise.all(
    sessions.map(async (c) => {
      let n = 0;
      while (started < job.maxCount && performance.now() < deadline) {
        started++;
        try {
          await c.command(`f${n++}`, 'FETCH 1 BODY.PEEK[]');
          fetches++;
        } catch (e) {
          failed++;
          noteError(firstErrors, e);
          return;
        }
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const bytes = sessions.reduce((a, c) => a + c.literalBytes, 0);
  await Promise.all(sessions.map((c) => c.logout(2000).catch(() => c.destroy())));
  return { generatorCpuSeconds: (cpu.user + cpu.system) / 1e6, fetches, bytes, failed, firstErrors, seconds };
}

async function hold(job: Job): Promise<void> {
  const byeTimes: number[] = [];
  let closedWithoutBye = 0;
  const clients = new Set<ImapClient>();
  const firstErrors: string[] = [];
  let opened = 0;
  let failed = 0;
  const t0 = performance.now();
  await inLanes(job, t0, async (u, local) => {
    try {
      const c = await openSession(job.host, job.port, u.name, u.pass, TIMEOUT, local);
      let sawBye = false;
      // An idle session gets nothing but the BYE: look for it in the raw bytes.
      c.raw((chunk) => {
        if (!sawBye && chunk.includes('* BYE')) {
          sawBye = true;
          byeTimes.push(hrMs());
        }
      });
      c.onClose = () => {
        clients.delete(c);
        if (!sawBye) closedWithoutBye++;
      };
      clients.add(c);
      opened++;
    } catch (e) {
      failed++;
      noteError(firstErrors, e);
    }
  });
  await send({ type: 'ready', result: { opened, failed, firstErrors, seconds: (performance.now() - t0) / 1000 } });
  await new Promise<void>((resolve) => {
    process.on('message', (m: { type?: string }) => {
      if (m.type === 'report') void send({ type: 'report', result: { byeTimes, closedWithoutBye, stillOpen: clients.size } });
      if (m.type === 'release') resolve();
    });
  });
  for (const c of clients) c.destroy();
}

async function main(): Promise<void> {
  // Loaded (tsx compiled us): say so, so that the bench starts its clocks with the job.
  const jobMsg = new Promise<Job>((resolve) => process.once('message', (m) => resolve(m as Job)));
  await send({ type: 'loaded' });
  const job = await jobMsg;
  // The hard stop: nothing this process does outlives it.
  setTimeout(() => {
    process.stderr.write(`bench worker (${job.mode}): hard stop after ${job.hardStopSeconds} s\n`);
    process.exit(3);
  }, job.hardStopSeconds * 1000).unref();
  process.on('disconnect', () => process.exit()); // the bench went away, or we are done
  if (job.mode === 'logins' || job.mode === 'pop3-logins') await send({ type: 'logins', result: await logins(job) });
  else if (job.mode === 'fetch') await send({ type: 'fetch', result: await fetch(job) });
  else await hold(job);
  process.disconnect();
}

main().catch(async (e: unknown) => {
  process.exitCode = 1;
  await send({ type: 'error', message: (e as Error).stack ?? String(e) });
  process.disconnect();
});
