import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { lmtpSend } from './harness/clients.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { changeInRedis, seedRedis, worldRoutes } from './support/routes.js';

// Deliveries while a store is locked for maintenance: Postfix's view. Every recipient gets
// 451 while locked and 250 after; what got 250 is on disk, what got 451 is delivered on the
// retry, and nothing is lost or doubled.

let world: World;
let proxy: TestProxy;

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  proxy = await startProxy({ listeners: [{ protocol: 'lmtp' }], lookup: { redis: { url: world.redis!.url } } });
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

/** Where the proxy's router sends alice right now: a slot, or the failure kind. */
function route(): Promise<string> {
  return proxy.server.router.resolve('alice@example.com').then(
    (r) => r.slot,
    (e: { kind: string }) => e.kind,
  );
}

function message(n: number): string {
  return `From: loop@example.net\r\nTo: alice@example.com\r\nSubject: lock-loop ${n}\r\nMessage-ID: <lock-loop-${n}@example.net>\r\n\r\nmessage ${n}\r\n`;
}

describe('LMTP during a store lock', () => {
  it('defers while locked, delivers after unlock, loses nothing', async () => {
    const url = world.redis!.url;
    const deferred: number[] = [];
    const replies: Record<number, string> = {};
    const total = 30;
    for (let n = 0; n < total; n++) {
      // Each change is published, then we wait until this proxy has applied it, so the
      // expected replies are exact whatever the machine's load.
      if (n === 10) {
        await changeInRedis(url, 'store', 'store1', { status: 'locked', epoch: '2' });
        await expect.poll(() => route()).toBe('locked');
      }
      if (n === 20) {
        await changeInRedis(url, 'store', 'store1', { status: 'active', epoch: '3' });
        await expect.poll(() => route()).toBe('slotA');
      }
      const r = await lmtpSend('127.0.0.1', proxy.ports.lmtp!, ['alice@example.com'], message(n));
      const answer = r.dataReplies[0] ?? r.rcptReplies[0]!;
      replies[n] = answer;
      if (answer.startsWith('4')) deferred.push(n);
      else expect(answer).toMatch(/^250 /);
    }
    expect(deferred).toEqual(Array.from({ length: 10 }, (_, i) => 10 + i));
    for (const n of deferred) expect(replies[n]).toMatch(/^451 4\.2\.1 /);
    // Postfix retries what got 451.
    for (const n of deferred) {
      const r = await lmtpSend('127.0.0.1', proxy.ports.lmtp!, ['alice@example.com'], message(n));
      expect(r.dataReplies).toEqual([expect.stringMatching(/^250 /)]);
    }
    const onDisk = (await world.slotA.messages('alice@example.com'))
      .map((m) => /Subject: lock-loop (\d+)/.exec(m)?.[1])
      .filter((x): x is string => x !== undefined)
      .map(Number)
      .sort((a, b) => a - b);
    expect(onDisk).toEqual(Array.from({ length: total }, (_, i) => i)); // each exactly once
  });
});
