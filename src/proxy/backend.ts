import { readFileSync } from 'node:fs';
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import type { BackendTlsConfig } from '../config.js';

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

export interface BackendOptions {
  connectTimeoutMs: number;
  tls: BackendTlsConfig;
}

let caCache: { path: string; pem: Buffer } | undefined;
function ca(path: string | undefined): Buffer | undefined {
  if (!path) return undefined;
  if (caCache?.path !== path) caCache = { path, pem: readFileSync(path) };
  return caCache.pem;
}

function tlsOptions(host: string, cfg: BackendTlsConfig) {
  const servername = cfg.servername ?? (isIP(host) ? undefined : host);
  return {
    ca: ca(cfg.ca),
    servername,
    // An IP-addressed slot (no servername) is checked against the IP SANs of its certificate.
    rejectUnauthorized: cfg.verify,
  };
}

/** Opens a TCP (or implicit-TLS) connection to a backend, failing as `unavailable` in bounded time. */
export function openBackend(host: string, port: number, opts: BackendOptions): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const implicit = opts.tls.mode === 'implicit';
    const sock: Socket = implicit
      ? tlsConnect({ host, port, ...tlsOptions(host, opts.tls) })
      : netConnect({ host, port, allowHalfOpen: true, noDelay: true });
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new BackendRefused('unavailable', `backend ${host}:${port} did not answer in ${opts.connectTimeoutMs} ms`));
    }, opts.connectTimeoutMs);
    const fail = (e: Error) => {
      clearTimeout(timer);
      sock.destroy();
      reject(new BackendRefused('unavailable', `backend ${host}:${port}: ${tlsHint(e)}`));
    };
    sock.once('error', fail);
    sock.once(implicit ? 'secureConnect' : 'connect', () => {
      clearTimeout(timer);
      sock.off('error', fail);
      sock.setNoDelay(true);
      resolve(sock);
    });
  });
}

/** Upgrades a backend connection after the protocol's STARTTLS/STLS was accepted. */
export function startBackendTls(sock: Socket, host: string, cfg: BackendTlsConfig): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const tls = tlsConnect({ socket: sock, ...tlsOptions(host, cfg) });
    const fail = (e: Error) => {
      tls.destroy();
      reject(new BackendRefused('unavailable', `backend ${host} TLS: ${tlsHint(e)}`));
    };
    tls.once('error', fail);
    tls.once('secureConnect', () => {
      tls.off('error', fail);
      resolve(tls);
    });
  });
}

function tlsHint(e: Error): string {
  const code = (e as NodeJS.ErrnoException).code;
  if (code && /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ERR_TLS_CERT_ALTNAME/.test(code)) {
    return `certificate check failed (${code}: ${e.message}); set backend.tls.ca to the CA that signed it`;
  }
  return e.message;
}
