import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectLines, type LineClient } from './harness/lines.js';
import { waitUntil } from './harness/proc.js';
import { startWorld, type World } from './harness/world.js';
import { startProxyProcess, type ProxyProcess } from './support/process.js';
import { seedRedis, worldRoutes } from './support/routes.js';

// Issue 9: what a real `mailsplice serve` logs at the default level, read as the JSON lines
// it writes: a login, a failed login, a LOGOUT, a failover and a kick each give exactly their
// lines, all lines of one session share its id, and Dovecot's log shows that id.

let world: World;
let proxy: ProxyProcess;

const execFileP = promisify(execFile);
const CLI = resolve(import.meta.dirname, '../src/cli.ts');

async function ctl(...args: string[]): Promise<string> {
  const { stdout } = await execFileP(process.execPath, ['--import', 'tsx', CLI, 'ctl', ...args, '--redis', world.redis!.url]);
  return stdout;
}

type Line = Record<string, unknown> & { msg: string; level: string };

function lines(): Line[] {
  return proxy
    .log()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Line);
}

/** The lines logged from `from` on, once `done` holds for them (bounded wait). */
async function linesUntil(from: number, what: string, done: (ls: Line[]) => boolean): Promise<Line[]> {
  let got: Line[] = [];
  await waitUntil(
    async () => {
      got = lines().slice(from);
      return done(got);
    },
    { what, timeoutMs: 15_000, describe: () => JSON.stringify(got, null, 1) },
  );
  return got;
}

/** Logs in, and waits for its login line (the log arrives on a pipe, after the client's answer). */
async function login(user: string, pass: string): Promise<LineClient> {
  const before = lines().filter((l) => l.msg === 'login').length;
  const c = await connectLines({ host: '127.0.0.1', port: proxy.port, timeoutMs: 20_000 });
  await c.readLine();
  c.send(`a LOGIN ${user} ${pass}`);
  const answer = (await c.readUntil(/^a /, 20_000)).at(-1)!;
  if (!answer.startsWith('a OK')) throw new Error(`${user}: ${answer}`);
  await waitUntil(async () => lines().filter((l) => l.msg === 'login').length > before, { what: `login line of ${user}`, timeoutMs: 10_000 });
  return c;
}

/** Lines of these messages only: the ones this issue defines (startup lines and the like are not counted). */
const SESSION_MSGS = new Set(['login', 'login failed', 'session end', 'route event']);
const ours = (ls: Line[]) => ls.filter((l) => SESSION_MSGS.has(l.msg));

beforeAll(async () => {
  world = await startWorld({ redis: true });
  await seedRedis(world.redis!.url, worldRoutes(world));
  proxy = await startProxyProcess({ lookup: { redis: { url: world.redis!.url } }, limits: { auth_failure_delay_ms: 0 } });
});

afterAll(async () => {
  await proxy?.stop();
  await world?.stop();
});

