import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ClientCommands, shownAtLogin, trackCommands, Verdict, Wait, watchAnswers } from '../src/imap/imap-commands.js';
import { initialFraming, type FramingState } from '../src/imap/imap-framing.js';

// The client-side command tracker of the splice (pure logic): any chunking of a client's
// stream gives the same command boundaries, the ones the generator of that stream made;
// a literal's bytes are never read as a command; random bytes never throw.
// Fixed seed; MAILSPLICE_PROPERTY_RUNS asks for a longer run.

const RUNS = Number(process.env.MAILSPLICE_PROPERTY_RUNS ?? 300);
const params = { seed: 42, numRuns: RUNS };
const enc = (s: string): Uint8Array => Buffer.from(s, 'latin1');

/** One generated client command: its bytes, and what the server answers where the client must wait. */
interface Command {
  bytes: Uint8Array;
  /** Server answers, in order, one for each wait this command causes. */
  answers: string[];
  refused?: boolean;
}

const tagText = fc.string({ unit: fc.constantFrom(...'abcXYZ019.'.split('')), minLength: 1, maxLength: 6 });
const argText = fc.string({ unit: fc.constantFrom(...'abc 019()"\\*{}+~[]<>.'.split('')), maxLength: 20 });
/** Literal data: anything, command-looking lines and counts included. */
const literalData = fc.oneof(
  fc.uint8Array({ maxLength: 60 }),
  fc.constantFrom('x UNAUTHENTICATE\r\n', 'y COMPRESS DEFLATE\r\n', 'z IDLE\r\n', 'w APPEND a {99999}\r\n', '{5}\r\n').map(enc),
);

function concat(parts: Uint8Array[]): Uint8Array {
  return Buffer.concat(parts.map((p) => Buffer.from(p)));
}

const command: fc.Arbitrary<Command> = fc.oneof(
  fc.tuple(tagText, fc.constantFrom('NOOP', 'select', 'UID FETCH', 'Unauthenticated', 'COMPRESSX', 'IDLEX'), argText).map(([tag, name, args]) => ({
    bytes: enc(`${tag} ${name} ${args.replace(/[{}]/g, '')}\r\n`),
    answers: [],
  })),
  // LITERAL+ (and BINARY's ~{n+}): the data follows at once.
  fc.tuple(tagText, literalData, fc.boolean(), argText).map(([tag, data, binary, tail]) => ({
    bytes: concat([enc(`${tag} APPEND INBOX ${binary ? '~' : ''}{${data.length}+}\r\n`), data, enc(` ${tail.replace(/[{}]/g, '')}\r\n`)]),
    answers: [],
  })),
  // A synchronising literal the server accepts.
  fc.tuple(tagText, literalData).map(([tag, data]) => ({
    bytes: concat([enc(`${tag} APPEND INBOX {${data.length}}\r\n`), data, enc('\r\n')]),
    answers: ['+ Ready\r\n'],
  })),
  // One it refuses: the literal never comes.
  fc.tuple(tagText).map(([tag]) => ({
    bytes: enc(`${tag} APPEND Nonexistent {20}\r\n`),
    answers: [`* 3 EXISTS\r\n${tag}x OK other\r\n${tag} NO [TRYCREATE] no such mailbox\r\n`],
    refused: true,
  })),
  // IDLE, then DONE; and COMPRESS refused (the stream stays plaintext).
  fc.tuple(tagText).map(([tag]) => ({ bytes: enc(`${tag} IDLE\r\nDONE {5}\r\n`), answers: ['+ idling\r\n'] })),
  fc.tuple(tagText).map(([tag]) => ({ bytes: enc(`${tag} COMPRESS DEFLATE\r\n`), answers: [`* OK {3}\r\nabc\r\n${tag} NO [COMPRESSIONACTIVE] no\r\n`] })),
);

function fresh(): { t: ClientCommands; f: FramingState } {
  const f = { litLeft: 0, mark: 0, markValue: 0 };
  initialFraming(f);
  return { t: new ClientCommands(), f };
}

/** Positions of the commands' ends in the concatenated stream, and the answers in order. */
function layout(cmds: Command[]): { stream: Uint8Array; ends: number[]; answers: string[] } {
  const ends: number[] = [];
  let at = 0;
  for (const c of cmds) ends.push((at += c.bytes.length));
  return { stream: concat(cmds.map((c) => c.bytes)), ends, answers: cmds.flatMap((c) => c.answers) };
}

/** Whether the tracker stands between two commands. */
function atCommandBoundary(t: ClientCommands): boolean {
  return t.litLeft === 0 && t.phase === 0 && t.tag === new ClientCommands().tag && t.end === 0 && t.wait === Wait.NONE;
}

/**
 * Feeds `stream` cut at `cuts`, answering each wait with the next answer. Returns the
 * positions where the tracker stood between commands (looked at after every byte when
 * `cuts` cuts everywhere, else at the cuts) and where it stopped to wait.
 */
function run(stream: Uint8Array, cutAt: number[], answers: string[]): { boundaries: number[]; waits: number[]; verdict: number } {
  const { t, f } = fresh();
  const boundaries: number[] = [];
  const waits: number[] = [];
  const queue = [...answers];
  let start = 0;
  for (const end of [...cutAt, stream.length]) {
    const chunk = stream.subarray(start, end);
    let pos = 0;
    while (pos < chunk.length) {
      const stop = trackCommands(t, chunk, pos);
      if (t.verdict !== Verdict.NONE) return { boundaries, waits, verdict: t.verdict };
      if (t.wait !== Wait.NONE) {
        waits.push(start + stop);
        const answer = queue.shift();
        if (answer === undefined) throw new Error('no answer left');
        // The answer may come in pieces too.
        const a = enc(answer);
        const half = a.length >> 1;
        watchAnswers(t, f, a.subarray(0, half));
        watchAnswers(t, f, a.subarray(half));
        expect(t.wait).toBe(Wait.NONE);
      }
      pos = stop;
    }
    if (end > start && atCommandBoundary(t)) boundaries.push(end);
    start = end;
  }
  return { boundaries, waits, verdict: t.verdict };
}

