import type { Socket } from 'node:net';
import type { BackendTlsConfig } from '../config.js';
import { asBackendRefused, BackendLines, BackendRefused, MAX_BACKEND_LINE, printable, startBackendTls } from '../net/backend.js';
import { backendIdCommand } from './hop.js';
import { capabilitiesIn, encodeAstring } from './imap-syntax.js';
import { LineReader } from '../net/lines.js';
import type { BackendCredentials } from '../auth/identity.js';
import { encodeTokenMessage, errorAcknowledgement } from '../auth/oauth-payload.js';
import { encodePlain } from '../auth/sasl.js';

/** Already mapped to the backend's name for the user where needed. */
export type ImapCredentials = BackendCredentials;

export interface ImapBackendLogin {
  socket: Socket;
  /** Untagged lines the client should see before the tagged answer (e.g. CAPABILITY). */
  untagged: string[];
  /** The backend's tagged OK without its tag, e.g. `OK [CAPABILITY ...] Logged in`. */
  okText: string;
  /** Bytes the backend sent past its tagged answer. */
  rest: Buffer;
}

/**
 * The status word of a response text (`OK [..] text` -> `OK`), matched exactly and
 * case-insensitively (RFC 9051 section 9): `OKAY` is no OK.
 */
export function imapStatus(text: string): 'OK' | 'NO' | 'BAD' | 'BYE' | 'PREAUTH' | undefined {
  const m = /^(OK|NO|BAD|BYE|PREAUTH)(?: |$)/i.exec(text);
  return m ? (m[1]!.toUpperCase() as 'OK' | 'NO' | 'BAD' | 'BYE' | 'PREAUTH') : undefined;
}

/**
 * Reads untagged lines until the tagged reply to `tag`; returns both. The lines count
 * against the dialogue's limits (BackendLines), so a backend streaming untagged lines
 * fails the login instead of growing this list.
 */
async function untilTagged(reader: BackendLines, tag: string): Promise<{ untagged: string[]; tagged: string }> {
  const untagged: string[] = [];
  for (;;) {
    const line = await reader.line();
    if (line.startsWith(`${tag} `)) return { untagged, tagged: line.slice(tag.length + 1) };
    if (line.startsWith('* ') && imapStatus(line.slice(2)) === 'BYE') throw new BackendRefused('unavailable', `backend said ${printable(line)}`);
    untagged.push(line);
  }
}

/**
 * untilTagged for a token login: a continuation before the tagged reply is the RFC 7628
 * error challenge (a refused token), answered with the mechanism's acknowledgement so
 * that the backend sends its NO. At most one: a second is a backend we do not understand.
 */
async function untilTaggedAcknowledging(reader: BackendLines, sock: Socket, tag: string, ack: Buffer): Promise<{ untagged: string[]; tagged: string }> {
  const untagged: string[] = [];
  let challenged = false;
  for (;;) {
    const line = await reader.line();
    if (line.startsWith(`${tag} `)) return { untagged, tagged: line.slice(tag.length + 1) };
    if (line.startsWith('+')) {
      if (challenged) throw new BackendRefused('unavailable', 'backend sent a second challenge to a token login');
      challenged = true;
      sock.write(`${ack.toString('base64')}\r\n`);
      continue;
    }
    if (line.startsWith('* ') && imapStatus(line.slice(2)) === 'BYE') throw new BackendRefused('unavailable', `backend said ${printable(line)}`);
    untagged.push(line);
  }
}

async function capability(sock: Socket, reader: BackendLines): Promise<Set<string>> {
  sock.write('C CAPABILITY\r\n');
  const { untagged } = await untilTagged(reader, 'C');
  for (const l of untagged) {
    const caps = capabilitiesIn(l);
    if (caps) return caps;
  }
  return new Set();
}

/**
 * Logs in to an IMAP backend with the client's credentials (the backend checks the
 * password). Prefers AUTHENTICATE PLAIN with SASL-IR (one round trip, any bytes), else
 * LOGIN. Throws BackendRefused: `auth` when the backend said NO to the credentials,
 * `unavailable` for anything else.
 */
