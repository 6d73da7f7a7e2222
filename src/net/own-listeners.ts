import { networkInterfaces } from 'node:os';
import type { Socket } from 'node:net';

// A slot record that points back at this proxy (its own address, or 0.0.0.0, which
// connects to the local host) would make every login open a connection to itself, which
// logs in and opens another, until a connection limit stops the chain. Every backend
// connection is checked, once connected, against the sockets this process listens on.

const WILDCARD = new Set(['0.0.0.0', '::', '']);

function plain(address: string): string {
  return address.replace(/^::ffff:(?=\d+\.)/i, '');
}

function isLoopback(address: string): boolean {
  return address.startsWith('127.') || address === '::1';
}

/** The addresses and ports this process listens on (IMAP, POP3 and LMTP listeners). */
export class OwnListeners {
  /** port -> addresses bound on it */
  private readonly byPort = new Map<number, string[]>();

  add(address: string, port: number): void {
    const list = this.byPort.get(port) ?? [];
    list.push(plain(address));
    this.byPort.set(port, list);
  }

  /** Whether a connected socket reaches one of our own listeners. One Map lookup unless the port is ours. */
  reaches(sock: Socket): boolean {
    const port = sock.remotePort;
    const bound = port === undefined ? undefined : this.byPort.get(port);
    if (!bound || sock.remoteAddress === undefined) return false;
    const remote = plain(sock.remoteAddress);
    for (const a of bound) {
      if (a === remote) return true;
      if (WILDCARD.has(a) && isLocal(remote)) return true;
    }
    return false;
  }
}

/** An address of this host: loopback, or one of its interfaces' (read only when a port matched). */
function isLocal(address: string): boolean {
  if (isLoopback(address) || WILDCARD.has(address)) return true;
  for (const list of Object.values(networkInterfaces())) {
    for (const i of list ?? []) if (plain(i.address) === address) return true;
  }
  return false;
}