describe('the client command tracker', () => {
  it('finds the same command boundaries under any chunking, and only those', () => {
    fc.assert(
      fc.property(fc.array(command, { minLength: 1, maxLength: 8 }), fc.array(fc.nat(), { maxLength: 12 }), (cmds, raw) => {
        const { stream, ends, answers } = layout(cmds);
        const everywhere = Array.from({ length: stream.length - 1 }, (_, i) => i + 1);
        const byByte = run(stream, everywhere, answers);
        expect(byByte.verdict).toBe(Verdict.NONE);
        // Between commands exactly at the generator's command ends (a wait is not between).
        expect(byByte.boundaries).toEqual(ends.filter((e) => everywhere.includes(e) || e === stream.length));
        const cuts = [...new Set(raw.map((r) => r % (stream.length + 1)))].filter((c) => c > 0 && c < stream.length).sort((a, b) => a - b);
        const chunked = run(stream, cuts, answers);
        expect(chunked.waits).toEqual(byByte.waits);
        expect(chunked.boundaries).toEqual(byByte.boundaries.filter((b) => cuts.includes(b) || b === stream.length));
      }),
      params,
    );
  });

  it('stops at an UNAUTHENTICATE command, before its line end, and never at one inside a literal', () => {
    fc.assert(
      fc.property(fc.array(command, { maxLength: 6 }), fc.array(fc.nat(), { maxLength: 8 }), fc.constantFrom('UNAUTHENTICATE', 'unauthenticate'), (cmds, raw, name) => {
        const { stream: before, answers } = layout(cmds);
        const stream = concat([before, enc(`q ${name}\r\n`)]);
        const cuts = [...new Set(raw.map((r) => r % (stream.length + 1)))].filter((c) => c > 0 && c < stream.length).sort((a, b) => a - b);
        const { t, f } = fresh();
        const queue = [...answers];
        let passed = 0;
        let start = 0;
        for (const end of [...cuts, stream.length]) {
          const chunk = stream.subarray(start, end);
          let pos = 0;
          while (pos < chunk.length && t.verdict === Verdict.NONE) {
            const stop = trackCommands(t, chunk, pos);
            passed = start + stop;
            if (t.wait !== Wait.NONE) watchAnswers(t, f, enc(queue.shift()!));
            pos = stop;
          }
          if (t.verdict !== Verdict.NONE) break;
          start = end;
        }
        expect(t.verdict).toBe(Verdict.UNAUTHENTICATE);
        // Nothing of the UNAUTHENTICATE line's end was let through.
        expect(passed).toBeLessThan(stream.length - 1);
        expect(passed).toBeGreaterThanOrEqual(before.length);
      }),
      params,
    );
  });

  it('takes a COMPRESS that the server accepted as the end of tracking', () => {
    const { t, f } = fresh();
    const c = enc('a NOOP\r\nb compress DEFLATE\r\nxx');
    const stop = trackCommands(t, c);
    expect(stop).toBe(c.length - 2);
    expect(t.wait).toBe(Wait.COMPRESS);
    watchAnswers(t, f, enc('a OK done\r\n* 1 EXISTS\r\nb OK DEFLATE active\r\n\x78\x9c'));
    expect(t.wait).toBe(Wait.NONE);
    expect(t.compressed).toBe(true);
  });

  it('refuses COMPRESS where the server offered UNAUTHENTICATE, and hides both at login', () => {
    const t = new ClientCommands(true);
    const c = enc('a NOOP\r\nb Compress DEFLATE\r\n');
    expect(trackCommands(t, c)).toBe(c.indexOf(32, 10)); // at the end of its name, before its line end
    expect(t.verdict).toBe(Verdict.COMPRESS);
    const admin = shownAtLogin(['* CAPABILITY IMAP4rev1 UNAUTHENTICATE COMPRESS=DEFLATE IDLE'], 'OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE UNAUTHENTICATE] hi');
    expect(admin).toEqual({ untagged: ['* CAPABILITY IMAP4rev1 IDLE'], okText: 'OK [CAPABILITY IMAP4rev1] hi', refuseCompress: true });
    const user = shownAtLogin([], 'OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE] UNAUTHENTICATEX');
    expect(user.okText).toBe('OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE] UNAUTHENTICATEX');
  });

  it('never throws on random client bytes and random server answers', () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 40 }), { maxLength: 20 }), fc.array(fc.uint8Array({ maxLength: 40 }), { maxLength: 20 }), (client, server) => {
        const { t, f } = fresh();
        for (let i = 0; i < client.length; i++) {
          const c = client[i]!;
          let pos = 0;
          while (pos < c.length && t.verdict === Verdict.NONE && !t.compressed) {
            const stop = trackCommands(t, c, pos);
            expect(stop).toBeGreaterThanOrEqual(pos);
            expect(stop).toBeLessThanOrEqual(c.length);
            if (t.wait !== Wait.NONE) {
              watchAnswers(t, f, server[i] ?? new Uint8Array());
              if (t.wait !== Wait.NONE) break;
            }
            if (stop === pos && t.wait === Wait.NONE && t.verdict === Verdict.NONE) throw new Error('no progress');
            pos = stop;
          }
        }
      }),
      params,
    );
  });
});
