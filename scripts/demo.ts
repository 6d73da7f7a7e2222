// The demo behind `npm run demo`: two Dovecot slots, a routes file, mailsplice in front.
// It reuses the test harness' Dovecot launcher so the demo and the tests run Dovecot the
// same way. Ctrl-C stops everything.
import { mkdtempSync, chmodSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { parseConfig } from '../src/config.js';
import { createLogger } from '../src/log.js';
import { startServer } from '../src/server.js';
import { startDovecotSlot } from '../test/harness/dovecot.js';
import { freePort } from '../test/harness/ports.js';
import { seedMessage } from '../test/harness/world.js';

const users = [
  { name: 'alice@example.com', password: 'alicepw' },
  { name: 'bob@example.com', password: 'bobpw' },
];

async function portOr(preferred: number): Promise<number> {
  const { createServer } = await import('node:net');
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => void freePort('127.0.0.1').then(resolve));
    s.listen(preferred, '127.0.0.1', () => s.close(() => resolve(preferred)));
  });
}

const dir = mkdtempSync(join(tmpdir(), 'mailsplice-demo-'));
chmodSync(dir, 0o755);
const started: { stop(): Promise<void> }[] = [];
/** Stops what started; the work folder is removed unless it holds the logs of a failed start. */
const cleanUp = async (keep: boolean) => {
  await Promise.allSettled(started.map((s) => s.stop()));
  if (keep) process.stderr.write(`demo: failed to start; Dovecot's logs are in ${dir}\n`);
  else rmSync(dir, { recursive: true, force: true });
};
const track = <T extends { stop(): Promise<void> }>(x: T): T => (started.push(x), x);
/** Runs a start-up step; if it fails, stops what started and exits. */
async function step<T>(p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (e) {
    process.stderr.write(`demo: ${(e as Error).message}\n`);
    await cleanUp(true);
    process.exit(1);
  }
}
const slotA = track(await step(startDovecotSlot({ id: 'slotA', host: '127.0.0.11', users, dir: join(dir, 'slotA') })));
const slotB = track(await step(startDovecotSlot({ id: 'slotB', host: '127.0.0.12', users, dir: join(dir, 'slotB') })));
for (const slot of [slotA, slotB]) for (const u of users) await step(slot.deliver(u.name, seedMessage(slot.id, u.name)));

const routesFile = join(dir, 'routes.yaml');
const slot = (s: typeof slotA) => ({ host: s.host, imap: s.imap, pop3: s.pop3, lmtp: s.lmtp });
writeFileSync(
  routesFile,
  stringify({
    users: { 'alice@example.com': { store: 'store1' }, 'bob@example.com': { store: 'store2' } },
    stores: { store1: { master: 'slotA', replicas: 'slotB', epoch: 1 }, store2: { master: 'slotB', replicas: 'slotA', epoch: 1 } },
    slots: { slotA: slot(slotA), slotB: slot(slotB) },
  }),
);
const imap = await portOr(1143);
const pop3 = await portOr(1110);
const lmtp = await portOr(2424);
const admin = await portOr(9143);
const cfg = parseConfig(
  {
    listeners: [
      { protocol: 'imap', address: '127.0.0.1', port: imap },
      { protocol: 'pop3', address: '127.0.0.1', port: pop3 },
      { protocol: 'lmtp', address: '127.0.0.1', port: lmtp },
    ],
    lookup: { file: routesFile },
    admin: { address: '127.0.0.1', port: admin },
  },
  'demo',
);
const server = await step(startServer(cfg, createLogger('info')));
track({ stop: () => server.close() });

process.stdout.write(`
mailsplice demo is running (Ctrl-C stops it all and removes its work files in ${dir})

  IMAP  127.0.0.1:${imap}    POP3  127.0.0.1:${pop3}    LMTP  127.0.0.1:${lmtp}    metrics http://127.0.0.1:${admin}/metrics
  alice@example.com / alicepw  lives on store1, master slotA (127.0.0.11)
  bob@example.com   / bobpw    lives on store2, master slotB (127.0.0.12)

Try:
  curl -s --user alice@example.com:alicepw 'imap://127.0.0.1:${imap}/INBOX;UID=1;SECTION=HEADER.FIELDS%20(SUBJECT)'
  curl -s --user bob@example.com:bobpw pop3://127.0.0.1:${pop3}/1 | grep Subject

Fail store1 over to slotB by editing the routes file (the proxy watches it):
  sed -i 's/master: slotA/master: slotB/' ${routesFile}
and the first curl now says "on slotB".
`);

let stopping = false;
const stop = async () => {
  if (stopping) process.exit(1);
  stopping = true;
  await cleanUp(false);
  process.exit(0);
};
process.on('SIGINT', () => void stop());
process.on('SIGTERM', () => void stop());
