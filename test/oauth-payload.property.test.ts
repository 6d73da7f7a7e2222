import { generateKeyPairSync, sign } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { findMechanism, offeredMechanisms, runSasl } from '../src/auth/mechanisms.js';
import { checkClaims, VerdictCache } from '../src/auth/oauth-check.js';
import { encodeTokenMessage, parseOauthBearer, parseXoauth2, refusalJson } from '../src/auth/oauth-payload.js';
import { parseJwks, verifyJwt } from '../src/auth/jwt.js';
import { parseConfig } from '../src/config.js';

// The OAUTHBEARER / XOAUTH2 message parsers, the JWT check and the verdict cache: pure
// logic, tested without sockets (the wire is test/oauth.test.ts, against real Dovecot).

const runs = Number(process.env.MAILSPLICE_PROPERTY_RUNS ?? 0) || 300;
const params = (n = runs) => ({ seed: 42, numRuns: process.env.MAILSPLICE_PROPERTY_RUNS ? runs : n });
const buf = (s: string) => Buffer.from(s, 'utf8');

describe('OAUTHBEARER message (RFC 7628 3.1)', () => {
  it('reads the authzid and the token; host/port are allowed and dropped', () => {
    const c = parseOauthBearer(buf('n,a=alice@example.com,\x01host=server.example.com\x01port=143\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01'));
    expect(c).toMatchObject({ kind: 'token', mechanism: 'OAUTHBEARER' });
    expect(c!.user.toString()).toBe('alice@example.com');
    expect(c!.token.toString()).toBe('vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==');
  });

  it('decodes =2C and =3D in the authzid; no a= gives an empty login', () => {
    expect(parseOauthBearer(buf('n,a=we=2Cird=3Dname,\x01auth=Bearer t\x01\x01'))!.user.toString()).toBe('we,ird=name');
    expect(parseOauthBearer(buf('y,,\x01auth=bearer   t\x01\x01'))!.user.length).toBe(0);
  });

  it.each([
    ['channel binding', 'p=tls-unique,a=a@b,\x01auth=Bearer t\x01\x01'],
    ['no final kvsep', 'n,a=a@b,\x01auth=Bearer t\x01'],
    ['no auth', 'n,a=a@b,\x01host=x\x01\x01'],
    ['auth twice', 'n,a=a@b,\x01auth=Bearer t\x01auth=Bearer u\x01\x01'],
    ['another scheme', 'n,a=a@b,\x01auth=Basic dXNlcjpwYXNz\x01\x01'],
    ['bad escape', 'n,a=a=2Bb,\x01auth=Bearer t\x01\x01'],
    ['empty authzid', 'n,a=,\x01auth=Bearer t\x01\x01'],
    ['control in authzid', 'n,a=a\rb,\x01auth=Bearer t\x01\x01'],
    ['token with a space', 'n,a=a@b,\x01auth=Bearer t u\x01\x01'],
    ['bare kvsep (the error acknowledgement)', '\x01'],
    ['empty', ''],
  ])('refuses %s', (_what, text) => {
    expect(parseOauthBearer(buf(text))).toBeUndefined();
  });

  it('never throws on random bytes, and what it accepts re-encodes to an equal message', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
        const c = parseOauthBearer(Buffer.from(bytes));
        if (c && c.user.length > 0) expect(parseOauthBearer(encodeTokenMessage('OAUTHBEARER', c.user.toString(), c.token)!)).toEqual(c);
      }),
      params(),
    );
  });

  it('round-trips any frameable login and b64token', () => {
    const login = fc.string({ minLength: 1, maxLength: 40 }).filter((s) => !/[\x00-\x1f\x7f\ufffd]/.test(s) && !/[\ud800-\udfff]/.test(s));
    const token = fc.stringMatching(/^[A-Za-z0-9\-._~+/]{1,60}=*$/);
    fc.assert(
      fc.property(login, token, fc.constantFrom('OAUTHBEARER', 'XOAUTH2') as fc.Arbitrary<'OAUTHBEARER' | 'XOAUTH2'>, (user, tok, mech) => {
        const msg = encodeTokenMessage(mech, user, buf(tok))!;
        const c = mech === 'OAUTHBEARER' ? parseOauthBearer(msg) : parseXoauth2(msg);
        expect(c?.user.toString()).toBe(user);
        expect(c?.token.toString()).toBe(tok);
      }),
      params(),
    );
  });
});

