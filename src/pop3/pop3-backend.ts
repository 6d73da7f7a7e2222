import type { Socket } from 'node:net';
import type { BackendTlsConfig } from '../config.js';
import { asBackendRefused, BackendLines, BackendRefused, MAX_BACKEND_LINE, printable, startBackendTls } from '../net/backend.js';
import type { PasswordCredentials } from '../auth/credentials.js';
import type { BackendCredentials } from '../auth/identity.js';
import { encodeTokenMessage, errorAcknowledgement } from '../auth/oauth-payload.js';
import { encodePlain } from '../auth/sasl.js';
import { LineReader } from '../net/lines.js';

// The backend half of a POP3 login (RFC 1939, 2449, 2595, 5034): greeting, CAPA, optional
// STLS, then AUTH PLAIN or USER/PASS with the client's own credentials. The backend checks
// the password; the proxy only carries it.

/** The same shape as IMAP's: SASL PLAIN's three fields, or a token to pass through. */
export type Pop3Credentials = BackendCredentials;

export interface Pop3BackendLogin {
  socket: Socket;
  /** The backend's `+OK ...` line answering the login, for the client to see. */
  okLine: string;
  /** Bytes the backend sent past that line. */
  rest: Buffer;
}

/** A CAPA answer longer than this is not a POP3 server we understand. */
const MAX_CAPA_LINES = 200;
/** RFC 5034 section 4: an AUTH command with its initial response must fit in 255 octets. */
const MAX_AUTH_LINE = 255;

/** Reads a CAPA answer (RFC 2449); an empty set when the backend does not know CAPA. */
async function capa(sock: Socket, reader: BackendLines): Promise<Set<string>> {
  sock.write('CAPA\r\n');
  const first = await reader.line();
  const caps = new Set<string>();
  if (!isOk(first)) return caps;
  for (let i = 0; ; i++) {
    const line = await reader.line();
    if (line === '.') return caps;
    if (i >= MAX_CAPA_LINES) throw new BackendRefused('unavailable', 'backend CAPA answer too long');
    caps.add(line.trim().toUpperCase());
  }
}

/** RFC 1939 status indicators, matched exactly: `+OKAY` is neither. */
export function isOk(line: string): boolean {
  return /^\+OK(?: |$)/.test(line);
}
export function isErr(line: string): boolean {
  return /^-ERR(?: |$)/.test(line);
}

function saslOffers(caps: Set<string>, mech: string): boolean {
  for (const c of caps) if (/^SASL( |$)/.test(c) && c.split(/\s+/).includes(mech)) return true;
  return false;
}

function saslPlain(caps: Set<string>): boolean {
  return saslOffers(caps, 'PLAIN');
}

/**
 * oauth: passthrough: AUTH OAUTHBEARER / XOAUTH2 with the client's token, for a backend
 * that checks it. A continuation after the message is the error challenge of a refused
 * token, acknowledged so that the backend sends its -ERR. Returns the final answer line.
 */
async function tokenLogin(sock: Socket, reader: BackendLines, caps: Set<string>, creds: BackendCredentials & { kind: 'token' }): Promise<string> {
  const mech = creds.mechanism;
  if (!saslOffers(caps, mech)) throw new BackendRefused('unavailable', `backend does not offer SASL ${mech} (oauth: passthrough needs a backend that checks tokens)`);
  const msg = encodeTokenMessage(mech, creds.user.toString('utf8'), creds.token);
  if (!msg) throw new BackendRefused('auth', 'login not representable in a token message');
  const b64 = msg.toString('base64');
  // RFC 5034: the command with its initial response fits in 255 octets, else it waits for "+".
  if (`AUTH ${mech} ${b64}`.length + 2 <= MAX_AUTH_LINE) {
    sock.write(`AUTH ${mech} ${b64}\r\n`);
  } else {
    sock.write(`AUTH ${mech}\r\n`);
    const cont = await reader.line();
    if (!cont.startsWith('+')) throw classifyErr(cont);
    sock.write(`${b64}\r\n`);
  }
  let answer = await reader.line();
  // A continuation ("+ <json>"), not "+OK": the error challenge of a refused token.
  if (/^\+(?: |$)/.test(answer)) {
    sock.write(`${errorAcknowledgement(mech).toString('base64')}\r\n`);
    answer = await reader.line();
  }
  return answer;
}

/** A refusal in the backend's own words, which a POP3 client may be shown as they are. */
export class Pop3Refused extends BackendRefused {
  constructor(
    kind: BackendRefused['kind'],
    /** The backend's -ERR line, printable ASCII only: a client may be shown it. */
    readonly line: string,
  ) {
    super(kind, `backend said ${line}`);
  }
}

/**
 * What a backend's -ERR to a login means (RFC 2449 section 8, RFC 3206): the mailbox is
 * busy, the server is in trouble, or the credentials are wrong. A bare -ERR is taken as
 * the last, as RFC 3206 tells clients of servers without response codes to do.
 */
export function classifyErr(raw: string): Pop3Refused {
  const line = printable(raw);
  const code = /^-ERR \[([^\]]+)\]/i.exec(line)?.[1]?.toUpperCase() ?? '';
  if (code === 'IN-USE' || code === 'LOGIN-DELAY') return new Pop3Refused('in-use', line);
  if (code.startsWith('SYS/')) return new Pop3Refused('unavailable', line);
  return new Pop3Refused('auth', line);
}

