import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { backendCredentials, backendUserName, identityFor } from '../src/auth/identity.js';
import { findMechanism, MAX_SASL_ROUNDS, MECHANISMS, offeredMechanisms, runSasl, type SaslOutcome } from '../src/auth/mechanisms.js';
import { decodeBase64, parsePlain } from '../src/auth/sasl.js';
import { escapeFilterValue, userFilter } from '../src/auth/ldap.js';
import { parseConfig } from '../src/config.js';
import { preflight } from '../src/preflight.js';
import type { Route } from '../src/lookup/model.js';

// The mechanism table, the SASL dialogue driver and the identity rule are pure logic:
// tested here without sockets. The wire (IMAP/POP3 against real backends) is in auth-*.test.ts.

const runs = Number(process.env.MAILSPLICE_PROPERTY_RUNS ?? 0) || 300;
const params = (n = runs) => ({ seed: 42, numRuns: process.env.MAILSPLICE_PROPERTY_RUNS ? runs : n });
const b64 = (s: string) => Buffer.from(s, 'utf8').toString('base64');

/** Runs a mechanism against scripted client lines; records the challenges sent. */
async function exchange(name: string, initial: string | undefined, lines: string[]): Promise<{ outcome: SaslOutcome; challenges: string[] }> {
  const challenges: string[] = [];
  const mech = findMechanism(name, true)!;
  const outcome = await runSasl(mech, initial, {
    challenge: (c) => challenges.push(c),
    response: async () => {
      const l = lines.shift();
      if (l === undefined) throw new Error('client has nothing more to say');
      return l;
    },
  });
  return { outcome, challenges };
}

describe('mechanism table', () => {
  it('offers PLAIN always and LOGIN only when the proxy checks passwords', () => {
    expect(offeredMechanisms(false).map((m) => m.name)).toEqual(['PLAIN']);
    expect(offeredMechanisms(true).map((m) => m.name)).toEqual(['PLAIN', 'LOGIN']);
    expect(findMechanism('login', false)).toBeUndefined();
    expect(findMechanism('login', true)?.name).toBe('LOGIN');
    expect(findMechanism('plain', false)?.name).toBe('PLAIN');
    expect(findMechanism('CRAM-MD5', true)).toBeUndefined();
  });

  it('PLAIN with an initial response, without one (empty challenge), and "=" as empty', async () => {
    const msg = b64('\0alice\0pw');
    const ir = await exchange('PLAIN', msg, []);
    expect(ir.challenges).toEqual([]);
    expect(ir.outcome).toMatchObject({ kind: 'ok', credentials: { kind: 'password' } });
    const asked = await exchange('PLAIN', undefined, [msg]);
    expect(asked.challenges).toEqual(['']);
    if (asked.outcome.kind !== 'ok' || asked.outcome.credentials.kind !== 'password') throw new Error('not ok');
    expect(asked.outcome.credentials.authcid.toString()).toBe('alice');
    expect(asked.outcome.credentials.password.toString()).toBe('pw');
    expect((await exchange('PLAIN', '=', [])).outcome.kind).toBe('malformed');
  });

  it('PLAIN keeps an authzid that differs from the authcid, and drops one that equals it', async () => {
    const r = await exchange('PLAIN', b64('bob\0admin\0pw'), []);
    if (r.outcome.kind !== 'ok' || r.outcome.credentials.kind !== 'password') throw new Error('not ok');
    expect(r.outcome.credentials.authzid?.toString()).toBe('bob');
    const same = await exchange('PLAIN', b64('admin\0admin\0pw'), []);
    if (same.outcome.kind !== 'ok' || same.outcome.credentials.kind !== 'password') throw new Error('not ok');
    expect(same.outcome.credentials.authzid).toBeUndefined();
  });

  it('LOGIN asks Username: then Password:, or takes the user name as initial response', async () => {
    const r = await exchange('LOGIN', undefined, [b64('alice@example.com'), b64('pass word')]);
    expect(r.challenges).toEqual([b64('Username:'), b64('Password:')]);
    if (r.outcome.kind !== 'ok' || r.outcome.credentials.kind !== 'password') throw new Error('not ok');
    expect(r.outcome.credentials.authcid.toString()).toBe('alice@example.com');
    expect(r.outcome.credentials.password.toString()).toBe('pass word');
    const ir = await exchange('LOGIN', b64('alice'), [b64('pw')]);
    expect(ir.challenges).toEqual([b64('Password:')]);
    expect(ir.outcome.kind).toBe('ok');
  });

  it('"*" cancels at any step, bad base64 is malformed', async () => {
    expect((await exchange('PLAIN', undefined, ['*'])).outcome.kind).toBe('cancelled');
    expect((await exchange('LOGIN', undefined, [b64('a'), '*'])).outcome.kind).toBe('cancelled');
    expect((await exchange('LOGIN', undefined, ['not base64!'])).outcome.kind).toBe('malformed');
    expect((await exchange('PLAIN', 'a b', [])).outcome.kind).toBe('malformed');
    expect((await exchange('LOGIN', undefined, ['='])).outcome.kind).toBe('malformed'); // empty user name
  });

  it('every mechanism ends in a bounded number of rounds, whatever the client sends (property)', async () => {
    const line = fc.oneof(fc.constant('*'), fc.constant('='), fc.string({ maxLength: 40 }), fc.uint8Array({ maxLength: 60 }).map((a) => Buffer.from(a).toString('base64')));
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...MECHANISMS.keys()), fc.option(line, { nil: undefined }), fc.array(line, { maxLength: 12 }), async (name, initial, lines) => {
        let asked = 0;
        const outcome = await runSasl(MECHANISMS.get(name)!, initial, {
          challenge: () => undefined,
          response: async () => {
            asked++;
            return lines.shift() ?? '*';
          },
        });
        expect(asked).toBeLessThanOrEqual(MAX_SASL_ROUNDS);
        expect(['ok', 'cancelled', 'malformed']).toContain(outcome.kind);
        if (outcome.kind === 'ok' && outcome.credentials.kind === 'password') {
          expect(outcome.credentials.authcid.length).toBeGreaterThan(0);
          expect(outcome.credentials.authcid.includes(0)).toBe(false);
          expect(outcome.credentials.password.includes(0)).toBe(false);
        }
      }),
      params(),
    );
  });

  it('the decoders never throw and accept only canonical padded base64 (property)', () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 300 }), (s) => {
        const raw = decodeBase64(s);
        if (raw !== undefined && s !== '=') expect(raw.toString('base64')).toBe(s);
        if (raw) parsePlain(raw);
      }),
      params(2000),
    );
  });
});

