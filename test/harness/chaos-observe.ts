import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { DovecotSlot } from './dovecot.js';
import { run } from './proc.js';

/** What the chaos test reads from the parts themselves: backends' sessions, proxies' health. */

/** Logged-in IMAP sessions by user, from the backend's own list (`doveadm who`, via anvil). */
export async function backendSessions(slot: DovecotSlot): Promise<Map<string, number>> {
  const out = await run('doveadm', ['-c', path.join(slot.dir, 'dovecot.conf'), 'who', '-1']);
  const byUser = new Map<string, number>();
  // One line per connection: username proto pid ip (after a header line).
  for (const line of out.split('\n').slice(1)) {
    const [user, proto] = line.trim().split(/\s+/);
    if (!user || proto !== 'imap') continue;
    byUser.set(user, (byUser.get(user) ?? 0) + 1);
  }
  return byUser;
}

export interface Health {
  status: number;
  /** Spliced sessions the proxy holds, from /healthz. */
  sessions?: number;
}

export async function healthz(adminPort: number): Promise<Health> {
  try {
    const res = await fetch(`http://127.0.0.1:${adminPort}/healthz`, { signal: AbortSignal.timeout(3000) });
    const body = (await res.json().catch(() => ({}))) as { sessions?: unknown };
    return { status: res.status, ...(typeof body.sessions === 'number' ? { sessions: body.sessions } : {}) };
  } catch {
    return { status: 0 };
  }
}

/** One metric's value (summed over its label sets) from /metrics. */
export async function metric(adminPort: number, name: string): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${adminPort}/metrics`, { signal: AbortSignal.timeout(3000) });
  const text = await res.text();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}

/** Resident set size of a process, in MiB (Linux). */
export async function rssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const kb = /^VmRSS:\s+(\d+) kB/m.exec(status);
  if (!kb) throw new Error(`no VmRSS for pid ${pid}`);
  return Math.round(Number(kb[1]) / 1024);
}

/**
 * Polls `probe` until it returns true; throws after `timeoutMs` with `what` and the last
 * `describe()`, so a failure says what was awaited and what was seen instead.
 */
export async function waitFor(what: string, probe: () => Promise<boolean> | boolean, timeoutMs: number, describe?: () => Promise<string> | string): Promise<number> {
  const t0 = Date.now();
  for (let delay = 25; ; delay = Math.min(delay * 2, 250)) {
    if (await probe()) return Date.now() - t0;
    if (Date.now() - t0 > timeoutMs) {
      const seen = describe ? `; seen: ${await describe()}` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}${seen}`);
    }
    await sleep(delay);
  }
}
