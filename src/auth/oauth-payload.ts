import type { TokenCredentials, TokenMechanism } from './credentials.js';

// The client messages of OAUTHBEARER (RFC 7628 section 3.1) and XOAUTH2 (Google's
// documented format, the same \x01 framing without the GS2 header), and the error
// statuses a server sends back. Input is hostile: the parsers never throw and return
// undefined for anything that is not exactly the grammar.

const KVSEP = 0x01;
/** RFC 7628: key = 1*(ALPHA). */
const KEY = /^[A-Za-z]+$/;
/** RFC 7628: value = *(VCHAR / SP / HTAB / CR / LF). */
const VALUE = /^[\x21-\x7e \t\r\n]*$/;
/** RFC 6750 b64token, after "Bearer" and one or more spaces (the scheme is case-insensitive). */
const BEARER = /^bearer +([A-Za-z0-9\-._~+/]+=*)$/i;

/** key=value pairs up to the final empty field; undefined on any flaw (or a repeated key). */
function kvpairs(text: string): Map<string, string> | undefined {
  const fields = text.split('\x01');
  // Ends in kvsep kvsep: the last two split fields are empty, and no other one is.
  if (fields.length < 2 || fields.pop() !== '' || fields.pop() !== '') return undefined;
  const pairs = new Map<string, string>();
  for (const f of fields) {
    const eq = f.indexOf('=');
    if (eq <= 0) return undefined;
    const key = f.slice(0, eq).toLowerCase();
    const value = f.slice(eq + 1);
    if (!KEY.test(key) || !VALUE.test(value) || pairs.has(key)) return undefined;
    pairs.set(key, value);
  }
  return pairs;
}

function bearer(pairs: Map<string, string>): string | undefined {
  const auth = pairs.get('auth');
  return auth === undefined ? undefined : BEARER.exec(auth)?.[1];
}

/** RFC 5801 saslname: `=2C` and `=3D` stand for `,` and `=`; any other `=`, a `,` or a NUL is malformed. */
function decodeSaslName(s: string): string | undefined {
  if (/[\0,]/.test(s) || /=(?!2C|3D)/.test(s)) return undefined;
  return s.replace(/=2C/g, ',').replace(/=3D/g, '=');
}

function encodeSaslName(s: string): string {
  return s.replace(/=/g, '=3D').replace(/,/g, '=2C');
}

/** Whether a value can sit in one \x01-framed field (no control character at all). */
function frameable(s: string): boolean {
  return !/[\x00-\x1f\x7f]/.test(s);
}

/** The text of a message, if it is UTF-8 (names and tokens are). */
function utf8(raw: Buffer): string | undefined {
  const text = raw.toString('utf8');
  return Buffer.byteLength(text) === raw.length && !text.includes('\ufffd') ? text : undefined;
}

/**
 * RFC 7628 client response: gs2-header kvsep *kvpair kvsep, with one `auth=Bearer <token>`.
 * Channel binding (`p=`) is refused: OAUTHBEARER defines none. `host` and `port` are
 * informative only and not kept.
 */
export function parseOauthBearer(raw: Buffer): TokenCredentials | undefined {
  const text = utf8(raw);
  if (text === undefined) return undefined;
  const m = /^([ny]),(?:a=([^,]*))?,\x01/.exec(text);
  if (!m) return undefined;
  const user = m[2] === undefined ? '' : decodeSaslName(m[2]);
  if (user === undefined || (m[2] !== undefined && user === '') || !frameable(user)) return undefined;
  const pairs = kvpairs(text.slice(m[0].length));
  if (!pairs) return undefined;
  const token = bearer(pairs);
  if (!token) return undefined;
  return { kind: 'token', mechanism: 'OAUTHBEARER', user: Buffer.from(user, 'utf8'), token: Buffer.from(token, 'latin1') };
}

/** Google's XOAUTH2: `user=<login>` \x01 `auth=Bearer <token>` \x01 \x01. */
export function parseXoauth2(raw: Buffer): TokenCredentials | undefined {
  const text = utf8(raw);
  if (text === undefined) return undefined;
  const pairs = kvpairs(text);
  const user = pairs?.get('user');
  const token = pairs && bearer(pairs);
  if (!user || !frameable(user) || !token || pairs.size !== 2) return undefined;
  return { kind: 'token', mechanism: 'XOAUTH2', user: Buffer.from(user, 'utf8'), token: Buffer.from(token, 'latin1') };
}

/** The message for a backend that checks tokens itself; undefined if `user` cannot be framed. */
export function encodeTokenMessage(mechanism: TokenMechanism, user: string, token: Buffer): Buffer | undefined {
  if (!frameable(user) || !BEARER.test(`Bearer ${token.toString('latin1')}`)) return undefined;
  const head = mechanism === 'OAUTHBEARER' ? `n,a=${encodeSaslName(user)},\x01` : `user=${user}\x01`;
  return Buffer.from(`${head}auth=Bearer ${token.toString('latin1')}\x01\x01`, 'utf8');
}

/** What the server tells a client whose token was refused (the challenge of the error exchange). */
export interface TokenRefusal {
  /** OAUTHBEARER: RFC 6749/7628 status, e.g. invalid_token; XOAUTH2 always says 401. */
  status: 'invalid_token' | 'invalid_request' | 'insufficient_scope';
  /** Scope the client should ask its token for, when configured. */
  scope?: string;
  /** RFC 7628 openid-configuration URL, when configured. */
  openidConfiguration?: string;
}

/** The JSON of the server's error challenge (RFC 7628 section 3.2.2; Google's XOAUTH2 error). */
export function refusalJson(mechanism: TokenMechanism, r: TokenRefusal): string {
  if (mechanism === 'XOAUTH2') {
    return JSON.stringify({ status: r.status === 'insufficient_scope' ? '403' : r.status === 'invalid_request' ? '400' : '401', schemes: 'bearer', ...(r.scope ? { scope: r.scope } : {}) });
  }
  return JSON.stringify({ status: r.status, ...(r.scope ? { scope: r.scope } : {}), ...(r.openidConfiguration ? { 'openid-configuration': r.openidConfiguration } : {}) });
}

/** The client's answer to the error challenge: OAUTHBEARER a lone kvsep, XOAUTH2 an empty response. */
export function errorAcknowledgement(mechanism: TokenMechanism): Buffer {
  return mechanism === 'OAUTHBEARER' ? Buffer.from([KVSEP]) : Buffer.alloc(0);
}
