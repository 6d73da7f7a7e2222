import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../src/log.js';
import { Sweep } from '../src/session/sweep.js';
import { FailureDelay, LoginThrottle, WindowCounts } from '../src/session/throttle.js';

// The throttle's own rules, counted in this process (the Redis path and concurrency through
// real proxies are in throttle.test.ts).

const sweeps: Sweep[] = [];
function sweep(): Sweep {
  const s = new Sweep(60_000); // ticked by hand below
  sweeps.push(s);
  return s;
}
afterEach(() => {
  for (const s of sweeps.splice(0)) s.stop();
});

describe('LoginThrottle without Redis', () => {
  it('counts attempts as they start, gives a success its place back, and keeps addresses apart', async () => {
    const t = new LoginThrottle({ failuresPerWindow: 3, windowMs: 60_000, log: silentLogger }, sweep());
    // Three at once, none finished: all counted.
    const held = await Promise.all([t.reserve('10.0.0.1'), t.reserve('10.0.0.1'), t.reserve('10.0.0.1')]);
    expect(held.every((r) => r !== undefined)).toBe(true);
    expect(await t.reserve('10.0.0.1')).toBeUndefined();
    expect(await t.reserve('10.0.0.2')).toBeDefined();
    // The fourth was refused and counted too; two successes free two places.
    t.succeeded(held[0]!);
    t.succeeded(held[1]!);
    expect(await t.reserve('10.0.0.1')).toBeDefined();
    expect(await t.reserve('10.0.0.1')).toBeUndefined();
    expect(t.refused).toBe(2);
  });

  it('logs refusals once per address and window, then one count', async () => {
    const lines: string[] = [];
    const log = { ...silentLogger, warn: (m: string, f?: Record<string, unknown>) => void lines.push(`${m} ${JSON.stringify(f)}`) };
    const s = sweep();
    const t = new LoginThrottle({ failuresPerWindow: 1, windowMs: 1000, log }, s);
    for (let i = 0; i < 20; i++) await t.reserve('10.0.0.9');
    expect(lines).toHaveLength(1);
    await expect.poll(() => {
      s.tick(Date.now());
      return lines.length;
    }, { timeout: 3000 }).toBe(2);
    expect(lines[1]).toContain('"refused":19');
  });
});

describe('FailureDelay', () => {
  it('releases an answer on a sweep tick once the delay since the start has passed', async () => {
    const s = sweep();
    const d = new FailureDelay(30, s);
    let released = false;
    void d.after(Date.now()).then(() => (released = true));
    s.tick(Date.now()); // too early: still held
    await Promise.resolve();
    expect(released).toBe(false);
    expect(d.size).toBe(1);
    await expect.poll(() => {
      s.tick(Date.now());
      return released;
    }).toBe(true);
    expect(d.size).toBe(0);
  });

  it('answers at once when the delay is 0', async () => {
    await new FailureDelay(0, sweep()).after(Date.now());
  });
});

describe('WindowCounts', () => {
  it('counts per key and forgets at the next window', async () => {
    const s = sweep();
    const c = new WindowCounts(50, s);
    expect(c.add('a')).toBe(1);
    expect(c.add('a')).toBe(2);
    expect(c.get('b')).toBe(0);
    await expect.poll(() => c.get('a')).toBe(0);
  });
});
