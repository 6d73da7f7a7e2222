import type { Socket } from 'node:net';
import type { BackendCredentials } from '../auth/identity.js';
import { encodeTokenMessage, errorAcknowledgement } from '../auth/oauth-payload.js';
import { encodePlain } from '../auth/sasl.js';
import type { BackendTlsConfig } from '../config.js';
import { asBackendRefused, BackendLines, BackendRefused, MAX_BACKEND_LINE, printable, startBackendTls } from '../net/backend.js';
import { LineReader } from '../net/lines.js';

// The backend half of a ManageSieve login (RFC 5804): the capability greeting, optional
// STARTTLS (after which the server says its capabilities again), then AUTHENTICATE PLAIN
// (with an authzid for the group's admin: Cyrus timsieved with proxyservers, a Dovecot
// master user) or the client's token mechanism (oauth: passthrough), with the initial
// response on the command line. Works with Dovecot's managesieved and Cyrus's timsieved.

export interface SieveBackendLogin {
  socket: Socket;
  /** The backend's OK answering the login, for the client to see. */
  okLine: string;
  rest: Buffer;
}

/** A response line's status word (RFC 5804 response-oknobye), or undefined for anything else. */
export function sieveStatus(line: string): 'OK' | 'NO' | 'BYE' | undefined {
  const m = /^(OK|NO|BYE)(?=[ (]|$)/i.exec(line);
  return m ? (m[1]!.toUpperCase() as 'OK' | 'NO' | 'BYE') : undefined;
}

/** A refusal that means "try later" (RFC 5804 TRYLATER), not "wrong credentials". */
function temporary(line: string): boolean {
  return /^NO \(TRYLATER\)/i.test(line) || sieveStatus(line) === 'BYE';
}

/**
 * Reads a capability response: lines `"NAME" ["value"]` up to the OK. Returns the upper-cased
 * names with their values.
 */
async function capabilities(reader: BackendLines): Promise<Map<string, string>> {
  const caps = new Map<string, string>();
  for (;;) {
    const line = await reader.line();
    const status = sieveStatus(line);
    if (status === 'OK') return caps;
    if (status) throw new BackendRefused('unavailable', `backend said ${printable(line)}`);
    const m = /^"([^"]*)"(?: "((?:[^"\\]|\\.)*)")?$/.exec(line);
    if (!m) throw new BackendRefused('unavailable', `backend capability line not understood: ${printable(line)}`);
    caps.set(m[1]!.toUpperCase(), (m[2] ?? '').replace(/\\(.)/g, '$1'));
  }
}

function offers(caps: Map<string, string>, mech: string): boolean {
  return (caps.get('SASL') ?? '').toUpperCase().split(/\s+/).includes(mech);
}

/** Skips a server string (quoted, or a literal `{n}` and its octets): the challenge of a refused token. */
async function skipString(line: string, reader: BackendLines): Promise<void> {
  const lit = /^\{(\d{1,6})\}$/.exec(line);
  if (lit) {
    await reader.reader.bytes(Number(lit[1]));
    await reader.line();
  }
}

export async function sieveBackendLogin(socket: Socket, host: string, creds: BackendCredentials, opts: { tls: BackendTlsConfig }): Promise<SieveBackendLogin> {
  let sock = socket;
  const reader = new BackendLines(new LineReader(sock, MAX_BACKEND_LINE));
  try {
    let caps = await capabilities(reader);
    if (opts.tls.mode === 'starttls') {
      if (!caps.has('STARTTLS')) throw new BackendRefused('unavailable', 'backend does not offer STARTTLS');
      sock.write('STARTTLS\r\n');
      const answer = await reader.line();
      if (sieveStatus(answer) !== 'OK') throw new BackendRefused('unavailable', `backend STARTTLS: ${printable(answer)}`);
      reader.reader.detach();
      sock = await startBackendTls(sock, host, opts.tls);
      reader.reader = new LineReader(sock, MAX_BACKEND_LINE);
      caps = await capabilities(reader); // RFC 5804 2.2: said again after TLS
    }
    let mech: string;
    let msg: Buffer;
    if (creds.kind === 'token') {
      mech = creds.mechanism;
      const m = encodeTokenMessage(mech as 'OAUTHBEARER', creds.user.toString('utf8'), creds.token);
      if (!m) throw new BackendRefused('auth', 'login not representable in a token message');
      msg = m;
    } else {
      mech = 'PLAIN';
      msg = encodePlain(creds);
    }
    if (!offers(caps, mech)) throw new BackendRefused('unavailable', `backend does not offer SASL ${mech}${caps.has('STARTTLS') && opts.tls.mode === 'none' ? ' (it offers STARTTLS: does it need backend TLS?)' : ''}`);
    sock.write(`AUTHENTICATE "${mech}" "${msg.toString('base64')}"\r\n`);
    let answer = await reader.line();
    if (!sieveStatus(answer) && creds.kind === 'token') {
      // A string instead of a status: the error challenge of a refused token (RFC 7628 3.2.2).
      await skipString(answer, reader);
      sock.write(`"${errorAcknowledgement(creds.mechanism).toString('base64')}"\r\n`);
      answer = await reader.line();
    }
    const status = sieveStatus(answer);
    if (status === 'OK') return { socket: sock, okLine: answer, rest: reader.reader.detach() };
    if (status === 'NO') throw new BackendRefused(temporary(answer) ? 'unavailable' : 'auth', `backend said ${printable(answer)}`);
    throw new BackendRefused('unavailable', `backend login: ${printable(answer)}`);
  } catch (e) {
    reader.reader.detach();
    sock.destroy();
    throw asBackendRefused(e);
  }
}
