import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse as parseYaml } from 'yaml';
import { connectLines } from './harness/lines.js';
import { lmtpTransaction } from './harness/lmtp.js';
import { freePort } from './harness/ports.js';
import { waitUntil } from './harness/proc.js';
import { startWorld, type World } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { seedRedis, worldRoutes } from './support/routes.js';

// Issue 9: every metric deploy/grafana/mailsplice.json and deploy/prometheus-rules.yaml name
// exists in what a real `mailsplice serve` answers on /metrics, after a little traffic (a
// login, a LOGOUT, an LMTP delivery, an event with a ts); and /readyz and /sessions answer.

const ROOT = resolve(import.meta.dirname, '..');
let world: World;
let proxy: ProxyProcess;

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  proxy = await startProxyProcess({ lookup: { redis: { url: world.redis!.url } } }, { admin: true, lmtp: true });
});

afterAll(async () => {
  await proxy?.stop();
  await world?.stop();
});

const get = (path: string) => fetch(`http://127.0.0.1:${proxy.adminPort}${path}`);

/** Metric names an expression uses (a histogram's _bucket/_sum/_count as the histogram). */
function metricsIn(expr: string): string[] {
  return [...expr.matchAll(/\bmailsplice_[a-z0-9_]+/g)].map((m) => m[0]);
}

/** Every series name a scrape can be asked for: each metric, and a histogram's three series. */
function scrapeNames(text: string): Set<string> {
  const names = new Set<string>();
  for (const m of text.matchAll(/^# TYPE (\S+) (\S+)$/gm)) {
    names.add(m[1]!);
    if (m[2] === 'histogram') for (const s of ['_bucket', '_sum', '_count']) names.add(m[1]! + s);
  }
  return names;
}

describe('dashboard and alert rules against a real scrape', () => {
  it('names only metrics that exist, and the per-slot ones carry a slot label', { timeout: 60_000 }, async () => {
    // Traffic, so that labelled series exist too.
    const c = await connectLines({ host: '127.0.0.1', port: proxy.port });
    await c.readLine();
    c.send('a LOGIN alice@example.com alicepw');
    expect((await c.readUntil(/^a /)).at(-1)).toMatch(/^a OK/);
    c.send('z LOGOUT');
    await c.readUntil(/^z OK/);
    c.close();
    const tx = await lmtpTransaction({ host: '127.0.0.1', port: proxy.lmtpPort! }, 'x@example.net', ['bob@example.com'], 'Subject: hi\r\n\r\nhi\r\n');
    expect(tx.results).toEqual([expect.stringMatching(/^250/)]);
    const r = new Redis(world.redis!.url);
    await r.publish('ms:events', JSON.stringify({ kind: 'slot', id: 'slotB', ts: Date.now() }));
    // A slot nobody listens on: a backend failure, counted by slot and reason.
    const deadPort = await freePort();
    await r.hset('ms:slot:slotDead', { host: '127.0.0.1', imap: String(deadPort), pop3: '110', lmtp: '24', status: 'up' });
    await r.hset('ms:store:storeDead', { master: 'slotDead', status: 'active', epoch: '1' });
    await r.hset('ms:user:dead@example.com', { store: 'storeDead' });
    r.disconnect();
    const d = await connectLines({ host: '127.0.0.1', port: proxy.port });
    await d.readLine();
    d.send('a LOGIN dead@example.com pw');
    expect((await d.readUntil(/^a /, 20_000)).at(-1)).toMatch(/^a NO \[UNAVAILABLE\]/);
    d.close();
    let text = '';
    await waitUntil(
      async () => {
        text = await (await get('/metrics')).text();
        return /mailsplice_route_event_lag_seconds_count\{kind="slot"\} 1/.test(text) && /mailsplice_sessions_ended_total\{[^}]*reason="client"/.test(text);
      },
      { what: 'metrics after the traffic', timeoutMs: 10_000, describe: () => text },
    );
    const have = scrapeNames(text);

    const dashboard = JSON.parse(readFileSync(resolve(ROOT, 'deploy/grafana/mailsplice.json'), 'utf8')) as { panels: { targets?: { expr: string }[] }[] };
    const dashNames = dashboard.panels.flatMap((p) => (p.targets ?? []).flatMap((t) => metricsIn(t.expr)));
    const rules = parseYaml(readFileSync(resolve(ROOT, 'deploy/prometheus-rules.yaml'), 'utf8')) as { groups: { rules: { expr: string }[] }[] };
    const ruleNames = rules.groups.flatMap((g) => g.rules.flatMap((x) => metricsIn(x.expr)));
    expect(dashNames.length).toBeGreaterThan(15);
    expect(ruleNames.length).toBeGreaterThan(5);
    expect([...new Set([...dashNames, ...ruleNames])].filter((n) => !have.has(n))).toEqual([]);

    // The per-slot views the issue asks for, with real values.
    expect(text).toMatch(/mailsplice_login_seconds_count\{protocol="imap",slot="slotA"\} 1/);
    expect(text).toMatch(/mailsplice_backend_connect_seconds_count\{slot="slotA"\} 1/);
    expect(text).toMatch(/mailsplice_backend_login_seconds_count\{slot="slotA"\} 1/);
    expect(text).toMatch(/mailsplice_lmtp_slot_deliveries_total\{slot="slotB",result="delivered"\} 1/);
    expect(text).toMatch(/mailsplice_logins_total\{protocol="imap",result="ok"\} 1/);
    expect(text).toMatch(/mailsplice_route_events_applied_total\{kind="slot"\} 1/);
    expect(text).toMatch(/mailsplice_backend_failures_total\{slot="slotDead",reason="connect"\} 1/);
    expect(text).not.toMatch(/alice/); // never a user in a label
  });

  it('answers /readyz, and /sessions with filters', { timeout: 30_000 }, async () => {
    const ready = await get('/readyz');
    expect(ready.status).toBe(200);
    expect(await ready.json()).toEqual({ ready: true, listening: true, lookup: true, events: true });

    const c = await connectLines({ host: '127.0.0.1', port: proxy.port });
    await c.readLine();
    c.send('a LOGIN carol@example.com carolpw');
    expect((await c.readUntil(/^a /)).at(-1)).toMatch(/^a OK/);
    const all = (await (await get('/sessions')).json()) as { total: number; sessions: Record<string, unknown>[] };
    expect(all.total).toBe(1);
    expect(all.sessions[0]).toMatchObject({ protocol: 'imap', login: 'carol@example.com', store: 'store1', slot: 'slotA', ip: '127.0.0.1', tls: 'none', listener: `imap:${proxy.port}` });
    expect(((await (await get('/sessions?user=CAROL@example.com')).json()) as { total: number }).total).toBe(1);
    expect(((await (await get('/sessions?slot=slotB')).json()) as { total: number }).total).toBe(0);
    expect((await get('/sessions?who=x')).status).toBe(400);
    // Writes need a token in the config: this admin has none.
    expect((await fetch(`http://127.0.0.1:${proxy.adminPort}/kick?user=carol@example.com`, { method: 'POST' })).status).toBe(403);
    c.close();

    // Redis down: the lookup is not reachable, so not ready.
    await world.redis!.stop();
    try {
      await waitUntil(async () => (await get('/readyz')).status === 503, { what: 'readyz 503 with Redis down', timeoutMs: 15_000 });
    } finally {
      await world.redis!.start();
    }
    await waitUntil(async () => (await get('/readyz')).status === 200, { what: 'readyz 200 again', timeoutMs: 20_000 });
  });
});
