import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { encodeProxyV2, MAX_PROXY_HEADER, parseProxyHeader, type ProxyHeaderParse } from '../src/net/proxy-protocol.js';

// The PROXY header parser (src/net/proxy-protocol.ts) on what HAProxy's spec allows, and on
// hostile bytes: it never throws, never takes a byte past the header, and says the same
// whatever chunks the bytes arrive in.

// A fixed seed by default; MAILSPLICE_PROPERTY_RUNS=N runs N cases per property with a fresh
// seed (fast-check prints it when a case fails, to replay with { seed }).
const RUNS = Number(process.env.MAILSPLICE_PROPERTY_RUNS) || 0;
const params = (numRuns: number): fc.Parameters<unknown> => (RUNS > 0 ? { numRuns: RUNS } : { seed: 42, numRuns });

const SIG = Buffer.from('0d0a0d0a000d0a515549540a', 'hex');
const ascii = (s: string) => Buffer.from(s, 'latin1');

/** A v2 header from its parts, TLVs and all, with a length field that may lie. */
function v2(opts: { vc?: number; fam?: number; addr?: Buffer; tlvs?: Buffer; length?: number }): Buffer {
  const body = Buffer.concat([opts.addr ?? Buffer.alloc(0), opts.tlvs ?? Buffer.alloc(0)]);
  const head = Buffer.alloc(16);
  SIG.copy(head);
  head[12] = opts.vc ?? 0x21;
  head[13] = opts.fam ?? 0x11;
  head.writeUInt16BE(opts.length ?? body.length, 14);
  return Buffer.concat([head, body]);
}

function tlv(type: number, value: Buffer): Buffer {
  const t = Buffer.alloc(3);
  t[0] = type;
  t.writeUInt16BE(value.length, 1);
  return Buffer.concat([t, value]);
}

const inet = (src: number[], dst: number[], sport: number, dport: number) => {
  const b = Buffer.alloc(12);
  Buffer.from(src).copy(b, 0);
  Buffer.from(dst).copy(b, 4);
  b.writeUInt16BE(sport, 8);
  b.writeUInt16BE(dport, 10);
  return b;
};

describe('PROXY v1', () => {
  it('TCP4 and TCP6: the client and where it connected', () => {
    expect(parseProxyHeader(ascii('PROXY TCP4 192.0.2.7 198.51.100.1 51000 143\r\nA1 CAPABILITY\r\n'))).toEqual({
      kind: 'header',
      version: 1,
      length: 45,
      command: 'proxy',
      source: { address: '192.0.2.7', port: 51000 },
      destination: { address: '198.51.100.1', port: 143 },
    });
    const v6 = parseProxyHeader(ascii('PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::1 1 65535\r\n'));
    expect(v6).toMatchObject({ kind: 'header', source: { address: '2001:db8::7', port: 1 }, destination: { address: '::1', port: 65535 } });
  });

  it('UNKNOWN: the connection stands for itself, whatever follows on the line', () => {
    expect(parseProxyHeader(ascii('PROXY UNKNOWN\r\n'))).toEqual({ kind: 'header', version: 1, length: 15, command: 'local' });
    expect(parseProxyHeader(ascii('PROXY UNKNOWN ffff::1 ::1 1 2\r\n'))).toMatchObject({ kind: 'header', command: 'local' });
  });

  it('refuses what the spec does not allow', () => {
    for (const bad of [
      'PROXY TCP4 192.0.2.7 198.51.100.1 51000 143\n', // LF alone
      'PROXY TCP4 192.0.2.7 198.51.100.1 51000 143 \r\n', // a sixth space
      'PROXY TCP4  192.0.2.7 198.51.100.1 51000 143\r\n',
      'PROXY TCP4 192.0.2.7 198.51.100.1 51000 65536\r\n',
      'PROXY TCP4 192.0.2.7 198.51.100.1 051000 143\r\n',
      'PROXY TCP4 ::1 198.51.100.1 51000 143\r\n', // family mismatch
      'PROXY TCP6 192.0.2.7 ::1 1 2\r\n',
      'PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n',
      'PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n',
      'proxy TCP4 192.0.2.7 198.51.100.1 1 2\r\n',
      'PROXY TCP4 192.0.2.7 198.51.100.1 1 2\x00\r\n',
      `PROXY UNKNOWN ${'x'.repeat(92)}\r\n`, // 108 bytes
      'A001 LOGIN alice secret\r\n',
      'GET / HTTP/1.0\r\n',
    ]) {
      expect(parseProxyHeader(ascii(bad)).kind, bad).toBe('invalid');
    }
    expect(parseProxyHeader(ascii(`PROXY UNKNOWN ${'x'.repeat(91)}\r\n`)).kind).toBe('header'); // exactly 107
  });

  it('a header without its end is refused once it is too long to be one', () => {
    expect(parseProxyHeader(ascii(`PROXY UNKNOWN ${'x'.repeat(80)}`)).kind).toBe('incomplete');
    expect(parseProxyHeader(ascii(`PROXY UNKNOWN ${'x'.repeat(92)}`)).kind).toBe('invalid');
  });
});

