import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createSecureContext } from 'node:tls';
import { readPasswordFile } from './auth/identity.js';
import { parseJwks } from './auth/jwt.js';
import { readSecretFile } from './auth/secret-file.js';
import { BACKEND_PROTOCOLS, isLoopback, plaintextAllowed, type Config } from './config.js';

// What the schema cannot see: the files a config names, and settings that are legal but
// unsafe. `check-config` and `serve` both run this, so a config that one passes the other
// starts with (short of a port taken by another program).

export interface Preflight {
  /** Reasons `serve` would fail: it refuses to start on any of them. */
  errors: string[];
  /** Legal but risky settings: logged at start and printed by check-config. */
  warnings: string[];
}

export function preflight(cfg: Config): Preflight {
  const errors: string[] = [];
  const warnings: string[] = [];
  cfg.listeners.forEach((l, i) => {
    const where = `listeners.${i} (${l.name ?? l.protocol})`;
    if (l.cert !== undefined && l.key !== undefined) checkPair(`${where}`, l.cert, l.key, errors);
    for (const [name, pair] of Object.entries(l.sni ?? {})) checkPair(`${where} sni ${name}`, pair.cert, pair.key, errors);
    if (l.path !== undefined) {
      for (const [kind, name] of [['passwd', l.socket_owner], ['group', l.socket_group]] as const) {
        if (name === undefined) continue;
        try {
          resolveId(kind, name);
        } catch (e) {
          errors.push(`${where}: socket_${kind === 'passwd' ? 'owner' : 'group'}: ${(e as Error).message}`);
        }
      }
      if (Number.parseInt(l.socket_mode, 8) & 0o002) warnings.push(`${where}: socket_mode ${l.socket_mode} lets every local user deliver mail as anyone`);
    }
    const local = isLoopback(l.address);
    if (l.protocol !== 'lmtp' && l.tls === 'none' && !local) {
      if (plaintextAllowed(l)) warnings.push(`${where}: plaintext_auth on ${l.address} without TLS: passwords cross the network in clear`);
      else warnings.push(`${where}: tls: none on ${l.address} and plaintext_auth off: no client can log in here (set tls, or plaintext_auth: true)`);
    }
    if (l.protocol === 'lmtp' && l.port !== undefined && !local) {
      warnings.push(`${where}: LMTP on ${l.address} has no authentication: anyone who reaches ${l.address}:${l.port} can deliver mail; firewall it`);
    }
  });
  const checkCa = (where: string, ca: string | undefined) => {
    if (ca === undefined) return;
    try {
      createSecureContext({ ca: readFileSync(ca) });
    } catch (e) {
      errors.push(`${where}: ca ${ca}: ${describe(e)}`);
    }
  };
  const checkCas = (where: string, t: Config['backend']['tls']) => {
    checkCa(where, t.ca);
    for (const p of BACKEND_PROTOCOLS) checkCa(`${where}.${p}`, t[p]?.ca);
  };
  checkCa('lookup.redis.tls', cfg.lookup.redis?.tls?.ca);
  checkCas('backend.tls', cfg.backend.tls);
  cfg.backend.tls_groups.forEach((g, i) => checkCas(`backend.tls_groups.${i}`, g));
  cfg.backend.identity_groups.forEach((g, i) => {
    if (g.admin_password_file === undefined) return;
    try {
      if (readPasswordFile(g.admin_password_file).length === 0) errors.push(`backend.identity_groups.${i}.admin_password_file ${g.admin_password_file} is empty`);
    } catch (e) {
      errors.push(`backend.identity_groups.${i}.admin_password_file: ${describe(e)}`);
    }
  });
  const checkSecret = (where: string, file: string | undefined) => {
    if (file === undefined) return;
    try {
      readSecretFile(file, where);
    } catch (e) {
      errors.push((e as Error).message);
    }
  };
  const ldap = cfg.auth.ldap;
  if (ldap) {
    checkCa('auth.ldap', ldap.ca);
    checkSecret('auth.ldap.bind_password_file', ldap.bind_password_file);
    if (!cfg.backend.identity_groups.some((g) => g.identity === 'admin')) {
      warnings.push('auth.ldap is set but no backend.identity_groups entry uses identity: admin: every password is checked twice, by the directory and by the backend');
    }
    if (ldap.url.startsWith('ldap://') && !ldap.starttls && !isLoopback(new URL(ldap.url).hostname)) {
      warnings.push(`auth.ldap.url ${ldap.url} without starttls: passwords cross the network to the directory in clear`);
    }
  }
  const oauth = cfg.auth.oauth;
  if (oauth) {
    checkSecret('auth.oauth.introspection.client_secret_file', oauth.introspection?.client_secret_file);
    if (oauth.jwt?.jwks_file !== undefined) {
      try {
        if (parseJwks(JSON.parse(readFileSync(oauth.jwt.jwks_file, 'utf8'))).length === 0) errors.push(`auth.oauth.jwt.jwks_file ${oauth.jwt.jwks_file} holds no usable RSA or EC signing key`);
      } catch (e) {
        errors.push(`auth.oauth.jwt.jwks_file ${oauth.jwt.jwks_file}: ${describe(e)}`);
      }
    }
    const url = oauth.introspection?.url ?? oauth.jwt?.jwks_url;
    if (url?.startsWith('http://') && !isLoopback(new URL(url).hostname)) warnings.push(`auth.oauth: ${url} is not https: tokens (or the keys that check them) cross the network in clear`);
  }
  if (cfg.admin?.token_file !== undefined) {
    try {
      readAdminToken(cfg.admin.token_file);
    } catch (e) {
      errors.push(`admin.token_file: ${(e as Error).message}`);
    }
  }
  return { errors, warnings };
}

function checkPair(where: string, cert: string, key: string, errors: string[]): void {
  let certPem: Buffer;
  let keyPem: Buffer;
  try {
    certPem = readFileSync(cert);
    keyPem = readFileSync(key);
  } catch (e) {
    errors.push(`${where}: ${describe(e)}`);
    return;
  }
  try {
    // Also proves that the key belongs to the certificate.
    createSecureContext({ cert: certPem, key: keyPem });
  } catch (e) {
    errors.push(`${where}: cert ${cert} / key ${key}: ${describe(e)}`);
  }
}

function describe(e: unknown): string {
  const err = e as NodeJS.ErrnoException;
  if (err.code === 'ENOENT') return `${err.path ?? 'file'} does not exist`;
  if (err.code === 'EACCES') return `${err.path ?? 'file'} is not readable by this user`;
  if (typeof err.code === 'string' && err.code.startsWith('ERR_OSSL')) return `not a valid PEM certificate or key, or they do not match (${err.message})`;
  return err.message;
}

/** The admin secret: the file's content without surrounding whitespace; never empty. */
export function readAdminToken(file: string): string {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new Error(describe(e));
  }
  const token = text.trim();
  if (token.length < 16) throw new Error(`${file} must hold a secret of at least 16 characters`);
  return token;
}

/** A user or group name (or number) as a numeric id, through NSS like every other program. */
export function resolveId(kind: 'passwd' | 'group', name: string): number {
  if (/^\d+$/.test(name)) return Number(name);
  let entry: string;
  try {
    entry = execFileSync('getent', [kind, name], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  } catch {
    throw new Error(`no ${kind === 'passwd' ? 'user' : 'group'} named ${JSON.stringify(name)}`);
  }
  const id = Number(entry.split(':')[2]);
  if (!Number.isInteger(id)) throw new Error(`cannot read the id of ${JSON.stringify(name)}`);
  return id;
}
