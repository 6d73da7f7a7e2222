import { readFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import type { ListenerConfig } from '../config.js';

/**
 * A listener's certificates: a default key and chain, and an optional SNI map from a name
 * (`mail.example.com`) or a one-label wildcard (`*.example.com`) to another pair. The
 * default serves clients that send no SNI or a name not in the map.
 *
 * `reload()` (SIGHUP) reads every file again and swaps all contexts at once; a handshake
 * already done keeps the context it used, so open sessions are untouched, and the next
 * handshake gets the new certificates. A reload that fails (a missing file, a key that does
 * not match its certificate) throws and leaves the old set in force.
 */
export class ListenerTls {
  private current!: { default: SecureContext; byName: Map<string, SecureContext> };

  constructor(private readonly cfg: ListenerConfig) {
    for (const name of Object.keys(cfg.sni ?? {})) {
      if (!validSniKey(name)) throw new Error(`listener ${cfg.name ?? `${cfg.protocol}:${cfg.port}`}: sni key "${name}" is not a host name or *.domain`);
    }
    this.reload();
  }

  reload(): void {
    const make = (cert: string, key: string, what: string): SecureContext => {
      try {
        return createSecureContext({ cert: readFileSync(cert), key: readFileSync(key), minVersion: this.cfg.min_tls_version });
      } catch (e) {
        throw new Error(`${what} (${cert}, ${key}): ${(e as Error).message}`);
      }
    };
    const def = make(this.cfg.cert!, this.cfg.key!, 'certificate');
    const byName = new Map<string, SecureContext>();
    for (const [name, pair] of Object.entries(this.cfg.sni ?? {})) byName.set(normalName(name), make(pair.cert, pair.key, `sni certificate for ${name}`));
    this.current = { default: def, byName };
  }

  /** Exact name first, then the wildcard one label up, then the default. */
  contextFor(servername: string): SecureContext {
    const { byName, default: def } = this.current;
    const name = normalName(servername);
    const exact = byName.get(name);
    if (exact) return exact;
    const dot = name.indexOf('.');
    return (dot > 0 && byName.get(`*${name.slice(dot)}`)) || def;
  }

  /**
   * Starts a server-side handshake on `socket`; resolves once it is secure, rejects if it
   * fails or the socket closes first. The caller bounds the time (the shared sweep).
   */
  accept(socket: Socket): Promise<TLSSocket> {
    return new Promise((resolve, reject) => {
      const tls = new TLSSocket(socket, {
        isServer: true,
        secureContext: this.current.default,
        SNICallback: (name, cb) => cb(null, this.contextFor(name)),
      });
      const fail = (e: Error) => {
        tls.destroy();
        reject(e);
      };
      const closed = () => fail(new Error('closed during TLS handshake'));
      // `on`, not `once`: a second error during teardown must not go unhandled.
      tls.on('error', fail);
      tls.once('close', closed);
      // The listeners allow half-open sockets: a client that hangs up mid-handshake sends
      // only a FIN, which would otherwise leave this waiting (and a shutdown with it).
      tls.once('end', closed);
      tls.once('secure', () => {
        tls.off('error', fail);
        tls.off('close', closed);
        tls.off('end', closed);
        resolve(tls);
      });
    });
  }
}

/** SNI names compare case-insensitively and without a trailing dot (RFC 6066 section 3). */
function normalName(name: string): string {
  return name.toLowerCase().replace(/\.$/, '');
}

function validSniKey(name: string): boolean {
  return /^(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]*[a-z0-9])?\.?$/i.test(name);
}