/** True when a value can go on a POP3 command line without ending or splitting it. */
function lineSafe(b: Buffer): boolean {
  return !b.includes(13) && !b.includes(10) && !b.includes(0);
}

/**
 * Logs in to a POP3 backend with the client's credentials. Prefers AUTH PLAIN (any bytes,
 * and the only way to carry a proxy authorisation), else USER/PASS. Throws BackendRefused:
 * `auth` when the backend refused the credentials, `in-use` when it said IN-USE or
 * LOGIN-DELAY, `unavailable` for anything else.
 */
export interface Pop3BackendOptions {
  tls: BackendTlsConfig;
  /** Tell the backend the client's address with XCLIENT when it offers it (Dovecot does to login_trusted_networks). */
  forwardClientIp?: boolean;
  clientIp?: string;
  clientPort?: number;
  /** Sent as XCLIENT SESSION (Dovecot logs it as session=<id>), with the address. */
  sessionId?: string;
}

export async function pop3BackendLogin(socket: Socket, host: string, creds: Pop3Credentials, opts: Pop3BackendOptions): Promise<Pop3BackendLogin> {
  let sock = socket;
  const reader = new BackendLines(new LineReader(sock, MAX_BACKEND_LINE));
  try {
    const greeting = await reader.line();
    if (!isOk(greeting)) throw new BackendRefused('unavailable', `backend greeted with ${printable(greeting)}`);
    let caps = await capa(sock, reader);

    if (opts.tls.mode === 'starttls') {
      // No CAPA (an RFC 1939-only server) says nothing either way: try STLS all the same.
      if (caps.size > 0 && !caps.has('STLS')) throw new BackendRefused('unavailable', 'backend does not offer STLS');
      sock.write('STLS\r\n');
      const answer = await reader.line();
      if (!isOk(answer)) throw new BackendRefused('unavailable', `backend STLS: ${printable(answer)}`);
      reader.reader.detach();
      sock = await startBackendTls(sock, host, opts.tls);
      reader.reader = new LineReader(sock, MAX_BACKEND_LINE);
      caps = await capa(sock, reader); // RFC 2595 section 4: what was said in clear is forgotten
    }

    // Dovecot announces XCLIENT in its greeting ("+OK [XCLIENT] ..."), others in CAPA. A
    // refusal only costs the backend's log the real address, so the login goes on.
    if (opts.forwardClientIp && opts.clientIp && (/^\+OK \[XCLIENT\]/i.test(greeting) || caps.has('XCLIENT'))) {
      const addr = opts.clientIp.replace(/^::ffff:(?=\d+\.)/i, '');
      if (/^[0-9a-f.:]+$/i.test(addr)) {
        const session = opts.sessionId && /^[\w-]{1,64}$/.test(opts.sessionId) ? ` SESSION=${opts.sessionId}` : '';
        sock.write(`XCLIENT ADDR=${addr}${opts.clientPort ? ` PORT=${opts.clientPort}` : ''}${session}\r\n`);
        await reader.line();
      }
    }

    let answer: string;
    if (creds.kind === 'token') {
      answer = await tokenLogin(sock, reader, caps, creds);
    } else if (saslPlain(caps) || creds.authzid) {
      const plain = encodePlain(creds).toString('base64');
      if (!saslPlain(caps)) throw new BackendRefused('auth', 'backend does not offer SASL PLAIN for a proxy login');
      const withIr = `AUTH PLAIN ${plain || '='}`;
      if (withIr.length + 2 <= MAX_AUTH_LINE) {
        sock.write(`${withIr}\r\n`);
      } else {
        sock.write('AUTH PLAIN\r\n');
        const cont = await reader.line();
        if (!cont.startsWith('+')) throw classifyErr(cont);
        sock.write(`${plain}\r\n`);
      }
      answer = await reader.line();
    } else {
      if (caps.size > 0 && !caps.has('USER')) {
        throw new BackendRefused('unavailable', 'backend offers neither USER nor SASL PLAIN (does it want TLS? see backend.tls)');
      }
      // USER/PASS put the values on a command line: a CR or LF in them (possible from an
      // AUTH PLAIN client) would start a second command on the backend.
      if (!lineSafe(creds.authcid) || !lineSafe(creds.password)) throw new BackendRefused('auth', 'credentials not representable with USER/PASS');
      sock.write(Buffer.concat([Buffer.from('USER '), creds.authcid, Buffer.from('\r\n')]));
      const user = await reader.line();
      if (!isOk(user)) {
        // No password was checked yet, so this is not the client's fault: typically the
        // backend wants TLS first (Dovecot answers "-ERR [AUTH] Plaintext authentication
        // disallowed" here). Busy codes still mean busy.
        const refused = classifyErr(user);
        if (refused.kind === 'in-use') throw refused;
        const hint = caps.has('STLS') && opts.tls.mode === 'none' ? ' (the backend offers STLS: does it need backend TLS?)' : '';
        throw new Pop3Refused('unavailable', `${printable(user)}${hint}`);
      }
      sock.write(Buffer.concat([Buffer.from('PASS '), creds.password, Buffer.from('\r\n')]));
      answer = await reader.line();
    }
    if (isOk(answer)) return { socket: sock, okLine: answer, rest: reader.reader.detach() };
    if (isErr(answer)) throw classifyErr(answer);
    throw new BackendRefused('unavailable', `backend login: ${printable(answer)}`);
  } catch (e) {
    reader.reader.detach();
    sock.destroy();
    throw asBackendRefused(e);
  }
}
