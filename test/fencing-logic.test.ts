import { describe, expect, it } from 'vitest';
import { fenceCheck, mergeFencing, type FencedRecord, type FencingState } from '../src/fleet/fencing.js';

// The pure part of fencing: how workers' answers merge into one proxy's record, and how a
// failover tool reads the records.

describe('mergeFencing', () => {
  it('takes the lowest epoch any worker applied, and adds up what they hold', () => {
    const a: FencingState = { epochs: { s1: 7, s2: 3 }, held: { s1: { slotA: { sessions: 2, lmtp: 0 } } } };
    const b: FencingState = { epochs: { s1: 6 }, held: { s1: { slotA: { sessions: 1, lmtp: 1 }, slotB: { sessions: 1, lmtp: 0 } } } };
    expect(mergeFencing([a, b])).toEqual({
      epochs: { s1: 6, s2: 3 },
      held: { s1: { slotA: { sessions: 3, lmtp: 1 }, slotB: { sessions: 1, lmtp: 0 } } },
    });
    expect(mergeFencing([])).toEqual({ epochs: {}, held: {} });
  });

  it('stays partial when any part is (a worker that did not answer)', () => {
    const a: FencingState = { epochs: { s1: 8 }, held: {} };
    expect(mergeFencing([a, { epochs: { s1: 8 }, held: {}, partial: true }]).partial).toBe(true);
    expect(mergeFencing([a, a]).partial).toBeUndefined();
  });
});

describe('fenceCheck', () => {
  const rec = (id: string, epoch: number | undefined, held?: { sessions: number; lmtp: number }): FencedRecord => {
    const fencing: FencingState = { epochs: {}, held: {} };
    if (epoch !== undefined) fencing.epochs.s1 = epoch;
    if (held) fencing.held.s1 = { slotA: held };
    return { id, fencing };
  };

  it('is done when every live proxy applied the epoch and holds nothing on the master', () => {
    const r = fenceCheck([rec('p1', 8), rec('p2', 9, { sessions: 0, lmtp: 0 })], 's1', 'slotA', 8);
    expect(r).toEqual({ done: true, clear: ['p1', 'p2'], lagging: [] });
  });

  it('names the proxies that lag: an older epoch, none, sessions or a transaction left, no fencing data', () => {
    const r = fenceCheck(
      [rec('old', 7), rec('unread', undefined), rec('sessions', 8, { sessions: 2, lmtp: 0 }), rec('lmtp', 8, { sessions: 0, lmtp: 1 }), { id: 'v1' }, rec('ok', 8)],
      's1',
      'slotA',
      8,
    );
    expect(r.done).toBe(false);
    expect(r.clear).toEqual(['ok']);
    expect(r.lagging).toEqual([
      { id: 'old', epoch: 7, sessions: 0, lmtp: 0 },
      { id: 'unread', epoch: undefined, sessions: 0, lmtp: 0 },
      { id: 'sessions', epoch: 8, sessions: 2, lmtp: 0 },
      { id: 'lmtp', epoch: 8, sessions: 0, lmtp: 1 },
      { id: 'v1', epoch: undefined, sessions: 0, lmtp: 0 },
    ]);
  });

  it('never counts a partial record clear, however clean it looks', () => {
    const r = fenceCheck([{ id: 'p', fencing: { epochs: { s1: 8 }, held: {}, partial: true } }], 's1', 'slotA', 8);
    expect(r).toEqual({ done: false, clear: [], lagging: [{ id: 'p', epoch: 8, sessions: 0, lmtp: 0 }] });
  });

  it('counts only the master: sessions of the store on another slot do not hold it up', () => {
    const r = fenceCheck([{ id: 'p', fencing: { epochs: { s1: 8 }, held: { s1: { slotB: { sessions: 5, lmtp: 2 } } } } }], 's1', 'slotA', 8);
    expect(r.done).toBe(true);
  });
});