describe('PROXY v2', () => {
  it('PROXY over IPv4 and IPv6, TLVs skipped', () => {
    const tlvs = Buffer.concat([tlv(0x05, Buffer.from('unique-id-123')), tlv(0x04, Buffer.alloc(0)), tlv(0x20, Buffer.alloc(200, 7))]);
    const h = v2({ addr: inet([192, 0, 2, 7], [198, 51, 100, 1], 51000, 993), tlvs });
    expect(parseProxyHeader(Buffer.concat([h, ascii('\x16\x03\x01')]))).toEqual({
      kind: 'header',
      version: 2,
      length: h.length,
      command: 'proxy',
      source: { address: '192.0.2.7', port: 51000 },
      destination: { address: '198.51.100.1', port: 993 },
    });
    const six = Buffer.alloc(36);
    Buffer.from('20010db8000000000000000000000007', 'hex').copy(six, 0);
    Buffer.from('00000000000000000000ffff7f000001', 'hex').copy(six, 16);
    six.writeUInt16BE(40000, 32);
    six.writeUInt16BE(143, 34);
    expect(parseProxyHeader(v2({ fam: 0x21, addr: six }))).toMatchObject({ source: { address: '2001:db8::7', port: 40000 }, destination: { address: '::ffff:127.0.0.1', port: 143 } });
  });

  it('LOCAL, UNSPEC and UNIX: the connection stands for itself', () => {
    expect(parseProxyHeader(v2({ vc: 0x20, fam: 0x00 }))).toEqual({ kind: 'header', version: 2, length: 16, command: 'local' });
    // LOCAL with addresses (HAProxy's health checks may send them): still ignored.
    expect(parseProxyHeader(v2({ vc: 0x20, addr: inet([10, 0, 0, 1], [10, 0, 0, 2], 1, 2) }))).toMatchObject({ command: 'local', length: 28 });
    expect(parseProxyHeader(v2({ fam: 0x00 }))).toMatchObject({ command: 'local' });
    expect(parseProxyHeader(v2({ fam: 0x31, addr: Buffer.alloc(216, 0x41) }))).toMatchObject({ kind: 'header', command: 'local', length: 232 });
  });

  it('refuses a wrong version or command, unknown families, datagrams, short bodies, broken TLVs and oversized headers', () => {
    const a = inet([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
    for (const [what, bad] of [
      ['version 1', v2({ vc: 0x11, addr: a })],
      ['command 2', v2({ vc: 0x22, addr: a })],
      ['family 4', v2({ fam: 0x41, addr: a })],
      ['UDP', v2({ fam: 0x12, addr: a })],
      ['short INET', v2({ addr: Buffer.alloc(11) })],
      ['short INET6', v2({ fam: 0x21, addr: Buffer.alloc(35) })],
      ['truncated TLV head', v2({ addr: a, tlvs: Buffer.from([0x05, 0x00]) })],
      ['TLV past the end', v2({ addr: a, tlvs: Buffer.from([0x05, 0x00, 0x09, 0x41]) })],
      ['oversized', v2({ addr: a, length: MAX_PROXY_HEADER })],
    ] as const) {
      expect(parseProxyHeader(bad).kind, what).toBe('invalid');
    }
    // Oversized is known from the fixed part alone: nothing more is waited for.
    expect(parseProxyHeader(v2({ length: 65535 })).kind).toBe('invalid');
    // A wrong version is known from byte 13.
    expect(parseProxyHeader(Buffer.concat([SIG, Buffer.from([0x31])])).kind).toBe('invalid');
  });

  it('encodeProxyV2 writes what the parser reads (IPv4, mapped IPv4, IPv6) and LOCAL without addresses', () => {
    const cases = [
      [{ address: '192.0.2.7', port: 1 }, { address: '127.0.0.1', port: 143 }, '192.0.2.7', '127.0.0.1'],
      [{ address: '::ffff:192.0.2.7', port: 1 }, { address: '127.0.0.1', port: 143 }, '192.0.2.7', '127.0.0.1'],
      [{ address: '2001:db8::7', port: 65535 }, { address: '::1', port: 110 }, '2001:db8::7', '::1'],
      [{ address: '1::', port: 2 }, { address: '::ffff:1.2.3.4', port: 3 }, '1::', '::ffff:1.2.3.4'],
    ] as const;
    for (const [src, dst, s, d] of cases) {
      expect(parseProxyHeader(encodeProxyV2(src, dst))).toMatchObject({ kind: 'header', command: 'proxy', source: { address: s, port: src.port }, destination: { address: d, port: dst.port } });
    }
    expect(parseProxyHeader(encodeProxyV2({ address: 'unix', port: 0 }, { address: '127.0.0.1', port: 24 }))).toEqual({ kind: 'header', version: 2, length: 16, command: 'local' });
    expect(parseProxyHeader(encodeProxyV2({ address: '192.0.2.7', port: 1 }, { address: '::1', port: 24 }))).toMatchObject({ source: { address: '::ffff:192.0.2.7' }, destination: { address: '::1' } });
  });
});

// ---- properties --------------------------------------------------------------------------

const ipv4 = fc.tuple(fc.nat(255), fc.nat(255), fc.nat(255), fc.nat(255)).map((p) => p.join('.'));
const ipv6 = fc.ipV6();
const port = fc.nat(65535);
const tlvArb = fc.tuple(fc.nat(255), fc.uint8Array({ maxLength: 40 })).map(([t, v]) => tlv(t, Buffer.from(v)));

/** Valid headers of every kind the spec has. */
const validHeader: fc.Arbitrary<Buffer> = fc.oneof(
  fc.tuple(ipv4, ipv4, port, port).map(([s, d, sp, dp]) => ascii(`PROXY TCP4 ${s} ${d} ${sp} ${dp}\r\n`)),
  fc.tuple(ipv6, ipv6, port, port).map(([s, d, sp, dp]) => ascii(`PROXY TCP6 ${s} ${d} ${sp} ${dp}\r\n`)),
  fc.string({ unit: fc.constantFrom(...'abc 0123:.'.split('')), maxLength: 80 }).map((rest) => ascii(`PROXY UNKNOWN${rest ? ` ${rest}` : ''}\r\n`)),
  fc.tuple(fc.boolean(), fc.constantFrom(0x00, 0x11, 0x21, 0x31), fc.uint8Array({ minLength: 216, maxLength: 216 }), fc.array(tlvArb, { maxLength: 5 })).map(([local, fam, addrBytes, tlvs]) =>
    v2({ vc: local ? 0x20 : 0x21, fam, addr: Buffer.from(addrBytes).subarray(0, [0, 12, 36, 216][fam >> 4]), tlvs: Buffer.concat(tlvs) }),
  ),
);

/** A valid header with some bytes changed, cut short, or lengthened: near misses. */
const mangled: fc.Arbitrary<Buffer> = fc
  .tuple(validHeader, fc.array(fc.tuple(fc.nat(), fc.nat(255)), { maxLength: 4 }), fc.nat(), fc.boolean())
  .map(([h, flips, cut, doCut]) => {
    const b = Buffer.from(h);
    for (const [at, v] of flips) b[at % b.length] = v;
    return doCut ? b.subarray(0, cut % (b.length + 1)) : b;
  });

const anyBytes = fc.oneof(fc.uint8Array({ maxLength: 300 }).map((u) => Buffer.from(u)), mangled, fc.constant(Buffer.concat([SIG, Buffer.from([0x21, 0x11, 0xff, 0xff])])));

/** The result as the pipeline acts on it. */
function outcome(p: ProxyHeaderParse): unknown {
  return p.kind === 'invalid' ? 'invalid' : p;
}

describe('properties', () => {
  it('never throws, and a header never claims more bytes than it was given', () => {
    fc.assert(
      fc.property(anyBytes, (b) => {
        const p = parseProxyHeader(b);
        if (p.kind === 'header') expect(p.length).toBeLessThanOrEqual(b.length);
        if (p.kind === 'header') expect(p.length).toBeLessThanOrEqual(MAX_PROXY_HEADER);
      }),
      params(2000),
    );
  });

  it('every split of the bytes gives the same result: each prefix is incomplete or the final answer', () => {
    fc.assert(
      fc.property(anyBytes, fc.array(fc.nat(), { maxLength: 6 }), (b, cuts) => {
        const whole = outcome(parseProxyHeader(b));
        // The pipeline parses what it has after each chunk; the first answer is the one acted on.
        const points = [...new Set(cuts.map((c) => c % (b.length + 1)))].sort((x, y) => x - y);
        for (const at of [...points, b.length]) {
          const p = parseProxyHeader(b.subarray(0, at));
          if (p.kind === 'incomplete') continue;
          expect(outcome(p)).toEqual(whole);
          return;
        }
        expect(whole).toEqual({ kind: 'incomplete' });
      }),
      params(2000),
    );
  });

  it('never reads past the header: what follows it changes nothing', () => {
    fc.assert(
      fc.property(validHeader, fc.uint8Array({ maxLength: 200 }), (h, after) => {
        const alone = parseProxyHeader(h);
        expect(alone.kind).toBe('header');
        expect(parseProxyHeader(Buffer.concat([h, after]))).toEqual(alone);
        if (alone.kind === 'header') expect(alone.length).toBe(h.length);
      }),
      params(1000),
    );
  });

  it('v2 out and in agree on every IPv4 and IPv6 endpoint pair', () => {
    fc.assert(
      fc.property(fc.oneof(fc.tuple(ipv4, ipv4), fc.tuple(ipv6, ipv6)), port, port, ([s, d], sp, dp) => {
        const p = parseProxyHeader(encodeProxyV2({ address: s, port: sp }, { address: d, port: dp }));
        const v1 = parseProxyHeader(ascii(`PROXY TCP${s.includes(':') ? 6 : 4} ${s} ${d} ${sp} ${dp}\r\n`));
        expect(p).toMatchObject({ kind: 'header', command: 'proxy', source: { port: sp }, destination: { port: dp } });
        // The same client, whichever version carried it.
        if (p.kind === 'header' && v1.kind === 'header') {
          expect(p.source).toEqual(v1.source);
          expect(p.destination).toEqual(v1.destination);
        }
      }),
      params(1000),
    );
  });
});
