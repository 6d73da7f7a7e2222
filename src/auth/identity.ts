import type { Config, IdentityGroupConfig } from '../config.js';
import type { Route } from '../lookup/model.js';
import { globToRegExp } from '../net/backend.js';
import type { PasswordCredentials, TokenCredentials } from './credentials.js';
import { readPasswordFile } from './secret-file.js';

export { readPasswordFile } from './secret-file.js';

// How mailsplice logs in to a slot's backend, from `backend.identity_groups` (first group
// whose `slots` glob matches; a slot in none is passthrough with the full address): with
// the client's own credentials (passthrough, the default), or as the group's admin acting
// for the user (Cyrus `proxyservers`, Dovecot master users), which needs the proxy to have
// checked the password itself (auth.ldap; the config refuses admin without it). LMTP
// authenticates as the group's admin whatever the mode (src/lmtp/delivery.ts).

export interface BackendIdentity {
  /** passthrough: the client's own credentials; admin: SASL PLAIN as `admin` on the user's behalf. */
  mode: 'passthrough' | 'admin';
  /** The slot group's admin, when configured (LMTP authenticates as it whatever `mode`). */
  admin?: { user: string; password: Buffer };
  /** The backend's name for a user when the user record sets no backend_login: the full address or its local part. */
  loginName: 'full' | 'local_part';
  /**
   * Admin mode for backends without AUTH=PLAIN (or by choice): log in as
   * `user<separator>admin` (Dovecot's auth_master_user_separator) instead of with an authzid.
   */
  masterSeparator?: string;
  /** Token logins: the backend checks the token (passthrough), or the proxy does and `admin` logs in (check). */
  oauth?: 'passthrough' | 'check';
}

const PASSTHROUGH: BackendIdentity = Object.freeze({ mode: 'passthrough', loginName: 'full', oauth: 'passthrough' });

/** Compiled once per config object; the admin password file read once per group (a reload reads it again). */
const compiled = new WeakMap<IdentityGroupConfig, { patterns: RegExp[]; identity: BackendIdentity }>();

function compile(g: IdentityGroupConfig): { patterns: RegExp[]; identity: BackendIdentity } {
  let c = compiled.get(g);
  if (!c) {
    const identity: BackendIdentity = { mode: g.identity, loginName: g.login_name, oauth: g.oauth };
    if (g.admin_user !== undefined && g.admin_password_file !== undefined) identity.admin = { user: g.admin_user, password: readPasswordFile(g.admin_password_file) };
    if ((g.identity === 'admin' || g.oauth === 'check') && g.master_login_form === 'separator') identity.masterSeparator = g.master_separator;
    c = { patterns: g.slots.map(globToRegExp), identity };
    compiled.set(g, c);
  }
  return c;
}

/** The identity rule of one slot: the first `backend.identity_groups` entry that matches, else passthrough with the full login. */
export function identityFor(backend: Config['backend'], slot: string): BackendIdentity {
  for (const g of backend.identity_groups) {
    const c = compile(g);
    if (c.patterns.some((re) => re.test(slot))) return c.identity;
  }
  return PASSTHROUGH;
}

/** Reads the admin password of every group in admin mode now, so that a missing file stops the start, not a login. */
export function loadIdentities(backend: Config['backend']): void {
  for (const g of backend.identity_groups) if (g.identity === 'admin' || g.oauth === 'check') compile(g);
}

/** The user's name on the backend: backend_login when the record sets one, else the login by the group's rule. */
export function backendUserName(route: Route, identity: BackendIdentity): string {
  if (route.backendLogin !== route.login) return route.backendLogin;
  if (identity.loginName === 'local_part') {
    const at = route.login.lastIndexOf('@');
    if (at > 0) return route.login.slice(0, at);
  }
  return route.login;
}

/**
 * What the proxy sends to the backend for this client on this route. Passthrough keeps the
 * client's password (and a client's own proxy login keeps its authcid: only the mailbox
 * name changes); admin sends the configured admin's.
 */
export function backendCredentials(identity: BackendIdentity, client: PasswordCredentials, route: Route): PasswordCredentials {
  if (identity.mode === 'admin' && identity.admin) return adminCredentials(identity, route)!;
  const user = Buffer.from(backendUserName(route, identity), 'utf8');
  return client.authzid ? { ...client, authzid: user } : { ...client, authcid: user };
}

/** The group's admin acting for the route's user (authzid, or the `user*admin` form); undefined without an admin. */
export function adminCredentials(identity: BackendIdentity, route: Route): PasswordCredentials | undefined {
  const { admin } = identity;
  if (!admin) return undefined;
  const user = backendUserName(route, identity);
  if (identity.masterSeparator !== undefined) {
    return { kind: 'password', authcid: Buffer.from(`${user}${identity.masterSeparator}${admin.user}`, 'utf8'), password: admin.password };
  }
  return { kind: 'password', authzid: Buffer.from(user, 'utf8'), authcid: Buffer.from(admin.user, 'utf8'), password: admin.password };
}

/** A token passed through to a backend that checks it: the same token, for the user's name on that backend. */
export function backendToken(identity: BackendIdentity, client: TokenCredentials, route: Route): TokenCredentials {
  return { ...client, user: Buffer.from(backendUserName(route, identity), 'utf8') };
}

/** What a backend dialogue logs in with. */
export type BackendCredentials = PasswordCredentials | TokenCredentials;
