/** Credentials as SASL PLAIN carries them (RFC 4616), shared by the IMAP and POP3 front ends. */
export interface PlainCredentials {
  /** Who acts. */
  authcid: Buffer;
  /** Whose mailbox, when it differs from authcid (a master/admin login). */
  authzid?: Buffer;
  password: Buffer;
}

/** RFC 4616: [authzid] NUL authcid NUL passwd, base64; undefined if malformed. */
export function decodePlain(b64: string): PlainCredentials | undefined {
  if (b64 !== '=' && !/^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/.test(b64)) return undefined;
  const raw = Buffer.from(b64 === '=' ? '' : b64, 'base64');
  const first = raw.indexOf(0);
  const second = first < 0 ? -1 : raw.indexOf(0, first + 1);
  if (first < 0 || second < 0 || raw.indexOf(0, second + 1) >= 0) return undefined;
  const authzid = raw.subarray(0, first);
  const authcid = raw.subarray(first + 1, second);
  const password = raw.subarray(second + 1);
  if (authcid.length === 0) return undefined;
  return authzid.length > 0 && !authzid.equals(authcid) ? { authzid, authcid, password } : { authcid, password };
}

