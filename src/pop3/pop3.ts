import type { Socket } from 'node:net';
import type { ClientInfo } from '../net/client-info.js';
import type { FrontEnd } from '../net/accept.js';
import { mailboxOwner, passwordCredentials, type Credentials } from '../auth/credentials.js';
import { runSasl } from '../auth/mechanisms.js';
import { INVALID_TOKEN, LoginFailed, PreauthConnection, type BackendDialogue, type ListenerRuntime } from '../session/core.js';
import { LineTooLong } from '../net/lines.js';
import { pop3BackendLogin, Pop3Refused, type Pop3BackendLogin } from './pop3-backend.js';

// The POP3 pre-auth dialogue (RFC 1939, 2449, 2595, 5034, 3206): greeting, CAPA, USER/PASS,
// AUTH (the mechanisms of src/auth/mechanisms.ts), STLS, QUIT, NOOP. Everything else before login is an error. After a
// successful backend login the connection is spliced and this object is dropped. POP3 has
// no unsolicited responses, so a session ended by an event is simply closed (no farewell).

class StopDialogue extends Error {}

/** RFC 2595 / Dovecot wording; [AUTH] because it concerns how the client authenticates. */
const PLAINTEXT_REFUSED = '-ERR [AUTH] Plaintext authentication disallowed on non-secure connections, use STLS first\r\n';

/**
 * A command line (latin1, one char per byte) as keyword and argument. RFC 1939 separates
 * them by one space; USER and PASS take the rest of the line as is (a password may contain
 * spaces). The keyword is upper-cased; it is only compared, never echoed.
 */
export function parsePop3Command(line: string): { name: string; arg: string } {
  const sp = line.indexOf(' ');
  return { name: (sp < 0 ? line : line.slice(0, sp)).toUpperCase(), arg: sp < 0 ? '' : line.slice(sp + 1) };
}

export class Pop3Preauth extends PreauthConnection {
  /** The name from USER, waiting for PASS (RFC 1939: USER then PASS, nothing between). */
  private user: string | undefined;

  constructor(rt: ListenerRuntime, socket: Socket, client: ClientInfo) {
    super(rt, socket, client);
  }

  /**
   * RFC 2449 CAPA for the AUTHORIZATION state. TOP and UIDL are the backends' (every
   * POP3 server this fronts has them) and are listed so that clients which only ask once,
   * before login, use them. USER and SASL PLAIN are hidden while cleartext is refused.
   */
  private capabilities(): string[] {
    const caps = ['TOP', 'UIDL', 'RESP-CODES', 'AUTH-RESP-CODE', 'PIPELINING'];
    if (this.credentialsAllowed) caps.push('USER', `SASL ${this.mechanismNames().join(' ')}`);
    if (this.canStartTls) caps.push('STLS');
    caps.push('IMPLEMENTATION mailsplice');
    return caps;
  }

  private mechanismNames(): string[] {
    return this.mechanisms.map((m) => m.name);
  }

  async run(): Promise<void> {
    this.write('+OK mailsplice ready\r\n');
    try {
      for (;;) {
        // latin1: one char per byte, so a password that is not UTF-8 reaches the backend intact.
        const line = await this.reader.line('latin1');
        if (!this.countCommand()) {
          this.close('-ERR Too many commands before login\r\n');
          return;
        }
        if (await this.execute(line)) return; // logged in and spliced, or QUIT
      }
    } catch (e) {
      if (e instanceof StopDialogue) return;
      if (e instanceof LineTooLong) this.close('-ERR Line too long\r\n');
      // A login timeout, like RFC 1939's autologout timer, closes without a response: any
      // line now would be read as the answer to whatever the client sends next.
      else this.close();
    }
  }

  /** Runs one command line; true once the connection was handed over or closed. */
  private async execute(line: string): Promise<boolean> {
    const { name, arg } = parsePop3Command(line);
    switch (name) {
      case 'CAPA':
        this.write(`+OK Capability list follows\r\n${this.capabilities().join('\r\n')}\r\n.\r\n`);
        return false;
      case 'NOOP':
        // RFC 1939 lists NOOP for the TRANSACTION state only; a +OK before login harms no one
        // and keeps keep-alive probes from counting as bad commands (nginx does the same).
        this.write('+OK\r\n');
        return false;
      case 'QUIT':
        this.close('+OK Logging out\r\n');
        return true;
      case 'STLS':
        return this.stls(arg);
      case 'USER':
        this.userCommand(arg);
        return false;
      case 'PASS':
        return this.passCommand(arg);
      case 'AUTH':
        return this.auth(arg);
      case 'APOP':
        // APOP needs the backend's greeting timestamp, which no proxy can offer before login.
        this.fail('-ERR APOP not supported, use USER/PASS or AUTH PLAIN');
        return false;
      default:
        this.fail(/^[A-Z]{3,4}$/.test(name) ? '-ERR Command not valid before login' : '-ERR Unknown command');
        return false;
    }
  }

  /** Answers a bad command and counts it; ends the connection past the limit. */
  private fail(answer: string): void {
    this.write(`${answer}\r\n`);
    if (!this.countBad()) {
      this.close();
      throw new StopDialogue();
    }
  }

