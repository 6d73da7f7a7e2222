import { readFileSync } from 'node:fs';
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, createSecureContext, type ConnectionOptions, type SecureContext, type TLSSocket } from 'node:tls';
import type { BackendProtocol, BackendTlsConfig, Config } from '../config.js';
import type { LineReader } from './lines.js';
import { landingReads, markLanding } from './read-buffer.js';

/** Why a backend login did not happen; the front ends map it to their protocol's words. */
export class BackendRefused extends Error {
  constructor(
    /** auth: the backend said no to the credentials; unavailable: anything else temporary; in-use: mailbox locked (POP3). */
    readonly kind: 'auth' | 'unavailable' | 'in-use',
    message: string,
  ) {
    super(message);
    this.name = 'BackendRefused';
  }
}

/** The longest line a backend may send during its login dialogue. */
export const MAX_BACKEND_LINE = 64 * 1024;

/**
 * How much a backend may send in one login dialogue, in lines and bytes, whatever it sends
 * them as (untagged lines, CAPA lines, ...). A real server sends a dozen lines; one that
 * streams more is broken or hostile, and must not grow our memory or hold the login.
 */
export const MAX_BACKEND_DIALOGUE_LINES = 1000;
export const MAX_BACKEND_DIALOGUE_BYTES = 256 * 1024;

/** The backend's side of one login dialogue, read line by line under the limits above. */
export class BackendLines {
  private lines = 0;
  private bytes = 0;

  constructor(public reader: LineReader) {}

  async line(): Promise<string> {
    const line = await this.reader.line();
    this.bytes += line.length + 2;
    if (++this.lines > MAX_BACKEND_DIALOGUE_LINES || this.bytes > MAX_BACKEND_DIALOGUE_BYTES) {
      throw new BackendRefused('unavailable', `backend sent more than ${MAX_BACKEND_DIALOGUE_LINES} lines or ${MAX_BACKEND_DIALOGUE_BYTES} bytes during login`);
    }
    return line;
  }
}

/**
 * A backend's text as a client may see it: printable ASCII only (no escape sequences, no
 * line breaks), and short.
 */
export function printable(text: string, max = 200): string {
  return text.replace(/[^\x20-\x7e]/g, '?').slice(0, max);
}

/** Any failure of a backend dialogue as a BackendRefused: a dropped connection, a timeout or a line too long is `unavailable`. */
export function asBackendRefused(e: unknown): BackendRefused {
  return e instanceof BackendRefused ? e : new BackendRefused('unavailable', `backend dialogue failed: ${(e as Error).message}`);
}

export interface BackendOptions {
  connectTimeoutMs: number;
  tls: BackendTlsConfig;
  /**
   * Read into the shared landing buffer (read-buffer.ts) when the connection stays plain
   * TCP: the IMAP/POP3 splice's bulk path. Not for STARTTLS (TLS takes the socket over).
   */
  landing?: boolean;
}

/**
 * The TLS settings for one slot: the first `backend.tls_groups` entry with a matching
 * pattern, else `backend.tls`; for `protocol`, that entry's own `imap`/`pop3`/`lmtp`
 * settings over it. Patterns are compiled once per config object.
 */
export function backendTlsFor(backend: Config['backend'], slot: string, protocol?: BackendProtocol): BackendTlsConfig {
  const group = backend.tls_groups.find((g) => {
    let patterns = globCache.get(g);
    if (!patterns) globCache.set(g, (patterns = g.slots.map(globToRegExp)));
    return patterns.some((re) => re.test(slot));
  }) ?? backend.tls;
  const override = protocol === undefined ? undefined : group[protocol];
  if (!override) return group;
  // One merged object per override, kept: the TLS context cache below is keyed by identity.
  let merged = mergedCache.get(override);
  if (!merged) {
    merged = {
      mode: override.mode ?? group.mode,
      verify: override.verify ?? group.verify,
      ...(override.ca ?? group.ca ? { ca: override.ca ?? group.ca } : {}),
      ...(override.servername ?? group.servername ? { servername: override.servername ?? group.servername } : {}),
    };
    mergedCache.set(override, merged);
  }
  return merged;
}

const mergedCache = new WeakMap<object, BackendTlsConfig>();
const globCache = new WeakMap<object, RegExp[]>();

/** `*` any run, `?` one character, everything else literal; the whole id must match. */
export function globToRegExp(glob: string): RegExp {
  const body = glob.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp(`^${body}$`);
}

/**
 * One client context per backend TLS setting: the CA file is read and parsed once, not on
 * every login (passing `ca` to tls.connect would build a fresh context per connection).
 * `reloadBackendTls()` forgets them, so a replaced CA file is read on the next login.
 */
