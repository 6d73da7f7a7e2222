import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { access, chmod, chown, copyFile, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { SlotUser } from './dovecot.js';
import { connectLines } from './lines.js';
import { lmtpTransaction } from './lmtp.js';
import { freePorts } from './ports.js';
import { killOnExit, run, waitUntil } from './proc.js';

/**
 * A private Cyrus IMAP 3.6 (Debian 12) per slot, beside Dovecot. Debian's
 * cyrus-imapd/-pop3d/-replication conflict with Dovecot's packages, so
 * test/harness/setup-cyrus.sh (run by .ci/run, as root) installs the rest of
 * Cyrus with apt and unpacks those three .debs under CYRUS_ROOT.
 */
export const CYRUS_ROOT = process.env.MAILSPLICE_CYRUS_ROOT ?? '/opt/mailsplice-test/cyrus';
/** imapd, pop3d, idled, sync_client, sync_server (the unpacked .debs). */
const UNPACKED_BIN = path.join(CYRUS_ROOT, 'usr/lib/cyrus/bin');
/** master, lmtpd, ctl_cyrusdb (apt's cyrus-common). */
const COMMON_BIN = '/usr/lib/cyrus/bin';

/**
 * The admin of every slot unless a test says otherwise. The same on all slots
 * because sync_client authenticates to the replica's sync_server as the
 * source's sync_authname, which must be an admin there.
 */
export const CYRUS_ADMIN: Readonly<SlotUser> = Object.freeze({ name: 'cyrusadmin', password: 'cyrusadminpw' });

export interface CyrusSlotOptions {
  id: string;
  /** Loopback address to listen on, e.g. 127.0.0.21. */
  host: string;
  /** Bare names (no @domain): this Cyrus runs without virtdomains. */
  users: SlotUser[];
  /** In `admins:` and `proxyservers:`, and the sync_authname. Default CYRUS_ADMIN. */
  admin?: SlotUser;
  /**
   * Users listed in `proxyservers:` only (not admins): they too may log in as
   * anyone with authzid, without admin rights. (Admins may do that anyway.)
   */
  proxyUsers?: SlotUser[];
  /** Directory to use; a fresh temp dir by default. */
  dir?: string;
  /** Cyrus servername and the SASL realm of its users. Default `<id>.test` (lower case). */
  servername?: string;
  /**
   * Server certificate: STARTTLS on imap, pop3 and both LMTP ports, plus
   * implicit-TLS imaps and pop3s ports. The files are copied into the slot dir.
   */
  tls?: { certFile: string; keyFile: string };
  /**
   * Added to the generated imapd.conf (e.g. quota or sieve settings); a key it
   * sets replaces the generated line (Cyrus refuses a key given twice).
   */
  extraImapdConf?: string;
}

export interface CyrusSlot {
  id: string;
  host: string;
  servername: string;
  imap: number;
  pop3: number;
  /** LMTP where every client is preauthenticated (`lmtpd -a`): no AUTH needed. */
  lmtp: number;
  /** LMTP that demands AUTH (430 at MAIL FROM without it); AUTH PLAIN as the admin. */
  lmtpAuth: number;
  /** sync_server, the target of another slot's syncUser(). */
  sync: number;
  /** timsieved (ManageSieve, from cyrus-common). */
  sieve: number;
  imaps?: number;
  pop3s?: number;
  dir: string;
  admin: SlotUser;
  users: SlotUser[];
  proxyUsers: SlotUser[];
  imapdConf: string;
  cyrusConf: string;
  /**
   * master's -L file: the stderr of master and its services. Cyrus logs only to
   * syslog, which these machines lack, so protocol errors are not in it:
   * debug from the client side.
   */
  logFile: string;
  pidFile: string;
  /** The sync_client binary (run it as user cyrus with `-C imapdConf`). */
  syncClientBin: string;
  /** SIGTERM to master, then SIGKILL to any of its services that outlive it; data stays. */
  stop(): Promise<void>;
  /** Starts again on the same ports with the same data. */
  start(): Promise<void>;
  /** stop(), then delete dir if the harness created it. */
  destroy(): Promise<void>;
  /** Delivers to the user's INBOX over the preauthenticated LMTP port; resolves with the final 250 line. */
  deliver(user: string, rfc822: string): Promise<string>;
  /** Creates a SASL user and (when running) its mailbox user/NAME. */
  addUser(user: SlotUser): Promise<void>;
  /**
   * Runs IMAP commands (without tags) as the admin, in order, in one session;
   * rejects at the first that does not end OK. Resolves with every line read.
   */
  adminImap(commands: string[]): Promise<string[]>;
  /** `sync_client -u USER` from this slot to `replica`'s sync_server (rolling replication by hand). */
  syncUser(user: string, replica: CyrusSlot): Promise<string>;
}

/** Cyrus runs as `cyrus` (Debian's cyrus-common creates it, primary group mail). */
function cyrusOwner(): { uid: number; gid: number } {
  const line = readFileSync('/etc/passwd', 'utf8').split('\n').find((l) => l.startsWith('cyrus:'));
  const [, , uid, gid] = line?.split(':') ?? [];
  if (uid === undefined || gid === undefined) throw new Error('no "cyrus" user: run test/harness/setup-cyrus.sh as root');
  return { uid: Number(uid), gid: Number(gid) };
}

async function assertInstalled(): Promise<void> {
  const needed = [
    path.join(COMMON_BIN, 'master'),
    path.join(COMMON_BIN, 'lmtpd'),
    ...['imapd', 'pop3d', 'idled', 'sync_client', 'sync_server'].map((b) => path.join(UNPACKED_BIN, b)),
  ];
  for (const f of needed) {
    await access(f).catch(() => {
      throw new Error(`Cyrus is not installed (${f} missing): run test/harness/setup-cyrus.sh as root`);
    });
  }
}

/** Services run as `cyrus`: a parent closed to others fails late and vaguely; fail early instead. */
async function assertTraversable(dir: string): Promise<void> {
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    if (((await stat(d)).mode & 0o001) === 0) {
      throw new Error(`cyrus slot dir ${dir}: ${d} is not searchable by other users (chmod o+x)`);
    }
    if (path.dirname(d) === d) return;
  }
}

/** Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session. */
function procStat(pid: number): { state: string; session: number } | undefined {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return { state: f[0] ?? '?', session: Number(f[3]) };
  } catch {
    return undefined;
  }
}

/** A master that exited stays a zombie until its parent reaps it: count that as gone. */
function running(pid: number): boolean {
  const s = procStat(pid);
  return s !== undefined && s.state !== 'Z' && s.state !== 'X';
}

/** Live processes of the session `sid` (master -d calls setsid, so sid = master's pid). */
function sessionMembers(sid: number): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    const s = procStat(pid);
    if (s && s.session === sid && s.state !== 'Z' && s.state !== 'X') out.push(pid);
  }
  return out;
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    /* already gone */
  }
}

async function waitFor(cond: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 10; ; delay = Math.min(delay * 2, 200)) {
    if (cond()) return true;
    if (Date.now() > deadline) return false;
    await sleep(delay);
  }
}

/** A line of imapd.conf / cyrus.conf must not be able to smuggle in another setting. */
function assertPlain(what: string, value: string): void {
  if (/[\s"\\]/.test(value)) throw new Error(`cyrus slot: ${what} must not contain spaces, quotes or backslashes: ${value}`);
}

/**
 * imapd.conf with `extra` merged in: master exits 78 (EX_CONFIG), silently
 * (it logs only to syslog), when a key appears twice, so a generated line whose
 * key `extra` sets is dropped.
 */
function withOverrides(generated: string, extra: string): string {
  const keyOf = (line: string): string | undefined => /^\s*([A-Za-z0-9_-]+)\s*:/.exec(line)?.[1]?.toLowerCase();
  const overridden = new Set(extra.split('\n').map(keyOf).filter((k): k is string => k !== undefined));
  const kept = generated.split('\n').filter((l) => {
    const k = keyOf(l);
    return k === undefined || !overridden.has(k);
  });
  return `${kept.join('\n')}\n${extra}${extra.endsWith('\n') || extra === '' ? '' : '\n'}`;
}

export async function startCyrusSlot(opts: CyrusSlotOptions): Promise<CyrusSlot> {
  const { id, host } = opts;
  if (!/^[A-Za-z0-9_-]+$/.test(id)) throw new Error(`slot id must be [A-Za-z0-9_-]+: ${id}`);
  const admin = { ...(opts.admin ?? CYRUS_ADMIN) };
  const users = opts.users.map((u) => ({ ...u }));
  const proxyUsers = (opts.proxyUsers ?? []).map((u) => ({ ...u }));
  for (const u of [admin, ...users, ...proxyUsers]) {
    // Bare lower-case names: with virtdomains off, `alice@example.com` is not a login.
    if (!/^[a-z0-9][a-z0-9._-]*$/.test(u.name)) throw new Error(`cyrus user names are bare and lower case: ${u.name}`);
    // saslpasswd2 -p reads one line.
    if (/[\r\n\0]/.test(u.password)) throw new Error(`cyrus password of ${u.name} contains CR, LF or NUL`);
  }
  const servername = opts.servername ?? `${id.toLowerCase()}.test`;
  await assertInstalled();
  const owner = cyrusOwner();

  const dir = opts.dir ?? (await mkdtemp(path.join(os.tmpdir(), `mailsplice-${id}-`)));
  assertPlain('dir', dir);
  await mkdir(dir, { recursive: true });
  await chmod(dir, 0o755);
  await assertTraversable(dir);
  const confDir = path.join(dir, 'conf');
  const spool = path.join(dir, 'spool');
  const imapdConf = path.join(dir, 'imapd.conf');
  const cyrusConf = path.join(dir, 'cyrus.conf');
  const logFile = path.join(dir, 'master.log');
  const pidFile = path.join(dir, 'master.pid');
  const sasldb = path.join(confDir, 'sasldb2');
  // imapd binds its IDLE client socket in $configdirectory/socket, whatever idlesocket says.
  for (const d of [confDir, spool, ...['socket', 'proc', 'lock', 'sieve', 'tls'].map((s) => path.join(confDir, s))]) {
    await mkdir(d, { recursive: true });
    await chown(d, owner.uid, owner.gid);
  }

  const [imap, pop3, lmtp, lmtpAuth, sync, sieve, imaps, pop3s] = (await freePorts(host, opts.tls ? 8 : 6)) as [
    number, number, number, number, number, number, number | undefined, number | undefined,
  ];

  let tlsConf = '';
  if (opts.tls) {
    // Services run as cyrus and read the key themselves.
    const cert = path.join(confDir, 'tls', 'server.crt');
    const key = path.join(confDir, 'tls', 'server.key');
    await copyFile(opts.tls.certFile, cert);
    await copyFile(opts.tls.keyFile, key);
    await chmod(key, 0o600);
    for (const f of [cert, key]) await chown(f, owner.uid, owner.gid);
    tlsConf = `tls_server_cert: ${cert}\ntls_server_key: ${key}\n`;
  }

  const generated = `# Generated by test/harness/cyrus.ts for slot ${id}. Every path is under this slot's dir.
configdirectory: ${confDir}
defaultpartition: default
partition-default: ${spool}
proc_path: ${confDir}/proc
mboxname_lockpath: ${confDir}/lock
sievedir: ${confDir}/sieve
lmtpsocket: ${confDir}/socket/lmtp
idlesocket: ${confDir}/socket/idle
notifysocket: ${confDir}/socket/notify
servername: ${servername}
# Users see INBOX and INBOX-level folders; the admin names them user/NAME.
altnamespace: yes
unixhierarchysep: yes
virtdomains: off
hashimapspool: false
# Tests only: plaintext logins without TLS.
allowplaintext: yes
duplicatesuppression: no
# The default (delayed) makes a second DELETE of the same name within a second fail.
delete_mode: immediate
popminpoll: 0
# Tests fail logins on purpose; the default pauses 3 s after each.
failedloginpause: 0
lmtp_downcase_rcpt: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: ${sasldb}
sasl_mech_list: PLAIN LOGIN
# These may AUTHENTICATE PLAIN with authzid = a user and get that user's session
# (admins may, even when not listed in proxyservers).
admins: ${admin.name}
proxyservers: ${[admin, ...proxyUsers].map((u) => u.name).join(' ')}
# Rolling replication by hand: sync_client -S HOST:PORT -u USER. Without
# sync_try_imap: no, sync_client first speaks IMAP to the sync_server port and
# waits 10 s for a reply that never comes.
sync_authname: ${admin.name}
sync_password: ${admin.password}
sync_try_imap: no
${tlsConf}`;
  await writeFile(imapdConf, withOverrides(generated, opts.extraImapdConf ?? ''), { mode: 0o640 });
  // The services read it as cyrus (it holds the sync password).
  await chown(imapdConf, owner.uid, owner.gid);

  // master passes no -C to what it starts: every command names the config itself,
  // or it reads /etc/imapd.conf (Debian's system instance).
  const cmd = (bin: string, args = ''): string => `cmd="${bin} -C ${imapdConf}${args ? ' ' + args : ''}"`;
  const listen = (port: number): string => `listen="${host}:${port}"`;
  const unpacked = (b: string): string => path.join(UNPACKED_BIN, b);
  const common = (b: string): string => path.join(COMMON_BIN, b);
  await writeFile(
    cyrusConf,
    `# Generated by test/harness/cyrus.ts for slot ${id}.
START {
  recover ${cmd(common('ctl_cyrusdb'), '-r')}
}
SERVICES {
  imap ${cmd(unpacked('imapd'))} ${listen(imap)} prefork=0
  pop3 ${cmd(unpacked('pop3d'))} ${listen(pop3)} prefork=0
  lmtp ${cmd(common('lmtpd'), '-a')} ${listen(lmtp)} prefork=0
  lmtpauth ${cmd(common('lmtpd'))} ${listen(lmtpAuth)} prefork=0
  syncserver ${cmd(unpacked('sync_server'))} ${listen(sync)} prefork=0
  sieve ${cmd(common('timsieved'))} ${listen(sieve)} prefork=0
${imaps !== undefined ? `  imaps ${cmd(unpacked('imapd'), '-s')} ${listen(imaps)} prefork=0\n` : ''}${pop3s !== undefined ? `  pop3s ${cmd(unpacked('pop3d'), '-s')} ${listen(pop3s)} prefork=0\n` : ''}}
EVENTS {
  checkpoint ${cmd(common('ctl_cyrusdb'), '-c')} period=30
}
DAEMON {
  # Pushes changes to IDLE sessions; without it IDLE polls every 60 s.
  idled ${cmd(unpacked('idled'))}
}
`,
  );

  const setPassword = async (u: SlotUser): Promise<void> => {
    // -p: password from stdin, byte for byte; the realm must equal servername.
    await run('saslpasswd2', ['-p', '-c', '-f', sasldb, '-u', servername, u.name], { input: u.password });
    await chown(sasldb, owner.uid, owner.gid);
    await chmod(sasldb, 0o640);
  };
  for (const u of [admin, ...users, ...proxyUsers]) await setPassword(u);

  let masterPid: number | undefined;
  let unregister: (() => void) | undefined;

  const logTail = async (): Promise<string> => {
    const log = await readFile(logFile, 'utf8').catch(() => '');
    return `--- ${logFile} (tail) ---\n${log.split('\n').slice(-40).join('\n')}`;
  };

  const greets = async (port: number, prefix: string): Promise<boolean> => {
    const c = await connectLines({ host, port, timeoutMs: 1000 });
    try {
      return (await c.readLine(2000)).startsWith(prefix);
    } finally {
      c.close();
    }
  };

  /** A pid file left by an earlier run on this dir, if that pid is still this slot's master (not a reused pid). */
  const ownMasterFromPidFile = async (): Promise<number | undefined> => {
    const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
    if (!pid) return undefined;
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    return cmdline.split('\0').includes(imapdConf) ? pid : undefined;
  };

  const stop = async (): Promise<void> => {
    const pid = masterPid ?? (await ownMasterFromPidFile());
    if (!pid) return;
    signal(pid, 'SIGTERM');
    if (!(await waitFor(() => !running(pid), 10_000))) signal(pid, 'SIGKILL');
    // Services of a master that died (or was SIGKILLed) keep their listening sockets.
    for (const child of sessionMembers(pid)) signal(child, 'SIGKILL');
    if (!(await waitFor(() => sessionMembers(pid).length === 0 && !running(pid), 5000))) {
      throw new Error(`cyrus slot ${id}: processes of session ${pid} survive SIGKILL: ${sessionMembers(pid).join(' ')}`);
    }
    unregister?.();
    unregister = undefined;
    masterPid = undefined;
    await rm(pidFile, { force: true });
  };

  const start = async (): Promise<void> => {
    if (masterPid !== undefined && running(masterPid)) return;
    await rm(pidFile, { force: true });
    // -d: master forks into its own session (setsid), which is how stop() finds
    // its services; -L gets its stderr (and that of the services).
    await run(common('master'), ['-C', imapdConf, '-M', cyrusConf, '-p', pidFile, '-d', '-L', logFile], { cwd: dir }).catch(
      (err: unknown) => {
        // Cyrus reports config errors only to syslog, which these machines lack.
        throw new Error(`cyrus slot ${id}: master did not start (exit 78 = a bad ${imapdConf} or ${cyrusConf}): ${String(err)}`);
      },
    );
    const pidKnown = await waitFor(() => existsSync(pidFile) && Number(readFileSync(pidFile, 'utf8').trim()) > 0, 10_000);
    if (!pidKnown) throw new Error(`cyrus slot ${id}: master wrote no pid file\n${await logTail()}`);
    const pid = Number((await readFile(pidFile, 'utf8')).trim());
    masterPid = pid;
    unregister = killOnExit(() => {
      signal(pid, 'SIGTERM');
      for (const child of sessionMembers(pid)) if (child !== pid) signal(child, 'SIGTERM');
    });
    await waitUntil(async () => running(pid) && (await greets(imap, '* OK')) && (await greets(lmtp, '220')), {
      what: `cyrus slot ${id} (${host}:${imap})`,
      describe: async () => `master ${pid} ${running(pid) ? 'running' : 'gone'}\n${await logTail()}`,
    }).catch(async (err: unknown) => {
      await stop().catch(() => undefined); // do not leave a half-started Cyrus behind
      throw err;
    });
  };

  const adminImap = async (commands: string[]): Promise<string[]> => {
    const c = await connectLines({ host, port: imap, timeoutMs: 10_000 });
    const lines: string[] = [];
    const step = async (tag: string, command: string, shown = command): Promise<void> => {
      c.send(`${tag} ${command}`);
      const reply = await c.readUntil(new RegExp(`^${tag} `), 10_000);
      lines.push(...reply);
      const last = reply.at(-1) ?? '';
      if (!last.startsWith(`${tag} OK`)) throw new Error(`cyrus slot ${id}: ${shown} -> ${last}`);
    };
    try {
      lines.push(await c.readLine(10_000));
      // SASL-IR: no quoting rules to get wrong for the password.
      const plain = Buffer.from(`\0${admin.name}\0${admin.password}`).toString('base64');
      await step('a0', `AUTHENTICATE PLAIN ${plain}`, `AUTHENTICATE PLAIN (admin ${admin.name})`);
      let n = 0;
      for (const command of commands) await step(`a${++n}`, command);
      c.send('z LOGOUT');
      await c.readUntil(/^z /, 5000).catch(() => []);
      return lines;
    } finally {
      c.close();
    }
  };

  const createMailbox = async (name: string): Promise<void> => {
    await adminImap([`CREATE user/${name}`]).catch((err: unknown) => {
      // A slot restarted on an existing dir already has it.
      if (!/already exists/i.test(String(err))) throw err;
    });
  };

  const deliver = async (user: string, rfc822: string): Promise<string> => {
    const t = await lmtpTransaction({ host, port: lmtp }, 'harness@example.net', [user], rfc822);
    const done = t.results[0] ?? '';
    if (!done.startsWith('250')) throw new Error(`cyrus slot ${id}: LMTP delivery to ${user}: RCPT ${t.rcpt[0]}, DATA ${t.data} ${done}`);
    return done;
  };

  const addUser = async (u: SlotUser): Promise<void> => {
    if (!/^[a-z0-9][a-z0-9._-]*$/.test(u.name) || /[\r\n\0]/.test(u.password)) throw new Error(`unsupported cyrus user: ${u.name}`);
    await setPassword(u);
    users.push({ ...u });
    if (masterPid !== undefined && running(masterPid)) await createMailbox(u.name);
  };

  const syncUser = async (user: string, replica: CyrusSlot): Promise<string> => {
    if (replica.admin.name !== admin.name || replica.admin.password !== admin.password) {
      throw new Error(`cyrus slot ${id}: sync to ${replica.id} needs the same admin on both slots`);
    }
    // As cyrus, or the files it creates in our config dir end up owned by root.
    return run('timeout', ['60', 'runuser', '-u', 'cyrus', '--', path.join(UNPACKED_BIN, 'sync_client'),
      '-C', imapdConf, '-S', `${replica.host}:${replica.sync}`, '-u', user]);
  };

  try {
    await start();
    for (const u of users) await createMailbox(u.name);
  } catch (err) {
    await stop().catch(() => undefined);
    if (!opts.dir) await rm(dir, { recursive: true, force: true });
    throw err;
  }

  return {
    id,
    host,
    servername,
    imap,
    pop3,
    lmtp,
    lmtpAuth,
    sync,
    sieve,
    ...(imaps !== undefined ? { imaps } : {}),
    ...(pop3s !== undefined ? { pop3s } : {}),
    dir,
    admin,
    users,
    proxyUsers,
    imapdConf,
    cyrusConf,
    logFile,
    pidFile,
    syncClientBin: path.join(UNPACKED_BIN, 'sync_client'),
    stop,
    start,
    destroy: async () => {
      await stop();
      if (!opts.dir) await rm(dir, { recursive: true, force: true });
    },
    deliver,
    addUser,
    adminImap,
    syncUser,
  };
}
