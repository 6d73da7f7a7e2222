// Where the commands are in an IMAP client's byte stream after login, so that the splice
// can refuse the two commands that would change the session behind the proxy's back:
// UNAUTHENTICATE (RFC 8437: log in again as anyone, on a server that is not that user's
// master) and COMPRESS (RFC 4978: from then on the stream is deflate, and the proxy may
// never write plaintext into it).
//
// Only each command's name is looked at. The rest is framing: a command is a line, unless
// the line ends with a literal count (`{n}`, LITERAL+'s `{n+}`, BINARY's `~{n}`); then n
// bytes follow and the command goes on after them. A synchronising literal `{n}` is sent
// only after the server's `+` (RFC 9051 7.5); if the server refuses it instead (a tagged
// NO/BAD), what follows is the next command. Whether the literal bytes come is known only
// from the server, so after such a line the splice holds what the client sends on until the
// server has answered (`wait`): a well-behaved client sends nothing then anyway. The same
// holds after IDLE (the next line is DONE, with no literals, if the server said `+`; else a
// command) and after COMPRESS (deflate if the server said OK; else plaintext commands).
//
// The server's answer is matched by the tag, kept as a 32-bit hash: a client that picks
// colliding tags only confuses its own session, never the check (a held line is forwarded
// only once the answer came, and a refused literal makes us read more as commands, not less).
//
// Cost: client-to-server traffic is command lines (short) and literals (skipped by
// arithmetic); lines are read a byte at a time with no allocation. The state is a few
// numbers in one object per IMAP session.

import { CLOSE_BRACE, CR, LF, MAX_LITERAL, NINE, OPEN_BRACE, PLUS, SP, STAR, ZERO } from './bytes.js';
import { atResponseBoundary, trackFraming, type FramingState } from './imap-framing.js';
import { capabilitiesIn } from './imap-syntax.js';

/** Why the splice holds the client's bytes: the server's answer to the command `waitTag` decides. */
export const Wait = {
  NONE: 0,
  /** A synchronising literal: `+` (send it) or a tagged answer (refused: the command ended). */
  LITERAL: 1,
  /** IDLE: `+` (the next line is DONE) or a tagged answer (refused). */
  IDLE: 2,
  /** COMPRESS: tagged OK (deflate from here on) or anything else (still plaintext). */
  COMPRESS: 3,
} as const;

/** What the client did that the proxy does not let through. */
export const Verdict = {
  NONE: 0,
  UNAUTHENTICATE: 1,
  /** A literal count no client sends (the framing would be lost). */
  LOST: 2,
  /** COMPRESS where the server offered UNAUTHENTICATE (see `shownAtLogin`). */
  COMPRESS: 3,
} as const;

const Phase = { TAG: 0, NAME: 1, ARGS: 2, RAW: 3 } as const;
/** How the current line ends so far (only a literal count at its end matters). */
const End = { MID: 0, OPEN: 1, DIGITS: 2, PLUS: 3, CLOSE: 4, CLOSE_NS: 5, CR: 6, CR_NS: 7 } as const;
/** The command names looked for, as bits of `ClientCommands.candidates`. */
const NAMES = ['UNAUTHENTICATE', 'COMPRESS', 'IDLE', 'LOGOUT'].map((n) => Buffer.from(n, 'latin1'));
const ALL_NAMES = (1 << NAMES.length) - 1;
const Cmd = { OTHER: 0, UNAUTHENTICATE: 1, COMPRESS: 2, IDLE: 3, LOGOUT: 4 } as const;

const FNV_OFFSET = 0x811c9dc5;
const FNV_PRIME = 0x01000193;

/** `OK` as the response head reader packs a status word. */
const STATUS_OK = ((79 & 0x1f) << 5) | (75 & 0x1f);

/** The tracker's state; one per spliced IMAP session. */
export class ClientCommands {
  constructor(
    /** COMPRESS is refused too (the server offers UNAUTHENTICATE, which deflate would hide). */
    readonly refuseCompress = false,
  ) {}

  /** Literal bytes still to come from the client. */
  litLeft = 0;
  phase: number = Phase.TAG;
  end: number = End.MID;
  /** The literal count being read. */
  value = 0;
  /** The current command's tag, hashed. */
  tag = FNV_OFFSET;
  /** Bits of NAMES the command name so far still matches, and how many of its bytes were read. */
  candidates = ALL_NAMES;
  nameLen = 0;
  /** The current command, once its name is known (Cmd). */
  cmd: number = Cmd.OTHER;
  /** Set when the client must wait for the server (Wait), for the command tagged `waitTag`. */
  wait: number = Wait.NONE;
  waitTag = 0;
  /** Set when the client used something the proxy refuses (Verdict). */
  verdict: number = Verdict.NONE;
  /** Set once the client sent LOGOUT: the backend closing then is the client's doing (for the log). */
  loggedOut = false;
  /** Set once COMPRESS was accepted: the stream is deflate both ways and nothing is tracked any more. */
  compressed = false;
  /** Reading a server response's head while waiting: 0 not in one, 1 tag, 2 status word. */
  headPhase = 0;
  headTag = FNV_OFFSET;
  headStatus = 0;
}

