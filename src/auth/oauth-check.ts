import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { OauthConfig } from '../config.js';
import type { Logger } from '../log.js';
import { OutageLog } from '../outage.js';
import { CheckerUnavailable } from './checker.js';
import { parseJwks, verifyJwt, type Jwk } from './jwt.js';
import type { TokenRefusal } from './oauth-payload.js';
import { readSecretFile } from './secret-file.js';

// Checking a bearer token at the proxy: RFC 7662 introspection, or a JWT's signature
// against a JWKS, then the claims (active, exp, nbf, iss, aud) and the claim naming the
// login. Good verdicts are cached by the token's hash (never the token), bounded in time
// (cache_ttl_ms, and never past the token's exp) and in size (cache_entries, oldest out).
// An endpoint that is down or answers nonsense is CheckerUnavailable: never a pass.

export type TokenVerdict =
  | { ok: true; /** The login the token names (username_claim). */ login: string }
  | { ok: false; why: string; status: TokenRefusal['status'] };

export interface TokenChecker {
  check(token: Buffer): Promise<TokenVerdict>;
}

type Claims = Record<string, unknown>;

/** The claims checks both kinds share; `now` in seconds. */
export function checkClaims(claims: Claims, cfg: Pick<OauthConfig, 'issuer' | 'audience' | 'username_claim'>, now: number, skew: number, requireExp: boolean): TokenVerdict {
  const num = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) ? v : undefined);
  const exp = num(claims.exp);
  if (claims.exp !== undefined && exp === undefined) return { ok: false, why: 'exp is not a number', status: 'invalid_token' };
  if (exp === undefined && requireExp) return { ok: false, why: 'no exp', status: 'invalid_token' };
  if (exp !== undefined && exp + skew <= now) return { ok: false, why: 'expired', status: 'invalid_token' };
  const nbf = num(claims.nbf);
  if (claims.nbf !== undefined && nbf === undefined) return { ok: false, why: 'nbf is not a number', status: 'invalid_token' };
  if (nbf !== undefined && nbf - skew > now) return { ok: false, why: 'not yet valid (nbf)', status: 'invalid_token' };
  if (cfg.issuer !== undefined && claims.iss !== cfg.issuer) return { ok: false, why: 'wrong issuer', status: 'invalid_token' };
  if (cfg.audience !== undefined) {
    const aud = claims.aud;
    const auds = typeof aud === 'string' ? [aud] : Array.isArray(aud) ? aud : [];
    if (!auds.includes(cfg.audience)) return { ok: false, why: 'wrong audience', status: 'invalid_token' };
  }
  const login = claims[cfg.username_claim];
  if (typeof login !== 'string' || login.length === 0 || login.length > 512) return { ok: false, why: `no ${cfg.username_claim} in the token`, status: 'invalid_token' };
  return { ok: true, login };
}

/** Time- and size-bounded map of good verdicts; Map order is insertion order, so the first key is the oldest. */
export class VerdictCache {
  private readonly entries = new Map<string, { login: string; until: number }>();

  constructor(
    private readonly ttlMs: number,
    private readonly max: number,
  ) {}

  static key(token: Buffer): string {
    return createHash('sha256').update(token).digest('base64');
  }

  get(key: string, now = Date.now()): string | undefined {
    const e = this.entries.get(key);
    if (!e) return undefined;
    if (e.until <= now) {
      this.entries.delete(key);
      return undefined;
    }
    return e.login;
  }

  /** `expMs`: the token's own end, which the entry never outlives. */
  set(key: string, login: string, expMs: number | undefined, now = Date.now()): void {
    if (this.max === 0 || this.ttlMs === 0) return;
    const until = Math.min(now + this.ttlMs, expMs ?? Infinity);
    if (until <= now) return;
    this.entries.delete(key);
    while (this.entries.size >= this.max) this.entries.delete(this.entries.keys().next().value!);
    this.entries.set(key, { login, until });
  }

  get size(): number {
    return this.entries.size;
  }
}

/** Where JWKS keys come from: a file read once, or a URL fetched and refreshed. */
class JwksSource {
  private keys: Jwk[] = [];
  private fetchedAt = 0;
  private lastForced = 0;
  private pending: Promise<void> | undefined;

  constructor(
    private readonly jwt: NonNullable<OauthConfig['jwt']>,
    private readonly timeoutMs: number,
  ) {
    if (jwt.jwks_file) {
      let doc: unknown;
      try {
        doc = JSON.parse(readFileSync(jwt.jwks_file, 'utf8'));
      } catch (e) {
        throw new Error(`cannot read auth.oauth.jwt.jwks_file ${jwt.jwks_file}: ${(e as Error).message}`);
      }
      this.keys = parseJwks(doc);
      if (this.keys.length === 0) throw new Error(`auth.oauth.jwt.jwks_file ${jwt.jwks_file} holds no usable RSA or EC signing key`);
    }
  }

  /** The keys; `unknownKid` asks for a fresh copy (a key rotated in), at most once a minute. */
  async get(unknownKid = false): Promise<Jwk[]> {
    if (!this.jwt.jwks_url) return this.keys;
    const now = Date.now();
    const stale = this.fetchedAt === 0 || now - this.fetchedAt > this.jwt.jwks_refresh_ms;
    const forced = unknownKid && now - this.lastForced > 60_000;
    if (stale || forced) {
      if (forced) this.lastForced = now;
      this.pending ??= this.fetch().finally(() => (this.pending = undefined));
      await this.pending;
    }
    return this.keys;
  }

