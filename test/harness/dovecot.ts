import { randomBytes } from 'node:crypto';
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { connectLines } from './lines.js';
import { freePorts } from './ports.js';
import { spawnDaemon, waitUntil, type Daemon } from './proc.js';

export interface SlotUser {
  name: string;
  password: string;
  /** The password as raw bytes when it is not UTF-8 (e.g. latin-1); overrides `password` in the passwd-file. */
  passwordBytes?: Buffer;
}

export interface DovecotSlotOptions {
  id: string;
  /** Loopback address to listen on, e.g. 127.0.0.11. */
  host: string;
  users: SlotUser[];
  tls?: { certFile: string; keyFile: string; required?: boolean };
  /** Per user+IP connection cap for IMAP and POP3 (default 1000). */
  maxUserIpConnections?: number;
  /**
   * login_trusted_networks. Default 127.0.0.0/8, or none when tls.required:
   * Dovecot treats trusted clients as secured, which would make loopback
   * clients exempt from ssl = required.
   */
  trustedNetworks?: string;
  /** Directory to use; a fresh temp dir by default. */
  dir?: string;
  /**
   * Master users: each may log in as any user, as SASL PLAIN with authzid = the user or
   * as `user*master` (auth_master_user_separator = *) with the master's password.
   */
  masterUsers?: SlotUser[];
  /** Appended verbatim to the generated dovecot.conf (later settings win). */
  extraConfig?: string;
  /**
   * ManageSieve (dovecot-managesieved) on a port of its own, and Sieve run by LMTP on
   * delivery (dovecot-sieve: mail_plugins sieve), scripts in ~/sieve.
   */
  sieve?: boolean;
}

export interface DovecotSlot {
  id: string;
  host: string;
  imap: number;
  pop3: number;
  lmtp: number;
  imaps?: number;
  pop3s?: number;
  /** ManageSieve, when started with `sieve: true`. */
  sieve?: number;
  dir: string;
  /** Dovecot's main log (errors/warnings and info). */
  logFile: string;
  users: SlotUser[];
  /** Terminates Dovecot (and with it all client sessions); data stays. */
  stop(): Promise<void>;
  /** Starts again on the same ports with the same data. */
  start(): Promise<void>;
  /** stop(), then delete dir if the harness created it. */
  destroy(): Promise<void>;
  /** Drops a message straight into the user's maildir new/ (bypassing Dovecot). */
  deliver(user: string, rfc822: string, folder?: string): Promise<void>;
  /** Raw contents of all messages in cur/ and new/ of a folder, oldest first (by maildir file name). */
  messages(user: string, folder?: string): Promise<string[]>;
}

/**
 * Dovecot refuses to run mail processes as root, so mail is owned by the
 * Debian `mail` system user (uid/gid 8) and first_valid_uid is lowered to it.
 * Using an existing user avoids creating one (useradd) on CI machines.
 */
async function mailOwner(): Promise<{ uid: number; gid: number }> {
  const passwd = await readFile('/etc/passwd', 'utf8');
  const line = passwd.split('\n').find((l) => l.startsWith('mail:'));
  const [, , uid, gid] = line?.split(':') ?? [];
  if (uid === undefined || gid === undefined) throw new Error('no "mail" user in /etc/passwd');
  return { uid: Number(uid), gid: Number(gid) };
}

