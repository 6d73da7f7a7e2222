// The results document (bench/results/latest.json) and its human summary (latest.md, stdout).

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface LoginFigure {
  target: string;
  /** imap (LOGIN, LOGOUT) or pop3 (USER, PASS, QUIT); absent in older results: imap. */
  protocol?: 'imap' | 'pop3';
  round: number;
  /** Connections the generator kept busy at once. */
  concurrency: number;
  logins: number;
  failed: number;
  seconds: number;
  perSecond: number;
  latencyMs: { p50: number; p99: number; max: number };
  /** CPU time (user+system) per successful login, microseconds, per process (group). */
  cpuMicrosecondsPerLogin: Record<string, number>;
  /** CPU seconds per wall second of the proxy's processes (1.0 = one core busy). */
  proxyCpuUtilization: number;
  /** Share of the proxy's CPU time spent in the kernel (system time). */
  proxySystemShare: number;
  /** Share of both cores busy during the run (1.0 = saturated). */
  machineBusy: number;
  errors?: string[];
}

export interface FetchFigure {
  target: string;
  round: number;
  fetches: number;
  failed: number;
  seconds: number;
  mibPerSecond: number;
  proxyCpuSecondsPerGiB: number;
  dovecotCpuSecondsPerGiB: number;
  generatorCpuSecondsPerGiB: number;
  machineBusy: number;
  errors?: string[];
}

export interface IdleFigure {
  target: string;
  sessions: number;
  failed: number;
  rssBeforeMiB: number;
  rssAfterMiB: number;
  /** (RSS after - RSS before) / sessions: the figure held against the target. */
  bytesPerSession: number;
  /** RSS growth over the second half of the sessions only (excludes one-off growth). */
  marginalBytesPerSession: number;
  heapUsedBytesPerSession?: number;
}

export interface FailoverFigure {
  sessions: number;
  failedToOpen: number;
  openSeconds: number;
  proxies: number;
  proxyRssMiB: number[];
  byes: number;
  closedWithoutBye: number;
  stillOpen: number;
  /** Time the MULTI/EXEC (write + PUBLISH) took to answer. */
  execMs: number;
  firstByeMs: number | undefined;
  p50ByeMs: number | undefined;
  p99ByeMs: number | undefined;
  /** From just before the MULTI/EXEC to the last `* BYE` any client received. */
  lastByeMs: number | undefined;
  sessionsEndedPerSecond: number | undefined;
  proxyCpuMs: number[];
}

export interface ScaleFigure {
  /** Sessions asked for, held (opened), and registered by the proxy before the event. */
  sessions: number;
  held: number;
  registered: number;
  failedToOpen: number;
  openSeconds: number;
  workers: number;
  /** RSS of the primary and every worker, summed, with every session held. */
  rssMiB: number;
  /** Sessions of the store that failed over (its BYEs are the figure). */
  storeSessions: number;
  byes: number;
  closedWithoutBye: number;
  stillOpen: number;
  /** BYEs or closes seen by sessions of the other stores (must be 0). */
  otherStoresLost: number;
  firstByeMs: number | undefined;
  p50ByeMs: number | undefined;
  lastByeMs: number | undefined;
  /** CPU of the whole instance from the event to the last BYE (and the polling after it). */
  proxyCpuMs: number;
}

export interface Verdict {
  value: number;
  target: string;
  met: boolean;
}

export interface Results {
  date: string;
  command: string;
  machine: Record<string, unknown>;
  settings: Record<string, unknown>;
  targets: Record<string, number>;
  bar: Record<string, number>;
  logins: LoginFigure[];
  fetch: FetchFigure[];
  idle: IdleFigure[];
  failover: FailoverFigure | undefined;
  scale?: ScaleFigure | undefined;
  ratios: Record<string, number>;
  pass: Partial<Record<'logins' | 'pop3' | 'fetch' | 'fetchCpu' | 'idle' | 'failover' | 'scale' | 'workersAheadOfNginx', Verdict>>;
  notes: string[];
}

function bestBy<T>(list: T[], key: (x: T) => number): T | undefined {
  return list.reduce<T | undefined>((b, x) => (b === undefined || key(x) > key(b) ? x : b), undefined);
}

const TARGET_NAMES = ['direct', 'mailsplice', 'mailsplice-auto', 'nginx-w1', 'nginx-auto', 'dovecot-proxy'];
const COLUMN: Record<string, string> = {
  direct: 'direct',
  mailsplice: 'mailsplice (1 worker)',
  'mailsplice-auto': 'mailsplice (auto)',
  'nginx-w1': 'nginx (1 worker)',
  'nginx-auto': 'nginx (auto)',
  'dovecot-proxy': 'Dovecot proxy',
};