describe('XOAUTH2 message', () => {
  it('reads user= and auth=Bearer', () => {
    const c = parseXoauth2(buf('user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01'));
    expect(c!.user.toString()).toBe('someuser@example.com');
    expect(c!.token.toString()).toBe('ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg');
  });
  it.each([
    ['no user', 'auth=Bearer t\x01\x01'],
    ['an extra field', 'user=a\x01auth=Bearer t\x01x=y\x01\x01'],
    ['CR in the user', 'user=a\rb\x01auth=Bearer t\x01\x01'],
    ['no terminator', 'user=a\x01auth=Bearer t'],
  ])('refuses %s', (_w, text) => expect(parseXoauth2(buf(text))).toBeUndefined());
  it('never throws on random text', () => {
    fc.assert(fc.property(fc.string({ maxLength: 200 }), (s) => void parseXoauth2(buf(s))), params());
  });
});

describe('mechanism table with tokens', () => {
  it('offers OAUTHBEARER and XOAUTH2 only when asked (auth.oauth)', () => {
    expect(offeredMechanisms(false).map((m) => m.name)).toEqual(['PLAIN']);
    expect(offeredMechanisms(false, true).map((m) => m.name)).toEqual(['PLAIN', 'OAUTHBEARER', 'XOAUTH2']);
    expect(findMechanism('oauthbearer', false)).toBeUndefined();
    expect(findMechanism('oauthbearer', false, true)?.name).toBe('OAUTHBEARER');
  });
  it('asks with an empty challenge when there is no initial response', async () => {
    const challenges: string[] = [];
    const out = await runSasl(findMechanism('XOAUTH2', false, true)!, undefined, {
      challenge: (c) => challenges.push(c),
      response: async () => buf('user=a@b\x01auth=Bearer tok\x01\x01').toString('base64'),
    });
    expect(challenges).toEqual(['']);
    expect(out).toMatchObject({ kind: 'ok', credentials: { kind: 'token', mechanism: 'XOAUTH2' } });
  });
  it('error challenges say what RFC 7628 and Google document', () => {
    expect(JSON.parse(refusalJson('OAUTHBEARER', { status: 'invalid_token', scope: 'mail', openidConfiguration: 'https://x/.well-known/openid-configuration' }))).toEqual({
      status: 'invalid_token',
      scope: 'mail',
      'openid-configuration': 'https://x/.well-known/openid-configuration',
    });
    expect(JSON.parse(refusalJson('XOAUTH2', { status: 'invalid_token' }))).toEqual({ status: '401', schemes: 'bearer' });
  });
});

describe('JWT check (RS256, ES256 against a JWKS)', () => {
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwks = parseJwks({
    keys: [
      { ...rsa.publicKey.export({ format: 'jwk' }), kid: 'r1', alg: 'RS256' },
      { ...ec.publicKey.export({ format: 'jwk' }), kid: 'e1' },
      { kty: 'oct', k: 'c2VjcmV0' },
      { kty: 'RSA', e: 'AQAB' },
    ],
  });
  const enc = (v: object) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const jwt = (header: object, claims: object, key = rsa.privateKey, ecdsa = false) => {
    const data = `${enc(header)}.${enc(claims)}`;
    const sig = ecdsa ? sign('sha256', Buffer.from(data), { key, dsaEncoding: 'ieee-p1363' }) : sign('sha256', Buffer.from(data), key);
    return `${data}.${sig.toString('base64url')}`;
  };

  it('keeps only usable signing keys', () => expect(jwks.map((k) => k.kid)).toEqual(['r1', 'e1']));
  it('verifies RS256 and ES256', () => {
    expect(verifyJwt(jwt({ alg: 'RS256', kid: 'r1' }, { a: 1 }), jwks, ['RS256', 'ES256'])).toEqual({ kind: 'ok', claims: { a: 1 } });
    expect(verifyJwt(jwt({ alg: 'ES256', kid: 'e1' }, { a: 2 }, ec.privateKey, true), jwks, ['RS256', 'ES256'])).toEqual({ kind: 'ok', claims: { a: 2 } });
  });
  it('refuses alg none, HS256, an algorithm not configured, a changed payload, an unknown kid', () => {
    const good = jwt({ alg: 'RS256', kid: 'r1' }, { a: 1 });
    const [h, , s] = good.split('.');
    expect(verifyJwt(`${enc({ alg: 'none' })}.${enc({ a: 1 })}.`, jwks, ['RS256']).kind).toBe('bad');
    expect(verifyJwt(`${enc({ alg: 'HS256' })}.${enc({ a: 1 })}.${s}`, jwks, ['RS256']).kind).toBe('bad');
    expect(verifyJwt(good, jwks, ['ES256']).kind).toBe('bad');
    expect(verifyJwt(`${h}.${enc({ a: 2 })}.${s}`, jwks, ['RS256'])).toEqual({ kind: 'bad', why: 'bad signature' });
    expect(verifyJwt(jwt({ alg: 'RS256', kid: 'r9' }, {}), jwks, ['RS256'])).toEqual({ kind: 'unknown-key', kid: 'r9' });
  });
  it('never throws on random text', () => {
    const part = fc.stringMatching(/^[A-Za-z0-9_-]{0,40}$/);
    fc.assert(fc.property(fc.string({ maxLength: 120 }), (s) => void verifyJwt(s, jwks, ['RS256', 'ES256'])), params());
    fc.assert(fc.property(part, part, part, (a, b, c) => void verifyJwt(`${a}.${b}.${c}`, jwks, ['RS256', 'ES256'])), params());
  });
});

