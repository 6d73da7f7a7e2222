import type { Socket } from 'node:net';
import type { ClientInfo } from '../net/client-info.js';
import type { FrontEnd } from '../net/accept.js';
import { mailboxOwner, passwordCredentials, type Credentials } from '../auth/credentials.js';
import { runSasl } from '../auth/mechanisms.js';
import { imapBackendLogin } from './imap-backend.js';
import { shownAtLogin } from './imap-commands.js';
import { hopIn } from './hop.js';
import { readImapCommand, type CommandSource, type ImapCommand } from './imap-command.js';
import { astring, type Token } from './imap-syntax.js';
import { LineTooLong } from '../net/lines.js';
import { INVALID_TOKEN, LoginFailed, PreauthConnection, type ListenerRuntime } from '../session/core.js';

// The IMAP pre-auth dialogue (RFC 9051 / 3501): greeting, CAPABILITY, NOOP, LOGOUT, ID,
// STARTTLS, LOGIN, AUTHENTICATE (the mechanisms of src/auth/mechanisms.ts). Everything else before login is BAD. After a
// successful backend login the connection is spliced and this object is dropped.

type Command = ImapCommand;

class StopDialogue extends Error {}

const SERVER_ID = '* ID ("name" "mailsplice")\r\n';

export class ImapPreauth extends PreauthConnection implements CommandSource {
  /** The hop mark of another mailsplice, if this connection's ID carried one (see hop.ts). */
  private hop: string | undefined;

  constructor(rt: ListenerRuntime, socket: Socket, client: ClientInfo) {
    super(rt, socket, client);
  }

  private capabilities(): string {
    const caps = ['IMAP4rev1', 'LITERAL+', 'SASL-IR', 'ID'];
    if (this.canStartTls) caps.push('STARTTLS');
    if (this.credentialsAllowed) for (const m of this.mechanisms) caps.push(`AUTH=${m.name}`);
    else caps.push('LOGINDISABLED');
    return caps.join(' ');
  }

  async run(): Promise<void> {
    this.write(`* OK [CAPABILITY ${this.capabilities()}] mailsplice ready\r\n`);
    try {
      for (;;) {
        const cmd = await this.readCommand();
        if (!cmd) continue;
        if (await this.execute(cmd)) return; // logged in and spliced
      }
    } catch (e) {
      if (e instanceof StopDialogue) return;
      if (e instanceof LineTooLong) this.close('* BYE [LIMIT] Line too long\r\n');
      else if ((e as Error).message === 'login timeout') this.close('* BYE Autologout; login took too long\r\n');
      else this.close();
    }
  }

  /** For readImapCommand, which reads from `this` (a CommandSource) with no object per command. */
  get literalSize(): number {
    return this.ctx.limits.literal_size;
  }

  /** Reads one command with its literals; undefined after answering a syntax error. */
  private async readCommand(): Promise<Command | undefined> {
    const read = await readImapCommand(this);
    if (read.kind === 'fatal') {
      this.close(read.reply);
      throw new StopDialogue();
    }
    if (!this.countCommand()) {
      this.close('* BYE [LIMIT] Too many commands before login\r\n');
      throw new StopDialogue();
    }
    if (read.kind === 'bad') {
      this.write(read.reply);
      this.bad();
      return undefined;
    }
    return read.command;
  }

  /** Counts a bad command and ends the connection past the limit. */
  private bad(): void {
    if (!this.countBad()) {
      this.close('* BYE [LIMIT] Too many invalid commands\r\n');
      throw new StopDialogue();
    }
  }

  /** Runs one command; true once the session was handed to the splice. */
  private async execute({ tag, name, args }: Command): Promise<boolean> {
    switch (name) {
      case 'CAPABILITY':
        this.write(`* CAPABILITY ${this.capabilities()}\r\n${tag} OK Capability completed\r\n`);
        return false;
      case 'NOOP':
        this.write(`${tag} OK NOOP completed\r\n`);
        return false;
      case 'LOGOUT':
        this.close(`* BYE Logging out\r\n${tag} OK Logout completed\r\n`);
        return true;
      case 'ID':
        this.hop ??= hopIn(args);
        this.write(`${SERVER_ID}${tag} OK ID completed\r\n`);
        return false;
      case 'STARTTLS':
        if (!this.canStartTls) {
          this.write(`${tag} BAD STARTTLS not available${this.secure ? ': TLS is already active' : ''}\r\n`);
          this.bad();
          return false;
        }
        this.write(`${tag} OK Begin TLS negotiation now\r\n`);
        await this.startTls();
        return false;
      case 'LOGIN': {
        const user = astring(args[0]);
        const pass = astring(args[1]);
        if (!user || !pass || args.length !== 2) {
          this.write(`${tag} BAD LOGIN needs a user name and a password\r\n`);
          this.bad();
          return false;
        }
        return this.login(tag, passwordCredentials(user, pass));
      }
      case 'AUTHENTICATE':
        return this.authenticate(tag, args);
      default:
        this.write(`${tag} BAD ${/^[A-Z]+$/.test(name) ? 'Command not valid before login' : 'Unknown command'}\r\n`);
        this.bad();
        return false;
    }
  }

