// The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), as a load
// balancer puts it in front of a client's bytes to say whose connection this is. A pure
// parser over the bytes received so far: it says "need more", "not a valid header", or "a
// header of n bytes", and never looks past the header's own end, so what follows is the
// protocol's (or TLS's) and goes back to the socket untouched.

import { isIPv4, isIPv6, SocketAddress } from 'node:net';

/**
 * The largest header accepted, in bytes. A v1 header is at most 107 by definition; a v2
 * header may announce up to 65,551, but what load balancers send (addresses, a few TLVs:
 * SSL facts, a unique id, a cloud endpoint id) is a few hundred. Anything longer is refused
 * before it is read, so a stranger cannot make us buffer 64 KiB per connection.
 */
export const MAX_PROXY_HEADER = 4096;

const V1_MAX = 107;
const V1_PREFIX = Buffer.from('PROXY ', 'latin1');
const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
const V2_FIXED = 16;

export interface Endpoint {
  address: string;
  port: number;
}

export type ProxyHeaderParse =
  /** Every byte so far fits a header that is not complete yet. */
  | { kind: 'incomplete' }
  /** Not a header, a broken one, or one too long: the connection is refused. */
  | { kind: 'invalid'; reason: string }
  | ProxyHeader;

export interface ProxyHeader {
  kind: 'header';
  version: 1 | 2;
  /** Bytes the header takes; the rest of the buffer is the client's. */
  length: number;
  /**
   * `proxy`: source and destination are the client's. `local`: the balancer's own
   * connection (a health check; v2 LOCAL, v1 UNKNOWN, or an address family without IP
   * addresses): the connection's own endpoints stand.
   */
  command: 'proxy' | 'local';
  source?: Endpoint;
  destination?: Endpoint;
}

const need = { kind: 'incomplete' } as const;
const invalid = (reason: string): ProxyHeaderParse => ({ kind: 'invalid', reason });

/** Parses the header at the start of `buf` (everything received so far). Never throws. */
export function parseProxyHeader(buf: Uint8Array, max = MAX_PROXY_HEADER): ProxyHeaderParse {
  if (buf.length === 0) return need;
  if (buf[0] === V1_PREFIX[0]) return parseV1(buf);
  if (buf[0] === V2_SIGNATURE[0]) return parseV2(buf, max);
  return invalid('no PROXY header');
}

function startsLike(buf: Uint8Array, prefix: Uint8Array): boolean {
  const n = Math.min(buf.length, prefix.length);
  for (let i = 0; i < n; i++) if (buf[i] !== prefix[i]) return false;
  return true;
}

function parseV1(buf: Uint8Array): ProxyHeaderParse {
  if (!startsLike(buf, V1_PREFIX)) return invalid('no PROXY header');
  // CR LF must end by byte 107: the CR is at index 105 at the latest.
  const lastCr = V1_MAX - 2;
  const limit = Math.min(buf.length, lastCr + 1);
  let cr = -1;
  for (let i = V1_PREFIX.length; i < limit; i++) {
    const c = buf[i]!;
    if (c === 0x0d) {
      cr = i;
      break;
    }
    // Printable US-ASCII only (and the single spaces between fields).
    if (c < 0x20 || c > 0x7e) return invalid('v1 header: a byte that is not printable');
  }
  if (cr < 0) return buf.length > lastCr ? invalid(`v1 header longer than ${V1_MAX} bytes`) : need;
  if (cr + 1 >= buf.length) return need;
  if (buf[cr + 1] !== 0x0a) return invalid('v1 header: CR not followed by LF');
  const length = cr + 2;
  const line = Buffer.from(buf.buffer, buf.byteOffset, cr).toString('latin1');
  const fields = line.split(' ');
  const proto = fields[1];
  if (proto === 'UNKNOWN') return { kind: 'header', version: 1, length, command: 'local' };
  if (proto !== 'TCP4' && proto !== 'TCP6') return invalid(`v1 header: unknown protocol ${printable(proto ?? '')}`);
  if (fields.length !== 6) return invalid('v1 header: expected 6 fields');
  const [, , src, dst, sport, dport] = fields as [string, string, string, string, string, string];
  const family = proto === 'TCP4' ? 'ipv4' : 'ipv6';
  const source = v1Address(src, family);
  const destination = v1Address(dst, family);
  const sourcePort = v1Port(sport);
  const destinationPort = v1Port(dport);
  if (source === undefined || destination === undefined) return invalid(`v1 header: not ${proto} addresses`);
  if (sourcePort === undefined || destinationPort === undefined) return invalid('v1 header: bad port');
  return { kind: 'header', version: 1, length, command: 'proxy', source: { address: source, port: sourcePort }, destination: { address: destination, port: destinationPort } };
}

