// The bytes the IMAP scanners look for, by name: the server-side framing (imap-framing.ts)
// and the client-side command tracker (imap-commands.ts) read the same grammar.

export const LF = 10;
export const CR = 13;
export const SP = 32;
export const STAR = 42;
export const PLUS = 43;
export const ZERO = 48;
export const NINE = 57;
export const OPEN_BRACE = 123;
export const CLOSE_BRACE = 125;

/**
 * Literal counts above this are not literals any peer sends (256 TiB): the stream's framing
 * is taken as lost rather than counted on in floating point.
 */
export const MAX_LITERAL = 2 ** 48;
