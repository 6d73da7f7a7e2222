/**
 * What a client proved who it is with, in one shape whatever the mechanism (SASL PLAIN,
 * LOGIN, IMAP LOGIN, POP3 USER/PASS). `kind` leaves room for mechanisms that carry no
 * password (OAUTHBEARER will add a `token` kind); the backend dialogues only send
 * `password` credentials.
 */
export interface PasswordCredentials {
  kind: 'password';
  /** Who acts (the name the password belongs to). */
  authcid: Buffer;
  /** Whose mailbox, when it differs from authcid (a master/admin login). */
  authzid?: Buffer;
  password: Buffer;
}

export type Credentials = PasswordCredentials;

export function passwordCredentials(authcid: Buffer, password: Buffer, authzid?: Buffer): PasswordCredentials {
  return authzid && authzid.length > 0 && !authzid.equals(authcid) ? { kind: 'password', authzid, authcid, password } : { kind: 'password', authcid, password };
}

/** The name the route is looked up by: the mailbox owner, i.e. authzid when a master login names one. */
export function mailboxOwner(creds: Credentials): string {
  return (creds.authzid ?? creds.authcid).toString('utf8');
}
