import type { Socket } from 'node:net';
import { mailboxOwner, type Credentials } from '../auth/credentials.js';
import { runSasl, type SaslWire } from '../auth/mechanisms.js';
import type { FrontEnd } from '../net/accept.js';
import type { ClientInfo } from '../net/client-info.js';
import { LineTooLong } from '../net/lines.js';
import { INVALID_TOKEN, LoginFailed, PreauthConnection, type ListenerRuntime } from '../session/core.js';
import { sieveBackendLogin } from './backend.js';
import { quoted, readSieveCommand, sieveString, type SieveToken } from './syntax.js';

// The ManageSieve pre-auth dialogue (RFC 5804): the greeting is the capability list;
// CAPABILITY, NOOP, LOGOUT, STARTTLS (capabilities said again after TLS) and AUTHENTICATE
// (the mechanisms of src/auth/mechanisms.ts; the initial response and every SASL response
// a quoted string or a literal). Anything else before login is NO. After a successful
// backend login the connection is spliced to the user's master slot's sieve port, like
// POP3 with no farewell: an event closes it (a BYE put between a script's literal bytes
// would corrupt it, and ManageSieve responses are not framed by the splice).

class StopDialogue extends Error {}

/**
 * What the proxy says it supports before login. The script language is the backend's
 * business; this is the set Dovecot's Pigeonhole and Cyrus 3.6 both implement, which is
 * what a client needs to offer its filter editor. After login a client's CAPABILITY goes to
 * the backend and gets its real list.
 */
const SIEVE_EXTENSIONS = 'fileinto reject envelope vacation imap4flags copy include variables body relational regex subaddress comparator-i;ascii-numeric';

export class SievePreauth extends PreauthConnection {
  constructor(rt: ListenerRuntime, socket: Socket, client: ClientInfo) {
    super(rt, socket, client);
  }

  private capabilityLines(): string {
    const lines = ['"IMPLEMENTATION" "mailsplice"', `"SIEVE" "${SIEVE_EXTENSIONS}"`];
    // RFC 5804 1.7: SASL is always listed; no mechanism is usable before TLS where cleartext is refused.
    lines.push(`"SASL" "${this.credentialsAllowed ? this.mechanisms.map((m) => m.name).join(' ') : ''}"`);
    if (this.canStartTls) lines.push('"STARTTLS"');
    lines.push('"VERSION" "1.0"');
    return lines.map((l) => `${l}\r\n`).join('');
  }

  async run(): Promise<void> {
    this.write(`${this.capabilityLines()}OK "mailsplice ready"\r\n`);
    try {
      for (;;) {
        const tokens = await this.readCommand();
        if (!tokens) continue;
        if (await this.execute(tokens)) return; // logged in and spliced, or LOGOUT
      }
    } catch (e) {
      if (e instanceof StopDialogue) return;
      if (e instanceof LineTooLong) this.close('BYE "Line too long"\r\n');
      else if ((e as Error).message === 'login timeout') this.close('BYE "Autologout; login took too long"\r\n');
      else this.close();
    }
  }

  private async readCommand(): Promise<SieveToken[] | undefined> {
    const read = await readSieveCommand(this.reader, this.ctx.limits.literal_size);
    if (read.kind === 'fatal') {
      this.close(`BYE "${read.why}"\r\n`);
      throw new StopDialogue();
    }
    if (!this.countCommand()) {
      this.close('BYE "Too many commands before login"\r\n');
      throw new StopDialogue();
    }
    if (read.kind === 'bad') {
      this.fail(read.why);
      return undefined;
    }
    return read.tokens;
  }

  /** Answers NO to a bad command and counts it; ends the connection past the limit. */
  private fail(why: string): void {
    this.write(`NO ${sieveString(why)}\r\n`);
    if (!this.countBad()) {
      this.close('BYE "Too many invalid commands"\r\n');
      throw new StopDialogue();
    }
  }