describe('backend identity', () => {
  const route = (login: string, backendLogin = login): Route => ({ login, backendLogin, store: 's', slot: 'cyrus1', host: '127.0.0.1', ports: {} });
  const doc = (groups: unknown[]) =>
    parseConfig({ listeners: [{ protocol: 'imap', port: 1143 }], lookup: { file: 'r.yaml' }, backend: { identity_groups: groups }, auth: { ldap: { url: 'ldap://127.0.0.1', base_dn: 'dc=x' } } }, 'test');

  it('is passthrough with the full login when no group matches, and the first matching group wins', () => {
    const cfg = doc([{ slots: ['dove*'], login_name: 'full' }, { slots: ['cyrus*'], login_name: 'local_part' }, { slots: ['*'], login_name: 'full' }]);
    expect(identityFor(cfg.backend, 'other')).toMatchObject({ mode: 'passthrough', loginName: 'full' });
    expect(identityFor(cfg.backend, 'cyrus1')).toMatchObject({ mode: 'passthrough', loginName: 'local_part' });
    expect(identityFor(parseConfig({ listeners: [{ protocol: 'imap', port: 1 }], lookup: { file: 'r' } }, 't').backend, 'x')).toEqual({ mode: 'passthrough', loginName: 'full', oauth: 'passthrough' });
  });

  it('maps the login by the rule unless the user record sets backend_login', () => {
    expect(backendUserName(route('alice@example.com'), { mode: 'passthrough', loginName: 'local_part' })).toBe('alice');
    expect(backendUserName(route('alice@example.com', 'al'), { mode: 'passthrough', loginName: 'local_part' })).toBe('al');
    expect(backendUserName(route('alice@example.com'), { mode: 'passthrough', loginName: 'full' })).toBe('alice@example.com');
  });

  it('sends the client password in passthrough and the admin with authzid (or user*admin) in admin mode', () => {
    const client = { kind: 'password' as const, authcid: Buffer.from('Alice@Example.com'), password: Buffer.from('pw') };
    const admin = { user: 'cyrusadmin', password: Buffer.from('adminpw') };
    const pass = backendCredentials({ mode: 'passthrough', loginName: 'full' }, client, route('alice@example.com'));
    expect([pass.authzid, pass.authcid.toString(), pass.password.toString()]).toEqual([undefined, 'alice@example.com', 'pw']);
    const plain = backendCredentials({ mode: 'admin', admin, loginName: 'local_part' }, client, route('alice@example.com'));
    expect([plain.authzid?.toString(), plain.authcid.toString(), plain.password.toString()]).toEqual(['alice', 'cyrusadmin', 'adminpw']);
    const sep = backendCredentials({ mode: 'admin', admin, loginName: 'full', masterSeparator: '*' }, client, route('alice@example.com'));
    expect([sep.authzid, sep.authcid.toString(), sep.password.toString()]).toEqual([undefined, 'alice@example.com*cyrusadmin', 'adminpw']);
  });

  it('is refused in admin mode without a password checker, and without admin_user', () => {
    const base = { listeners: [{ protocol: 'imap', port: 1143 }], lookup: { file: 'r.yaml' } };
    expect(() => parseConfig({ ...base, backend: { identity_groups: [{ slots: ['*'], identity: 'admin', admin_user: 'a', admin_password_file: 'f' }] } }, 't')).toThrow(
      /identity: admin needs a password checker at the proxy \(auth\.ldap\)/,
    );
    expect(() => parseConfig({ ...base, backend: { identity_groups: [{ slots: ['*'], identity: 'admin' }] } }, 't')).toThrow(/needs admin_user and admin_password_file/);
  });
});

