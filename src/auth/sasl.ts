import { passwordCredentials, type PasswordCredentials } from './credentials.js';

// SASL wire decoding shared by every mechanism and front end. Input is hostile: these
// functions never throw, and return undefined for anything malformed.

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Strict base64 (RFC 4648, padded, no whitespace); `=` is the empty response (RFC 4954, 5034, 9051 SASL-IR). */
export function decodeBase64(text: string): Buffer | undefined {
  if (text === '=') return Buffer.alloc(0);
  if (!BASE64.test(text)) return undefined;
  return Buffer.from(text, 'base64');
}

export function encodeBase64(data: Buffer): string {
  return data.length === 0 ? '' : data.toString('base64');
}

/** RFC 4616 message: [authzid] NUL authcid NUL passwd; undefined if malformed. */
export function parsePlain(raw: Buffer): PasswordCredentials | undefined {
  const first = raw.indexOf(0);
  const second = first < 0 ? -1 : raw.indexOf(0, first + 1);
  if (first < 0 || second < 0 || raw.indexOf(0, second + 1) >= 0) return undefined;
  const authcid = raw.subarray(first + 1, second);
  if (authcid.length === 0) return undefined;
  return passwordCredentials(authcid, raw.subarray(second + 1), raw.subarray(0, first));
}

/** RFC 4616 PLAIN from its base64 form; undefined if malformed. */
export function decodePlain(b64: string): PasswordCredentials | undefined {
  const raw = decodeBase64(b64);
  return raw === undefined ? undefined : parsePlain(raw);
}

/** The PLAIN message for a backend: authzid NUL authcid NUL password. */
export function encodePlain(creds: PasswordCredentials): Buffer {
  return Buffer.concat([creds.authzid ?? Buffer.alloc(0), Buffer.from([0]), creds.authcid, Buffer.from([0]), creds.password]);
}