  private async stls(arg: string): Promise<boolean> {
    if (arg !== '') {
      this.fail('-ERR STLS takes no argument');
      return false;
    }
    if (!this.canStartTls) {
      this.fail(this.secure ? '-ERR Command not permitted when TLS active' : '-ERR STLS not available');
      return false;
    }
    this.write('+OK Begin TLS negotiation\r\n');
    // RFC 2595 section 4: nothing said before TLS carries over, not even a USER name. What the
    // client pipelined after STLS is dropped by startTls().
    this.user = undefined;
    await this.startTls();
    return false;
  }

  private userCommand(arg: string): void {
    this.user = undefined;
    if (!this.credentialsAllowed) {
      this.write(PLAINTEXT_REFUSED);
      return;
    }
    const name = arg.trim();
    if (name === '') {
      this.fail('-ERR USER needs a name');
      return;
    }
    // Whether the user exists is not told here: the backend decides at PASS.
    this.user = name;
    this.write('+OK Send your password\r\n');
  }

  private async passCommand(arg: string): Promise<boolean> {
    const user = this.user;
    this.user = undefined;
    if (!this.credentialsAllowed) {
      this.write(PLAINTEXT_REFUSED);
      return false;
    }
    if (user === undefined) {
      this.fail('-ERR USER first');
      return false;
    }
    if (arg === '') {
      this.fail('-ERR PASS needs a password');
      return false;
    }
    return this.login(passwordCredentials(Buffer.from(user, 'latin1'), Buffer.from(arg, 'latin1')));
  }

  /** RFC 5034 AUTH; a bare AUTH lists the mechanisms, as many clients expect (RFC 1734 style). */
  private async auth(arg: string): Promise<boolean> {
    this.user = undefined;
    const [mechRaw = '', ir, ...extra] = arg.split(' ');
    if (mechRaw === '') {
      this.write(`+OK\r\n${this.credentialsAllowed ? this.mechanismNames().map((n) => `${n}\r\n`).join('') : ''}.\r\n`);
      return false;
    }
    const mech = this.findMechanism(mechRaw);
    if (!mech || extra.length > 0) {
      this.fail('-ERR Unsupported authentication mechanism');
      return false;
    }
    if (!this.credentialsAllowed) {
      this.write(PLAINTEXT_REFUSED);
      return false;
    }
    // "=" is an empty initial response (RFC 5034 section 4).
    const outcome = await runSasl(mech, ir, { challenge: (b64) => this.write(`+ ${b64}\r\n`), response: () => this.reader.line() });
    if (outcome.kind === 'cancelled') {
      this.write('-ERR Authentication cancelled\r\n');
      return false;
    }
    if (outcome.kind === 'malformed') {
      this.fail(`-ERR Invalid SASL ${mech.name} response`);
      return false;
    }
    return this.login(outcome.credentials);
  }

  private async login(creds: Credentials): Promise<boolean> {
    // For the log: the routed login may differ (an alias mapped by the password checker).
    const login = mailboxOwner(creds);
    let backendSaid: string | undefined;
    try {
      const dialogue: BackendDialogue<Pop3BackendLogin> = async (route, sock, tls, backendCreds) => {
        try {
          return await pop3BackendLogin(sock, route.host, backendCreds, {
            tls,
            forwardClientIp: this.ctx.backend.forward_client_ip,
            clientIp: this.clientIp,
            clientPort: this.clientPort,
            sessionId: this.sessionId,
          });
        } catch (e) {
          if (e instanceof Pop3Refused) backendSaid = e.line;
          throw e;
        }
      };
      await this.loginAndSplice('pop3', creds, dialogue, (result) => ({ toClient: `${result.okLine}\r\n`, logout: 'QUIT\r\n' }));
      return true;
    } catch (e) {
      if (!(e instanceof LoginFailed)) throw e;
      this.noteFailure('pop3', e, login);
      if (e.result === 'auth-failed' || e.result === 'throttled') {
        if (e.result === 'auth-failed' && creds.kind === 'token') await this.tokenErrorExchange(creds, e.refusal ?? INVALID_TOKEN);
        this.write(
          e.result === 'throttled'
            ? '-ERR [SYS/TEMP] Too many login attempts from your address, try again later\r\n'
            : '-ERR [AUTH] Authentication failed\r\n',
        );
        if (!this.countAuthFailure()) {
          this.close();
          return true;
        }
      } else if (e.result === 'in-use') {
        // The backend's own words (RFC 2449 IN-USE / LOGIN-DELAY): the client may act on them.
        this.write(`${backendSaid?.replace(/[\r\n\0]/g, ' ') ?? '-ERR [IN-USE] Mailbox in use, try again later'}\r\n`);
      } else if (e.result === 'locked') {
        // Only after the backend accepted the password (see toBackend).
        this.write('-ERR [SYS/TEMP] Account is under maintenance, try again shortly\r\n');
      } else {
        this.write('-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n');
      }
      return false;
    }
  }
}

/** POP3 on the accept pipeline (src/net/accept.ts). */
export function pop3FrontEnd(rt: ListenerRuntime): FrontEnd {
  return {
    refused: () => '-ERR [SYS/TEMP] Too many connections, try again later\r\n',
    start: (socket, client) => void new Pop3Preauth(rt, socket, client).run(),
  };
}
