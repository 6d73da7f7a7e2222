import { ImapSyntaxError, literalAtEnd, replyTag, tokenize, validTag, type Token } from './imap-syntax.js';
import type { LineReader } from '../net/lines.js';

// Reading one pre-auth IMAP command with its literals, apart from the dialogue so that it
// can be driven by random input in the property tests. Every answer it produces echoes a
// tag only after checking it (validTag); nothing else from the client is echoed.

export interface ImapCommand {
  tag: string;
  /** Upper-cased. */
  name: string;
  args: Token[];
}

/** LOGIN needs two literals, ID a few more; past this a command is refused. */
export const MAX_LITERALS = 4;

export type CommandRead =
  | { kind: 'command'; command: ImapCommand }
  /** The command was refused; `reply` answers it and it counts as a bad command. */
  | { kind: 'bad'; reply: string }
  /** The connection must end after `reply` (a LITERAL+ literal we will not read is on its way). */
  | { kind: 'fatal'; reply: string };

export interface CommandSource {
  reader: LineReader;
  /** Writes to the client (the "+" continuation of a synchronising literal). */
  write(s: string): void;
  literalSize: number;
}

/**
 * Reads one command. Throws only what the reader throws (LineTooLong, ConnectionClosed, a
 * timeout); every syntax problem comes back as `bad`. Lines are latin1: one char per byte.
 */
export async function readImapCommand(src: CommandSource): Promise<CommandRead> {
  const segments: string[] = [];
  const literals: Buffer[] = [];
  for (;;) {
    const line = await src.reader.line('latin1');
    const lit = literalAtEnd(line);
    if (!lit) {
      segments.push(line);
      break;
    }
    const why = literals.length >= MAX_LITERALS ? 'Too many literals' : lit.size > src.literalSize ? 'Literal too large' : undefined;
    if (why) {
      const tag = replyTag(segments[0] ?? line);
      // A synchronising literal is refused before the client sends it; a LITERAL+ one is
      // already on its way and cannot be skipped safely, so that connection ends.
      if (lit.nonSync) return { kind: 'fatal', reply: `${tag} BAD [LIMIT] ${why}\r\n* BYE [LIMIT] ${why}\r\n` };
      return { kind: 'bad', reply: `${tag} BAD [LIMIT] ${why}\r\n` };
    }
    segments.push(lit.prefix);
    if (!lit.nonSync) src.write('+ Ready for literal data\r\n');
    literals.push(await src.reader.bytes(lit.size));
  }
  let tokens: Token[];
  try {
    tokens = tokenize(segments, literals);
  } catch (e) {
    if (!(e instanceof ImapSyntaxError)) throw e;
    return { kind: 'bad', reply: `${replyTag(segments[0]!)} BAD ${e.message}\r\n` };
  }
  const [tag, name] = tokens;
  if (tag?.kind !== 'atom' || !validTag(tag.text)) return { kind: 'bad', reply: '* BAD Missing or invalid tag\r\n' };
  if (name?.kind !== 'atom') return { kind: 'bad', reply: `${tag.text} BAD Missing command\r\n` };
  return { kind: 'command', command: { tag: tag.text, name: name.text.toUpperCase(), args: tokens.slice(2) } };
}
