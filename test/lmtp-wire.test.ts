import { describe, expect, it } from 'vitest';
import { parsePathArgument, splitDetail, validRecipient, withDetail } from '../src/lmtp/address.js';
import { DotDecoder, DotEncoder } from '../src/lmtp/dot.js';
import { ReplyAssembler, ReplySyntaxError, formatReply, reply } from '../src/lmtp/reply.js';

// Pure logic only: the byte-level transparency code and the parsers, fed every chunking.

/** Decodes `wire` cut into the given chunk sizes; returns content and what followed the dot. */
function decode(wire: Buffer, cuts: number[]): { content: Buffer; rest: Buffer | undefined } {
  const d = new DotDecoder();
  const out: Buffer[] = [];
  let pos = 0;
  let i = 0;
  while (pos < wire.length) {
    const n = Math.max(1, cuts[i++ % cuts.length]!);
    const rest = d.push(wire.subarray(pos, pos + n), (b) => out.push(Buffer.from(b)));
    pos += n;
    if (rest !== undefined) return { content: Buffer.concat(out), rest: Buffer.concat([rest, wire.subarray(pos)]) };
  }
  return { content: Buffer.concat(out), rest: undefined };
}

function encode(content: Buffer, cuts: number[]): Buffer {
  const e = new DotEncoder();
  const out: Buffer[] = [];
  let pos = 0;
  let i = 0;
  while (pos < content.length) {
    const n = Math.max(1, cuts[i++ % cuts.length]!);
    out.push(...e.encode(content.subarray(pos, pos + n)));
    pos += n;
  }
  out.push(e.terminator());
  return Buffer.concat(out);
}

/** A Dovecot-2.3-like reader: a line starts after any LF, LF "." [CR] LF ends the data. */
function looseDecode(wire: Buffer): { content: string; rest: string } {
  const s = wire.toString('latin1');
  let out = '';
  let i = 0;
  let lineStart = true;
  while (i < s.length) {
    if (lineStart && s[i] === '.') {
      if (s.startsWith('.\r\n', i) || s.startsWith('.\n', i)) {
        return { content: out, rest: s.slice(i + (s[i + 1] === '\r' ? 3 : 2)) };
      }
      i++; // stuffing dot
    }
    const c = s[i]!;
    out += c;
    lineStart = c === '\n';
    i++;
  }
  throw new Error('no terminator');
}

const CUTS = [[1], [2], [3], [5], [7], [1, 2, 3], [4096], [13, 1, 1, 2]];

describe('DotDecoder (client side: strict CRLF "." CRLF)', () => {
  const cases: [string, string, string][] = [
    ['plain', 'Subject: x\r\n\r\nhello\r\n.\r\n', 'Subject: x\r\n\r\nhello\r\n'],
    ['empty message', '.\r\n', ''],
    ['stuffed dot lines', '..\r\n..x\r\n...\r\n.\r\n', '.\r\n.x\r\n..\r\n'],
    ['a stray leading dot is dropped (RFC 5321 4.5.2)', '.x\r\n.\r\n', 'x\r\n'],
    ['bare LF dot LF is content', 'a\n.\nb\r\n.\r\n', 'a\n.\nb\r\n'],
    ['LF dot CRLF is content', 'a\n.\r\nb\r\n.\r\n', 'a\n.\r\nb\r\n'],
    ['CRLF dot LF is not the end', 'a\r\n.\nb\r\n.\r\n', 'a\r\n\nb\r\n'],
    ['dot CR x keeps the CR', 'a\r\n.\rx\r\n.\r\n', 'a\r\n\rx\r\n'],
    ['dot CR CR LF', 'a\r\n.\r\r\n.\r\n', 'a\r\n\r\r\n'],
    ['CR CR LF dot', 'a\r\r\n.\r\n', 'a\r\r\n'],
    ['8-bit bytes pass', 'caf\xe9\r\n.\r\n', 'caf\xe9\r\n'],
  ];
  for (const [name, wire, content] of cases) {
    it(`${name}, at every chunking`, () => {
      for (const cuts of CUTS) {
        const r = decode(Buffer.from(`${wire}NEXT`, 'latin1'), cuts);
        expect(r.content.toString('latin1'), `cuts ${cuts}`).toBe(content);
        expect(r.rest?.toString('latin1'), `cuts ${cuts}`).toBe('NEXT');
      }
    });
  }

  it('waits for the terminator', () => {
    expect(decode(Buffer.from('a\r\n.'), [1]).rest).toBeUndefined();
    expect(decode(Buffer.from('a\r\n.\r'), [2]).rest).toBeUndefined();
    expect(decode(Buffer.from('a\n.\n'), [1]).rest).toBeUndefined();
  });

  it('counts content bytes', () => {
    const d = new DotDecoder();
    d.push(Buffer.from('..ab\r\n.\r\n'), () => undefined);
    expect(d.bytes).toBe(5);
  });
});

