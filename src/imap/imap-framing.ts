// Where the responses are in an IMAP server's byte stream, so that the proxy can put a
// `* BYE` between two of them and never inside one. A response is a line, unless that line
// ends with a literal count (`{n}` or BINARY's `~{n}`): then n bytes of literal data follow
// and the response goes on after them. Literal data may contain line ends (a FETCH of a
// message is one literal of many lines), so "the last byte was LF" is not a boundary.
//
// The cost is what the splice had to pay anyway plus a little: one native search for each
// line end (`indexOf`), a look at the few bytes before it, and skipping literal bytes by
// arithmetic. No allocation; the state is three numbers kept on the session itself.

import { CLOSE_BRACE, CR, LF, MAX_LITERAL, NINE, OPEN_BRACE, ZERO } from './bytes.js';

/** The state, as plain fields on the owner (the spliced session), not an object of its own. */
export interface FramingState {
  /** Literal bytes still to come; Infinity once the framing is lost (never a boundary again). */
  litLeft: number;
  /** Where the current line stands: one of the `Mark` values below. */
  mark: number;
  /** The value of the digits of a literal count being read (meaningful from DIGITS on). */
  markValue: number;
}

/** What the current line ends with so far. */
export const Mark = {
  /** At the start of a response: a boundary when no literal is pending. */
  START: 0,
  /** Inside a line, not ending with any part of a literal count. */
  MID: 1,
  /** `{` */
  OPEN: 2,
  /** `{` and one or more digits */
  DIGITS: 3,
  /** `{n}` */
  CLOSE: 4,
  /** `{n}` CR */
  CR: 5,
} as const;

/** The state of a fresh stream: at a response boundary. */
export function initialFraming(s: FramingState): void {
  s.litLeft = 0;
  s.mark = Mark.START;
  s.markValue = 0;
}

/** True when the bytes seen so far end exactly between two responses. */
export function atResponseBoundary(s: FramingState): boolean {
  return s.litLeft === 0 && s.mark === Mark.START;
}

/** Feeds `c` (server to client bytes, in order) through the tracker. Never throws. */
export function trackFraming(s: FramingState, c: Uint8Array): void {
  const len = c.length;
  let pos = 0;
  while (pos < len) {
    if (s.litLeft > 0) {
      const take = Math.min(s.litLeft, len - pos);
      s.litLeft -= take; // Infinity stays Infinity
      pos += take;
      continue;
    }
    const lf = c.indexOf(LF, pos);
    if (lf < 0) {
      lineSuffix(s, c, pos, len);
      return;
    }
    lineSuffix(s, c, pos, lf);
    if (s.mark === Mark.CLOSE || s.mark === Mark.CR) {
      // The line ended with a literal count (a bare LF is taken like CRLF): its data comes
      // next, and after it the same response goes on.
      // A count past MAX_LITERAL loses the framing: an event then closes the connection
      // instead of saying BYE, nothing worse.
      s.litLeft = s.markValue > MAX_LITERAL ? Infinity : s.markValue;
      s.mark = Mark.MID;
    } else {
      s.mark = Mark.START;
    }
    s.markValue = 0;
    pos = lf + 1;
  }
}

/**
 * Sets the line state after the bytes [from, end) (none of them LF) are added to the line
 * whose state is in `s`. Read backwards from the end: only a literal count's few bytes at the
 * end of a line matter, and most lines show at their last or second-to-last byte that they
 * end with none. Where the bytes run out, the state carried from the previous chunk decides.
 */
function lineSuffix(s: FramingState, c: Uint8Array, from: number, end: number): void {
  if (end <= from) return;
  let i = end - 1;
  let cr = false;
  if (c[i] === CR) {
    cr = true;
    if (--i < from) {
      // This chunk adds only the CR.
      s.mark = s.mark === Mark.CLOSE ? Mark.CR : Mark.MID;
      return;
    }
  }
  let close = false;
  if (c[i] === CLOSE_BRACE) {
    close = true;
    i--;
  } else if (cr) {
    s.mark = Mark.MID;
    return;
  }
  // The digits just before, read backwards; `scale` is 10 to the number of digits read.
  let value = 0;
  let scale = 1;
  while (i >= from) {
    const b = c[i]!;
    if (b < ZERO || b > NINE) break;
    // Zeros add nothing (and 0 * Infinity, for absurdly long counts, would be NaN).
    if (b !== ZERO) value += (b - ZERO) * scale;
    scale *= 10;
    i--;
  }
  const digits = scale > 1;
  if (i >= from) {
    if (c[i] !== OPEN_BRACE) {
      s.mark = Mark.MID;
    } else if (close) {
      // `{}` is no count.
      setCount(s, digits ? Mark.CLOSE : Mark.MID, cr, value);
    } else {
      s.mark = digits ? Mark.DIGITS : Mark.OPEN;
      s.markValue = value;
    }
    return;
  }
  // These bytes are all part of a count (or nothing was before them in this chunk): whether
  // they continue one depends on how the line stood before them.
  if (s.mark !== Mark.OPEN && s.mark !== Mark.DIGITS) {
    s.mark = Mark.MID;
    return;
  }
  const hadDigits = s.mark === Mark.DIGITS;
  const total = s.markValue === 0 ? value : s.markValue * scale + value;
  if (close) {
    setCount(s, hadDigits || digits ? Mark.CLOSE : Mark.MID, cr, total);
  } else {
    s.mark = hadDigits || digits ? Mark.DIGITS : Mark.OPEN;
    s.markValue = total;
  }
}

function setCount(s: FramingState, mark: number, cr: boolean, value: number): void {
  if (mark === Mark.MID) {
    s.mark = Mark.MID;
    return;
  }
  s.mark = cr ? Mark.CR : Mark.CLOSE;
  s.markValue = value;
}