describe('claims and cache', () => {
  const cfg = { issuer: 'https://idp', audience: 'mail', username_claim: 'email' };
  const ok = { iss: 'https://idp', aud: ['x', 'mail'], exp: 2000, email: 'a@b' };
  it('checks exp, nbf (with skew), iss, aud and the login claim', () => {
    expect(checkClaims(ok, cfg, 1000, 0, true)).toEqual({ ok: true, login: 'a@b' });
    expect(checkClaims({ ...ok, exp: 1000 }, cfg, 1000, 0, true)).toMatchObject({ ok: false, why: 'expired' });
    expect(checkClaims({ ...ok, exp: 990 }, cfg, 1000, 30, true)).toMatchObject({ ok: true });
    expect(checkClaims({ ...ok, nbf: 1100 }, cfg, 1000, 30, true)).toMatchObject({ ok: false });
    expect(checkClaims({ ...ok, iss: 'https://other' }, cfg, 1000, 0, true)).toMatchObject({ why: 'wrong issuer' });
    expect(checkClaims({ ...ok, aud: 'cal' }, cfg, 1000, 0, true)).toMatchObject({ why: 'wrong audience' });
    expect(checkClaims({ ...ok, exp: undefined }, cfg, 1000, 0, true)).toMatchObject({ why: 'no exp' });
    expect(checkClaims({ ...ok, exp: undefined }, cfg, 1000, 0, false)).toMatchObject({ ok: true });
    expect(checkClaims({ ...ok, exp: '2000' }, cfg, 1000, 0, true)).toMatchObject({ ok: false });
    expect(checkClaims({ ...ok, email: 7 }, cfg, 1000, 0, true)).toMatchObject({ ok: false });
  });
  it('the cache keeps at most its size, never past ttl or exp', () => {
    const c = new VerdictCache(1000, 2);
    c.set('a', 'A', undefined, 0);
    c.set('b', 'B', 500, 0);
    c.set('c', 'C', undefined, 0);
    expect(c.size).toBe(2);
    expect(c.get('a', 1)).toBeUndefined(); // the oldest went
    expect(c.get('b', 499)).toBe('B');
    expect(c.get('b', 500)).toBeUndefined(); // its token's exp
    expect(c.get('c', 999)).toBe('C');
    expect(c.get('c', 1000)).toBeUndefined(); // ttl
  });
  it('config: oauth: check needs a checker and an admin', () => {
    const base = { listeners: [{ protocol: 'imap', port: 143 }], lookup: { file: 'r.yaml' } };
    expect(() => parseConfig({ ...base, auth: { oauth: {} }, backend: { identity_groups: [{ slots: ['*'], oauth: 'check', admin_user: 'm', admin_password_file: 'p' }] } }, 't')).toThrow(/oauth: check needs auth.oauth.introspection or auth.oauth.jwt/);
    expect(() => parseConfig({ ...base, auth: { oauth: { jwt: { jwks_file: 'j' } } }, backend: { identity_groups: [{ slots: ['*'], oauth: 'check' }] } }, 't')).toThrow(/oauth: check needs admin_user/);
    expect(() => parseConfig({ ...base, auth: { oauth: { jwt: { jwks_file: 'j', jwks_url: 'https://x' } } } }, 't')).toThrow(/exactly one of jwks_file or jwks_url/);
    expect(parseConfig({ ...base, auth: { oauth: { jwt: { jwks_file: 'j' } } } }, 't').auth.oauth?.mechanisms).toEqual(['OAUTHBEARER', 'XOAUTH2']);
  });
});
