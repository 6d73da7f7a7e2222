import { describe, expect, it } from 'vitest';
import { IpLedger, SharedClientGate, type IpDenials } from '../src/cluster/ip-limits.js';

// The per-address limits of a multi-worker instance, as pure logic: two workers' gates and
// the primary's ledger wired together in this process (the IPC is a function call here; the
// real processes are in workers.test.ts).

function instance(limits: { connectionsPerIp: number; concurrentLoginsPerIp: number }) {
  const gates: SharedClientGate[] = [];
  const ledger = new IpLedger(limits, (d: IpDenials) => {
    for (const g of gates) g.applyDenials(d);
  });
  for (const worker of [1, 2]) gates.push(new SharedClientGate(limits, (d) => ledger.apply(worker, d)));
  return { ledger, gates };
}

/** The gates send their changes at most every few ms: wait until the ledger has them. */
async function settled(check: () => boolean): Promise<void> {
  const end = Date.now() + 5000;
  while (!check()) {
    if (Date.now() > end) throw new Error('ledger did not settle');
    await new Promise((r) => setTimeout(r, 2));
  }
}

describe('per-address limits over workers', () => {
  it('holds an address to the limit over both workers, and lets it back in below it', async () => {
    const { ledger, gates } = instance({ connectionsPerIp: 4, concurrentLoginsPerIp: 10 });
    const [a, b] = gates as [SharedClientGate, SharedClientGate];
    expect([a.admit('10.0.0.1'), b.admit('10.0.0.1'), a.admit('10.0.0.1'), b.admit('10.0.0.1')]).toEqual([true, true, true, true]);
    await settled(() => ledger.total('connections', '10.0.0.1') === 4);
    // Each worker holds 2 of its own 4: alone each would admit more. Together they are full.
    expect(a.admit('10.0.0.1')).toBe(false);
    expect(b.admit('10.0.0.1')).toBe(false);
    expect(a.admit('10.0.0.2')).toBe(true); // another address is never held back
    expect(ledger.atLimit('connections')).toBe(1);
    b.release('10.0.0.1');
    await settled(() => ledger.atLimit('connections') === 0);
    expect(a.admit('10.0.0.1')).toBe(true);
    for (const g of gates) g.close();
  });

  it('counts logins in progress the same way, apart from connections', async () => {
    const { ledger, gates } = instance({ connectionsPerIp: 100, concurrentLoginsPerIp: 2 });
    const [a, b] = gates as [SharedClientGate, SharedClientGate];
    expect(a.beginLogin('10.0.0.1')).toBe(true);
    expect(b.beginLogin('10.0.0.1')).toBe(true);
    await settled(() => ledger.atLimit('logins') === 1);
    expect(a.beginLogin('10.0.0.1')).toBe(false);
    expect(a.admit('10.0.0.1')).toBe(true);
    a.endLogin('10.0.0.1');
    await settled(() => ledger.atLimit('logins') === 0);
    expect(b.beginLogin('10.0.0.1')).toBe(true);
    for (const g of gates) g.close();
  });

  it('forgets a dead worker\'s counts, and a new worker learns who is at the limit', async () => {
    const { ledger, gates } = instance({ connectionsPerIp: 2, concurrentLoginsPerIp: 10 });
    const [a, b] = gates as [SharedClientGate, SharedClientGate];
    a.admit('10.0.0.1');
    b.admit('10.0.0.1');
    await settled(() => ledger.atLimit('connections') === 1);
    const fresh = new SharedClientGate({ connectionsPerIp: 2, concurrentLoginsPerIp: 10 }, () => undefined);
    fresh.applyDenials(ledger.snapshot());
    expect(fresh.admit('10.0.0.1')).toBe(false);
    ledger.forget(2); // b died, and its connection with it
    expect(ledger.total('connections', '10.0.0.1')).toBe(1);
    expect(a.admit('10.0.0.1')).toBe(true);
    for (const g of [...gates, fresh]) g.close();
  });
});