describe('session log lines at the default level', () => {
  it('a login and its LOGOUT: one login line, one session end, one session id, seen by Dovecot too', { timeout: 60_000 }, async () => {
    const from = lines().length;
    const c = await login('alice@example.com', 'alicepw');
    c.send('b SELECT INBOX');
    await c.readUntil(/^b OK/);
    c.send('z LOGOUT');
    await c.readUntil(/^z OK/);
    const got = ours(await linesUntil(from, 'login and session end', (ls) => ls.some((l) => l.msg === 'session end')));
    expect(got.map((l) => l.msg)).toEqual(['login', 'session end']);
    const [li, end] = got as [Line, Line];
    expect(li).toMatchObject({
      level: 'info',
      protocol: 'imap',
      login: 'alice@example.com',
      backend_login: 'alice@example.com',
      ip: '127.0.0.1',
      // The client info of the accept pipeline names an unnamed listener by protocol and port.
      listener: `imap:${proxy.port}`,
      tls: 'none',
      store: 'store1',
      slot: 'slotA',
      backend: `${world.slotA.host}:${world.slotA.imap}`,
    });
    for (const k of ['route_ms', 'connect_ms', 'backend_ms', 'port']) expect(typeof li[k]).toBe('number');
    expect(li.session).toMatch(/^[\w-]{9,}$/);
    expect(end).toMatchObject({ session: li.session, protocol: 'imap', login: 'alice@example.com', slot: 'slotA', ended_by: 'client' });
    expect(end.bytes_in as number).toBeGreaterThan(20); // SELECT and LOGOUT
    expect(end.bytes_out as number).toBeGreaterThan(100);
    expect(typeof end.duration_ms).toBe('number');
    expect(JSON.stringify(got)).not.toContain('alicepw');
    c.close();
    // The backend's log names the same session (Dovecot: session=<id> from ID x-session-id).
    await waitUntil(async () => (await readFile(world.slotA.logFile, 'utf8')).includes(`session=<${li.session as string}>`), {
      what: 'session id in Dovecot log',
      timeoutMs: 10_000,
    });
  });

  it('a failed login: one login failed line with the address, nothing else', { timeout: 60_000 }, async () => {
    const from = lines().length;
    const c = await connectLines({ host: '127.0.0.1', port: proxy.port, timeoutMs: 20_000 });
    await c.readLine();
    c.send('a LOGIN alice@example.com wrongpassword');
    expect((await c.readUntil(/^a /)).at(-1)).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);
    c.send('z LOGOUT');
    await c.readUntil(/^z OK/).catch(() => undefined);
    c.close();
    const got = ours(await linesUntil(from, 'login failed', (ls) => ls.some((l) => l.msg === 'login failed')));
    expect(got).toHaveLength(1);
    expect(got[0]).toMatchObject({ level: 'info', msg: 'login failed', protocol: 'imap', login: 'alice@example.com', ip: '127.0.0.1', result: 'auth-failed' });
    expect(JSON.stringify(got)).not.toContain('wrongpassword');
  });

  it('a failover: route event lines with epoch and sessions ended, and each session end says so', { timeout: 60_000 }, async () => {
    const a = await login('alice@example.com', 'alicepw');
    const b = await login('carol@example.com', 'carolpw');
    const other = await login('bob@example.com', 'bobpw');
    const from = lines().length;
    await ctl('failover', 'store1', '--to', 'slotB');
    for (const c of [a, b]) expect(await c.readLine(20_000)).toMatch(/^\* BYE \[UNAVAILABLE\] /);
    const got = ours(
      await linesUntil(from, 'two route events and two session ends', (ls) => ls.filter((l) => l.msg === 'route event').length >= 2 && ls.filter((l) => l.msg === 'session end').length >= 2),
    );
    const events = got.filter((l) => l.msg === 'route event');
    // ctl failover: the lock, then the switch; each event re-reads the store, and may find
    // either state (the second write can land before the first re-read).
    expect(events).toHaveLength(2);
    for (const e of events) expect(e).toMatchObject({ level: 'info', kind: 'store', id: 'store1' });
    expect(events[1]!.epoch as number).toBeGreaterThanOrEqual(events[0]!.epoch as number);
    expect((events[0]!.ended as number) + (events[1]!.ended as number)).toBe(2);
    const ends = got.filter((l) => l.msg === 'session end');
    expect(ends.map((l) => l.login).sort()).toEqual(['alice@example.com', 'carol@example.com']);
    for (const e of ends) {
      expect(e).toMatchObject({ slot: 'slotA' });
      expect([
        { ended_by: 'lock', why: 'store locked for maintenance' },
        { ended_by: 'failover', why: 'store moved to another server' },
      ]).toContainEqual({ ended_by: e.ended_by, why: e.why });
    }
    expect(got).toHaveLength(4); // bob's session is untouched: no line about it
    other.send('n NOOP');
    expect((await other.readUntil(/^n /)).at(-1)).toMatch(/^n OK/);
    other.close();
    await ctl('failover', 'store1', '--to', 'slotA'); // back, for the next case
  });

  it('a kick: one route event, the session ends as kicked, and the user logs in again at once', { timeout: 60_000 }, async () => {
    const c = await login('alice@example.com', 'alicepw');
    const from = lines().length;
    const out = await ctl('kick', 'Alice@Example.com', '--json');
    expect(JSON.parse(out)).toMatchObject({ kick: 'user', id: 'alice@example.com', subscribers: 1 });
    expect(await c.readLine(20_000)).toBe('* BYE [UNAVAILABLE] Session ended by the administrator');
    const got = ours(await linesUntil(from, 'kick lines', (ls) => ls.some((l) => l.msg === 'session end') && ls.some((l) => l.msg === 'route event')));
    expect(got.map((l) => l.msg).sort()).toEqual(['route event', 'session end']);
    const ev = got.find((l) => l.msg === 'route event')!;
    expect(ev).toMatchObject({ kind: 'kick', scope: 'user', id: 'alice@example.com', ended: 1 });
    expect(typeof ev.lag_ms).toBe('number'); // ctl sends ts
    expect(got.find((l) => l.msg === 'session end')).toMatchObject({ login: 'alice@example.com', ended_by: 'kick' });
    c.close();
    const again = await login('alice@example.com', 'alicepw'); // a kick is not a lock
    again.close();
  });
});
