import { describe, expect, it } from 'vitest';
import { parseConfig } from '../src/config.js';
import { slotLoginLimits } from '../src/server.js';

// backend.logins_per_slot is the instance's bound: N workers each taking the whole of it
// would let N times the bound at a slot right after a failover.
describe('the per-slot login bound over workers', () => {
  const cfg = parseConfig(
    { listeners: [{ protocol: 'imap', port: 1143 }], lookup: { file: 'routes.yaml' }, backend: { logins_per_slot: 100, login_queue_per_slot: 500, login_queue_timeout_ms: 5000 } },
    'test',
  );

  it('is the whole bound in one process', () => {
    expect(slotLoginLimits(cfg, 1)).toEqual({ concurrent: 100, queue: 500, queueTimeoutMs: 5000 });
  });

  it('is shared by the workers, rounded up, so the sum stays within a worker of the bound', () => {
    for (const workers of [2, 3, 7, 16]) {
      const l = slotLoginLimits(cfg, workers);
      expect(l.concurrent * workers).toBeGreaterThanOrEqual(100);
      expect(l.concurrent * workers).toBeLessThan(100 + workers);
      expect(l.queue * workers).toBeGreaterThanOrEqual(500);
      expect(l.queueTimeoutMs).toBe(5000);
    }
  });

  it('leaves every worker at least one place, and 0 (no bound) stays 0', () => {
    expect(slotLoginLimits(cfg, 200).concurrent).toBe(1);
    const off = parseConfig({ listeners: [{ protocol: 'imap', port: 1143 }], lookup: { file: 'routes.yaml' }, backend: { logins_per_slot: 0 } }, 'test');
    expect(slotLoginLimits(off, 8).concurrent).toBe(0);
  });
});
