import { readFileSync } from 'node:fs';
import type { Config, IdentityGroupConfig } from '../config.js';
import { globToRegExp } from '../proxy/backend.js';

/**
 * How mailsplice logs in to a slot's backend, from `backend.identity_groups` (first group
 * whose `slots` glob matches; a slot in none is `passthrough` with the full address).
 * Minimal version written for the LMTP side (issue 8); the auth layer owns its growth.
 */
export interface BackendIdentity {
  /** passthrough: the client's own credentials; admin: SASL PLAIN as `admin` on the user's behalf. */
  mode: 'passthrough' | 'admin';
  /** The slot group's admin, when configured (LMTP authenticates as it whatever `mode`). */
  admin?: { user: string; password: Buffer };
  /** The backend's name for a user: the full address or its local part. */
  loginName: 'full' | 'local_part';
}

const PASSTHROUGH: BackendIdentity = Object.freeze({ mode: 'passthrough', loginName: 'full' });

const compiled = new WeakMap<IdentityGroupConfig, { patterns: RegExp[]; identity: BackendIdentity }>();

/** A password file's content: one line, its final newline not part of it. */
export function readPasswordFile(file: string): Buffer {
  const raw = readFileSync(file);
  let end = raw.length;
  if (end > 0 && raw[end - 1] === 0x0a) end--;
  if (end > 0 && raw[end - 1] === 0x0d) end--;
  return raw.subarray(0, end);
}

function compile(g: IdentityGroupConfig): { patterns: RegExp[]; identity: BackendIdentity } {
  let c = compiled.get(g);
  if (!c) {
    const identity: BackendIdentity = { mode: g.identity, loginName: g.login_name };
    // The file is read once per config object: a reload reads it again.
    if (g.admin_user !== undefined && g.admin_password_file !== undefined) identity.admin = { user: g.admin_user, password: readPasswordFile(g.admin_password_file) };
    c = { patterns: g.slots.map(globToRegExp), identity };
    compiled.set(g, c);
  }
  return c;
}

export function identityFor(backend: Config['backend'], slot: string): BackendIdentity {
  for (const g of backend.identity_groups) {
    const c = compile(g);
    if (c.patterns.some((re) => re.test(slot))) return c.identity;
  }
  return PASSTHROUGH;
}