describe('LDAP filter', () => {
  it('escapes the login (RFC 4515) and fills %u, %n, %d', () => {
    expect(escapeFilterValue('a*b(c)\\d\0')).toBe('a\\2ab\\28c\\29\\5cd\\00');
    expect(userFilter('(|(mail=%u)(uid=%n)(dc=%d))', 'al*ice@ex.com')).toBe('(|(mail=al\\2aice@ex.com)(uid=al\\2aice)(dc=ex.com))');
    expect(userFilter('(uid=%n)%%', 'bob')).toBe('(uid=bob)%');
  });
});

describe('auth config checks', () => {
  const base = { listeners: [{ protocol: 'imap', port: 1143 }], lookup: { file: 'r.yaml' } };

  it('preflight: a missing secret file is an error; LDAP without an admin group, or in clear off loopback, a warning', () => {
    const cfg = parseConfig(
      {
        ...base,
        backend: { identity_groups: [{ slots: ['c*'], identity: 'admin', admin_user: 'a', admin_password_file: '/nonexistent/admin.pw' }] },
        auth: { ldap: { url: 'ldap://127.0.0.1', base_dn: 'dc=x', bind_dn: 'cn=s', bind_password_file: '/nonexistent/ldap.pw' } },
      },
      't',
    );
    const { errors, warnings } = preflight(cfg);
    expect(errors.join('\n')).toMatch(/admin_password_file:? \/nonexistent\/admin\.pw/);
    expect(errors.join('\n')).toMatch(/bind_password_file \/nonexistent\/ldap\.pw/);
    expect(warnings).toEqual([]);
    const plain = preflight(parseConfig({ ...base, auth: { ldap: { url: 'ldap://ldap.example.com', base_dn: 'dc=x' } } }, 't')).warnings.join('\n');
    expect(plain).toMatch(/no backend.identity_groups entry uses identity: admin/);
    expect(plain).toMatch(/without starttls: passwords cross the network/);
  });

  it('refuses bad LDAP settings', () => {
    const ldap = (l: Record<string, unknown>) => () => parseConfig({ ...base, auth: { ldap: { url: 'ldap://h', base_dn: 'dc=x', ...l } } }, 't');
    expect(ldap({ url: 'http://h' })).toThrow(/ldap:\/\/host\[:port\] or ldaps/);
    expect(ldap({ url: 'ldaps://h', starttls: true })).toThrow(/starttls with ldaps/);
    expect(ldap({ bind_dn: 'cn=s' })).toThrow(/set both bind_dn and bind_password_file/);
    expect(ldap({ filter: '(mail=*)' })).toThrow(/must use %u, %n or %d/);
  });
});
