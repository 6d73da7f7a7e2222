import { EventEmitter } from 'node:events';
import type { Duplex } from 'node:stream';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { canonicalRecipient, parsePathArgument, splitDetail, withDetail } from '../src/lmtp/address.js';
import { MAX_LITERALS, readImapCommand, type CommandRead } from '../src/imap/imap-command.js';
import { astring, encodeAstring, ImapSyntaxError, literalAtEnd, replyTag, tokenize, validTag } from '../src/imap/imap-syntax.js';
import { ConnectionClosed, LineReader, LineTooLong } from '../src/net/lines.js';
import { parsePop3Command } from '../src/pop3/pop3.js';
import { decodePlain } from '../src/auth/sasl.js';

// Property tests of every parser that sees input before login (issue 14): random and
// malformed input, byte streams cut into random chunks. No exception escapes other than the
// parser's own, and input far over a limit is refused without being buffered.
// A fixed seed by default; MAILSPLICE_PROPERTY_RUNS=N runs N cases per property with a fresh
// seed (fast-check prints it when a case fails, to replay with { seed }).

const RUNS = Number(process.env.MAILSPLICE_PROPERTY_RUNS) || 0;
const params = (numRuns: number): fc.Parameters<unknown> => (RUNS > 0 ? { numRuns: RUNS } : { seed: 42, numRuns });

/** Stands in for a socket (pure logic): emits 'data' only while not paused, as a socket does. */
class FakeSocket extends EventEmitter {
  paused = false;
  private wake: (() => void) | undefined;
  pause(): this {
    this.paused = true;
    return this;
  }
  resume(): this {
    this.paused = false;
    this.wake?.();
    return this;
  }
  /** Resolves at the next resume() (or at once when not paused). */
  resumed(): Promise<void> {
    return this.paused ? new Promise((r) => (this.wake = r)) : Promise.resolve();
  }
  asDuplex(): Duplex {
    return this as unknown as Duplex;
  }
}

/** Cuts `data` at the given points (fractions of its length), giving at least one chunk. */
function chunked(data: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => Math.floor(c * data.length)))].filter((p) => p > 0 && p < data.length).sort((a, b) => a - b);
  const out: Buffer[] = [];
  let at = 0;
  for (const p of points) {
    out.push(data.subarray(at, p));
    at = p;
  }
  out.push(data.subarray(at));
  return out;
}

const cutsArb = fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 12 });

/**
 * Feeds chunks while the reader wants them (waits while it paused the socket), then ends the
 * stream; stops early once `done` settles. Returns the most bytes the reader ever held
 * unconsumed, given `consumed()` (what the consumer took out so far).
 */
async function feed(sock: FakeSocket, chunks: Iterable<Buffer>, done: Promise<unknown>, consumed: () => number): Promise<number> {
  let finished = false;
  void done.then(
    () => (finished = true),
    () => (finished = true),
  );
  const stop = done.then(
    () => undefined,
    () => undefined,
  );
  let fed = 0;
  let held = 0;
  for (const c of chunks) {
    while (sock.paused && !finished) await Promise.race([sock.resumed(), stop]);
    if (finished) return held;
    sock.emit('data', c);
    fed += c.length;
    held = Math.max(held, fed - consumed());
    await new Promise((r) => setImmediate(r));
  }
  if (!finished) sock.emit('end');
  return held;
}

const latin1 = (b: Buffer): string => b.toString('latin1');
const PRINTABLE_REPLY = /^(?:[\x20-\x7e]*\r\n)+$/;

