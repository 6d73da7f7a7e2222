import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DatError, formatStoreLine, parseProductionDat, slotId } from '../src/lookup/proddat.js';
import { swapReplicas } from '../src/ctl/ops.js';

describe('production.dat', () => {
  it('reads the seed lines as the seed explains them', () => {
    const l = parseProductionDat('i30 30 t15 0 1000 e 10.202.80.1\nstore23 n 0 90 sloti30t01 sloti15t03 slotti5t02 slotsi2d2t01\n');
    expect(l.slots).toHaveLength(15);
    expect(l.slots[0]).toEqual({ id: 'sloti30t01', host: '10.202.80.1', line: 1 });
    expect(l.slots[14]).toEqual({ id: 'sloti30t15', host: '10.202.80.15', line: 1 });
    expect(l.stores).toEqual([
      { id: 'store23', location: 'n', branch: '0', diskTarget: '90', slots: ['sloti30t01', 'sloti15t03', 'slotti5t02', 'slotsi2d2t01'], line: 2 },
    ]);
    const future = parseProductionDat('store254 n future 0 sloti30t15 sloti29t15 slotti1t06 slotsi1d2t40').stores[0];
    expect(future).toMatchObject({ branch: 'future', diskTarget: '0', slots: ['sloti30t15', 'sloti29t15', 'slotti1t06', 'slotsi1d2t40'] });
  });

  it('reads the test fixture', () => {
    const l = parseProductionDat(readFileSync(resolve(import.meta.dirname, 'fixtures/production.dat'), 'utf8'));
    expect(l.slots.map((s) => `${s.id}=${s.host}`)).toEqual([
      'sloti1t01=127.0.0.31',
      'sloti1t02=127.0.0.32',
      'sloti1t03=127.0.0.33',
      'sloti1t04=127.0.0.34',
      'sloti2t01=127.0.0.41',
      'sloti2t02=127.0.0.42',
      'sloti2t03=127.0.0.43',
      'sloti2t04=127.0.0.44',
    ]);
    expect(l.stores.map((s) => s.id)).toEqual(['store1', 'store2', 'store3']);
    expect(l.stores[1]!.slots).toEqual(['sloti2t02', 'sloti1t02']); // the comment after it is ignored
  });

  it('carries addresses across octets and numbers wide ranges with enough digits', () => {
    const l = parseProductionDat('x 1 t3 0 1 e 127.0.0.254');
    expect(l.slots.map((s) => s.host)).toEqual(['127.0.0.254', '127.0.0.255', '127.0.1.0']);
    expect(slotId('i1', 7, 120)).toBe('sloti1t007');
    expect(slotId('i1', 7, 15)).toBe('sloti1t07');
    expect(formatStoreLine({ id: 's', slots: ['a', 'b'] })).toBe('s - 0 0 a b');
  });

  it('reports every bad line with its number', () => {
    let err: unknown;
    try {
      parseProductionDat('i1 1 t0 0 1 e 10.0.0.1\ni2 2 t2 0 1 e 255.255.255.255\nstore1 n 0 90 a a\ni1 1 t1 0 1 e 10.0.0.9\ni1 1 t1 0 1 e 10.0.0.9\ngarbage\n');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(DatError);
    expect((err as DatError).problems).toEqual([
      'line 1: slot count t0 must be at least t1',
      'line 2: 2 addresses from 255.255.255.255 run past 255.255.255.255',
      'line 3: store store1 lists slot a twice',
      'line 5: slot sloti1t01 already defined on line 4',
      expect.stringMatching(/^line 6: neither a slot line/),
    ]);
  });
});

describe('failover replica lists', () => {
  it('puts the old master where the new one was', () => {
    expect(swapReplicas(['B', 'C'], 'A', 'C')).toEqual(['B', 'A']);
    expect(swapReplicas(['B', 'C'], 'A', 'D')).toEqual(['B', 'C', 'A']); // --force to a non-replica
    expect(swapReplicas(['B'], '', 'B')).toEqual([]); // store had no master
    expect(swapReplicas(['B', 'A'], 'A', 'B')).toEqual(['A']);
  });
});
