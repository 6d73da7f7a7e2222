import { generateKeyPairSync, randomBytes, sign, verify, type KeyObject } from 'node:crypto';
import { createServer, type IncomingMessage, type Server } from 'node:http';

// A small OAuth 2.0 authorisation server on loopback, for tests: it signs JWT access
// tokens (RS256 and ES256), publishes its keys as a JWKS, and answers RFC 7662
// introspection for the tokens it issued (active while unexpired and correctly signed).
// Both mailsplice (oauth: check) and Dovecot's oauth2 passdb (pass-through) ask it.

export interface IssueOptions {
  /** The login claim; also answered as `username` by introspection. */
  email: string;
  aud?: string | string[];
  iss?: string;
  /** Seconds from now (negative: already expired). Default 600. */
  expiresIn?: number;
  /** Seconds from now the token becomes valid. */
  notBeforeIn?: number;
  alg?: 'RS256' | 'ES256';
  /** Sign with a key the JWKS does not publish (under a published kid): a bad signature. */
  forged?: boolean;
}

export interface OauthIssuer {
  /** The `iss` of the tokens it issues (its base URL). */
  issuer: string;
  audience: string;
  introspectionUrl: string;
  jwksUrl: string;
  jwks: object;
  issue(o: IssueOptions): string;
  /** Introspection requests answered so far (to see the proxy's cache at work). */
  introspections(): number;
  close(): Promise<void>;
}

const b64url = (v: object): string => Buffer.from(JSON.stringify(v)).toString('base64url');

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => {
      body += c;
      if (body.length > 65536) req.destroy(new Error('body too large'));
    });
    req.on('end', () => resolve(body));
    req.on('error', reject);
  });
}

export async function startOauthIssuer(opts: { host?: string; audience?: string } = {}): Promise<OauthIssuer> {
  const host = opts.host ?? '127.0.0.1';
  const audience = opts.audience ?? 'mail';
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const forger = { RS256: generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey, ES256: generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey };
  const kids = { RS256: `rsa-${randomBytes(3).toString('hex')}`, ES256: `ec-${randomBytes(3).toString('hex')}` };
  const publicKeys: Record<string, KeyObject> = { [kids.RS256]: rsa.publicKey, [kids.ES256]: ec.publicKey };
  const jwks = {
    keys: [
      { ...rsa.publicKey.export({ format: 'jwk' }), kid: kids.RS256, alg: 'RS256', use: 'sig' },
      { ...ec.publicKey.export({ format: 'jwk' }), kid: kids.ES256, alg: 'ES256', use: 'sig' },
    ],
  };
  let introspections = 0;
  let issuer = '';

  /** The claims of a token we issued, if its signature is ours; undefined otherwise. */
  const claimsOf = (token: string): Record<string, unknown> | undefined => {
    const [h, p, s] = token.split('.');
    if (!h || !p || !s) return undefined;
    try {
      const header = JSON.parse(Buffer.from(h, 'base64url').toString()) as { kid?: string; alg?: string };
      const key = publicKeys[header.kid ?? ''];
      if (!key) return undefined;
      const data = Buffer.from(`${h}.${p}`);
      const sig = Buffer.from(s, 'base64url');
      const good = header.alg === 'ES256' ? verify('sha256', data, { key, dsaEncoding: 'ieee-p1363' }, sig) : verify('sha256', data, key, sig);
      return good ? (JSON.parse(Buffer.from(p, 'base64url').toString()) as Record<string, unknown>) : undefined;
    } catch {
      return undefined;
    }
  };

  const server: Server = createServer((req, res) => {
    void (async () => {
      const url = req.url ?? '/';
      if (req.method === 'GET' && url === '/jwks.json') {
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(jwks));
        return;
      }
      if (req.method === 'POST' && url === '/introspect') {
        introspections++;
        const token = new URLSearchParams(await readBody(req)).get('token') ?? '';
        const claims = claimsOf(token);
        const now = Date.now() / 1000;
        const active = claims !== undefined && typeof claims.exp === 'number' && claims.exp > now && !(typeof claims.nbf === 'number' && claims.nbf > now);
        const answer = active ? { active: true, ...claims, username: claims.email, token_type: 'Bearer' } : { active: false };
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer));
        return;
      }
      res.writeHead(404).end();
    })().catch(() => res.destroy());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port: 0 }, () => resolve());
  });
  const addr = server.address();
  if (addr === null || typeof addr === 'string') throw new Error('issuer: no address');
  issuer = `http://${host}:${addr.port}`;

  const issue = (o: IssueOptions): string => {
    const alg = o.alg ?? 'RS256';
    const now = Math.floor(Date.now() / 1000);
    const header = { alg, typ: 'at+jwt', kid: kids[alg] };
    const claims: Record<string, unknown> = {
      iss: o.iss ?? issuer,
      sub: o.email,
      email: o.email,
      aud: o.aud ?? audience,
      iat: now,
      exp: now + (o.expiresIn ?? 600),
      jti: randomBytes(8).toString('hex'),
      scope: 'email',
    };
    if (o.notBeforeIn !== undefined) claims.nbf = now + o.notBeforeIn;
    const data = `${b64url(header)}.${b64url(claims)}`;
    const key = o.forged ? forger[alg] : alg === 'RS256' ? rsa.privateKey : ec.privateKey;
    const sig = alg === 'ES256' ? sign('sha256', Buffer.from(data), { key, dsaEncoding: 'ieee-p1363' }) : sign('sha256', Buffer.from(data), key);
    return `${data}.${sig.toString('base64url')}`;
  };

  return {
    issuer,
    audience,
    introspectionUrl: `${issuer}/introspect`,
    jwksUrl: `${issuer}/jwks.json`,
    jwks,
    issue,
    introspections: () => introspections,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