  private async execute(tokens: SieveToken[]): Promise<boolean> {
    const [first, ...args] = tokens;
    if (!first) return false; // an empty line: nothing to answer
    if (first.kind !== 'atom') {
      this.fail('Command name expected');
      return false;
    }
    switch (first.text.toUpperCase()) {
      case 'CAPABILITY':
        this.write(`${this.capabilityLines()}OK "Capability completed"\r\n`);
        return false;
      case 'NOOP': {
        // RFC 5804 2.11: a string argument comes back as the TAG response code.
        const tag = args[0]?.kind === 'string' ? quoted(args[0].value.toString('latin1')) : undefined;
        this.write(`OK ${tag ? `(TAG ${tag}) ` : ''}"NOOP completed"\r\n`);
        return false;
      }
      case 'LOGOUT':
        this.close('OK "Logout completed"\r\n');
        return true;
      case 'STARTTLS':
        if (!this.canStartTls) {
          this.fail(this.secure ? 'TLS is already active' : 'STARTTLS not available');
          return false;
        }
        this.write('OK "Begin TLS negotiation now"\r\n');
        await this.startTls();
        // RFC 5804 2.2: the capabilities again, now under TLS.
        this.write(`${this.capabilityLines()}OK "TLS negotiation successful"\r\n`);
        return false;
      case 'AUTHENTICATE':
        return this.authenticate(args);
      default:
        this.fail(/^[A-Za-z]+$/.test(first.text) ? 'Authenticate first' : 'Unknown command');
        return false;
    }
  }

  /** SASL responses are strings here (RFC 5804 2.1): `"base64"` or a literal; `"*"` cancels. */
  private readonly sieveWire: SaslWire = {
    challenge: (b64) => this.write(`${sieveString(b64)}\r\n`),
    response: async () => {
      const read = await readSieveCommand(this.reader, this.ctx.limits.literal_size);
      if (read.kind === 'fatal') {
        this.close(`BYE "${read.why}"\r\n`);
        throw new StopDialogue();
      }
      const t = read.kind === 'command' && read.tokens.length === 1 ? read.tokens[0] : undefined;
      // Anything but one string is no base64 at all: the exchange fails as malformed.
      return t?.kind === 'string' ? t.value.toString('latin1') : '!';
    },
  };

  private async authenticate(args: SieveToken[]): Promise<boolean> {
    const [mechArg, ir, ...extra] = args;
    if (mechArg?.kind !== 'string' || (ir && ir.kind !== 'string') || extra.length > 0) {
      this.fail('AUTHENTICATE needs a mechanism name and at most an initial response, as strings');
      return false;
    }
    const mech = this.findMechanism(mechArg.value.toString('latin1'));
    if (!mech) {
      this.write('NO "Unsupported authentication mechanism"\r\n');
      return false;
    }
    if (!this.credentialsAllowed) {
      this.write('NO (ENCRYPT-NEEDED) "Use STARTTLS first"\r\n');
      return false;
    }
    // An empty initial response is an empty string here (RFC 5804 has no "=").
    const initial = ir?.kind === 'string' ? ir.value.toString('latin1') || '=' : undefined;
    const outcome = await runSasl(mech, initial, this.sieveWire);
    if (outcome.kind === 'cancelled') {
      this.write('NO "Authentication cancelled"\r\n');
      return false;
    }
    if (outcome.kind === 'malformed') {
      this.fail(`Invalid SASL ${mech.name} response`);
      return false;
    }
    return this.login(outcome.credentials);
  }

  private async login(creds: Credentials): Promise<boolean> {
    const login = mailboxOwner(creds);
    try {
      await this.loginAndSplice(
        'sieve',
        creds,
        (route, sock, tls, backendCreds) => sieveBackendLogin(sock, route.host, backendCreds, { tls }),
        (result) => ({ toClient: `${result.okLine}\r\n`, logout: 'LOGOUT\r\n' }),
      );
      return true;
    } catch (e) {
      if (!(e instanceof LoginFailed)) throw e;
      this.noteFailure('sieve', e, login);
      if (e.result === 'auth-failed') {
        if (creds.kind === 'token') await this.tokenErrorExchange(creds, e.refusal ?? INVALID_TOKEN, this.sieveWire);
        this.write('NO "Authentication failed"\r\n');
        if (!this.countAuthFailure()) {
          this.close('BYE "Too many authentication failures"\r\n');
          return true;
        }
      } else if (e.result === 'throttled') {
        this.write('NO (TRYLATER) "Too many login attempts from your address, try again later"\r\n');
        if (!this.countAuthFailure()) {
          this.close('BYE "Too many authentication failures"\r\n');
          return true;
        }
      } else if (e.result === 'locked') {
        this.write('NO (TRYLATER) "Account is under maintenance, try again shortly"\r\n');
      } else {
        this.write('NO (TRYLATER) "Mail server temporarily unavailable, try again later"\r\n');
      }
      return false;
    }
  }
}

/** ManageSieve on the accept pipeline (src/net/accept.ts). */
export function sieveFrontEnd(rt: ListenerRuntime): FrontEnd {
  return {
    refused: () => 'BYE (TRYLATER) "Too many connections, try again later"\r\n',
    start: (socket, client) => void new SievePreauth(rt, socket, client).run(),
  };
}