function v1Address(text: string, family: 'ipv4' | 'ipv6'): string | undefined {
  if (family === 'ipv4') return isIPv4(text) ? text : undefined;
  // No zone ids (fe80::1%eth0): they mean nothing on the balancer's far side.
  if (!isIPv6(text) || text.includes('%')) return undefined;
  return normalIPv6(text);
}

function v1Port(text: string): number | undefined {
  if (!/^(0|[1-9][0-9]{0,4})$/.test(text)) return undefined;
  const n = Number(text);
  return n <= 65535 ? n : undefined;
}

function parseV2(buf: Uint8Array, max: number): ProxyHeaderParse {
  if (!startsLike(buf, V2_SIGNATURE)) return invalid('no PROXY header');
  if (buf.length < V2_FIXED) {
    // Say no as soon as the version/command byte is wrong, not only at byte 16.
    if (buf.length > 12 && !validVersionCommand(buf[12]!)) return invalid('v2 header: not version 2, or an unknown command');
    return need;
  }
  const vc = buf[12]!;
  if (!validVersionCommand(vc)) return invalid('v2 header: not version 2, or an unknown command');
  const command = (vc & 0x0f) === 0 ? 'local' : 'proxy';
  const famByte = buf[13]!;
  const family = famByte >> 4;
  const transport = famByte & 0x0f;
  const bodyLength = (buf[14]! << 8) | buf[15]!;
  const length = V2_FIXED + bodyLength;
  if (length > max) return invalid(`v2 header of ${length} bytes, more than ${max}`);
  if (family > 3 || transport > 2) return invalid('v2 header: unknown address family or transport');
  const addressBytes = [0, 12, 36, 216][family]!;
  if (bodyLength < addressBytes) return invalid('v2 header: shorter than its addresses');
  if (buf.length < length) return need;
  const tlvError = checkTlvs(buf, V2_FIXED + addressBytes, length);
  if (tlvError) return invalid(tlvError);
  // LOCAL: the balancer speaking for itself (health checks); its addresses are ignored.
  // UNSPEC and UNIX carry no IP address to stand for the client's.
  if (command === 'local' || family === 0 || family === 3) return { kind: 'header', version: 2, length, command: 'local' };
  // A datagram address on a stream connection is nonsense.
  if (transport !== 1) return invalid('v2 header: not a stream (TCP) connection');
  const b = V2_FIXED;
  if (family === 1) {
    return {
      kind: 'header',
      version: 2,
      length,
      command,
      source: { address: ipv4At(buf, b), port: u16(buf, b + 8) },
      destination: { address: ipv4At(buf, b + 4), port: u16(buf, b + 10) },
    };
  }
  return {
    kind: 'header',
    version: 2,
    length,
    command,
    source: { address: ipv6At(buf, b), port: u16(buf, b + 32) },
    destination: { address: ipv6At(buf, b + 16), port: u16(buf, b + 34) },
  };
}

function validVersionCommand(vc: number): boolean {
  return vc >> 4 === 2 && (vc & 0x0f) <= 1;
}

/** The TLVs after the addresses must tile the rest of the header exactly; their contents are skipped. */
function checkTlvs(buf: Uint8Array, from: number, end: number): string | undefined {
  let at = from;
  while (at < end) {
    if (end - at < 3) return 'v2 header: a truncated TLV';
    const len = u16(buf, at + 1);
    at += 3 + len;
  }
  return at === end ? undefined : 'v2 header: a TLV runs past the header';
}

