import { createPublicKey, verify, type KeyObject } from 'node:crypto';

// JWS compact serialisation (RFC 7515) with RS256 / ES256 (RFC 7518) against a JWKS
// (RFC 7517), with node:crypto only. Input is hostile: nothing here throws on bad input.

export type JwtAlgorithm = 'RS256' | 'ES256';

export interface Jwk {
  kid?: string;
  kty: 'RSA' | 'EC';
  alg?: string;
  key: KeyObject;
}

/** The usable keys of a JWKS document; keys of other types or that fail to import are skipped. */
export function parseJwks(doc: unknown): Jwk[] {
  const keys = (doc as { keys?: unknown } | null)?.keys;
  if (!Array.isArray(keys)) return [];
  const out: Jwk[] = [];
  for (const k of keys as Record<string, unknown>[]) {
    if (typeof k !== 'object' || k === null || (k.kty !== 'RSA' && k.kty !== 'EC')) continue;
    if (k.use !== undefined && k.use !== 'sig') continue;
    try {
      const key = createPublicKey({ key: k as import('node:crypto').JsonWebKey, format: 'jwk' });
      out.push({ kty: k.kty, key, ...(typeof k.kid === 'string' ? { kid: k.kid } : {}), ...(typeof k.alg === 'string' ? { alg: k.alg } : {}) });
    } catch {
      // not a key we can use
    }
  }
  return out;
}

const B64URL = /^[A-Za-z0-9_-]*$/;

function jsonPart(part: string): Record<string, unknown> | undefined {
  if (!B64URL.test(part)) return undefined;
  try {
    const v: unknown = JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

export type JwtResult =
  | { kind: 'ok'; claims: Record<string, unknown> }
  /** Not a JWT at all, or one whose signature does not verify. */
  | { kind: 'bad'; why: string }
  /** Signed with a key id the JWKS does not have (yet): worth fetching the JWKS again. */
  | { kind: 'unknown-key'; kid: string | undefined };

/** Verifies the signature of a compact JWT; claims are the caller's business. */
export function verifyJwt(token: string, keys: readonly Jwk[], algorithms: readonly JwtAlgorithm[]): JwtResult {
  const parts = token.split('.');
  if (parts.length !== 3) return { kind: 'bad', why: 'not a JWT' };
  const [h, p, s] = parts as [string, string, string];
  const header = jsonPart(h);
  const claims = jsonPart(p);
  if (!header || !claims || !B64URL.test(s)) return { kind: 'bad', why: 'not a JWT' };
  const alg = header.alg;
  // The algorithm comes from our list, never from the token alone ("none", HS256 with a public key).
  if (typeof alg !== 'string' || !(algorithms as readonly string[]).includes(alg)) return { kind: 'bad', why: `algorithm ${String(alg).slice(0, 16)} not accepted` };
  const kty = alg === 'RS256' ? 'RSA' : 'EC';
  const kid = typeof header.kid === 'string' ? header.kid : undefined;
  const candidates = keys.filter((k) => k.kty === kty && (k.alg === undefined || k.alg === alg) && (kid === undefined || k.kid === kid));
  if (candidates.length === 0) return { kind: 'unknown-key', kid };
  const data = Buffer.from(`${h}.${p}`, 'ascii');
  const sig = Buffer.from(s, 'base64url');
  for (const k of candidates) {
    try {
      const good = alg === 'RS256' ? verify('sha256', data, k.key, sig) : verify('sha256', data, { key: k.key, dsaEncoding: 'ieee-p1363' }, sig);
      if (good) return { kind: 'ok', claims };
    } catch {
      // a malformed signature for this key type: not good
    }
  }
  return { kind: 'bad', why: 'bad signature' };
}
