import { PassThrough } from 'node:stream';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { parseSlot, staleReason, type Route } from '../src/lookup/model.js';
import { LineReader } from '../src/net/lines.js';
import { sieveStatus } from '../src/sieve/backend.js';
import { quoted, readSieveCommand, sieveString, type SieveRead } from '../src/sieve/syntax.js';

// The ManageSieve command reader (RFC 5804 strings: quoted and literals) against hostile
// input, without sockets; and the model's optional sieve port. The wire against real
// managesieved/timsieved is test/sieve.test.ts.

const runs = Number(process.env.MAILSPLICE_PROPERTY_RUNS ?? 0) || 300;
const params = (n = runs) => ({ seed: 42, numRuns: process.env.MAILSPLICE_PROPERTY_RUNS ? runs : n });

/** Reads one command from `input` fed in chunks of `chunk` bytes. */
async function read(input: Buffer | string, literalSize = 100, chunk = 1 << 20): Promise<SieveRead | 'error'> {
  const stream = new PassThrough();
  const reader = new LineReader(stream, 256);
  const data = Buffer.from(input);
  for (let i = 0; i < data.length; i += chunk) stream.write(data.subarray(i, i + chunk));
  stream.end();
  try {
    return await readSieveCommand(reader, literalSize);
  } catch {
    return 'error';
  }
}

const strings = (r: SieveRead | 'error') => (r !== 'error' && r.kind === 'command' ? r.tokens.map((t) => (t.kind === 'atom' ? `atom:${t.text}` : t.value.toString('latin1'))) : r);

describe('ManageSieve command reader', () => {
  it('reads atoms, quoted strings with escapes, and literals {n+} and {n}', async () => {
    expect(strings(await read('AUTHENTICATE "PLAIN" "AGFsaWNlAHB3"\r\n'))).toEqual(['atom:AUTHENTICATE', 'PLAIN', 'AGFsaWNlAHB3']);
    expect(strings(await read('NOOP "a\\"b\\\\c"\r\n'))).toEqual(['atom:NOOP', 'a"b\\c']);
    expect(strings(await read('PUTSCRIPT "x" {5+}\r\nab\r\nc\r\n'))).toEqual(['atom:PUTSCRIPT', 'x', 'ab\r\nc']);
    expect(strings(await read('AUTHENTICATE "PLAIN" {4}\r\nAAAA\r\n'))).toEqual(['atom:AUTHENTICATE', 'PLAIN', 'AAAA']);
  });

  it.each([
    ['an unterminated quoted string', 'NOOP "abc\r\n'],
    ['a bad escape', 'NOOP "a\\nb"\r\n'],
    ['a literal not at the end', 'NOOP {3+} x\r\n'],
    ['junk after a string', 'NOOP "a"b\r\n'],
    ['a command name that is no atom', '123 "x"\r\n'],
    ['too many arguments', `NOOP ${'"a" '.repeat(9)}\r\n`],
  ])('refuses %s as a bad command (NO, the connection goes on)', async (_w, input) => {
    expect(await read(input)).toMatchObject({ kind: 'bad' });
  });

  it('refuses a literal over the limit before reading it (BYE)', async () => {
    expect(await read('AUTHENTICATE "PLAIN" {101+}\r\n')).toEqual({ kind: 'fatal', why: 'Literal too large' });
    expect(await read('AUTHENTICATE "PLAIN" {99999999999+}\r\n')).toMatchObject({ kind: 'bad' }); // more than 10 digits: no literal at all
  });

  it('reads the same command whatever the chunking', async () => {
    const input = 'PUTSCRIPT "name" {12+}\r\nif true {}\r\n\r\n';
    const whole = strings(await read(input));
    await fc.assert(fc.asyncProperty(fc.integer({ min: 1, max: input.length }), async (n) => {
      expect(strings(await read(input, 100, n))).toEqual(whole);
    }), params(50));
  });

  it('never throws past the reader and never returns a literal over the limit, on any input', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 300 }), async (bytes): Promise<void> => {
        const r = await read(Buffer.concat([Buffer.from(bytes), Buffer.from('\r\n')]), 16);
        if (r !== 'error' && r.kind === 'command') for (const t of r.tokens) if (t.kind === 'string') expect(t.value.length).toBeLessThanOrEqual(256 + 16);
      }),
      params(),
    );
  });

  it('quotes what can be quoted, else writes a literal', () => {
    expect(quoted('a"b\\')).toBe('"a\\"b\\\\"');
    expect(quoted('a\r\nb')).toBeUndefined();
    expect(sieveString('a\r\nb')).toBe('{4}\r\na\r\nb');
    expect(sieveStatus('OK (SASL "x") "Logged in"')).toBe('OK');
    expect(sieveStatus('NO (TRYLATER) "x"')).toBe('NO');
    expect(sieveStatus('"SASL" "PLAIN"')).toBeUndefined();
    expect(sieveStatus('OKAY')).toBeUndefined();
  });
});

describe('the optional sieve port of a slot', () => {
  it('is read like the other ports, and absent is allowed', () => {
    expect(parseSlot({ host: '10.0.0.1', imap: '143', sieve: '4190' }, 's1')?.ports).toEqual({ imap: 143, sieve: 4190 });
    expect(parseSlot({ host: '10.0.0.1', imap: '143' }, 's1')?.ports).toEqual({ imap: 143 });
    expect(() => parseSlot({ host: '10.0.0.1', sieve: '0x10' }, 's1')).toThrow(/sieve/);
  });

  it('a slot that loses its sieve port (or changes it) ends sieve sessions only', () => {
    const route: Route = { login: 'a@b', backendLogin: 'a@b', store: 'st', slot: 's1', host: '10.0.0.1', ports: { imap: 143, sieve: 4190 } };
    const without = { host: '10.0.0.1', ports: { imap: 143 }, status: 'up' as const };
    expect(staleReason('slot', without, route, 'sieve')).toBe('server address changed');
    expect(staleReason('slot', without, route, 'imap')).toBeUndefined();
    expect(staleReason('slot', { ...without, ports: { imap: 143, sieve: 2000 } }, route, 'sieve')).toBe('server address changed');
  });
});
