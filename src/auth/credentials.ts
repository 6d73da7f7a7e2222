/**
 * What a client proved who it is with, in one shape whatever the mechanism (SASL PLAIN,
 * LOGIN, IMAP LOGIN, POP3 USER/PASS, OAUTHBEARER, XOAUTH2). `kind` tells a password from a
 * bearer token: a backend dialogue sends a password with PLAIN/LOGIN/USER, and a token
 * with the mechanism the client used (pass-through) or not at all (checked at the proxy,
 * then the group's admin logs in).
 */
export interface PasswordCredentials {
  kind: 'password';
  /** Who acts (the name the password belongs to). */
  authcid: Buffer;
  /** Whose mailbox, when it differs from authcid (a master/admin login). */
  authzid?: Buffer;
  password: Buffer;
}

export type TokenMechanism = 'OAUTHBEARER' | 'XOAUTH2';

/** An OAuth 2.0 bearer token (RFC 7628 OAUTHBEARER, or Google's XOAUTH2). */
export interface TokenCredentials {
  kind: 'token';
  mechanism: TokenMechanism;
  /**
   * The login to route by: OAUTHBEARER's GS2 authzid (`a=`), XOAUTH2's `user=`. Empty when
   * an OAUTHBEARER client named nobody (then only a token checked here can say who it is).
   */
  user: Buffer;
  /** The bearer token (RFC 6750 b64token). Never logged. */
  token: Buffer;
}

export type Credentials = PasswordCredentials | TokenCredentials;

export function passwordCredentials(authcid: Buffer, password: Buffer, authzid?: Buffer): PasswordCredentials {
  return authzid && authzid.length > 0 && !authzid.equals(authcid) ? { kind: 'password', authzid, authcid, password } : { kind: 'password', authcid, password };
}

/** The name the route is looked up by: the mailbox owner, i.e. authzid when a master login names one. */
export function mailboxOwner(creds: Credentials): string {
  if (creds.kind === 'token') return creds.user.toString('utf8');
  return (creds.authzid ?? creds.authcid).toString('utf8');
}
