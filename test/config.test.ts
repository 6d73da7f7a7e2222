import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { identityFor } from '../src/auth/identity.js';
import { ConfigError, loadConfig, parseConfig, plaintextAllowed } from '../src/config.js';
import { backendTlsFor } from '../src/net/backend.js';
import { tempDir } from './support/tmp.js';

const execFileP = promisify(execFile);
const dir = tempDir('config');

function file(name: string, text: string): string {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
}

describe('config', () => {
  it('accepts the example config shipped in deploy/', () => {
    const cfg = loadConfig(resolve(import.meta.dirname, '../deploy/mailsplice.example.yaml'));
    expect(cfg.listeners.map((l) => l.protocol)).toEqual(['imap', 'imap', 'pop3', 'pop3', 'sieve', 'lmtp']);
    expect(plaintextAllowed(cfg.listeners[0]!)).toBe(false); // TLS configured: no cleartext by default
  });

  it('takes workers: auto or a number, and a parsed config parses again to itself (workers get it as JSON)', () => {
    const auto = loadConfig(resolve(import.meta.dirname, '../deploy/mailsplice.example.yaml'));
    expect(auto.workers).toBe('auto');
    expect(parseConfig(JSON.parse(JSON.stringify(auto)), 'again')).toEqual(auto);
    const sentinel = parseConfig({ workers: 4, listeners: [{ protocol: 'imap', port: 1143 }], lookup: { redis: { sentinels: ['127.0.0.1:26379'], name: 'm', password: 'x' } } }, 'test');
    expect(sentinel.workers).toBe(4);
    expect(parseConfig(JSON.parse(JSON.stringify(sentinel)), 'again')).toEqual(sentinel);
    expect(() => parseConfig({ workers: 0, listeners: [{ protocol: 'imap', port: 1143 }], lookup: { file: 'r.yaml' } }, 'test')).toThrow(/workers/);
  });

  it('checks the lookup fault settings', () => {
    const doc = (lookup: object) => ({ listeners: [{ protocol: 'imap', port: 1143 }], lookup });
    const cfg = parseConfig(doc({ redis: {} }), 't');
    expect(cfg.lookup).toMatchObject({ redis: { heartbeat_ms: 1000, heartbeat_timeout_ms: 3000 }, max_resync_removed: 0.5, resync_retry_max_ms: 30_000 });
    expect(() => parseConfig(doc({ redis: { heartbeat_ms: 2000, heartbeat_timeout_ms: 2000 } }), 't')).toThrow(/lookup\.redis\.heartbeat_timeout_ms: must be more than heartbeat_ms/);
    expect(() => parseConfig(doc({ redis: {}, max_resync_removed: 1.5 }), 't')).toThrow(/lookup\.max_resync_removed/);
  });

  it('takes Redis Sentinel (sentinels, name, passwords, TLS) or a url, not both', () => {
    const doc = (redis: object) => ({ listeners: [{ protocol: 'imap', port: 1143 }], lookup: { redis } });
    expect(parseConfig(doc({}), 't').lookup.redis?.url).toBe('redis://127.0.0.1:6379');
    const cfg = parseConfig(doc({ sentinels: ['10.0.0.1:26379', '[::1]:26380'], name: 'ms', password: 'p', sentinel_password: 's', tls: { ca: 'ca.pem' } }), 't', '/etc/m');
    expect(cfg.lookup.redis).toMatchObject({ sentinels: ['10.0.0.1:26379', '[::1]:26380'], name: 'ms', tls: { ca: '/etc/m/ca.pem', verify: true, sentinels: true } });
    expect(cfg.lookup.redis?.url).toBeUndefined();
    expect(() => parseConfig(doc({ sentinels: ['a:1'] }), 't')).toThrow(/lookup\.redis\.name: sentinels need the master group name/);
    expect(() => parseConfig(doc({ sentinels: ['a:1'], name: 'ms', url: 'redis://a' }), 't')).toThrow(/lookup\.redis\.url: set url or sentinels, not both/);
    expect(() => parseConfig(doc({ name: 'ms' }), 't')).toThrow(/lookup\.redis\.name: name goes with sentinels/);
    expect(() => parseConfig(doc({ sentinels: ['10.0.0.1'], name: 'ms' }), 't')).toThrow(/lookup\.redis\.sentinels\.0: host:port/);
    expect(() => parseConfig(doc({ sentinels: ['10.0.0.1:0'], name: 'ms' }), 't')).toThrow(/lookup\.redis\.sentinels\.0: port 1-65535/);
    expect(() => parseConfig(doc({ sentinels: [], name: 'ms' }), 't')).toThrow(/lookup\.redis\.sentinels/);
  });

  it('PROXY protocol: proxy_protocol needs trusted_networks (IPv4/IPv6 CIDRs or addresses), TCP only; proxy_protocol_groups per slot', () => {
    const doc = (l: object, backend: object = {}) => ({ listeners: [{ protocol: 'imap', port: 1143, ...l }], lookup: { file: 'r' }, backend });
    const cfg = parseConfig(doc({ proxy_protocol: 'required', trusted_networks: ['10.0.0.0/8', '192.0.2.7', '2001:db8::/32', '::1'] }, { proxy_protocol_groups: [{ slots: ['dove*'] }] }), 't');
    expect(cfg.listeners[0]).toMatchObject({ proxy_protocol: 'required', trusted_networks: ['10.0.0.0/8', '192.0.2.7', '2001:db8::/32', '::1'] });
    expect(cfg.backend.proxy_protocol_groups).toEqual([{ slots: ['dove*'], protocols: ['imap', 'pop3'] }]);
    expect(parseConfig(doc({}), 't').listeners[0]!.proxy_protocol).toBe('off');
    expect(() => parseConfig(doc({ proxy_protocol: 'required' }), 't')).toThrow(/listeners\.0\.trusted_networks: proxy_protocol: required needs trusted_networks/);
    expect(() => parseConfig(doc({ trusted_networks: ['10.0.0.1'] }), 't')).toThrow(/trusted_networks only applies with proxy_protocol/);
    expect(() => parseConfig(doc({ proxy_protocol: 'optional', trusted_networks: ['10.0.0.1'] }), 't')).toThrow(/listeners\.0\.proxy_protocol/);
    expect(() => parseConfig(doc({ proxy_protocol: 'from_trusted', trusted_networks: ['10.0.0.0/33'] }), 't')).toThrow(/trusted_networks\.0: "10\.0\.0\.0\/33": the prefix length must be 0 to 32/);
    expect(() => parseConfig(doc({ proxy_protocol: 'from_trusted', trusted_networks: ['lb.example.com'] }), 't')).toThrow(/not an IPv4 or IPv6 address/);
    expect(() => parseConfig({ listeners: [{ protocol: 'lmtp', path: '/run/x.sock', proxy_protocol: 'required', trusted_networks: ['10.0.0.1'] }], lookup: { file: 'r' } }, 't')).toThrow(/TCP only|not on a unix socket/);
    expect(() => parseConfig(doc({}, { proxy_protocol_groups: [{ slots: ['a'], protocols: ['lmtp'] }] }), 't')).toThrow(/backend\.proxy_protocol_groups\.0\.protocols/);
  });

  it('fills defaults and makes paths relative to the file', () => {
    const cfg = loadConfig(file('min.yaml', 'listeners: [{ protocol: imap, port: 1143 }]\nlookup: { file: routes.yaml }\n'));
    expect(cfg.lookup.file).toBe(join(dir, 'routes.yaml'));
    expect(cfg.limits.line_length).toBe(65536);
    expect(plaintextAllowed(cfg.listeners[0]!)).toBe(true);
  });

  it('names the file and the path of an unknown key', () => {
    const p = file('bad.yaml', 'listeners: [{ protocol: imap, port: 1143, colour: blue }]\nlookup: { file: r.yaml }\n');
    expect(() => loadConfig(p)).toThrow(ConfigError);
    expect(() => loadConfig(p)).toThrow(new RegExp(`${p}[\\s\\S]*listeners\\.0: Unrecognized key: "colour"`));
  });

  it('refuses contradictions: both lookups, TLS without a certificate, a bad port', () => {
    expect(() => parseConfig({ listeners: [{ protocol: 'imap', port: 1 }], lookup: { file: 'a', redis: {} } }, 'x')).toThrow(/exactly one of lookup.file or lookup.redis/);
    expect(() => parseConfig({ listeners: [{ protocol: 'imap', port: 993, tls: 'implicit' }], lookup: { file: 'a' } }, 'x')).toThrow(/needs cert and key/);
    expect(() => parseConfig({ listeners: [{ protocol: 'imap', port: 70000 }], lookup: { file: 'a' } }, 'x')).toThrow(/listeners\.0\.port/);
    expect(() => parseConfig({ listeners: [{ protocol: 'imap', port: 1 }], lookup: { file: 'a' }, limits: { login_timeout_ms: 2000 } }, 'x')).toThrow(
      /limits\.auth_failure_delay_ms: must be less than login_timeout_ms/,
    );
  });

  it('stops `mailsplice serve` with exit code 78 and the message', async () => {
    const p = file('typo.yaml', 'listeners: [{ protocol: imap, port: 1143 }]\nlookup: { file: r.yaml }\nlimitz: {}\n');
    const cli = resolve(import.meta.dirname, '../src/cli.ts');
    const err = await execFileP(process.execPath, ['--import', 'tsx', cli, 'serve', '--config', p]).catch((e: { code: number; stderr: string }) => e);
    expect(err).toMatchObject({ code: 78 });
    expect((err as { stderr: string }).stderr).toMatch(/Unrecognized key: "limitz"/);
  });

  it('takes per-protocol backend TLS over the slot group, key by key (IMAP over TLS, LMTP cleartext or STARTTLS)', () => {
    const cfg = parseConfig(
      {
        listeners: [{ protocol: 'imap', port: 1143 }],
        lookup: { file: 'r.yaml' },
        backend: {
          tls: { mode: 'starttls', lmtp: { mode: 'none' } },
          tls_groups: [{ slots: ['cyrus*'], mode: 'implicit', ca: 'ca.pem', servername: 'store.test', lmtp: { mode: 'starttls', verify: false } }],
        },
      },
      't',
      dir,
    );
    const b = cfg.backend;
    expect(backendTlsFor(b, 'cyrus1', 'imap')).toMatchObject({ mode: 'implicit', ca: join(dir, 'ca.pem'), servername: 'store.test', verify: true });
    expect(backendTlsFor(b, 'cyrus1', 'lmtp')).toEqual({ mode: 'starttls', ca: join(dir, 'ca.pem'), servername: 'store.test', verify: false });
    // The same object each time: the TLS context cache is keyed by it.
    expect(backendTlsFor(b, 'cyrus1', 'lmtp')).toBe(backendTlsFor(b, 'cyrus2', 'lmtp'));
    expect(backendTlsFor(b, 'slotA', 'pop3')).toMatchObject({ mode: 'starttls' });
    expect(backendTlsFor(b, 'slotA', 'lmtp')).toEqual({ mode: 'none', verify: true });
    expect(() => parseConfig({ listeners: [{ protocol: 'imap', port: 1 }], lookup: { file: 'a' }, backend: { tls: { lmtp: { mode: 'tls' } } } }, 'x')).toThrow(/backend\.tls\.lmtp\.mode/);
  });

  it('reads backend identity groups: the admin and its password file go together', () => {
    const pw = file('admin.pw', 's3cret\n');
    const doc = (identity_groups: object[]) => ({ listeners: [{ protocol: 'imap', port: 1143 }], lookup: { file: 'r.yaml' }, backend: { identity_groups } });
    const cfg = parseConfig(doc([{ slots: ['cyrus*'], admin_user: 'cyrusadmin', admin_password_file: 'admin.pw', login_name: 'local_part' }]), 't', dir);
    const id = identityFor(cfg.backend, 'cyrus1');
    expect(id).toMatchObject({ mode: 'passthrough', loginName: 'local_part', admin: { user: 'cyrusadmin' } });
    expect(id.admin?.password.toString()).toBe('s3cret');
    expect(identityFor(cfg.backend, 'slotA')).toEqual({ mode: 'passthrough', loginName: 'full', oauth: 'passthrough' });
    expect(pw).toBe(join(dir, 'admin.pw'));
    expect(() => parseConfig(doc([{ slots: ['a'], admin_user: 'x' }]), 'x')).toThrow(/admin_user and admin_password_file go together/);
    expect(() => parseConfig(doc([{ slots: ['a'], identity: 'admin' }]), 'x')).toThrow(/identity: admin needs admin_user/);
  });
});