describe('LineReader', () => {
  it('frames any byte stream cut anywhere into the same lines (CRLF or LF)', async () => {
    const lineArb = fc.uint8Array({ maxLength: 80 }).map((a) => Buffer.from(a.filter((b) => b !== 10)));
    await fc.assert(
      fc.asyncProperty(fc.array(lineArb, { maxLength: 20 }), fc.array(fc.boolean(), { maxLength: 20 }), cutsArb, async (lines, crlf, cuts) => {
        const data = Buffer.concat(lines.flatMap((l, i) => [l, Buffer.from(crlf[i] ? '\r\n' : '\n')]));
        const sock = new FakeSocket();
        const reader = new LineReader(sock.asDuplex(), 100);
        const got: Buffer[] = [];
        let consumed = 0;
        const done = (async () => {
          for (;;) {
            const l = Buffer.from(await reader.line('latin1'), 'latin1');
            got.push(l);
            consumed += l.length + 1;
          }
        })();
        await feed(sock, chunked(data, cuts), done, () => consumed);
        await expect(done).rejects.toBeInstanceOf(ConnectionClosed);
        // A line's own trailing CR is part of the ending only when we wrote CRLF after it.
        const want = lines.map((l, i) => (crlf[i] ? l : l.length > 0 && l[l.length - 1] === 13 ? l.subarray(0, -1) : l));
        expect(got.map(latin1)).toEqual(want.map(latin1));
      }),
      params(300),
    );
  });

  it('refuses a line over the limit without buffering it, however it is cut', async () => {
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 4096 }), fc.integer({ min: 64 * 1024, max: 4 * 1024 * 1024 }), fc.integer({ min: 1, max: 64 * 1024 }), async (maxLine, total, chunk) => {
        const sock = new FakeSocket();
        const reader = new LineReader(sock.asDuplex(), maxLine);
        const pending = reader.line();
        const part = Buffer.alloc(chunk, 0x61);
        // Lazily: the whole input is never built, let alone fed (the reader stops it early).
        function* chunks(): Generator<Buffer> {
          for (let n = 0; n < total; n += chunk) yield part;
        }
        const held = await feed(sock, chunks(), pending, () => 0);
        await expect(pending).rejects.toBeInstanceOf(LineTooLong);
        // Refused as soon as more than maxLine bytes were there: at most one chunk beyond it.
        expect(held).toBeLessThanOrEqual(maxLine + chunk);
      }),
      params(100),
    );
  });

  it('holds input nobody asked for to about one line: the socket is paused', async () => {
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 1, max: 2048 }), fc.uint8Array({ minLength: 1, maxLength: 20_000 }), cutsArb, async (maxLine, bytes, cuts) => {
        const sock = new FakeSocket();
        const reader = new LineReader(sock.asDuplex(), maxLine);
        const data = Buffer.from(bytes);
        const chunks = chunked(data, cuts);
        // Nobody reads: the reader must pause the socket once it holds more than maxLine.
        let fed = 0;
        for (const c of chunks) {
          if (sock.paused) break;
          sock.emit('data', c);
          fed += c.length;
        }
        const biggest = Math.max(...chunks.map((c) => c.length));
        expect(fed).toBeLessThanOrEqual(maxLine + biggest);
        reader.detach();
      }),
      params(200),
    );
  });
});