/**
 * Feeds client bytes `c[from..]` through the tracker. Returns the index up to which they may
 * be passed to the server: `c.length`, or less when the tracker stopped, because the client
 * must now wait for the server (`t.wait`) or used a refused command (`t.verdict`; then nothing
 * of this command was complete, and nothing more may be passed). Never throws.
 */
export function trackCommands(t: ClientCommands, c: Uint8Array, from = 0): number {
  const len = c.length;
  let pos = from;
  while (pos < len) {
    if (t.litLeft > 0) {
      const take = Math.min(t.litLeft, len - pos);
      t.litLeft -= take;
      pos += take;
      continue;
    }
    const b = c[pos++]!;
    if (b === LF) {
      if (lineEnd(t)) return pos;
      if (t.verdict) return pos - 1;
      continue;
    }
    if (t.phase === Phase.TAG) {
      if (b === SP) t.phase = Phase.NAME;
      else t.tag = Math.imul(t.tag ^ b, FNV_PRIME) >>> 0;
    } else if (t.phase === Phase.NAME) {
      if (b === SP || b === CR) {
        if (nameEnd(t)) return pos - 1;
      } else if (t.candidates !== 0) {
        matchName(t, b);
      }
    }
    if (t.phase !== Phase.RAW) lineTail(t, b);
  }
  return len;
}

/** Narrows the candidate names by the next byte of the command name (ASCII, any case). */
function matchName(t: ClientCommands, b: number): void {
  const upper = b >= 97 && b <= 122 ? b - 32 : b;
  const i = t.nameLen++;
  let cand = t.candidates;
  for (let k = 0; k < NAMES.length; k++) {
    if (cand & (1 << k) && NAMES[k]![i] !== upper) cand &= ~(1 << k);
  }
  t.candidates = cand;
}

/** The command name is complete. True when the client used a refused command. */
function nameEnd(t: ClientCommands): boolean {
  t.phase = Phase.ARGS;
  for (let k = 0; k < NAMES.length; k++) {
    if (t.candidates & (1 << k) && NAMES[k]!.length === t.nameLen) t.cmd = k + 1;
  }
  if (t.cmd === Cmd.UNAUTHENTICATE) {
    t.verdict = Verdict.UNAUTHENTICATE;
    return true;
  }
  if (t.cmd === Cmd.COMPRESS && t.refuseCompress) {
    t.verdict = Verdict.COMPRESS;
    return true;
  }
  return false;
}

/** Follows a literal count at the end of the line, byte by byte. */
function lineTail(t: ClientCommands, b: number): void {
  const e = t.end;
  if (b === OPEN_BRACE) {
    t.end = End.OPEN;
    t.value = 0;
  } else if (b >= ZERO && b <= NINE && (e === End.OPEN || e === End.DIGITS)) {
    t.end = End.DIGITS;
    t.value = t.value > MAX_LITERAL ? t.value : t.value * 10 + (b - ZERO);
  } else if (b === PLUS && e === End.DIGITS) {
    t.end = End.PLUS;
  } else if (b === CLOSE_BRACE && (e === End.DIGITS || e === End.PLUS)) {
    t.end = e === End.DIGITS ? End.CLOSE : End.CLOSE_NS;
  } else if (b === CR && (e === End.CLOSE || e === End.CLOSE_NS)) {
    t.end = e === End.CLOSE ? End.CR : End.CR_NS;
  } else {
    t.end = End.MID;
  }
}

/**
 * A client line ended (a bare LF is taken like CRLF, as servers do). True when the client
 * must now wait for the server's answer.
 */
function lineEnd(t: ClientCommands): boolean {
  if (t.phase === Phase.NAME && nameEnd(t)) return false; // the verdict stops the caller
  const e = t.end;
  t.end = End.MID;
  if (t.phase !== Phase.RAW && e !== End.MID && e !== End.OPEN && e !== End.DIGITS && e !== End.PLUS) {
    if (t.value > MAX_LITERAL) {
      t.verdict = Verdict.LOST;
      return false;
    }
    if (e === End.CLOSE_NS || e === End.CR_NS) {
      t.litLeft = t.value; // LITERAL+: the bytes follow at once, and the command goes on after them
      return false;
    }
    waitFor(t, Wait.LITERAL);
    return true;
  }
  // The command is complete.
  const cmd = t.cmd;
  if (cmd === Cmd.LOGOUT) t.loggedOut = true;
  if (cmd === Cmd.COMPRESS || cmd === Cmd.IDLE) waitFor(t, cmd === Cmd.COMPRESS ? Wait.COMPRESS : Wait.IDLE);
  nextCommand(t);
  return cmd === Cmd.COMPRESS || cmd === Cmd.IDLE;
}

