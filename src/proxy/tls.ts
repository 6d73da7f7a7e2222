import { readFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { createSecureContext, TLSSocket, type SecureContext } from 'node:tls';
import type { ListenerConfig } from '../config.js';

/**
 * A listener's certificates: a default pair and an optional SNI map. `reload()` reads the
 * files again (SIGHUP); open sessions keep the context they shook hands with, the next
 * handshake gets the new one. A reload that fails keeps the old certificates in force.
 */
export class ListenerTls {
  private default!: SecureContext;
  private byName = new Map<string, SecureContext>();

  constructor(private readonly cfg: ListenerConfig) {
    this.reload();
  }

  reload(): void {
    const make = (cert: string, key: string) =>
      createSecureContext({ cert: readFileSync(cert), key: readFileSync(key), minVersion: this.cfg.min_tls_version });
    const def = make(this.cfg.cert!, this.cfg.key!);
    const byName = new Map<string, SecureContext>();
    for (const [name, pair] of Object.entries(this.cfg.sni ?? {})) byName.set(name.toLowerCase(), make(pair.cert, pair.key));
    this.default = def;
    this.byName = byName;
  }

  private context(servername: string): SecureContext {
    const name = servername.toLowerCase();
    const exact = this.byName.get(name);
    if (exact) return exact;
    const dot = name.indexOf('.');
    return (dot > 0 && this.byName.get(`*${name.slice(dot)}`)) || this.default;
  }

  /** Starts a server-side handshake on `socket`; resolves once it is secure. */
  accept(socket: Socket): Promise<TLSSocket> {
    return new Promise((resolve, reject) => {
      const tls = new TLSSocket(socket, {
        isServer: true,
        secureContext: this.default,
        SNICallback: (name, cb) => cb(null, this.context(name)),
      });
      tls.once('secure', () => {
        tls.off('error', reject);
        resolve(tls);
      });
      tls.once('error', reject);
      tls.once('close', () => reject(new Error('closed during TLS handshake')));
    });
  }
}