export async function imapBackendLogin(
  socket: Socket,
  host: string,
  creds: ImapCredentials,
  opts: { tls: BackendTlsConfig; clientIp: string; clientPort: number; forwardClientIp: boolean; sessionId?: string },
): Promise<ImapBackendLogin> {
  let sock = socket;
  const reader = new BackendLines(new LineReader(sock, MAX_BACKEND_LINE));
  try {
    const greeting = await reader.line();
    if (!greeting.startsWith('* ') || imapStatus(greeting.slice(2)) !== 'OK') {
      throw new BackendRefused('unavailable', `backend greeted with ${printable(greeting)}`);
    }
    let caps = capabilitiesIn(greeting) ?? (await capability(sock, reader));

    if (opts.tls.mode === 'starttls') {
      if (!caps.has('STARTTLS')) throw new BackendRefused('unavailable', 'backend does not offer STARTTLS');
      sock.write('S STARTTLS\r\n');
      const { tagged } = await untilTagged(reader, 'S');
      if (imapStatus(tagged) !== 'OK') throw new BackendRefused('unavailable', `backend STARTTLS: ${printable(tagged)}`);
      reader.reader.detach();
      sock = await startBackendTls(sock, host, opts.tls);
      reader.reader = new LineReader(sock, MAX_BACKEND_LINE);
      caps = await capability(sock, reader); // RFC 9051 6.2.1: capabilities may change after TLS
    }

    // Pipelined: the ID (the hop mark that stops routing loops, and the client's address if
    // forwarded; see hop.ts) and the login.
    let out = '';
    if (caps.has('ID')) out += backendIdCommand(opts);
    const plainIr = caps.has('AUTH=PLAIN') && caps.has('SASL-IR');
    let answer: { untagged: string[]; tagged: string } | undefined;
    if (creds.kind === 'token') {
      // oauth: passthrough: the backend checks the token (Dovecot's oauth2 passdb).
      const mech = creds.mechanism;
      if (!caps.has(`AUTH=${mech}`)) throw new BackendRefused('unavailable', `backend does not offer AUTH=${mech} (oauth: passthrough needs a backend that checks tokens)`);
      const msg = encodeTokenMessage(mech, creds.user.toString('utf8'), creds.token);
      if (!msg) throw new BackendRefused('auth', 'login not representable in a token message');
      const ir = caps.has('SASL-IR');
      out += ir ? `L AUTHENTICATE ${mech} ${msg.toString('base64')}\r\n` : `L AUTHENTICATE ${mech}\r\n`;
      sock.write(out);
      if (out.includes('I ID')) await untilTagged(reader, 'I');
      if (!ir) {
        const cont = await reader.line();
        if (!cont.startsWith('+')) throw new BackendRefused('unavailable', `backend AUTHENTICATE: ${printable(cont)}`);
        sock.write(`${msg.toString('base64')}\r\n`);
      }
      answer = await untilTaggedAcknowledging(reader, sock, 'L', errorAcknowledgement(mech));
    } else if (plainIr || creds.authzid) {
      if (!caps.has('AUTH=PLAIN')) throw new BackendRefused('auth', 'backend does not offer AUTH=PLAIN for a proxy login');
      const msg = encodePlain(creds);
      out += plainIr ? `L AUTHENTICATE PLAIN ${msg.toString('base64') || '='}\r\n` : 'L AUTHENTICATE PLAIN\r\n';
      sock.write(out);
      if (out.includes('I ID')) await untilTagged(reader, 'I');
      if (!plainIr) {
        const cont = await reader.line();
        if (!cont.startsWith('+')) throw new BackendRefused('unavailable', `backend AUTHENTICATE: ${printable(cont)}`);
        sock.write(`${msg.toString('base64')}\r\n`);
      }
    } else {
      if (caps.has('LOGINDISABLED')) throw new BackendRefused('unavailable', 'backend has LOGINDISABLED; configure backend.tls');
      const literalPlus = caps.has('LITERAL+');
      sock.write(out);
      if (out.includes('I ID')) await untilTagged(reader, 'I');
      // Each argument goes as atom, quoted string or literal; a synchronising literal waits
      // for the backend's "+" before its bytes.
      let line = 'L LOGIN';
      for (const value of [creds.authcid, creds.password]) {
        const arg = encodeAstring(value, literalPlus);
        line += ` ${arg.head}`;
        if (!arg.literal) continue;
        sock.write(`${line}\r\n`);
        if (!literalPlus) {
          const cont = await reader.line();
          if (!cont.startsWith('+')) throw new BackendRefused('unavailable', `backend refused literal: ${printable(cont)}`);
        }
        sock.write(arg.literal);
        line = '';
      }
      sock.write(`${line}\r\n`);
    }

    const { untagged, tagged } = answer ?? (await untilTagged(reader, 'L'));
    const status = imapStatus(tagged);
    if (status === 'OK') {
      const okText = tagged;
      if (!/\[CAPABILITY /i.test(okText) && !untagged.some((l) => /^\* CAPABILITY /i.test(l))) {
        // The client must learn what it now talks to: fetch the post-login list for it.
        sock.write('C CAPABILITY\r\n');
        const more = await untilTagged(reader, 'C');
        untagged.push(...more.untagged.filter((l) => /^\* CAPABILITY /i.test(l)));
      }
      return { socket: sock, untagged, okText, rest: reader.reader.detach() };
    }
    if (status === 'NO') {
      const temporary = /^NO \[(UNAVAILABLE|SERVERBUG|INUSE|LIMIT|CONTACTADMIN|EXPIRED)[\] ]/i.test(tagged);
      throw new BackendRefused(temporary ? 'unavailable' : 'auth', `backend said ${printable(tagged)}`);
    }
    throw new BackendRefused('unavailable', `backend login: ${printable(tagged)}`);
  } catch (e) {
    reader.reader.detach();
    sock.destroy();
    throw asBackendRefused(e);
  }
}
