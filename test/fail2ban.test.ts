import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../src/log.js';
import { connectLines } from './harness/lines.js';
import { openLmtp } from './harness/lmtp.js';
import { waitUntil } from './harness/proc.js';
import { startWorld, type World } from './harness/world.js';
import { startProxy, type TestProxy } from './support/proxy.js';
import { worldRoutes, writeRoutesFile } from './support/routes.js';
import { tempDir } from './support/tmp.js';

// Issue 9: deploy/fail2ban/filter.d/mailsplice.conf, run by Debian's fail2ban-regex against the
// lines a real mailsplice writes: it finds every failed login (IMAP, POP3), the throttle's
// refusal and the LMTP unknown-recipient limit, and never a successful login.

const execFileP = promisify(execFile);
const FILTER = resolve(import.meta.dirname, '../deploy/fail2ban/filter.d/mailsplice.conf');

let world: World;
let proxy: TestProxy;
const logged: string[] = [];

beforeAll(async () => {
  world = await startWorld();
  const routes = join(tempDir('f2b'), 'routes.yaml');
  writeRoutesFile(routes, worldRoutes(world));
  proxy = await startProxy(
    {
      listeners: [{ protocol: 'imap' }, { protocol: 'pop3' }, { protocol: 'lmtp' }],
      lookup: { file: routes },
      limits: { auth_failure_delay_ms: 0, auth_failures_per_ip_per_minute: 4 },
      lmtp: { unknown_recipients_per_ip_per_minute: 1 },
    },
    createLogger('info', (l) => logged.push(l)),
  );
});

afterAll(async () => {
  await proxy?.close();
  await world?.stop();
});

async function imapLogin(user: string, pass: string): Promise<string> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.imap! });
  await c.readLine();
  c.send(`a LOGIN ${user} ${pass}`);
  const answer = (await c.readUntil(/^a /)).at(-1)!;
  c.close();
  return answer;
}

async function pop3Login(user: string, pass: string): Promise<string> {
  const c = await connectLines({ host: proxy.host, port: proxy.ports.pop3! });
  await c.readLine();
  c.send(`USER ${user}`);
  await c.readLine();
  c.send(`PASS ${pass}`);
  const answer = await c.readLine();
  c.close();
  return answer;
}

describe('the fail2ban filter', () => {
  it('matches the failures and no successful login, in the lines mailsplice writes', { timeout: 60_000 }, async () => {
    // Successes first: the throttle below refuses this address for the rest of the minute.
    expect(await imapLogin('alice@example.com', 'alicepw')).toMatch(/^a OK/);
    expect(await pop3Login('bob@example.com', 'bobpw')).toMatch(/^\+OK/);
    // POP3 too: the session id reaches Dovecot (XCLIENT SESSION) and its log.
    const pop3Login1 = JSON.parse(logged.find((x) => x.includes('"msg":"login"') && x.includes('"protocol":"pop3"'))!) as { session: string };
    await waitUntil(async () => readFileSync(world.slotB.logFile, 'utf8').includes(`session=<${pop3Login1.session}>`), { what: 'POP3 session id in Dovecot log', timeoutMs: 10_000 });
    expect(await imapLogin('alice@example.com', 'wrong1')).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);
    expect(await imapLogin('nobody@example.com', 'wrong2')).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);
    expect(await pop3Login('bob@example.com', 'wrong3')).toMatch(/^-ERR \[AUTH\]/);
    // More failures until the throttle refuses (bounded; the count is per wall-clock minute,
    // so a minute that turns over meanwhile only takes a few more attempts).
    let refused = false;
    for (let i = 4; i < 20 && !refused; i++) {
      const answer = await imapLogin('carol@example.com', `wrong${i}`);
      refused = /^a NO \[UNAVAILABLE\] Too many/.test(answer);
      if (!refused) expect(answer).toMatch(/^a NO \[AUTHENTICATIONFAILED\]/);
    }
    expect(refused).toBe(true);
    // LMTP: the second unknown recipient in a minute trips the limit.
    const l = await openLmtp({ host: proxy.host, port: proxy.ports.lmtp! });
    await l.line();
    l.send('LHLO test');
    await l.reply();
    l.send('MAIL FROM:<x@example.net>');
    await l.line();
    l.send('RCPT TO:<nobody1@example.com>');
    expect(await l.line()).toMatch(/^550 5\.1\.1/);
    l.send('RCPT TO:<nobody2@example.com>');
    expect(await l.line()).toMatch(/^450 4\.7\.1/);
    l.close();

    const expected = (msg: string) => logged.filter((x) => x.includes(`"msg":"${msg}"`)).length;
    expect(expected('login')).toBe(2);
    const file = join(tempDir('f2b-log'), 'mailsplice.log');
    writeFileSync(file, logged.join(''));
    const { stdout } = await execFileP('fail2ban-regex', ['-o', 'ip', file, FILTER]);
    const hits = stdout.split('\n').filter((x) => x.trim() !== '');
    // Every failed login, the throttle's line(s) and the LMTP line, all from 127.0.0.1.
    const failures = logged.filter((x) => /"msg":"login failed".*"result":"auth-failed"/.test(x)).length;
    const refusals = logged.filter((x) => /"msg":"login attempts refused","ip":"127\.0\.0\.1"/.test(x)).length;
    const lmtp = logged.filter((x) => /"msg":"lmtp recipients refused".*"too many unknown recipients"/.test(x)).length;
    expect(failures).toBeGreaterThanOrEqual(4);
    expect(refusals).toBeGreaterThanOrEqual(1);
    expect(lmtp).toBe(1);
    const total = failures + refusals + lmtp;
    expect(hits).toEqual(Array(total).fill('127.0.0.1'));
    const { stdout: summary } = await execFileP('fail2ban-regex', [file, FILTER]);
    expect(summary).toMatch(new RegExp(`Failregex: ${total} total`));
    // Every line the filter missed is one that must not ban: no failure among them.
    const missed = logged.filter((x) => !/"msg":"(login failed|login attempts refused|lmtp recipients refused)"/.test(x));
    expect(summary).toMatch(new RegExp(`Lines: ${logged.length} lines, 0 ignored, ${total} matched, ${missed.length} missed`));
  });
});
