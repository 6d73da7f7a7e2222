import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { atResponseBoundary, initialFraming, Mark, trackFraming, type FramingState } from '../src/imap/imap-framing.js';

// The response-framing tracker (pure logic), against a byte-at-a-time reference that is
// plainly right, and against the boundaries a generator of IMAP responses knows it made.
// Fixed seed; MAILSPLICE_PROPERTY_RUNS asks for a longer run.

const RUNS = Number(process.env.MAILSPLICE_PROPERTY_RUNS ?? 300);
const params = { seed: 42, numRuns: RUNS };

function fresh(): FramingState {
  const s = { litLeft: 0, mark: 0, markValue: 0 };
  initialFraming(s);
  return s;
}

/** One byte at a time, the obvious way: the state after every prefix of `bytes`. */
function reference(bytes: Uint8Array): FramingState[] {
  const s = fresh();
  const out: FramingState[] = [{ ...s }];
  for (const b of bytes) {
    if (s.litLeft > 0) {
      s.litLeft--;
    } else if (b === 10) {
      if (s.mark === Mark.CLOSE || s.mark === Mark.CR) {
        s.litLeft = s.markValue > 2 ** 48 ? Infinity : s.markValue;
        s.mark = Mark.MID;
      } else s.mark = Mark.START;
      s.markValue = 0;
    } else if (b === 123) {
      s.mark = Mark.OPEN;
      s.markValue = 0;
    } else if (b >= 48 && b <= 57 && (s.mark === Mark.OPEN || s.mark === Mark.DIGITS)) {
      s.mark = Mark.DIGITS;
      s.markValue = s.markValue * 10 + (b - 48);
    } else if (b === 125 && s.mark === Mark.DIGITS) {
      s.mark = Mark.CLOSE;
    } else if (b === 13 && s.mark === Mark.CLOSE) {
      s.mark = Mark.CR;
    } else {
      s.mark = Mark.MID;
    }
    out.push({ ...s });
  }
  return out;
}

/** The parts of the state that matter: the value only while a count is being read. */
function essence(s: FramingState): string {
  const counting = s.mark === Mark.DIGITS || s.mark === Mark.CLOSE || s.mark === Mark.CR;
  // Past the cap only "too large" matters (both ways of adding up digits round differently there).
  const value = !counting ? '-' : s.markValue > 2 ** 48 ? 'big' : s.markValue;
  return `${s.litLeft}/${s.mark}/${value}`;
}

/** Cut points (sorted, unique, inside the stream) from arbitrary numbers. */
function cuts(len: number, raw: number[]): number[] {
  return [...new Set(raw.map((r) => (len === 0 ? 0 : r % (len + 1))))].sort((a, b) => a - b);
}

/** Feeds `bytes` in the chunks the cut points make; the state after each chunk, by offset. */
function chunked(bytes: Uint8Array, points: number[]): Map<number, string> {
  const s = fresh();
  const seen = new Map<number, string>();
  let prev = 0;
  for (const p of [...points, bytes.length]) {
    trackFraming(s, bytes.subarray(prev, p));
    seen.set(p, essence(s));
    prev = p;
  }
  return seen;
}

const text = (chars: string) => fc.string({ unit: fc.constantFrom(...chars.split('')), maxLength: 30 });
/** Bytes that look like IMAP and like its near misses. */
const lineText = text('abc *()[]{}~+0123456789\r');
const enc = (s: string) => Buffer.from(s, 'latin1');

