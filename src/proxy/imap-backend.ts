import type { Socket } from 'node:net';
import type { BackendTlsConfig } from '../config.js';
import { asBackendRefused, BackendRefused, MAX_BACKEND_LINE, startBackendTls } from './backend.js';
import { capabilitiesIn, encodeAstring, quoted } from './imap-syntax.js';
import { LineReader } from './lines.js';
import type { PlainCredentials } from './sasl.js';

/** Already mapped to the backend's name for the user where needed. */
export type ImapCredentials = PlainCredentials;

export interface ImapBackendLogin {
  socket: Socket;
  /** Untagged lines the client should see before the tagged answer (e.g. CAPABILITY). */
  untagged: string[];
  /** The backend's tagged OK without its tag, e.g. `OK [CAPABILITY ...] Logged in`. */
  okText: string;
  /** Bytes the backend sent past its tagged answer. */
  rest: Buffer;
}

/** Reads untagged lines until the tagged reply to `tag`; returns both. */
async function untilTagged(reader: LineReader, tag: string): Promise<{ untagged: string[]; tagged: string }> {
  const untagged: string[] = [];
  for (;;) {
    const line = await reader.line();
    if (line.startsWith(`${tag} `)) return { untagged, tagged: line.slice(tag.length + 1) };
    if (line.startsWith('* BYE')) throw new BackendRefused('unavailable', `backend said ${line}`);
    untagged.push(line);
  }
}

async function capability(sock: Socket, reader: LineReader): Promise<Set<string>> {
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
  opts: { tls: BackendTlsConfig; clientIp: string; clientPort: number; forwardClientIp: boolean },
): Promise<ImapBackendLogin> {
  let sock = socket;
  let reader = new LineReader(sock, MAX_BACKEND_LINE);
  try {
    const greeting = await reader.line();
    if (!greeting.startsWith('* OK')) throw new BackendRefused('unavailable', `backend greeted with ${greeting.slice(0, 200)}`);
    let caps = capabilitiesIn(greeting) ?? (await capability(sock, reader));

    if (opts.tls.mode === 'starttls') {
      if (!caps.has('STARTTLS')) throw new BackendRefused('unavailable', 'backend does not offer STARTTLS');
      sock.write('S STARTTLS\r\n');
      const { tagged } = await untilTagged(reader, 'S');
      if (!tagged.startsWith('OK')) throw new BackendRefused('unavailable', `backend STARTTLS: ${tagged}`);
      reader.detach();
      sock = await startBackendTls(sock, host, opts.tls);
      reader = new LineReader(sock, MAX_BACKEND_LINE);
      caps = await capability(sock, reader); // RFC 9051 6.2.1: capabilities may change after TLS
    }

    // Pipelined: the optional ID (client address for the backend's logs and limits) and the login.
    let out = '';
    if (opts.forwardClientIp && caps.has('ID')) {
      out += `I ID ("x-originating-ip" ${quoted(opts.clientIp)} "x-originating-port" "${opts.clientPort}")\r\n`;
    }
    const plainIr = caps.has('AUTH=PLAIN') && caps.has('SASL-IR');
    if (plainIr || creds.authzid) {
      if (!caps.has('AUTH=PLAIN')) throw new BackendRefused('auth', 'backend does not offer AUTH=PLAIN for a proxy login');
      const msg = Buffer.concat([creds.authzid ?? Buffer.alloc(0), Buffer.from([0]), creds.authcid, Buffer.from([0]), creds.password]);
      out += plainIr ? `L AUTHENTICATE PLAIN ${msg.toString('base64') || '='}\r\n` : 'L AUTHENTICATE PLAIN\r\n';
      sock.write(out);
      if (out.includes('I ID')) await untilTagged(reader, 'I');
      if (!plainIr) {
        const cont = await reader.line();
        if (!cont.startsWith('+')) throw new BackendRefused('unavailable', `backend AUTHENTICATE: ${cont}`);
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
          if (!cont.startsWith('+')) throw new BackendRefused('unavailable', `backend refused literal: ${cont}`);
        }
        sock.write(arg.literal);
        line = '';
      }
      sock.write(`${line}\r\n`);
    }

    const { untagged, tagged } = await untilTagged(reader, 'L');
    if (tagged.startsWith('OK')) {
      const okText = tagged;
      if (!/\[CAPABILITY /i.test(okText) && !untagged.some((l) => /^\* CAPABILITY /i.test(l))) {
        // The client must learn what it now talks to: fetch the post-login list for it.
        sock.write('C CAPABILITY\r\n');
        const more = await untilTagged(reader, 'C');
        untagged.push(...more.untagged.filter((l) => /^\* CAPABILITY /i.test(l)));
      }
      return { socket: sock, untagged, okText, rest: reader.detach() };
    }
    if (tagged.startsWith('NO')) {
      const temporary = /\[(UNAVAILABLE|SERVERBUG|INUSE|LIMIT|CONTACTADMIN|EXPIRED)\]/i.test(tagged);
      throw new BackendRefused(temporary ? 'unavailable' : 'auth', `backend said NO: ${tagged.slice(0, 200)}`);
    }
    throw new BackendRefused('unavailable', `backend login: ${tagged.slice(0, 200)}`);
  } catch (e) {
    reader.detach();
    sock.destroy();
    throw asBackendRefused(e);
  }
}