  private async fetch(): Promise<void> {
    const url = this.jwt.jwks_url!;
    let res: Response;
    try {
      res = await fetch(url, { signal: AbortSignal.timeout(this.timeoutMs), headers: { accept: 'application/json' } });
    } catch (e) {
      if (this.keys.length > 0) return; // keep the keys we have
      throw new CheckerUnavailable(`JWKS ${url}: ${(e as Error).message}`);
    }
    const keys = res.ok ? parseJwks(await res.json().catch(() => undefined)) : [];
    if (keys.length === 0) {
      if (this.keys.length > 0) return;
      throw new CheckerUnavailable(`JWKS ${url}: ${res.ok ? 'no usable key' : `HTTP ${res.status}`}`);
    }
    this.keys = keys;
    this.fetchedAt = Date.now();
  }
}

export class ProxyTokenChecker implements TokenChecker {
  private readonly cache: VerdictCache;
  private readonly jwks: JwksSource | undefined;
  private readonly basicAuth: string | undefined;
  private readonly outage: OutageLog;

  constructor(
    private readonly cfg: OauthConfig,
    log: Logger,
  ) {
    this.cache = new VerdictCache(cfg.cache_ttl_ms, cfg.cache_entries);
    this.jwks = cfg.jwt ? new JwksSource(cfg.jwt, cfg.timeout_ms) : undefined;
    const i = cfg.introspection;
    if (i?.client_id && i.client_secret_file) {
      const secret = readSecretFile(i.client_secret_file, 'auth.oauth.introspection.client_secret_file').toString('utf8');
      // RFC 6749 2.3.1: both form-urlencoded before Basic.
      this.basicAuth = `Basic ${Buffer.from(`${encodeURIComponent(i.client_id)}:${encodeURIComponent(secret)}`).toString('base64')}`;
    }
    this.outage = new OutageLog(log, {
      what: `OAuth token checker ${i?.url ?? cfg.jwt?.jwks_url ?? 'jwks'}`,
      effect: 'token logins checked at the proxy get UNAVAILABLE',
      describe: (e) => e.message,
    });
  }

  async check(token: Buffer): Promise<TokenVerdict> {
    const key = VerdictCache.key(token);
    const cached = this.cache.get(key);
    if (cached !== undefined) return { ok: true, login: cached };
    try {
      const { verdict, exp } = this.cfg.jwt ? await this.checkJwt(token) : await this.introspect(token);
      this.outage.ok();
      if (verdict.ok) this.cache.set(key, verdict.login, exp === undefined ? undefined : exp * 1000);
      return verdict;
    } catch (e) {
      if (e instanceof CheckerUnavailable) this.outage.error(e);
      throw e;
    }
  }

  private async checkJwt(token: Buffer): Promise<{ verdict: TokenVerdict; exp?: number }> {
    const jwt = this.cfg.jwt!;
    const text = token.toString('latin1');
    let result = verifyJwt(text, await this.jwks!.get(), jwt.algorithms);
    if (result.kind === 'unknown-key') result = verifyJwt(text, await this.jwks!.get(true), jwt.algorithms);
    if (result.kind === 'unknown-key') return { verdict: { ok: false, why: 'signed with an unknown key', status: 'invalid_token' } };
    if (result.kind === 'bad') return { verdict: { ok: false, why: result.why, status: 'invalid_token' } };
    const verdict = checkClaims(result.claims, this.cfg, Date.now() / 1000, jwt.clock_skew_s, true);
    return { verdict, ...(typeof result.claims.exp === 'number' ? { exp: result.claims.exp } : {}) };
  }

  /** RFC 7662: POST token=...; `active: true` and the claims checked as for a JWT (exp optional). */
  private async introspect(token: Buffer): Promise<{ verdict: TokenVerdict; exp?: number }> {
    const url = this.cfg.introspection!.url;
    let res: Response;
    try {
      res = await fetch(url, {
        method: 'POST',
        signal: AbortSignal.timeout(this.cfg.timeout_ms),
        headers: {
          'content-type': 'application/x-www-form-urlencoded',
          accept: 'application/json',
          ...(this.basicAuth ? { authorization: this.basicAuth } : {}),
        },
        body: new URLSearchParams({ token: token.toString('latin1'), token_type_hint: 'access_token' }).toString(),
      });
    } catch (e) {
      throw new CheckerUnavailable(`introspection ${url}: ${(e as Error).message}`);
    }
    if (!res.ok) throw new CheckerUnavailable(`introspection ${url}: HTTP ${res.status}`);
    const body: unknown = await res.json().catch(() => undefined);
    if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new CheckerUnavailable(`introspection ${url}: not a JSON object`);
    const claims = body as Claims;
    if (claims.active !== true) return { verdict: { ok: false, why: 'token not active', status: 'invalid_token' } };
    const verdict = checkClaims(claims, this.cfg, Date.now() / 1000, 0, false);
    return { verdict, ...(typeof claims.exp === 'number' ? { exp: claims.exp } : {}) };
  }
}