/** One server response, as bytes, well formed: the stream is at a boundary after it. */
const response = fc.oneof(
  lineText.map((t) => enc(`* ${t.replace(/\r/g, '')}x\r\n`)),
  fc.tuple(lineText, fc.uint8Array({ maxLength: 80 }), fc.boolean(), lineText).map(([head, data, binary, tail]) =>
    Buffer.concat([enc(`* 1 FETCH (${head} ${binary ? '~' : ''}{${data.length}}\r\n`), data, enc(` ${tail.replace(/\r/g, '')})\r\n`)]),
  ),
  // A literal whose data is made of lines, the case that fooled "last byte was LF".
  fc.array(lineText, { maxLength: 6 }).map((ls) => {
    const data = enc(ls.map((l) => `${l}\r\n`).join(''));
    return Buffer.concat([enc(`* 2 FETCH (BODY[] {${data.length}}\r\n`), data, enc(')\r\n')]);
  }),
  fc.constant(enc('a OK done\r\n')),
  fc.constant(enc('+ go on\r\n')),
);

describe('IMAP response framing', () => {
  it('agrees with the byte-at-a-time reference however the stream is cut', () => {
    const stream = fc.oneof(
      fc.array(response, { maxLength: 8 }).map((rs) => Buffer.concat(rs)),
      fc.array(fc.oneof(lineText.map(enc), fc.uint8Array({ maxLength: 20 }), fc.constantFrom(enc('{'), enc('}'), enc('\r\n'), enc('\n'), enc('{3}'), enc('~{0}'), enc('{99999999999999999999}'))), { maxLength: 20 }).map((ps) => Buffer.concat(ps)),
    );
    fc.assert(
      fc.property(stream, fc.array(fc.nat(), { maxLength: 12 }), (bytes, raw) => {
        const ref = reference(bytes);
        for (const [offset, got] of chunked(bytes, cuts(bytes.length, raw))) expect(got).toBe(essence(ref[offset]!));
      }),
      params,
    );
  });

  it('puts boundaries exactly at the ends of whole responses', () => {
    fc.assert(
      fc.property(fc.array(response, { minLength: 1, maxLength: 8 }), (rs) => {
        const bytes = Buffer.concat(rs);
        const ends = new Set<number>([0]);
        let at = 0;
        for (const r of rs) ends.add((at += r.length));
        const ref = reference(bytes);
        // Every cut point at once: the state after each single byte.
        const all = chunked(bytes, Array.from({ length: bytes.length }, (_, i) => i));
        for (let i = 0; i <= bytes.length; i++) {
          const fast = all.get(i)!;
          expect(fast).toBe(essence(ref[i]!));
          const boundary = fast.startsWith(`0/${Mark.START}/`);
          // A boundary only at a response end (an end may also fall inside nothing else).
          if (boundary) expect(ends.has(i)).toBe(true);
          if (ends.has(i)) expect(boundary).toBe(true);
        }
      }),
      params,
    );
  });

  it('never throws on random bytes and agrees with the reference', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 400 }), fc.array(fc.nat(), { maxLength: 20 }), (bytes, raw) => {
        const ref = reference(bytes);
        for (const [offset, got] of chunked(bytes, cuts(bytes.length, raw))) expect(got).toBe(essence(ref[offset]!));
      }),
      params,
    );
  });

  it('treats a count too large for any message as lost framing: no boundary again', () => {
    const s = fresh();
    trackFraming(s, enc('* 1 FETCH (BODY[] {1000000000000000000000}\r\nabc\r\n)\r\n'));
    expect(s.litLeft).toBe(Infinity);
    trackFraming(s, enc('a OK\r\n'));
    expect(atResponseBoundary(s)).toBe(false);
  });

  it('sees a count split over chunks at every byte', () => {
    const bytes = enc('* 1 FETCH (BODY[] {12}\r\nline one\r\n\r\n)\r\n');
    for (let cut = 0; cut <= bytes.length; cut++) {
      const s = fresh();
      trackFraming(s, bytes.subarray(0, cut));
      trackFraming(s, bytes.subarray(cut));
      expect(atResponseBoundary(s)).toBe(true);
      expect(s.litLeft).toBe(0);
    }
    const inside = fresh();
    trackFraming(inside, bytes.subarray(0, bytes.indexOf('\r\n\r\n)') + 2)); // ends with LF, inside the literal
    expect(atResponseBoundary(inside)).toBe(false);
  });
});