describe('IMAP syntax', () => {
  const anyLine = fc.uint8Array({ maxLength: 200 }).map((a) => latin1(Buffer.from(a.filter((b) => b !== 10))));
  const imapish = fc
    .array(
      fc.oneof(
        fc.constantFrom('a1', '*', '+', 'LOGIN', 'ID', 'NIL', 'AUTHENTICATE', 'PLAIN', ' ', '(', ')', '"', '\\', '{', '}', '{5}', '{3+}', '{99999999999}', '\r', '\x00', '\x1b', '\xe4', ']'),
        fc.string({ maxLength: 8 }),
      ),
      { maxLength: 30 },
    )
    .map((parts) => parts.join(''));

  it('tokenize throws nothing but ImapSyntaxError, on any segments and literals', () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(anyLine, imapish), { minLength: 1, maxLength: 5 }), fc.array(fc.uint8Array({ maxLength: 20 }), { maxLength: 5 }), (segments, lits) => {
        try {
          const tokens = tokenize(segments, lits.map((l) => Buffer.from(l)));
          for (const t of tokens) if (t.kind === 'atom') expect(t.text).not.toMatch(/[\x00-\x1f\x7f "{\\()]/);
        } catch (e) {
          expect(e).toBeInstanceOf(ImapSyntaxError);
        }
      }),
      params(2000),
    );
  });

  it('literalAtEnd finds exactly a trailing {n} or {n+}', () => {
    fc.assert(
      fc.property(fc.oneof(anyLine, imapish), (line) => {
        const lit = literalAtEnd(line);
        if (!lit) return;
        expect(line.startsWith(lit.prefix)).toBe(true);
        const marker = /^\{(\d{1,10})(\+?)\}$/.exec(line.slice(lit.prefix.length));
        expect(Number(marker?.[1])).toBe(lit.size);
        expect(marker?.[2] === '+').toBe(lit.nonSync);
      }),
      params(2000),
    );
  });

  it('any bytes encoded for a backend (atom, quoted or literal) parse back to the same bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 300 }), fc.boolean(), (bytes, plus) => {
        const v = Buffer.from(bytes);
        const enc = encodeAstring(v, plus);
        const tokens = enc.literal ? tokenize(['a LOGIN ', ''], [enc.literal]) : tokenize([`a LOGIN ${enc.head}`], []);
        expect(astring(tokens[2])?.equals(v) ?? enc.head.toUpperCase() === 'NIL').toBe(true);
        expect(enc.head).toMatch(/^[\x20-\x7e]+$/);
      }),
      params(2000),
    );
  });

  it('a reply tag is the client tag only when valid, else *', () => {
    fc.assert(
      fc.property(fc.oneof(anyLine, imapish), (line) => {
        const tag = replyTag(line);
        if (tag !== '*') {
          expect(validTag(tag)).toBe(true);
          expect(tag).toMatch(/^[\x21-\x7e]+$/);
          expect(tag).not.toMatch(/[(){%*"\\+]/);
        }
      }),
      params(2000),
    );
  });
});

describe('IMAP command reading', () => {
  const LITERAL_SIZE = 64;
  const LINE = 256;
  const commandLine = fc.oneof(
    fc.constantFrom(
      'a1 NOOP',
      'a2 LOGIN alice "pass word"',
      'a3 LOGIN {5}',
      'a4 LOGIN {5+}',
      'a5 ID ("name" {3}',
      'a6 LOGIN {100}',
      'a7 LOGIN {100+}',
      'a8 AUTHENTICATE PLAIN AGFsaWNlAHB3',
      'x\r* OK [ALERT] pwned {99999}',
      '\x01 NOOP',
      'a9 "quoted',
      '* NOOP',
      '',
    ),
    fc.uint8Array({ maxLength: 300 }).map((a) => latin1(Buffer.from(a))),
  );

  it('never throws but the reader errors, never echoes an invalid tag, never reads a literal over the limit', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(commandLine, { maxLength: 12 }), cutsArb, async (lines, cuts) => {
        const data = Buffer.from(lines.map((l) => `${l}\r\n`).join(''), 'latin1');
        const sock = new FakeSocket();
        const reader = new LineReader(sock.asDuplex(), LINE);
        const writes: string[] = [];
        const reads: CommandRead[] = [];
        const done = (async () => {
          for (;;) {
            const r = await readImapCommand({ reader, write: (s) => writes.push(s), literalSize: LITERAL_SIZE });
            reads.push(r);
            if (r.kind === 'fatal') return;
          }
        })();
        await feed(sock, chunked(data, cuts), done, () => 0);
        const end = await done.then(
          () => undefined,
          (e: unknown) => e,
        );
        if (end !== undefined) expect(end instanceof ConnectionClosed || end instanceof LineTooLong).toBe(true);
        for (const w of writes) expect(w).toBe('+ Ready for literal data\r\n');
        for (const r of reads) {
          if (r.kind === 'command') {
            expect(validTag(r.command.tag)).toBe(true);
            for (const t of r.command.args) if (t.kind === 'string') expect(t.data.length).toBeLessThanOrEqual(Math.max(LITERAL_SIZE, LINE));
          } else {
            expect(r.reply).toMatch(PRINTABLE_REPLY);
            const tag = r.reply.split(' ', 1)[0]!;
            expect(tag === '*' || validTag(tag)).toBe(true);
          }
        }
      }),
      params(300),
    );
  });

  it(`refuses literal number ${MAX_LITERALS + 1} as too many literals`, async () => {
    const sock = new FakeSocket();
    const reader = new LineReader(sock.asDuplex(), LINE);
    const read = readImapCommand({ reader, write: () => undefined, literalSize: LITERAL_SIZE });
    sock.emit('data', Buffer.from(`a1 ID ({1}\r\n${'x {1}\r\n'.repeat(MAX_LITERALS)}`));
    expect(await read).toEqual({ kind: 'bad', reply: 'a1 BAD [LIMIT] Too many literals\r\n' });
  });
});

describe('POP3 command parsing', () => {
  it('splits any line into keyword and argument, keeping every byte of the argument', async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 300 }), cutsArb, async (bytes, cuts) => {
        const arg = Buffer.from(bytes.filter((b) => b !== 10 && b !== 13));
        const sock = new FakeSocket();
        const reader = new LineReader(sock.asDuplex(), 512);
        const line = reader.line('latin1');
        await feed(sock, chunked(Buffer.concat([Buffer.from('PASS '), arg, Buffer.from('\r\n')]), cuts), line, () => 0);
        const { name, arg: got } = parsePop3Command(await line);
        expect(name).toBe('PASS');
        expect(Buffer.from(got, 'latin1').equals(arg)).toBe(true);
      }),
      params(500),
    );
  });

  it('never throws, and the keyword is the upper-cased first word', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
        const line = latin1(Buffer.from(bytes));
        const { name, arg } = parsePop3Command(line);
        expect(name).toBe(line.split(' ', 1)[0]!.toUpperCase());
        expect(line.length === name.length || line.endsWith(arg)).toBe(true);
      }),
      params(2000),
    );
  });
});