/** The proxy's own CPU per login from a login figure (every process but Dovecot and the generator). */
export function proxyMicroseconds(f: LoginFigure): number {
  return Object.entries(f.cpuMicrosecondsPerLogin).reduce((a, [k, v]) => (k === 'dovecot' || k === 'generator' ? a : a + v), 0);
}

/** Best figure per target: logins of one protocol at one concurrency, or fetches. */
export function bestLogin(r: Results, target: string, protocol: 'imap' | 'pop3', concurrency: number): LoginFigure | undefined {
  return bestBy(r.logins.filter((x) => x.target === target && (x.protocol ?? 'imap') === protocol && x.concurrency === concurrency), (x) => x.perSecond);
}
export function bestFetch(r: Results, target: string): FetchFigure | undefined {
  return bestBy(r.fetch.filter((x) => x.target === target), (x) => x.mibPerSecond);
}

export function summaryMarkdown(r: Results): string {
  const out: string[] = [];
  const m = r.machine;
  out.push(`# mailsplice bench, ${r.date}`, '');
  out.push(`\`${r.command}\``, '');
  out.push(`Machine: ${m.cpu} x${m.cpus}, ${m.memoryGiB} GiB, Linux ${m.kernel}; node ${m.node}; dovecot ${m.dovecot}; ${m.nginx}; ${m.redis}; load average before ${JSON.stringify(m.loadAverageBefore)}.`, '');
  const yes = (v: { met: boolean } | undefined) => (v === undefined ? 'not run' : v.met ? 'MET' : 'MISSED');
  const idleOf = (t: string) => r.idle.find((x) => x.target === t);
  const kib = (b: number | undefined) => (b === undefined ? '-' : `${(b / 1024).toFixed(1)} KiB`);
  out.push('## Summary (ratios to direct; figures in brackets)', '');
  const cols = TARGET_NAMES.filter((t) => r.logins.some((x) => x.target === t) || r.fetch.some((x) => x.target === t) || r.idle.some((x) => x.target === t));
  const busyN = r.settings.concurrency as number;
  out.push(`| figure | ${cols.map((c) => COLUMN[c]).join(' | ')} | target | |`);
  out.push(`| --- | ${cols.map(() => '---:').join(' | ')} | --- | --- |`);
  const cell = (t: string, v: number | undefined, direct: number | undefined, unit: string) =>
    v === undefined ? '-' : t === 'direct' || direct === undefined ? `${v} ${unit}` : `${(v / direct).toFixed(2)}x (${v})`;
  const row = (label: string, value: (t: string) => number | undefined, unit: string, target = '', verdict = '') => {
    const d = value('direct');
    out.push(`| ${label} | ${cols.map((t) => cell(t, value(t), d, unit)).join(' | ')} | ${target} | ${verdict} |`);
  };
  const abs = (label: string, value: (t: string) => string | undefined, target = '', verdict = '') =>
    out.push(`| ${label} | ${cols.map((t) => value(t) ?? '-').join(' | ')} | ${target} | ${verdict} |`);
  row(`IMAP logins/s (${busyN} at once)`, (t) => bestLogin(r, t, 'imap', busyN)?.perSecond, '/s', `>= ${r.targets.loginsRatio}x`, yes(r.pass.logins));
  row('IMAP logins/s (one at a time)', (t) => bestLogin(r, t, 'imap', 1)?.perSecond, '/s');
  row(`POP3 logins/s (${busyN} at once)`, (t) => bestLogin(r, t, 'pop3', busyN)?.perSecond, '/s', `>= ${r.targets.pop3Ratio}x`, yes(r.pass.pop3));
  row('FETCH 1 MiB, MiB/s', (t) => bestFetch(r, t)?.mibPerSecond, 'MiB/s', `>= ${r.targets.fetchRatio}x`, yes(r.pass.fetch));
  abs('proxy CPU per IMAP login', (t) => (t === 'direct' ? undefined : ((f) => (f ? `${proxyMicroseconds(f).toFixed(0)} us` : undefined))(bestLogin(r, t, 'imap', busyN))));
  abs('proxy CPU per POP3 login', (t) => (t === 'direct' ? undefined : ((f) => (f ? `${proxyMicroseconds(f).toFixed(0)} us` : undefined))(bestLogin(r, t, 'pop3', busyN))));
  abs('proxy CPU per GiB fetched', (t) => (t === 'direct' ? undefined : ((f) => (f ? `${f.proxyCpuSecondsPerGiB} s` : undefined))(bestFetch(r, t))), "<= Dovecot proxy's", yes(r.pass.fetchCpu));
  abs('idle session RSS, marginal (second half)', (t) => kib(idleOf(t)?.marginalBytesPerSession), `<= ${kib(r.targets.idleBytes)}`, yes(r.pass.idle));
  abs('idle session RSS (growth / all sessions)', (t) => kib(idleOf(t)?.bytesPerSession));
  const fo = r.failover;
  abs('failover: publish -> last BYE', (t) => (t === 'mailsplice' && fo ? `${fo.lastByeMs} ms (${fo.byes}/${fo.sessions})` : undefined), `<= ${r.targets.failoverMs} ms`, yes(r.pass.failover));
  const sc = r.scale;
  abs(`${sc?.sessions ?? ''} idle sessions, a store's failover: publish -> last BYE`, (t) => (t === 'mailsplice-auto' && sc ? `${sc.lastByeMs} ms (${sc.byes}/${sc.storeSessions}; ${sc.held} held)` : undefined), `<= ${r.targets.failoverMs} ms`, yes(r.pass.scale));
  if (r.pass.workersAheadOfNginx) out.push('', `mailsplice (auto) ahead of nginx (auto) on every figure: **${yes(r.pass.workersAheadOfNginx)}** (${r.pass.workersAheadOfNginx.target})`);
  out.push('');

  const busy = r.settings.concurrency as number;
  const imapLogins = r.logins.filter((x) => (x.protocol ?? 'imap') === 'imap');
  const loaded = imapLogins.filter((x) => x.concurrency === busy);
  const single = imapLogins.filter((x) => x.concurrency === 1);
  const pop3 = r.logins.filter((x) => x.protocol === 'pop3');
  if (loaded.length) {
    out.push(`## 1. IMAP logins/s (connect, greeting, LOGIN, LOGOUT, close; ${busy} connections at once)`, '');
    out.push('| target | logins/s (best) | vs direct | p50 ms | p99 ms | proxy CPU us/login | Dovecot CPU us/login | machine busy |');
    out.push('| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |');
    for (const t of TARGET_NAMES) {
      const b = bestBy(loaded.filter((x) => x.target === t), (x) => x.perSecond);
      if (!b) continue;
      const { dovecot, generator: _g, ...proxy } = b.cpuMicrosecondsPerLogin;
      const ratio = t === 'direct' ? '1.00' : (r.ratios[`logins ${t}`]?.toFixed(2) ?? '');
      const cpu = Object.entries(proxy).map(([k, v]) => `${k} ${v}`).join(', ') || '-';
      out.push(`| ${t} | ${b.perSecond} | ${ratio} | ${b.latencyMs.p50} | ${b.latencyMs.p99} | ${cpu} | ${dovecot} | ${b.machineBusy} |`);
    }
    out.push('', `Target: mailsplice >= ${r.targets.loginsRatio}x direct: **${yes(r.pass.logins)}**`, '');
  }
  if (pop3.length) {
    out.push(`### 1c. POP3 logins/s (connect, greeting, USER, PASS, QUIT, close; ${busy} connections at once)`, '');
    out.push('| target | logins/s (best) | vs direct | p50 ms | p99 ms | proxy CPU us/login | Dovecot CPU us/login | machine busy |');
    out.push('| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |');
    for (const t of TARGET_NAMES) {
      const b = bestBy(pop3.filter((x) => x.target === t), (x) => x.perSecond);
      if (!b) continue;
      const { dovecot, generator: _g, ...proxy } = b.cpuMicrosecondsPerLogin;
      const ratio = t === 'direct' ? '1.00' : (r.ratios[`pop3 ${t}`]?.toFixed(2) ?? '');
      const cpu = Object.entries(proxy).map(([k, v]) => `${k} ${v}`).join(', ') || '-';
      out.push(`| ${t} | ${b.perSecond} | ${ratio} | ${b.latencyMs.p50} | ${b.latencyMs.p99} | ${cpu} | ${dovecot} | ${b.machineBusy} |`);
    }
    out.push('', `Target: mailsplice >= ${r.targets.pop3Ratio}x direct: **${yes(r.pass.pop3)}**`, '');
  }
  if (single.length) {
    out.push('### 1b. One connection at a time (not CPU-bound: the time a proxy adds to a login)', '');
    out.push('| target | logins/s | vs direct | p50 ms | p99 ms |');
    out.push('| --- | ---: | ---: | ---: | ---: |');
    for (const t of TARGET_NAMES) {
      const b = bestBy(single.filter((x) => x.target === t), (x) => x.perSecond);
      if (!b) continue;
      const ratio = t === 'direct' ? '1.00' : (r.ratios[`logins x1 ${t}`]?.toFixed(2) ?? '');
      out.push(`| ${t} | ${b.perSecond} | ${ratio} | ${b.latencyMs.p50} | ${b.latencyMs.p99} |`);
    }
    out.push('');
  }
  if (r.fetch.length) {
    out.push('## 2. FETCH 1 MiB throughput', '');
    out.push('| target | MiB/s (best) | vs direct | proxy CPU s/GiB | Dovecot CPU s/GiB | client CPU s/GiB | machine busy |');
    out.push('| --- | ---: | ---: | ---: | ---: | ---: | ---: |');
    for (const t of TARGET_NAMES) {
      const b = bestBy(r.fetch.filter((x) => x.target === t), (x) => x.mibPerSecond);
      if (!b) continue;
      const ratio = t === 'direct' ? '1.00' : (r.ratios[`fetch ${t}`]?.toFixed(2) ?? '');
      out.push(`| ${t} | ${b.mibPerSecond} | ${ratio} | ${t === 'direct' ? '-' : b.proxyCpuSecondsPerGiB} | ${b.dovecotCpuSecondsPerGiB} | ${b.generatorCpuSecondsPerGiB} | ${b.machineBusy} |`);
    }
    out.push('', `Target: mailsplice >= ${r.targets.fetchRatio}x direct: **${yes(r.pass.fetch)}**; proxy CPU per GiB no higher than Dovecot's proxy's: **${yes(r.pass.fetchCpu)}**`, '');
  }
  if (r.idle.length) {
    out.push('## 3. Idle session memory (proxy RSS growth / sessions)', '');
    out.push('| proxy | sessions | RSS before -> after MiB | bytes/session | marginal bytes/session | JS heap used bytes/session |');
    out.push('| --- | ---: | --- | ---: | ---: | ---: |');
    for (const x of r.idle) {
      out.push(`| ${x.target} | ${x.sessions} | ${x.rssBeforeMiB} -> ${x.rssAfterMiB} | ${x.bytesPerSession} (${(x.bytesPerSession / 1024).toFixed(1)} KiB) | ${x.marginalBytesPerSession} | ${x.heapUsedBytesPerSession ?? '-'} |`);
    }
    out.push('', `Target: mailsplice <= ${(r.targets.idleBytes! / 1024).toFixed(0)} KiB/session, marginal: **${yes(r.pass.idle)}**`, '');
  }
  const f = r.failover;
  if (f) {
    out.push('## 4. Failover: one store\'s sessions ended by one event', '');
    out.push(`${f.sessions} sessions (${f.failedToOpen} failed to open, opened in ${f.openSeconds} s) over ${f.proxies} mailsplice processes (RSS ${f.proxyRssMiB.join(', ')} MiB) on one Redis.`, '');
    out.push('| publish -> first BYE | p50 | p99 | last BYE | BYEs | closed without BYE | still open | sessions ended/s | proxy CPU ms |');
    out.push('| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |');
    out.push(`| ${f.firstByeMs} ms | ${f.p50ByeMs} ms | ${f.p99ByeMs} ms | ${f.lastByeMs} ms | ${f.byes} | ${f.closedWithoutBye} | ${f.stillOpen} | ${f.sessionsEndedPerSecond} | ${f.proxyCpuMs.join(', ')} |`);
    out.push('', `Target: ${r.pass.failover?.target}: **${yes(r.pass.failover)}**`, '');
  }
  if (sc) {
    out.push(`## 5. Scale: ${sc.sessions} idle IMAP sessions on one instance (${sc.workers} workers), one store's failover`, '');
    out.push(`${sc.held} sessions held (${sc.failedToOpen} failed to open, opened in ${sc.openSeconds} s), ${sc.registered} registered; RSS of the instance ${sc.rssMiB} MiB.`, '');
    out.push('| store sessions | publish -> first BYE | p50 | last BYE | BYEs | closed without BYE | still open | other stores lost | instance CPU ms |');
    out.push('| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
    out.push(`| ${sc.storeSessions} | ${sc.firstByeMs} ms | ${sc.p50ByeMs} ms | ${sc.lastByeMs} ms | ${sc.byes} | ${sc.closedWithoutBye} | ${sc.stillOpen} | ${sc.otherStoresLost} | ${sc.proxyCpuMs} |`);
    out.push('', `Target: ${r.pass.scale?.target}: **${yes(r.pass.scale)}**`, '');
  }
  if (r.notes.length) out.push('## Notes', '', ...r.notes.map((n) => `- ${n}`), '');
  return out.join('\n');
}

export function writeReport(r: Results, dir: string, name = 'latest'): void {
  writeFileSync(join(dir, `${name}.json`), `${JSON.stringify(r, null, 2)}\n`);
  const md = summaryMarkdown(r);
  writeFileSync(join(dir, `${name}.md`), md);
  process.stdout.write(`\n${md}\n`);
}
