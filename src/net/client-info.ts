import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';

/** What the TLS handshake settled, for logs and for whatever may later want it. */
export interface TlsFacts {
  /** `TLSv1.3`, `TLSv1.2`. */
  version: string;
  /** OpenSSL's name of the cipher suite. */
  cipher: string;
  /** The host name the client asked for (SNI), when it sent one. */
  sni: string | undefined;
}

/**
 * One accepted connection as everything after the accept pipeline sees it: limits, the
 * login throttle, logs, the address forwarded to backends, metrics. Made once at accept
 * (from the socket, or from a PROXY header sent by a trusted load balancer) and never
 * re-derived from the socket later, so that a proxied client has one address everywhere.
 */
export interface ClientInfo {
  /** `tcp`, or `unix` (an LMTP unix socket: no address, not limited per address). */
  readonly transport: 'tcp' | 'unix';
  /** The client's address (IPv4 dotted, IPv6 as Node writes it); `unix` on a unix socket. */
  readonly address: string;
  readonly port: number;
  /** The listener's name (its `name`, else `protocol:port` or the socket path). */
  readonly listener: string;
  /** Where the client connected to: this socket's end, or the header's destination when proxied. */
  readonly localAddress: string;
  readonly localPort: number;
  /** The load balancer's own address when address/port came from its PROXY header. */
  readonly proxiedBy: string | undefined;
  /** Set once a TLS handshake is done: implicit TLS at accept, STARTTLS/STLS later. */
  tls: TlsFacts | undefined;
}

/** The client as the socket itself says: no PROXY header (yet). */
export function clientFromSocket(socket: Socket, listener: string, transport: 'tcp' | 'unix'): ClientInfo {
  if (transport === 'unix') {
    return { transport, address: 'unix', port: 0, listener, localAddress: '', localPort: 0, proxiedBy: undefined, tls: undefined };
  }
  return {
    transport,
    // A peer that already left has no address any more; it is about to be closed anyway.
    address: socket.remoteAddress ?? 'unknown',
    port: socket.remotePort ?? 0,
    listener,
    localAddress: socket.localAddress ?? '',
    localPort: socket.localPort ?? 0,
    proxiedBy: undefined,
    tls: undefined,
  };
}

export function tlsFacts(socket: TLSSocket): TlsFacts {
  const servername = (socket as TLSSocket & { servername?: string | false }).servername;
  return {
    version: socket.getProtocol() ?? 'unknown',
    cipher: socket.getCipher()?.name ?? 'unknown',
    sni: typeof servername === 'string' && servername !== '' ? servername : undefined,
  };
}

/** `address:port` for logs, `unix` on a unix socket. */
export function peerText(c: ClientInfo): string {
  return c.transport === 'unix' ? 'unix' : `${c.address}:${c.port}`;
}

/** The client as log fields: its address, the listener, TLS, and the load balancer it came through. */
export function clientFields(c: ClientInfo): { ip: string; port: number; listener: string; tls: string | undefined; sni: string | undefined; via: string | undefined } {
  return { ip: c.address, port: c.port, listener: c.listener, tls: c.tls?.version, sni: c.tls?.sni, via: c.proxiedBy };
}
