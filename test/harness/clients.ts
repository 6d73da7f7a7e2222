import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { connectLines } from './lines.js';

const execFileP = promisify(execFile);

/**
 * Real, independent protocol clients for assertions: Python's imaplib/poplib
 * (so a bug shared by our proxy and our own test sockets cannot hide) and a
 * small raw LMTP client that reports every reply code.
 */
export interface ClientTarget {
  host: string;
  port: number;
  user: string;
  password: string;
  /** Implicit TLS (IMAPS/POP3S), verifying the server (by host, IP SANs work) against this CA file. */
  caFile?: string;
}

const PY_CONNECT = `
import sys, json, ssl
t = json.loads(sys.argv[1])
ctx = None
if t.get('caFile'):
    ctx = ssl.create_default_context(cafile=t['caFile'])
`;

const IMAP_SUBJECTS = `${PY_CONNECT}
import imaplib
m = imaplib.IMAP4_SSL(t['host'], t['port'], ssl_context=ctx) if ctx else imaplib.IMAP4(t['host'], t['port'])
m.login(t['user'], t['password'])
m.select(t.get('folder', 'INBOX'), readonly=True)
_, data = m.search(None, 'ALL')
subjects = []
for num in data[0].split():
    _, parts = m.fetch(num, '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
    subjects.append(parts[0][1].decode().strip().removeprefix('Subject: '))
m.logout()
print(json.dumps(subjects))
`;

const POP3_UIDLS = `${PY_CONNECT}
import poplib
p = poplib.POP3_SSL(t['host'], t['port'], context=ctx) if ctx else poplib.POP3(t['host'], t['port'])
p.user(t['user']); p.pass_(t['password'])
print(json.dumps([l.decode().split()[1] for l in p.uidl()[1]]))
p.quit()
`;

async function python<T>(script: string, args: object): Promise<T> {
  const { stdout } = await execFileP('python3', ['-c', script, JSON.stringify(args)], { timeout: 30_000 });
  return JSON.parse(stdout) as T;
}

/** Log in with imaplib and return the Subject of every message in `folder` (default INBOX). */
export function imapSubjects(target: ClientTarget & { folder?: string }): Promise<string[]> {
  return python<string[]>(IMAP_SUBJECTS, target);
}

/** Log in with poplib (USER/PASS) and return the UIDL of every message. */
export function pop3Uidls(target: ClientTarget): Promise<string[]> {
  return python<string[]>(POP3_UIDLS, target);
}

export interface LmtpResult {
  /** Reply line to each RCPT TO, in order. */
  rcptReplies: string[];
  /** One reply line per accepted recipient after DATA (LMTP semantics); empty if none was accepted. */
  dataReplies: string[];
}

/** One LMTP transaction over a raw socket. `body` may use LF line ends; dot-stuffing is done here. */
export async function lmtpSend(
  host: string,
  port: number,
  rcpts: string[],
  body: string,
  from = 'sender@example.net',
): Promise<LmtpResult> {
  const c = await connectLines({ host, port });
  const expectCode = async (code: string, what: string): Promise<void> => {
    const lines = await c.readUntil(/^\d{3} /);
    const last = lines.at(-1) ?? '';
    if (!last.startsWith(code)) throw new Error(`LMTP ${what}: expected ${code}, got ${lines.join(' | ')}`);
  };
  try {
    await expectCode('220', 'greeting');
    c.send('LHLO harness.test');
    await expectCode('250', 'LHLO');
    c.send(`MAIL FROM:<${from}>`);
    await expectCode('250', 'MAIL FROM');
    const rcptReplies: string[] = [];
    for (const r of rcpts) {
      c.send(`RCPT TO:<${r}>`);
      rcptReplies.push(await c.readLine());
    }
    const accepted = rcptReplies.filter((l) => l.startsWith('250')).length;
    const dataReplies: string[] = [];
    if (accepted > 0) {
      c.send('DATA');
      await expectCode('354', 'DATA');
      const crlf = body.replace(/\r?\n/g, '\r\n');
      c.write(crlf.replace(/^\./gm, '..') + (crlf.endsWith('\r\n') ? '' : '\r\n') + '.\r\n');
      for (let i = 0; i < accepted; i++) dataReplies.push(await c.readLine());
    }
    c.send('QUIT');
    return { rcptReplies, dataReplies };
  } finally {
    c.close();
  }
}