describe('DotEncoder (backend side: stuff after any LF)', () => {
  it('stuffs every dot at a line start, CRLF or bare LF', () => {
    expect(encode(Buffer.from('.a\r\n.b\n.c\r\nd.e\r\n'), [4096]).toString()).toBe('..a\r\n..b\n..c\r\nd.e\r\n.\r\n');
  });
  it('adds CRLF before the terminator when the content lacks it', () => {
    expect(encode(Buffer.from('abc'), [1]).toString()).toBe('abc\r\n.\r\n');
    expect(encode(Buffer.from('abc\n'), [1]).toString()).toBe('abc\n\r\n.\r\n');
    expect(encode(Buffer.alloc(0), [1]).toString()).toBe('.\r\n');
  });

  it('round-trips random content through the strict decoder and a loose (Dovecot-like) reader', () => {
    const alphabet = Buffer.from('..\r\n\nab\r.');
    let seed = 42;
    const rand = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    for (let n = 0; n < 300; n++) {
      const len = Math.floor(rand() * 60);
      const content = Buffer.alloc(len);
      for (let i = 0; i < len; i++) content[i] = alphabet[Math.floor(rand() * alphabet.length)]!;
      // What a strict decoder yields from a client, re-encoded for a backend...
      const cuts = [1 + Math.floor(rand() * 5), 1 + Math.floor(rand() * 9)];
      const wire = encode(content, cuts);
      // ...a loose reader (LF "." LF ends) must still see exactly the content, nothing after.
      const loose = looseDecode(Buffer.concat([wire, Buffer.from('RSET\r\n')]));
      const withEnd = content.length === 0 || content.subarray(-2).toString('latin1') === '\r\n' ? content : Buffer.concat([content, Buffer.from('\r\n')]);
      expect(loose.content, JSON.stringify(content.toString('latin1'))).toBe(withEnd.toString('latin1'));
      expect(loose.rest).toBe('RSET\r\n');
      // A strict reader gets the content back too, as long as there are no bare LFs (after
      // which only a loose reader treats the stuffed dot as stuffing, by design).
      if (!/(^|[^\r])\n/.test(content.toString('latin1'))) {
        const strict = decode(wire, [3]);
        expect(strict.content.toString('latin1')).toBe(withEnd.toString('latin1'));
        expect(strict.rest?.length).toBe(0);
      }
    }
  });
});