let contexts = new WeakMap<BackendTlsConfig, SecureContext>();

export function reloadBackendTls(): void {
  contexts = new WeakMap();
}

function tlsOptions(host: string, cfg: BackendTlsConfig): ConnectionOptions {
  let secureContext = contexts.get(cfg);
  if (!secureContext) {
    secureContext = createSecureContext(cfg.ca ? { ca: readFileSync(cfg.ca) } : {});
    contexts.set(cfg, secureContext);
  }
  return {
    secureContext,
    host,
    // SNI only for names (RFC 6066 forbids IP literals); an IP-addressed slot is checked
    // against the IP SANs of its certificate, `servername` overrides both.
    servername: cfg.servername ?? (isIP(host) ? undefined : host),
    rejectUnauthorized: cfg.verify,
  };
}

/**
 * Opens a TCP (or implicit-TLS) connection to a backend, failing as `unavailable` in bounded
 * time. A `preamble` (a PROXY header) is written first, in clear, before any TLS.
 */
export function openBackend(host: string, port: number, opts: BackendOptions & { preamble?: Buffer }): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const implicit = opts.tls.mode === 'implicit';
    const tlsAtOnce = implicit && !opts.preamble;
    let sock: Socket = tlsAtOnce
      ? tlsConnect({ host, port, ...tlsOptions(host, opts.tls) })
      : opts.landing && opts.tls.mode === 'none'
        ? netConnect({ host, port, allowHalfOpen: true, noDelay: true, onread: landingReads })
        : netConnect({ host, port, allowHalfOpen: true, noDelay: true });
    if (opts.landing && opts.tls.mode === 'none') markLanding(sock);
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new BackendRefused('unavailable', `backend ${host}:${port} did not answer in ${opts.connectTimeoutMs} ms`));
    }, opts.connectTimeoutMs);
    const fail = (e: Error) => {
      clearTimeout(timer);
      sock.destroy();
      reject(new BackendRefused('unavailable', `backend ${host}:${port}: ${tlsHint(e)}`));
    };
    const done = () => {
      clearTimeout(timer);
      sock.off('error', fail);
      sock.setNoDelay(true);
      resolve(sock);
    };
    sock.once('error', fail);
    sock.once(tlsAtOnce ? 'secureConnect' : 'connect', () => {
      if (opts.preamble) sock.write(opts.preamble);
      if (!implicit || tlsAtOnce) return done();
      // The header went in clear; the handshake follows on the same connection.
      sock.off('error', fail);
      const raw = sock;
      sock = tlsConnect({ socket: raw, ...tlsOptions(host, opts.tls) });
      raw.once('error', fail);
      sock.once('error', fail);
      sock.once('secureConnect', () => {
        raw.off('error', fail);
        done();
      });
    });
  });
}

/**
 * Whether the slot's backends take a PROXY v2 header on `protocol` (the first
 * `backend.proxy_protocol_groups` entry whose globs match the slot).
 */
export function sendsProxyHeader(backend: Config['backend'], slot: string, protocol: 'imap' | 'pop3'): boolean {
  const group = backend.proxy_protocol_groups.find((g) => {
    let patterns = globCache.get(g);
    if (!patterns) globCache.set(g, (patterns = g.slots.map(globToRegExp)));
    return patterns.some((re) => re.test(slot));
  });
  return group !== undefined && group.protocols.includes(protocol);
}

/** Upgrades a backend connection after the protocol's STARTTLS/STLS was accepted. */
export function startBackendTls(sock: Socket, host: string, cfg: BackendTlsConfig): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const tls = tlsConnect({ socket: sock, ...tlsOptions(host, cfg) });
    const fail = (e: Error) => {
      tls.destroy();
      reject(new BackendRefused('unavailable', `backend ${host} TLS: ${tlsHint(e)}`));
    };
    const closed = () => fail(new Error('connection closed during TLS handshake'));
    tls.on('error', fail); // `on`: a second error after the first must not go unhandled
    tls.once('close', closed);
    tls.once('secureConnect', () => {
      tls.off('error', fail);
      tls.off('close', closed);
      resolve(tls);
    });
  });
}

function tlsHint(e: Error): string {
  const code = (e as NodeJS.ErrnoException).code;
  if (code && /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ERR_TLS_CERT_ALTNAME/.test(code)) {
    return `certificate check failed (${code}: ${e.message}); check the ca (and servername) of this slot's backend.tls_groups entry or of backend.tls`;
  }
  return e.message;
}