function nextCommand(t: ClientCommands): void {
  t.phase = Phase.TAG;
  t.tag = FNV_OFFSET;
  t.candidates = ALL_NAMES;
  t.nameLen = 0;
  t.cmd = Cmd.OTHER;
}

function waitFor(t: ClientCommands, w: number): void {
  t.wait = w;
  t.waitTag = t.tag;
  t.headPhase = 0;
}

/**
 * Reads the head (tag and status word) of a server response; `start` says that `c[from]`
 * begins one. Returns the index after the head's last byte read, and resolves `t.wait` when
 * this was the answer.
 */
function readResponseHead(t: ClientCommands, c: Uint8Array, from: number, start: boolean): number {
  const len = c.length;
  let pos = from;
  if (start) {
    t.headPhase = 1;
    t.headTag = FNV_OFFSET;
    t.headStatus = 0;
    const b = c[pos]!;
    if (b === PLUS) {
      t.headPhase = 0;
      continued(t);
      return pos + 1;
    }
    if (b === STAR) {
      t.headPhase = 0;
      return pos + 1;
    }
  }
  while (pos < len && t.headPhase !== 0) {
    const b = c[pos++]!;
    if (b === LF || ((b === SP || b === CR) && t.headPhase === 2)) {
      if (t.headPhase === 2) tagged(t, t.headTag, t.headStatus);
      t.headPhase = 0;
    } else if (t.headPhase === 1) {
      if (b === SP) t.headPhase = 2;
      else t.headTag = Math.imul(t.headTag ^ b, FNV_PRIME) >>> 0;
    } else {
      t.headStatus = t.headStatus < 1 << 15 ? (t.headStatus << 5) | (b & 0x1f) : 1 << 20;
    }
  }
  return pos;
}

/** The server sent a continuation request `+`: the one command that waits for one has it. */
function continued(t: ClientCommands): void {
  if (t.wait === Wait.LITERAL) {
    t.litLeft = t.value;
    t.wait = Wait.NONE;
  } else if (t.wait === Wait.IDLE) {
    t.phase = Phase.RAW; // the next line is DONE (anything else ends the IDLE: no literals)
    t.wait = Wait.NONE;
  }
}

/** A tagged response: the answer to the waiting command if the tags match. */
function tagged(t: ClientCommands, tag: number, status: number): void {
  if (tag !== t.waitTag) return;
  if (t.wait === Wait.LITERAL) {
    nextCommand(t); // refused: the literal never comes, and the command has ended
  } else if (t.wait === Wait.COMPRESS && status === STATUS_OK) {
    t.compressed = true;
  }
  t.wait = Wait.NONE;
}

/**
 * Feeds server bytes `c` (in order) through the response framing tracker `f`; while the
 * client waits for an answer (`t.wait`), the head of every response is read too, until the
 * answer comes. Once the stream is deflate, nothing past the answer is tracked.
 */
export function watchAnswers(t: ClientCommands, f: FramingState, c: Uint8Array): void {
  const len = c.length;
  let pos = 0;
  while (pos < len && t.wait !== Wait.NONE) {
    let next: number;
    if (t.headPhase !== 0 || atResponseBoundary(f)) {
      next = readResponseHead(t, c, pos, t.headPhase === 0);
    } else if (f.litLeft > 0) {
      next = pos + Math.min(f.litLeft, len - pos);
    } else {
      const lf = c.indexOf(LF, pos);
      next = lf < 0 ? len : lf + 1;
    }
    trackFraming(f, c.subarray(pos, next));
    pos = next;
  }
  if (pos < len && !t.compressed) trackFraming(f, c.subarray(pos));
}

/**
 * The backend's login answer (untagged lines, tagged OK text) as the client is shown it:
 * without UNAUTHENTICATE (RFC 8437), which the splice refuses. Where the server offered it
 * (Cyrus does to admins logged in as themselves), COMPRESS is hidden and refused too: after
 * COMPRESS the client's commands are deflate, which the splice does not read, so an
 * UNAUTHENTICATE inside it would pass unseen. A later CAPABILITY answer from the backend
 * still lists them; using them ends the session.
 */
export function shownAtLogin(untagged: readonly string[], okText: string): { untagged: string[]; okText: string; refuseCompress: boolean } {
  const offered = [okText, ...untagged].some((l) => capabilitiesIn(l)?.has('UNAUTHENTICATE'));
  if (!offered) return { untagged: [...untagged], okText, refuseCompress: false };
  return { untagged: untagged.map(withoutRefused), okText: withoutRefused(okText), refuseCompress: true };
}

function withoutRefused(line: string): string {
  return line.replace(/\[CAPABILITY [^\]]*\]|^\* CAPABILITY .*$/i, (list) => list.replace(/ (UNAUTHENTICATE|COMPRESS=[^ \]]*)(?=[ \]]|$)/gi, ''));
}