describe('replies', () => {
  it('assembles multi-line replies and takes the enhanced code off every line', () => {
    const a = new ReplyAssembler();
    expect(a.push('250-mx.example')).toBeUndefined();
    expect(a.push('250-PIPELINING')).toBeUndefined();
    expect(a.push('250 8BITMIME')).toEqual({ code: 250, lines: ['mx.example', 'PIPELINING', '8BITMIME'] });
    expect(a.push('550 5.1.1 <x@y> User unknown')).toEqual({ code: 550, enhanced: '5.1.1', lines: ['<x@y> User unknown'] });
    expect(a.push('451-4.3.0 a')).toBeUndefined();
    expect(a.push('451 4.3.0 b')).toEqual({ code: 451, enhanced: '4.3.0', lines: ['a', 'b'] });
    expect(a.push('250')).toEqual({ code: 250, lines: [''] });
    // An enhanced code of another class is text, not a code (RFC 3463 section 2).
    expect(a.push('250 5.0.0 odd')).toEqual({ code: 250, lines: ['5.0.0 odd'] });
  });
  it("takes the enhanced code from whichever line has it (Cyrus: the last) and writes it once per line", () => {
    const a = new ReplyAssembler();
    expect(a.push('550-Mailbox unknown.  Either there is no mailbox associated with this')).toBeUndefined();
    expect(a.push('550-name or you do not have authorization to see it.')).toBeUndefined();
    const r = a.push('550 5.1.1 User unknown');
    expect(r).toEqual({
      code: 550,
      enhanced: '5.1.1',
      lines: ['Mailbox unknown.  Either there is no mailbox associated with this', 'name or you do not have authorization to see it.', 'User unknown'],
    });
    // Postfix reads the code from the first line: 5.1.1 there, and no default 5.0.0 anywhere.
    expect(formatReply(r!)).toBe(
      '550-5.1.1 Mailbox unknown.  Either there is no mailbox associated with this\r\n550-5.1.1 name or you do not have authorization to see it.\r\n550 5.1.1 User unknown\r\n',
    );
    // Codes on some lines only, or on every line: the first one stands, none stays in the text.
    expect(a.push('452-4.2.2 first')).toBeUndefined();
    expect(a.push('452-second')).toBeUndefined();
    expect(a.push('452 4.2.2 third')).toEqual({ code: 452, enhanced: '4.2.2', lines: ['first', 'second', 'third'] });
  });
  it('rejects malformed replies', () => {
    expect(() => new ReplyAssembler().push('hello')).toThrow(ReplySyntaxError);
    expect(() => new ReplyAssembler().push('099 x')).toThrow(ReplySyntaxError);
    const a = new ReplyAssembler();
    a.push('250-a');
    expect(() => a.push('251 b')).toThrow(ReplySyntaxError);
    const b = new ReplyAssembler(3);
    b.push('250-a');
    b.push('250-a');
    b.push('250-a');
    expect(() => b.push('250-a')).toThrow(/3 lines/);
  });
  it('formats with the enhanced code on every line and strips control characters', () => {
    expect(formatReply(reply(250, undefined, 'h', 'PIPELINING'), false)).toBe('250-h\r\n250 PIPELINING\r\n');
    expect(formatReply(reply(451, undefined, 'x'))).toBe('451 4.0.0 x\r\n');
    expect(formatReply(reply(550, '5.1.1', 'a\r\nb'))).toBe('550 5.1.1 a  b\r\n');
    expect(formatReply(reply(354, undefined, 'go'))).toBe('354 go\r\n');
  });
});

describe('addresses', () => {
  it('parses paths and parameters', () => {
    expect(parsePathArgument('FROM:<a@b> SIZE=10 BODY=8BITMIME', 'FROM')).toEqual({
      address: 'a@b',
      params: new Map([
        ['SIZE', '10'],
        ['BODY', '8BITMIME'],
      ]),
    });
    expect(parsePathArgument('from:<>', 'FROM')).toEqual({ address: '', params: new Map() });
    expect(parsePathArgument('TO: <@r1,@r2:u@x>', 'TO')).toMatchObject({ address: 'u@x' });
    expect(parsePathArgument('TO:<"a b>c"@x> X', 'TO')).toMatchObject({ address: '"a b>c"@x', params: new Map([['X', true]]) });
  });
  it('refuses bad syntax', () => {
    for (const bad of ['TO:a@b', 'TO:<a@b', 'TO:<a b@c>', 'TO:<a@b>x', 'TO:<a@b> K=', 'TO:<a@b> A=1 A=2', 'TO:<a\u00e9@b>', 'FROM:<a@b>']) {
      expect(typeof parsePathArgument(bad, 'TO'), bad).toBe('string');
    }
  });
  it('knows a recipient and its +detail', () => {
    expect(validRecipient('Postmaster')).toBe(true);
    expect(validRecipient('a@b')).toBe(true);
    expect(validRecipient('a')).toBe(false);
    expect(validRecipient('@b')).toBe(false);
    expect(splitDetail('Alice+Tag+x@Example.com')).toEqual({ base: 'Alice@Example.com', detail: 'Tag+x' });
    expect(splitDetail('alice@example.com')).toBeUndefined();
    expect(splitDetail('+x@example.com')).toBeUndefined();
    expect(splitDetail('"a+b"@example.com')).toBeUndefined();
    expect(withDetail('alice@example.com', 'Tag')).toBe('alice+Tag@example.com');
    expect(withDetail('alice', 'Tag')).toBe('alice+Tag');
  });
});