function u16(buf: Uint8Array, at: number): number {
  return (buf[at]! << 8) | buf[at + 1]!;
}

function ipv4At(buf: Uint8Array, at: number): string {
  return `${buf[at]}.${buf[at + 1]}.${buf[at + 2]}.${buf[at + 3]}`;
}

function ipv6At(buf: Uint8Array, at: number): string {
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(u16(buf, at + i).toString(16));
  return normalIPv6(groups.join(':'));
}

/** IPv6 as Node writes a peer's address (inet_ntop): lower case, `::` for the longest zero run, `::ffff:a.b.c.d`. */
function normalIPv6(text: string): string {
  return new SocketAddress({ address: text, family: 'ipv6' }).address;
}

function printable(s: string): string {
  return s.replace(/[^\x20-\x7e]/g, '?').slice(0, 20);
}

/**
 * A v2 PROXY header (command PROXY, TCP over IPv4 or IPv6) for a backend that takes one
 * (Dovecot's `haproxy = yes` listeners), saying who the client is and where it connected.
 * An IPv4 client on an IPv6 socket (`::ffff:a.b.c.d`) goes as IPv4 when the other end is
 * IPv4 too. A client without an IP address (a unix socket) is sent as LOCAL: no address.
 */
export function encodeProxyV2(source: Endpoint | undefined, destination: Endpoint | undefined): Buffer {
  let src = source && ipBytes(source.address);
  let dst = destination && ipBytes(destination.address);
  // One family for both: IPv4 goes as ::ffff:a.b.c.d beside an IPv6 address.
  if (src && dst && src.length !== dst.length) [src, dst] = [asIPv6(src), asIPv6(dst)];
  if (!src || !dst) {
    const out = Buffer.alloc(V2_FIXED);
    V2_SIGNATURE.copy(out);
    out[12] = 0x20; // version 2, LOCAL
    return out;
  }
  const v6 = src.length === 16;
  const body = v6 ? 36 : 12;
  const out = Buffer.alloc(V2_FIXED + body);
  V2_SIGNATURE.copy(out);
  out[12] = 0x21; // version 2, PROXY
  out[13] = v6 ? 0x21 : 0x11; // INET6 or INET, STREAM
  out.writeUInt16BE(body, 14);
  src.copy(out, V2_FIXED);
  dst.copy(out, V2_FIXED + src.length);
  out.writeUInt16BE(source!.port, V2_FIXED + 2 * src.length);
  out.writeUInt16BE(destination!.port, V2_FIXED + 2 * src.length + 2);
  return out;
}

function asIPv6(b: Buffer): Buffer {
  if (b.length === 16) return b;
  const out = Buffer.alloc(16);
  out[10] = 0xff;
  out[11] = 0xff;
  b.copy(out, 12);
  return out;
}

/** 4 bytes for IPv4 (also written `::ffff:a.b.c.d`), 16 for IPv6, undefined for anything else. */
function ipBytes(address: string): Buffer | undefined {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  const v4 = mapped ? mapped[1]! : address;
  if (isIPv4(v4)) return Buffer.from(v4.split('.').map(Number));
  if (!isIPv6(address) || address.includes('%')) return undefined;
  const full = expandIPv6(address);
  return full;
}

/** 16 bytes of a textual IPv6 address (already checked by isIPv6, no zone). */
function expandIPv6(text: string): Buffer {
  let head = text;
  let tailV4: number[] = [];
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4) {
    tailV4 = v4[1]!.split('.').map(Number);
    head = text.slice(0, -v4[1]!.length) + '0:0';
  }
  const [left, right] = head.includes('::') ? head.split('::') as [string, string] : [head, undefined];
  const groups = (s: string | undefined) => (s ? s.split(':').filter((g) => g !== '').map((g) => parseInt(g, 16)) : []);
  const l = groups(left);
  const r = right === undefined ? [] : groups(right);
  const all = right === undefined ? l : [...l, ...new Array<number>(8 - l.length - r.length).fill(0), ...r];
  const out = Buffer.alloc(16);
  all.forEach((g, i) => out.writeUInt16BE(g, i * 2));
  if (v4) Buffer.from(tailV4).copy(out, 12);
  return out;
}