  private async authenticate(tag: string, args: Token[]): Promise<boolean> {
    const mech = args[0]?.kind === 'atom' ? this.findMechanism(args[0].text) : undefined;
    if (!mech) {
      this.write(`${tag} NO Unsupported authentication mechanism\r\n`);
      return false;
    }
    if (!this.credentialsAllowed) {
      this.write(`${tag} NO [PRIVACYREQUIRED] Use STARTTLS first\r\n`);
      return false;
    }
    const ir = args[1];
    if (args.length > 2 || (ir && ir.kind !== 'atom')) {
      this.write(`${tag} BAD Invalid initial response\r\n`);
      this.bad();
      return false;
    }
    const outcome = await runSasl(mech, ir?.kind === 'atom' ? ir.text : undefined, {
      challenge: (b64) => this.write(`+ ${b64}\r\n`),
      response: () => this.reader.line(),
    });
    if (outcome.kind === 'cancelled') {
      this.write(`${tag} BAD Authentication cancelled\r\n`);
      return false;
    }
    if (outcome.kind === 'malformed') {
      this.write(`${tag} BAD Invalid SASL ${mech.name} response\r\n`);
      this.bad();
      return false;
    }
    return this.login(tag, outcome.credentials);
  }

  private async login(tag: string, creds: Credentials): Promise<boolean> {
    if (!this.credentialsAllowed) {
      this.write(`${tag} NO [PRIVACYREQUIRED] Use STARTTLS first\r\n`);
      return false;
    }
    if (this.hop !== undefined) {
      // Another mailsplice sent this login here: a slot points at a proxy (see hop.ts).
      this.ctx.counters.logins.imap.unavailable++;
      this.ctx.log.error('routing loop: a login came from another mailsplice; a slot points at a proxy (mailsplice never fronts mailsplice)', {
        ip: this.clientIp,
        hop: this.hop,
      });
      this.write(`${tag} NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n`);
      return false;
    }
    // For the log: the routed login may differ (an alias mapped by the password checker).
    const login = mailboxOwner(creds);
    const { backend } = this.ctx;
    try {
      await this.loginAndSplice(
        'imap',
        creds,
        (route, sock, tls, backendCreds) =>
          imapBackendLogin(sock, route.host, backendCreds, {
            tls,
            clientIp: this.clientIp,
            clientPort: this.clientPort,
            forwardClientIp: backend.forward_client_ip,
            sessionId: this.sessionId,
          }),
        (result) => {
          const shown = shownAtLogin(result.untagged, result.okText);
          return {
            toClient: `${shown.untagged.map((l) => `${l}\r\n`).join('')}${tag} ${shown.okText}\r\n`,
            farewell: imapFarewell,
            logout: 'Z LOGOUT\r\n',
            refuseCompress: shown.refuseCompress,
          };
        },
      );
      return true;
    } catch (e) {
      if (!(e instanceof LoginFailed)) throw e;
      this.noteFailure('imap', e, login);
      if (e.result === 'auth-failed' || e.result === 'throttled') {
        if (e.result === 'auth-failed' && creds.kind === 'token') await this.tokenErrorExchange(creds, e.refusal ?? INVALID_TOKEN);
        this.write(
          e.result === 'throttled'
            ? `${tag} NO [UNAVAILABLE] Too many login attempts from your address, try again later\r\n`
            : `${tag} NO [AUTHENTICATIONFAILED] Authentication failed\r\n`,
        );
        if (!this.countAuthFailure()) {
          this.close('* BYE Too many authentication failures\r\n');
          return true;
        }
      } else if (e.result === 'locked') {
        // Only after the backend accepted the password (see toBackend).
        this.write(`${tag} NO [UNAVAILABLE] Account is under maintenance, try again shortly\r\n`);
      } else {
        this.write(`${tag} NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n`);
      }
      return false;
    }
  }
}


function imapFarewell(reason: string): string {
  return `* BYE [UNAVAILABLE] ${reason.replace(/[\r\n]/g, ' ')}\r\n`;
}

/** IMAP on the accept pipeline (src/net/accept.ts). */
export function imapFrontEnd(rt: ListenerRuntime): FrontEnd {
  return {
    refused: () => '* BYE [UNAVAILABLE] Too many connections, try again later\r\n',
    start: (socket, client) => void new ImapPreauth(rt, socket, client).run(),
  };
}
