// `ctl lock store S --wait` and the wait inside `ctl failover`: after the lock is written,
// wait until every live proxy says (in its heartbeat record) that it applied the lock's
// epoch and holds nothing on the store's master any more. A proxy whose heartbeat stopped
// is reported, not waited for: it may be dead, or frozen with sessions (SIGSTOP, a hung
// host), and only the operator can tell which.

import { setTimeout as sleep } from 'node:timers/promises';
import { fenceCheck, type FenceReport, type FencedRecord } from '../fleet/fencing.js';

/** What the wait reads: the live proxies' records, and those whose heartbeat stopped. */
export interface FenceSource {
  proxies(): Promise<FencedRecord[]>;
  /** Proxies in the index whose record expired: heartbeat stopped `agoMs` ago. */
  stopped(): Promise<{ id: string; agoMs: number }[]>;
}

export interface FenceWait {
  store: string;
  master: string;
  epoch: number;
  /** Every live proxy confirmed (and none stopped): the old master is free. */
  done: boolean;
  waitedMs: number;
  clear: string[];
  lagging: FenceReport[];
  stopped: { id: string; agoMs: number }[];
}

/** Polls until every live proxy is clear, or `timeoutMs` is over; never throws on lag. */
export async function waitForFence(
  source: FenceSource,
  target: { store: string; master: string; epoch: number },
  timeoutMs: number,
  /** Told what is waited for, each time that changes (progress for the operator). */
  onWait: (lagging: FenceReport[]) => void = () => undefined,
  pollMs = 200,
): Promise<FenceWait> {
  const t0 = Date.now();
  let said = '';
  for (;;) {
    const [records, stopped] = await Promise.all([source.proxies(), source.stopped()]);
    const r = fenceCheck(records, target.store, target.master, target.epoch);
    const now = JSON.stringify(r.lagging);
    if (r.lagging.length > 0 && now !== said) onWait(r.lagging);
    said = now;
    const waitedMs = Date.now() - t0;
    if (r.done || waitedMs >= timeoutMs) {
      return { ...target, done: r.done && stopped.length === 0, waitedMs, clear: r.clear, lagging: r.lagging, stopped };
    }
    await sleep(Math.min(pollMs, Math.max(0, timeoutMs - waitedMs)));
  }
}

/** Why one proxy is not clear yet, in words. */
export function lagReason(l: FenceReport, w: { epoch: number; master: string }): string {
  const why = [
    l.epoch === undefined ? 'has not applied the lock' : l.epoch < w.epoch ? `at epoch ${l.epoch} < ${w.epoch}` : '',
    l.sessions > 0 ? `${l.sessions} session(s) on ${w.master}` : '',
    l.lmtp > 0 ? `${l.lmtp} LMTP transaction(s) on ${w.master}` : '',
  ].filter(Boolean);
  return `${l.id}: ${why.join(', ') || 'no fencing data (an older mailsplice, or a worker that did not answer)'}`;
}

/** Lines for an operator: who lagged and why, who stopped beating. */
export function describeFence(w: FenceWait): string[] {
  const lines = [
    w.done
      ? `fence: every live proxy (${w.clear.length}) applied epoch ${w.epoch} of ${w.store} and holds nothing on ${w.master} (waited ${w.waitedMs} ms)`
      : `fence NOT complete after ${w.waitedMs} ms: ${w.master} (old master of ${w.store}) may still be in use`,
  ];
  for (const l of w.lagging) lines.push(`  lagging: ${lagReason(l, w)}`);
  for (const s of w.stopped) lines.push(`  heartbeat stopped: ${s.id} (last beat ${Math.round(s.agoMs / 1000)} s ago; dead, or frozen with sessions: check it)`);
  return lines;
}

/** `--wait` alone, or `--wait=SECONDS`: parseArgs has no optional values, so ctl spells the bare one out. */
export const DEFAULT_WAIT_S = 60;

export function waitSeconds(v: string | boolean | undefined): number | undefined {
  if (v === undefined || v === false) return undefined;
  if (v === true || v === '') return DEFAULT_WAIT_S;
  const n = Number(v);
  if (!/^\d+(\.\d+)?$/.test(v) || n <= 0) throw new Error(`bad --wait value ${JSON.stringify(v)} (seconds, e.g. --wait=30)`);
  return n;
}