/** Maildir++ directory of a folder: INBOX is the root, others are .Name (hierarchy with dots). */
function folderDir(maildir: string, folder: string): string {
  return folder.toUpperCase() === 'INBOX' ? maildir : path.join(maildir, '.' + folder.replace(/\//g, '.'));
}

/**
 * Auth runs as `dovecot`, logins as `dovenull`, mail as `mail`: if any parent
 * of the slot dir is closed to others, logins fail only later with a vague
 * "Temporary authentication failure". Fail early and say why instead.
 */
async function assertTraversable(dir: string): Promise<void> {
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    if (((await stat(d)).mode & 0o001) === 0) {
      throw new Error(`dovecot slot dir ${dir}: ${d} is not searchable by other users (chmod o+x)`);
    }
    if (path.dirname(d) === d) return;
  }
}

let deliverSeq = 0;

export async function startDovecotSlot(opts: DovecotSlotOptions): Promise<DovecotSlot> {
  const { id, host, users } = opts;
  if (!/^[A-Za-z0-9_-]+$/.test(id)) throw new Error(`slot id must be [A-Za-z0-9_-]+: ${id}`);
  for (const u of users) {
    if (/[:\s/]/.test(u.name) || /[:\s]/.test(u.password) || /[:\s]/.test(u.passwordBytes?.toString('latin1') ?? '')) {
      throw new Error(`unsupported user/password: ${u.name}`);
    }
  }
  const owner = await mailOwner();
  const dir = opts.dir ?? (await mkdtemp(path.join(os.tmpdir(), `mailsplice-${id}-`)));
  // Login (dovenull), auth (dovecot) and mail (uid 8) processes all need to
  // traverse this tree; mkdtemp creates 0700.
  await mkdir(dir, { recursive: true });
  await chmod(dir, 0o755);
  await assertTraversable(dir);
  const runDir = path.join(dir, 'run');
  const stateDir = path.join(dir, 'state');
  const mailRoot = path.join(dir, 'mail');
  const logFile = path.join(dir, 'dovecot.log');
  const confFile = path.join(dir, 'dovecot.conf');
  const passwdFile = path.join(dir, 'users.passwd');
  const masterFile = path.join(dir, 'masters.passwd');
  await mkdir(stateDir, { recursive: true });
  await mkdir(mailRoot, { recursive: true });
  await chown(mailRoot, owner.uid, owner.gid);

  const ports = await freePorts(host, 3 + (opts.tls ? 2 : 0) + (opts.sieve ? 1 : 0));
  const [imap, pop3, lmtp] = ports as [number, number, number];
  const [imaps, pop3s] = opts.tls ? (ports.slice(3, 5) as [number, number]) : [undefined, undefined];
  const sieve = opts.sieve ? ports.at(-1) : undefined;

  const home = (user: string): string => path.join(mailRoot, user);
  // passwd-file: user:password:uid:gid:gecos:home:shell:extra. Serves as both
  // passdb and userdb, so LMTP rejects unknown recipients with 550.
  await writeFile(
    passwdFile,
    // Bytes, not a string: a passwordBytes that is not UTF-8 must reach Dovecot unchanged.
    Buffer.concat(
      users.map((u) =>
        Buffer.concat([
          Buffer.from(`${u.name}:{PLAIN}`),
          u.passwordBytes ?? Buffer.from(u.password),
          Buffer.from(`:${owner.uid}:${owner.gid}::${home(u.name)}::\n`),
        ]),
      ),
    ),
    { mode: 0o644 },
  );

  const masters = opts.masterUsers ?? [];
  for (const m of masters) if (/[:\s*]/.test(m.name) || /[:\s]/.test(m.password)) throw new Error(`unsupported master user/password: ${m.name}`);
  if (masters.length > 0) await writeFile(masterFile, masters.map((m) => `${m.name}:{PLAIN}${m.password}\n`).join(''), { mode: 0o644 });

  // Unique per slot (shows in `ps` as the master's name); ids repeat across worlds.
  const instanceName = `mailsplice-${id}-${randomBytes(3).toString('hex')}`;
  const maxConn = opts.maxUserIpConnections ?? 1000;
  const trusted = opts.trustedNetworks ?? (opts.tls?.required ? '' : '127.0.0.0/8');
  const listener = (name: string, port: number | undefined, ssl = false): string =>
    port === undefined ? '' : `  inet_listener ${name} {\n    address = ${host}\n    port = ${port}\n${ssl ? '    ssl = yes\n' : ''}  }\n`;

  const conf = `# Generated by test/harness/dovecot.ts for slot ${id}
# Own instance name, base_dir and state_dir so several slots run side by side
# without touching /run/dovecot or /var/lib/dovecot.
instance_name = ${instanceName}
base_dir = ${runDir}
state_dir = ${stateDir}
listen = ${host}
protocols = imap pop3 lmtp${sieve !== undefined ? ' sieve' : ''}

# No syslog in the test environment.
log_path = ${logFile}
info_log_path = ${logFile}
debug_log_path = ${logFile}
auth_verbose = yes

default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull

# Hundreds of concurrent sessions per test; defaults allow only 100 processes.
default_process_limit = 1000
default_client_limit = 5000

auth_mechanisms = plain login
# Failed logins (tests do them on purpose) would otherwise answer after 2s, and
# anvil's per-IP auth penalty then delays *every* login from 127.0.0.1 by up
# to 15s. mode = 0 removes the penalty socket, which disables the penalty.
auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
disable_plaintext_auth = no
# Lets a proxy in front pass the real client IP (IMAP ID / XCLIENT). Dovecot
# also counts trusted clients as "secured", so ssl = required would not apply.
login_trusted_networks = ${trusted}
${masters.length > 0 ? `# Master users (the proxy's admin identity); pass = yes: the user must exist in the passdb below.
auth_master_user_separator = *
passdb {
  driver = passwd-file
  master = yes
  pass = yes
  args = scheme=PLAIN ${masterFile}
}
` : ''}passdb {
  driver = passwd-file
  args = scheme=PLAIN ${passwdFile}
}
userdb {
  driver = passwd-file
  args = ${passwdFile}
}

mail_location = maildir:${mailRoot}/%u/Maildir
first_valid_uid = ${owner.uid}
last_valid_uid = ${owner.uid}
first_valid_gid = ${owner.gid}
pop3_uidl_format = %08Xu%08Xv
lmtp_save_to_detail_mailbox = no

${opts.tls ? `ssl = ${opts.tls.required ? 'required' : 'yes'}\nssl_cert = <${opts.tls.certFile}\nssl_key = <${opts.tls.keyFile}` : 'ssl = no'}

protocol imap {
  mail_max_userip_connections = ${maxConn}
}
protocol pop3 {
  mail_max_userip_connections = ${maxConn}
}

service imap-login {
${listener('imap', imap)}${listener('imaps', imaps, true)}}
service pop3-login {
${listener('pop3', pop3)}${listener('pop3s', pop3s, true)}}
service lmtp {
${listener('lmtp', lmtp)}}
${sieve !== undefined ? `service managesieve-login {
${listener('sieve', sieve)}}
protocol lmtp {
  mail_plugins = $mail_plugins sieve
}
plugin {
  sieve = file:~/sieve;active=~/.dovecot.sieve
}
` : ''}
service imap {
  process_limit = 1000
}
service pop3 {
  process_limit = 1000
}
${opts.extraConfig ?? ''}
`;
  await writeFile(confFile, conf);

  let daemon: Daemon | undefined;
  const logTail = async (): Promise<string> => {
    const log = await readFile(logFile, 'utf8').catch(() => '');
    return `--- ${logFile} (tail) ---\n${log.split('\n').slice(-40).join('\n')}\n--- dovecot stdout/stderr ---\n${daemon?.output() ?? ''}`;
  };

  const start = async (): Promise<void> => {
    if (daemon && !daemon.hasExited()) return;
    // -F: stay in the foreground so we own the process and see it exit.
    daemon = spawnDaemon('dovecot', ['-F', '-c', confFile], dir);
    const d = daemon;
    await waitUntil(
      async () => {
        const c = await connectLines({ host, port: imap, timeoutMs: 1000 });
        try {
          return (await c.readLine(2000)).startsWith('* OK');
        } finally {
          c.close();
        }
      },
      { what: `dovecot slot ${id} (${host}:${imap})`, daemon: d, describe: logTail },
    ).catch(async (err: unknown) => {
      await d.stop(); // do not leave a half-started Dovecot behind
      throw err;
    });
  };

  const stop = async (): Promise<void> => {
    await daemon?.stop(10_000);
  };

  const maildir = (user: string): string => path.join(home(user), 'Maildir');

  const deliver = async (user: string, rfc822: string, folder = 'INBOX'): Promise<void> => {
    const fdir = folderDir(maildir(user), folder);
    // Create every missing level owned by the mail user, or Dovecot cannot write indexes there.
    const levels = [home(user), maildir(user), fdir, ...['cur', 'new', 'tmp'].map((s) => path.join(fdir, s))];
    for (const d of levels) {
      await mkdir(d, { recursive: true, mode: 0o700 });
      await chown(d, owner.uid, owner.gid);
    }
    if (fdir !== maildir(user)) {
      const marker = path.join(fdir, 'maildirfolder');
      await writeFile(marker, '');
      await chown(marker, owner.uid, owner.gid);
    }
    // Maildir protocol: write to tmp/, then rename into new/ so Dovecot never sees a partial file.
    // Dovecot's own naming scheme (<unix secs>.M<n>P<pid>.<host>), so names sort by time.
    const name = `${Math.floor(Date.now() / 1000)}.M${++deliverSeq}P${process.pid}.mailsplice-harness`;
    const tmp = path.join(fdir, 'tmp', name);
    await writeFile(tmp, rfc822, { mode: 0o600 });
    await chown(tmp, owner.uid, owner.gid);
    await rename(tmp, path.join(fdir, 'new', name));
  };

  const messages = async (user: string, folder = 'INBOX'): Promise<string[]> => {
    const fdir = folderDir(maildir(user), folder);
    const files: string[] = [];
    for (const sub of ['cur', 'new']) {
      const names = await readdir(path.join(fdir, sub)).catch(() => [] as string[]);
      files.push(...names.map((n) => path.join(fdir, sub, n)));
    }
    files.sort((a, b) => path.basename(a).localeCompare(path.basename(b), 'en', { numeric: true }));
    return Promise.all(files.map((f) => readFile(f, 'utf8')));
  };

  await start();
  return {
    id,
    host,
    imap,
    pop3,
    lmtp,
    ...(imaps !== undefined ? { imaps } : {}),
    ...(pop3s !== undefined ? { pop3s } : {}),
    ...(sieve !== undefined ? { sieve } : {}),
    dir,
    logFile,
    users,
    // Dovecot's master takes ~1s to shut down (it waits for its children).
    stop,
    start,
    destroy: async () => {
      await stop();
      if (!opts.dir) await rm(dir, { recursive: true, force: true });
    },
    deliver,
    messages,
  };
}