describe('SASL PLAIN decoding', () => {
  const noNul = fc.uint8Array({ maxLength: 100 }).map((a) => Buffer.from(a.filter((b) => b !== 0)));

  it('never throws on any response text', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string({ maxLength: 200 }), fc.base64String({ maxLength: 200 }), fc.uint8Array({ maxLength: 150 }).map((a) => Buffer.from(a).toString('base64'))), (s) => {
        const creds = decodePlain(s);
        if (creds) {
          expect(creds.authcid.length).toBeGreaterThan(0);
          for (const f of [creds.authzid, creds.authcid, creds.password]) if (f) expect(f.includes(0)).toBe(false);
        }
      }),
      params(2000),
    );
  });

  it('gives back exactly the bytes the client encoded', () => {
    fc.assert(
      fc.property(noNul, noNul, noNul, (authzid, authcid, password) => {
        const b64 = Buffer.concat([authzid, Buffer.from([0]), authcid, Buffer.from([0]), password]).toString('base64');
        const creds = decodePlain(b64 || '=');
        if (authcid.length === 0) return void expect(creds).toBeUndefined();
        expect(creds?.authcid.equals(authcid)).toBe(true);
        expect(creds?.password.equals(password)).toBe(true);
        const proxy = authzid.length > 0 && !authzid.equals(authcid);
        expect(creds?.authzid?.equals(authzid) ?? !proxy).toBe(true);
      }),
      params(2000),
    );
  });
});

describe('LMTP address parsing', () => {
  const atext = fc.constantFrom(...'abcXYZ019!#$%&\'*+-/=?^_`{|}~'.split(''));
  const atom = fc.array(atext, { minLength: 1, maxLength: 8 }).map((a) => a.join(''));
  const dotString = fc.array(atom, { minLength: 1, maxLength: 3 }).map((a) => a.join('.'));
  const label = fc.stringMatching(/^[a-z0-9](?:[a-z0-9-]{0,6}[a-z0-9])?$/);
  const domain = fc.array(label, { minLength: 1, maxLength: 3 }).map((a) => a.join('.'));
  const ascii = fc.string({ unit: fc.integer({ min: 0, max: 0x7f }).map((c) => String.fromCharCode(c)), maxLength: 60 });
  const pathText = fc.oneof(
    ascii,
    fc.tuple(ascii, ascii).map(([a, b]) => `TO:<${a}@${b}>`),
    fc.tuple(dotString, domain, ascii).map(([l, d, p]) => `TO:<${l}@${d}>${p}`),
    fc.tuple(fc.string({ maxLength: 20 }), domain).map(([l, d]) => `TO:<"${l}"@${d}>`),
  );

  it('parsePathArgument and canonicalRecipient never throw; what they accept is printable and stable', () => {
    fc.assert(
      fc.property(pathText, (text) => {
        const p = parsePathArgument(text, 'TO');
        if (typeof p === 'string') return;
        expect(p.address).toMatch(/^[\x20-\x7e]*$/);
        const canon = canonicalRecipient(p.address);
        if (canon === undefined) return;
        expect(canonicalRecipient(canon)).toBe(canon);
        const split = splitDetail(canon);
        if (split) {
          // Whatever the backend gets back with the detail is a mailbox RFC 5321 allows.
          expect(split.detail).not.toMatch(/[@" \\]/);
          expect(canonicalRecipient(withDetail(split.base, split.detail))).toBe(canon);
        }
      }),
      params(3000),
    );
  });

  it('a mailbox is the same with or without unneeded quotes', () => {
    fc.assert(
      fc.property(dotString, domain, (local, dom) => {
        const plain = `${local}@${dom}`;
        expect(canonicalRecipient(plain)).toBe(plain);
        expect(canonicalRecipient(`"${local}"@${dom}`)).toBe(plain);
        expect(canonicalRecipient(`"${local.replace(/./g, (c) => `\\${c}`)}"@${dom}`)).toBe(plain);
      }),
      params(1000),
    );
  });

  it('refuses a local part with an unquoted "@", quote or space', () => {
    fc.assert(
      fc.property(dotString, fc.constantFrom('@', '"', ' ', '"x"', '@b'), dotString, domain, (a, bad, b, dom) => {
        expect(canonicalRecipient(`${a}+${bad}${b}@${dom}`)).toBeUndefined();
      }),
      params(500),
    );
  });
});
