import { readFileSync } from 'node:fs';
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { Client, InvalidCredentialsError } from 'ldapts';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';
import { OutageLog } from '../outage.js';
import { CheckerUnavailable, type CheckResult, type PasswordChecker } from './checker.js';
import type { PasswordCredentials } from './credentials.js';
import { readSecretFile } from './secret-file.js';

// Passwords checked against an LDAP directory: bind as the service DN, search the user's
// entry with the configured filter, then bind as that entry with the client's password.
// A small bounded pool of connections; each connection is used for one check at a time.

export type LdapConfig = NonNullable<Config['auth']['ldap']>;

/** RFC 4515 section 3: a value inside a filter. */
export function escapeFilterValue(value: string): string {
  return value.replace(/[\\*()\0]/g, (c) => `\\${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** The filter for one login: %u the login, %n its local part, %d its domain, %% a percent sign. */
export function userFilter(template: string, login: string): string {
  const at = login.lastIndexOf('@');
  const parts: Record<string, string> = { u: login, n: at < 0 ? login : login.slice(0, at), d: at < 0 ? '' : login.slice(at + 1) };
  return template.replace(/%([und%])/g, (_, k: string) => (k === '%' ? '%' : escapeFilterValue(parts[k]!)));
}

/** Where the socket path cannot exist: a connect there fails at once (see oneConnection). */
const NOWHERE = '/nonexistent/mailsplice-ldap-connection-was-lost';

interface Pooled {
  client: Client;
  /** Who the connection is bound as now: after a user's bind it must bind as the service again. */
  boundAsService: boolean;
}

interface Waiter {
  resolve(p: Pooled): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

export class LdapPasswordChecker implements PasswordChecker {
  private readonly idle: Pooled[] = [];
  private readonly waiters: Waiter[] = [];
  private open = 0;
  private closed = false;
  private readonly bindPassword: string | undefined;
  private readonly tls: ConnectionOptions | undefined;
  private readonly secureUrl: boolean;
  /** A directory that is down fails every check: one line when it goes, a count, one when back. */
  private readonly outage: OutageLog;

  constructor(
    private readonly cfg: LdapConfig,
    private readonly log: Logger,
  ) {
    this.bindPassword = cfg.bind_password_file ? readSecretFile(cfg.bind_password_file, 'auth.ldap.bind_password_file').toString('utf8') : undefined;
    this.secureUrl = cfg.url.startsWith('ldaps://');
    this.outage = new OutageLog(log, {
      what: `LDAP directory ${ldapEndpoint(cfg.url)}`,
      effect: 'logins whose password the proxy checks get UNAVAILABLE',
      // Our own messages already say "ldap <url>:"; the first line of ldapts' is the reason.
      describe: (e) => e.message.replace(/^ldap( \S+)?: /, ''),
    });
    if (this.secureUrl || cfg.starttls) {
      const host = new URL(cfg.url).hostname.replace(/^\[|\]$/g, '');
      this.tls = {
        // host: what the certificate is checked against when StartTLS upgrades a socket
        // (tls.connect would check "localhost" otherwise); servername: SNI, names only.
        host,
        ...(cfg.ca ? { ca: readFileSync(cfg.ca) } : {}),
        rejectUnauthorized: cfg.verify,
        servername: cfg.servername ?? (isIP(host) ? undefined : host),
      };
    }
  }

  async check(creds: PasswordCredentials): Promise<CheckResult> {
    const login = creds.authcid.toString('utf8');
    // An empty password is an unauthenticated bind (RFC 4513 5.1.2), which servers accept.
    if (creds.password.length === 0) return { ok: false, why: 'empty password' };
    if (login.length === 0 || login.length > 512) return { ok: false, why: 'bad login' };
    try {
      const result = await this.checkWithPool(login, creds.password.toString('utf8'));
      this.outage.ok();
      return result;
    } catch (e) {
      if (e instanceof CheckerUnavailable && !this.closed) this.outage.error(e);
      throw e;
    }
  }

  private async checkWithPool(login: string, password: string): Promise<CheckResult> {
    const conn = await this.acquire();
    let reusable = false;
    try {
      const result = await this.checkOn(conn, login, password);
      reusable = true;
      return result;
    } catch (e) {
      if (e instanceof CheckerUnavailable) throw e;
      throw new CheckerUnavailable(`ldap: ${(e as Error).message.split('\n')[0]}`);
    } finally {
      this.release(conn, reusable);
    }
  }

  private async checkOn(conn: Pooled, login: string, password: string): Promise<CheckResult> {
    const { cfg } = this;
    if (!conn.boundAsService) {
      // Anonymous when no service DN is configured: an empty simple bind.
      await conn.client.bind(cfg.bind_dn ?? '', this.bindPassword ?? '');
      conn.boundAsService = true;
    }
    const attributes = cfg.login_attribute ? [cfg.login_attribute] : ['1.1'];
    const { searchEntries } = await conn.client.search(cfg.base_dn, {
      scope: 'sub',
      filter: userFilter(cfg.filter, login),
      attributes,
      sizeLimit: 2,
      timeLimit: Math.ceil(cfg.timeout_ms / 1000),
    });
    if (searchEntries.length === 0) return { ok: false, why: 'no such user in the directory' };
    if (searchEntries.length > 1) {
      this.log.warn('ldap filter matches more than one entry; login refused', { login, filter: cfg.filter });
      return { ok: false, why: 'ambiguous login' };
    }
    const entry = searchEntries[0]!;
    let canonical = login;
    if (cfg.login_attribute) {
      // Attribute names are case-insensitive (RFC 4512); the entry has them as the server spells them.
      const wanted = cfg.login_attribute.toLowerCase();
      const key = Object.keys(entry).find((k) => k.toLowerCase() === wanted);
      const v = key === undefined ? undefined : entry[key];
      const first = Array.isArray(v) ? v[0] : v;
      const text = Buffer.isBuffer(first) ? first.toString('utf8') : first;
      if (typeof text !== 'string' || text === '') return { ok: false, why: `entry has no ${cfg.login_attribute}` };
      canonical = text;
    }
    conn.boundAsService = false;
    try {
      await conn.client.bind(entry.dn, password);
    } catch (e) {
      if (e instanceof InvalidCredentialsError) return { ok: false, why: 'wrong password' };
      throw e;
    }
    return { ok: true, login: canonical };
  }

  /** A connection of the pool, a new one while under pool_size, else the next one released (bounded wait and queue). */
  private acquire(): Promise<Pooled> {
    if (this.closed) return Promise.reject(new CheckerUnavailable('ldap: shutting down'));
    // One the server closed while idle (an idle timeout) is dropped here rather than failing a check.
    for (let idle = this.idle.pop(); idle; idle = this.idle.pop()) {
      if (idle.client.isConnected) return Promise.resolve(idle);
      this.open--;
    }
    if (this.open < this.cfg.pool_size) return this.connect();
    if (this.waiters.length >= this.cfg.queue_limit) return Promise.reject(new CheckerUnavailable('ldap: too many checks waiting'));
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        resolve,
        reject,
        timer: setTimeout(() => {
          const i = this.waiters.indexOf(waiter);
          if (i >= 0) this.waiters.splice(i, 1);
          reject(new CheckerUnavailable(`ldap: no connection free within ${this.cfg.timeout_ms} ms`));
        }, this.cfg.timeout_ms),
      };
      this.waiters.push(waiter);
    });
  }

  private release(conn: Pooled, reusable: boolean): void {
    if (!reusable || this.closed) {
      this.open--;
      void conn.client.unbind().catch(() => undefined);
      // A waiter gets a fresh connection in its place.
      const next = this.waiters.shift();
      if (next) {
        clearTimeout(next.timer);
        this.connect().then(next.resolve, next.reject);
      }
      return;
    }
    const next = this.waiters.shift();
    if (next) {
      clearTimeout(next.timer);
      next.resolve(conn);
    } else {
      this.idle.push(conn);
    }
  }

  /**
   * One Client per TCP connection. ldapts reconnects by itself when the server closed the
   * connection, in clear and without StartTLS; the connection factories below allow one
   * connection only, so a lost one fails the check (and is replaced) instead.
   */
  private async connect(): Promise<Pooled> {
    this.open++;
    const { cfg } = this;
    let used = false;
    const once = <T extends (...args: never[]) => Socket>(make: T): T =>
      ((...args: Parameters<T>) => {
        if (used) return netConnect({ path: NOWHERE });
        used = true;
        return make(...args);
      }) as T;
    const client = new Client({
      url: cfg.url,
      timeout: cfg.timeout_ms,
      connectTimeout: cfg.connect_timeout_ms,
      ...(this.secureUrl && this.tls ? { tlsOptions: this.tls } : {}),
      ...(this.secureUrl
        ? { createSecureConnection: once(tlsConnect as (...args: never[]) => Socket) as typeof tlsConnect }
        : { createConnection: once(netConnect as (...args: never[]) => Socket) as typeof netConnect }),
    });
    try {
      if (cfg.starttls) await client.startTLS(this.tls);
      if (this.secureUrl) {
        // ldaps: the first operation connects; do it here so that a refused certificate is a connect error.
        await client.bind(cfg.bind_dn ?? '', this.bindPassword ?? '');
        return { client, boundAsService: true };
      }
      return { client, boundAsService: false };
    } catch (e) {
      this.open--;
      void client.unbind().catch(() => undefined);
      throw new CheckerUnavailable(`ldap ${cfg.url}: ${(e as Error).message.split('\n')[0]}`);
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new CheckerUnavailable('ldap: shutting down'));
    }
    await Promise.allSettled(this.idle.splice(0).map((c) => c.client.unbind()));
  }
}

/** host:port of an LDAP URL, without anything else it may carry: safe to log. */
function ldapEndpoint(url: string): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.hostname}${u.port ? `:${u.port}` : ''}`;
  } catch {
    return '(unparsable url)';
  }
}
