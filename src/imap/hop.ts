// Routing loops through several proxies (A -> B -> A): a backend connection to this process's
// own listeners is caught by OwnListeners, but one through another mailsplice is not. So every
// IMAP backend connection whose server offers ID says in it that it comes from a mailsplice,
// and a mailsplice refuses a login whose connection said so: mailsplice never fronts mailsplice.

import os from 'node:os';
import { quoted, type Token } from './imap-syntax.js';

export const HOP_KEY = 'x-mailsplice-hop';

/** Who sends the hop mark: enough for the other side's log to say where the loop goes. */
const HOP_VALUE = `${os.hostname()} pid ${process.pid}`;

/**
 * The ID command pipelined before a backend login: the hop mark always, the session id when
 * there is one (so the backend's log lines can be joined with the proxy's: Dovecot takes
 * `x-session-id` from its login_trusted_networks and logs it as `session=<...>`), and the
 * client's address (for the backend's logs and limits) when the operator wants it forwarded.
 */
export function backendIdCommand(opts: { clientIp: string; clientPort: number; forwardClientIp: boolean; sessionId?: string }): string {
  const client = opts.forwardClientIp ? ` "x-originating-ip" ${quoted(opts.clientIp)} "x-originating-port" "${opts.clientPort}"` : '';
  const session = opts.sessionId === undefined ? '' : ` "x-session-id" ${quoted(opts.sessionId)}`;
  return `I ID (${quoted(HOP_KEY)} ${quoted(HOP_VALUE)}${session}${client})\r\n`;
}

/**
 * The hop mark in the arguments of a client's ID command (`("key" "value" ...)` or NIL), as
 * printable text for the log; undefined when there is none.
 */
export function hopIn(args: readonly Token[]): string | undefined {
  if (args[0]?.kind !== 'open') return undefined;
  for (let i = 1; i + 1 < args.length; i += 2) {
    const key = args[i]!;
    if (key.kind !== 'string' || key.data.toString('latin1').toLowerCase() !== HOP_KEY) continue;
    const value = args[i + 1]!;
    const text = value.kind === 'string' ? value.data.toString('latin1') : value.kind === 'atom' ? value.text : '';
    return text.replace(/[^\x20-\x7e]/g, '?').slice(0, 200) || '(empty)';
  }
  return undefined;
}
