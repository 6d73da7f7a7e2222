import type { Socket } from 'node:net';
import type { BackendTlsConfig, Config, ListenerConfig } from '../config.js';
import type { Logger } from '../log.js';
import { LookupFailure, type Protocol, type Route } from '../lookup/model.js';
import type { Router } from '../lookup/router.js';
import { BackendRefused, backendTlsFor, openBackend, sendsProxyHeader } from '../net/backend.js';
import { encodeProxyV2 } from '../net/proxy-protocol.js';
import type { ClientGate } from '../net/gate.js';
import type { OwnListeners } from '../net/own-listeners.js';
import type { FailureDelay, LoginThrottle, Reservation } from './throttle.js';
import type { SessionRegistry } from './registry.js';
import { SplicedSession } from './splice.js';
import type { SlotLogins } from './slot-logins.js';
import type { Expiring, Sweep } from './sweep.js';
import type { ListenerTls } from '../net/tls.js';
import { LineReader } from '../net/lines.js';
import { clientFields, tlsFacts, type ClientInfo } from '../net/client-info.js';
import type { ProxyHeaderResult } from '../net/accept.js';
import { CheckerUnavailable, type PasswordChecker } from '../auth/checker.js';
import { mailboxOwner, type Credentials, type TokenCredentials } from '../auth/credentials.js';
import { offeredMechanisms, type Mechanism, type SaslWire } from '../auth/mechanisms.js';
import { refusalJson } from '../auth/oauth-payload.js';
import { adminCredentials, backendCredentials, backendToken, identityFor, type BackendCredentials } from '../auth/identity.js';
import type { TokenChecker } from '../auth/oauth-check.js';
import type { TokenRefusal } from '../auth/oauth-payload.js';
import type { OauthConfig } from '../config.js';
import { normalizeLogin } from '../lookup/model.js';
import type { BackendFailure, Meters } from './meters.js';
import { newSessionId, type SessionInfo } from './session-info.js';

/** Login outcomes, counted for metrics. `throttled`: refused by a per-address limit before any lookup. */
export type LoginResult = 'ok' | 'auth-failed' | 'unavailable' | 'locked' | 'throttled';

/** Everything the front ends share: one per process. */
export interface ProxyContext {
  router: Router;
  registry: SessionRegistry;
  sweep: Sweep;
  gate: ClientGate;
  throttle: LoginThrottle;
  failureDelay: FailureDelay;
  limits: Config['limits'];
  backend: Config['backend'];
  log: Logger;
  counters: {
    logins: Record<Protocol, Record<LoginResult, number>>;
    rejectedConnections: number;
    /** PROXY headers awaited by the accept pipeline, by what became of them. */
    proxyHeaders: Record<ProxyHeaderResult, number>;
  };
  /** This process's listening sockets: a route to one of them is a loop. */
  ownListeners: OwnListeners;
  /** Set when the proxy checks passwords itself (auth.ldap); absent, the backend does. */
  passwords?: PasswordChecker;
  /** auth.oauth: the token mechanisms are offered (and how a refusal is worded). */
  oauth?: OauthConfig;
  /** Set when auth.oauth can check tokens here (introspection or jwt), for groups with oauth: check. */
  tokens?: TokenChecker;
  /** lookup.default_domain, to compare a token's login claim with the client's login. */
  defaultDomain?: string;
  /** The bound on backend logins in progress per slot (a login storm after a failover). */
  slotLogins: SlotLogins;
  /** Per-login, per-session-end and per-event metrics (src/session/meters.ts). */
  meters: Meters;
  /** LMTP backend transactions from their start to their last reply (what a fence waits for). */
  lmtpTransactions: Set<LmtpTransaction>;
}

/** One LMTP backend transaction (a delivery's leg to one slot), as fencing counts it. */
export interface LmtpTransaction {
  readonly slot: string;
  /** The stores of its recipients. */
  readonly stores: readonly string[];
}

/** A protocol's backend login dialogue, given what to log in with on that backend. */
export type BackendDialogue<T> = (route: Route, sock: Socket, tls: BackendTlsConfig, creds: BackendCredentials) => Promise<T>;

/** A logged-in backend connection as a protocol's login dialogue hands it over. */
export interface BackendSession {
  socket: Socket;
  /** Bytes the backend sent past its answer to the login. */
  rest: Buffer;
}

/** How a protocol's logged-in backend connection is handed to the client, or given up. */
export interface Handover {
  /** What the client must see first: the backend's answer to the login. */
  toClient: string;
  /** The line an event's end of the session says, if the protocol has one. */
  farewell?: (reason: string) => string;
  /** The command that logs out of a backend that is no longer the route (`Z LOGOUT`, `QUIT`). */
  logout: string;
  /** IMAP: COMPRESS ends the session (see shownAtLogin in imap-commands.ts). */
  refuseCompress?: boolean;
}

/** One listener's settings as a front end needs them. */
export interface ListenerRuntime {
  cfg: ListenerConfig;
  tls: ListenerTls | undefined;
  plaintextAllowed: boolean;
  ctx: ProxyContext;
}

/** Why a login did not reach a backend session, in protocol-neutral terms. */
export class LoginFailed extends Error {
  constructor(
    readonly result: Exclude<LoginResult, 'ok'> | 'in-use',
    message: string,
    /** A refused token: what the RFC 7628 error exchange tells the client. */
    readonly refusal?: TokenRefusal,
  ) {
    super(message);
  }
}

/** Any token login that failed as auth-failed is answered with the error exchange; this is what it says when nothing more precise is known. */
export const INVALID_TOKEN: TokenRefusal = Object.freeze({ status: 'invalid_token' });

/** What a connection before login is told when the server stops (RFC 9051 7.1.5; RFC 2449 [SYS/TEMP]). */
const SHUTDOWN_WORDS: Record<string, string> = {
  imap: '* BYE [UNAVAILABLE] Server shutting down, try again later\r\n',
  pop3: '-ERR [SYS/TEMP] Server shutting down, try again later\r\n',
  sieve: 'BYE (TRYLATER) "Server shutting down, try again later"\r\n',
};

/**
 * The state of one connection before login, shared by the IMAP and POP3 dialogues: its
 * socket (swapped for a TLS one by STARTTLS/STLS), a bounded reader, and one entry in the
 * shared sweep that enforces both the login deadline and the backend dialogue's deadline.
 */
export abstract class PreauthConnection implements Expiring {
  deadline: number;
  reader: LineReader;
  secure: boolean;
  authFailures = 0;
  commands = 0;
  badCommands = 0;
  /** Set while a backend dialogue runs, so the sweep can cut it short. */
  private backendSocket: Socket | undefined;
  /** Set while a STARTTLS/STLS handshake runs: the reader is detached then, so the sweep ends it here. */
  private handshaking = false;
  private readonly loginDeadline: number;
  private id: string | undefined;
  /** The last login attempt: when it began, and its lookup, backend connect and backend login times (ms). */
  private loginStarted = 0;
  private routeMs = 0;
  private connectMs = 0;
  private backendMs = 0;

  constructor(
    readonly rt: ListenerRuntime,
    public socket: Socket,
    /** Who this is, as the accept pipeline found it (a PROXY header's address, TLS facts). */
    readonly client: ClientInfo,
  ) {
    const { limits } = rt.ctx;
    this.loginDeadline = this.deadline = Date.now() + limits.login_timeout_ms;
    this.secure = rt.cfg.tls === 'implicit';
    this.reader = new LineReader(socket, limits.line_length);
    rt.ctx.sweep.add(this);
  }

  /** The client's address: what limits, the throttle, logs and backends get. */
  get clientIp(): string {
    return this.client.address;
  }

  get clientPort(): number {
    return this.client.port;
  }

  /** Too slow: in the backend phase only the backend attempt is abandoned. */
  expire(): void {
    if (this.backendSocket) {
      const sock = this.backendSocket;
      this.backendSocket = undefined;
      sock.destroy(new Error('backend did not answer in time'));
      // Back under the login deadline, unless that has passed too (the backend deadline is
      // capped by it): re-adding an already expired entry would have the sweep visit it
      // again in the same pass, forever.
      if (this.loginDeadline > Date.now()) {
        this.deadline = this.loginDeadline;
        this.rt.ctx.sweep.add(this);
      } else {
        this.reader.fail(new Error('login timeout'));
      }
    } else if (this.handshaking) {
      this.socket.destroy(); // the pending handshake fails with it
    } else {
      this.reader.fail(new Error('login timeout'));
    }
  }

  /** Server shutdown: the protocol's goodbye now, whatever the dialogue was waiting for. */
  shutdown(): void {
    this.backendSocket?.destroy(); // an unfinished login fails with it; its answer is not sent
    if (this.handshaking) this.socket.destroy(); // no cleartext way to say it mid-handshake
    else this.close(SHUTDOWN_WORDS[this.rt.cfg.protocol]);
  }

  get ctx(): ProxyContext {
    return this.rt.ctx;
  }

  /** This connection's session id: made at its first login attempt, sent to IMAP backends, in every line. */
  get sessionId(): string {
    return (this.id ??= newSessionId());
  }

  /** Plaintext credentials may be sent now (TLS is up, or the listener allows cleartext). */
  get credentialsAllowed(): boolean {
    return this.secure || this.rt.plaintextAllowed;
  }

  /** Whether the proxy checks passwords (then AUTH=LOGIN is offered too). */
  get passwordsChecked(): boolean {
    return this.ctx.passwords !== undefined;
  }

  /** The SASL mechanisms this connection is offered: LOGIN when passwords are checked here, the token ones with auth.oauth. */
  get mechanisms(): Mechanism[] {
    const oauth = this.ctx.oauth;
    return offeredMechanisms(this.passwordsChecked, oauth !== undefined).filter((m) => !m.token || oauth!.mechanisms.includes(m.name as 'OAUTHBEARER'));
  }

  findMechanism(name: string): Mechanism | undefined {
    const upper = name.toUpperCase();
    return this.mechanisms.find((m) => m.name === upper);
  }

  /**
   * RFC 7628 3.2.2 (and Google's XOAUTH2 alike): a refused token is told as a challenge
   * carrying the JSON status; the client's answer (%x01, an empty line, anything) is read
   * and dropped; then the caller sends the protocol's failure.
   */
  async tokenErrorExchange(creds: TokenCredentials, refusal: TokenRefusal, wire: SaslWire = this.saslWire): Promise<void> {
    wire.challenge(Buffer.from(refusalJson(creds.mechanism, refusal), 'utf8').toString('base64'));
    await wire.response();
  }

  /** IMAP and POP3 alike: `+ <base64>` and a response line. */
  readonly saslWire: SaslWire = {
    challenge: (b64) => this.write(`+ ${b64}\r\n`),
    response: () => this.reader.line(),
  };

  get canStartTls(): boolean {
    return this.rt.cfg.tls === 'starttls' && !this.secure;
  }

  write(s: string): void {
    if (!this.socket.destroyed) this.socket.write(s);
  }

  /** Swaps the socket for TLS after the client's STARTTLS/STLS; what it pipelined is dropped. */
  async startTls(): Promise<void> {
    this.reader.discard();
    this.reader.detach();
    this.handshaking = true;
    try {
      const secure = await this.rt.tls!.accept(this.socket);
      this.socket = secure;
      this.client.tls = tlsFacts(secure);
    } catch (e) {
      this.ctx.log.debug('tls handshake failed', { listener: this.rt.cfg.name ?? this.rt.cfg.protocol, ip: this.clientIp, error: (e as Error).message });
      throw e;
    } finally {
      this.handshaking = false;
    }
    this.secure = true;
    this.reader = new LineReader(this.socket, this.ctx.limits.line_length);
  }

  /** Ends the connection before login. */
  close(lastWords?: string): void {
    this.ctx.sweep.delete(this);
    if (this.socket.destroyed) return;
    if (lastWords) this.socket.end(lastWords);
    this.socket.destroySoon();
  }

  /** Counts a command; false once the client has used up its pre-auth allowance. */
  countCommand(): boolean {
    return ++this.commands <= this.ctx.limits.preauth_commands;
  }

  countBad(): boolean {
    return ++this.badCommands < this.ctx.limits.bad_commands;
  }

  /** Counts a failed login; false once this connection may not try again. */
  countAuthFailure(): boolean {
    return ++this.authFailures < this.ctx.limits.auth_failures;
  }

  /**
   * One login attempt, from the client's command to a logged-in backend connection, or a
   * LoginFailed answered no sooner than limits.auth_failure_delay_ms after the attempt began.
   *
   * Before anything is looked up, the attempt takes a place in the address's logins in
   * progress (this proxy) and in its failed-login count (shared in Redis); a success gives
   * the second back. Then the route is found and the backend connection opened under the
   * backend deadline; the protocol's own dialogue runs in `dialogue`, with the TLS settings
   * of the slot's group (STARTTLS is the dialogue's business; implicit TLS is already up).
   *
   * A locked account is told so only to whoever knows its password: where its master slot
   * is known and up, the credentials are checked there, and that session is logged out of
   * again (`logout`). Where nothing can check them (no master, slot down, lookup down), the
   * answer is the general UNAVAILABLE, the same as for every other outage.
   */
  async toBackend<T>(
    protocol: Protocol,
    creds: Credentials,
    dialogue: BackendDialogue<T>,
    logout: (result: T) => void,
  ): Promise<{ route: Route; result: T }> {
    const started = (this.loginStarted = Date.now());
    const { gate, throttle } = this.ctx;
    if (!gate.beginLogin(this.clientIp)) {
      throttle.noteRefused(this.clientIp, 'too many logins in progress');
      return this.failAfterDelay(started, new LoginFailed('throttled', 'too many logins in progress from this address'));
    }
    try {
      const reservation = await throttle.reserve(this.clientIp);
      if (!reservation) throw new LoginFailed('throttled', 'too many failed logins from this address');
      const login = await this.routedLogin(creds);
      const done = await this.verify(protocol, login, (route) => this.backendCreds(creds, route), dialogue, logout);
      throttle.succeeded(reservation);
      return done;
    } catch (e) {
      if (!(e instanceof LoginFailed)) throw e;
      return this.failAfterDelay(started, e);
    } finally {
      gate.endLogin(this.clientIp);
    }
  }

  /**
   * The login to route by. Without a checker it is the mailbox owner the client named, and
   * the backend checks the password. With one, the password is checked here first (a failure
   * takes the same delay and throttle as a backend's); an alias login becomes its owner's.
   */
  private async routedLogin(creds: Credentials): Promise<string> {
    if (creds.kind === 'token') {
      // The token is checked once the route says by whom (its slot group's oauth mode).
      if (creds.user.length > 0) return mailboxOwner(creds);
      // OAUTHBEARER without a=: only a token checked here can say who it is.
      if (!this.ctx.tokens) throw new LoginFailed('auth-failed', 'no login in the OAUTHBEARER message (a=)', INVALID_TOKEN);
      return this.checkToken(creds, undefined);
    }
    const checker = this.ctx.passwords;
    if (!checker) return mailboxOwner(creds);
    // The directory says whose password it is, not who may act for whom.
    if (creds.authzid) throw new LoginFailed('auth-failed', 'an authorisation identity is not accepted when the proxy checks passwords');
    let verdict;
    try {
      verdict = await checker.check(creds);
    } catch (e) {
      if (e instanceof CheckerUnavailable) throw new LoginFailed('unavailable', e.message);
      throw e;
    }
    if (!verdict.ok) throw new LoginFailed('auth-failed', verdict.why);
    return verdict.login;
  }

  /**
   * Checks a token here; the login it names, which must be the login the client gave
   * (`claimed`, when it gave one). A refusal is auth-failed with the RFC 7628 status.
   */
  private async checkToken(creds: TokenCredentials, claimed: string | undefined): Promise<string> {
    const checker = this.ctx.tokens;
    if (!checker) throw new LoginFailed('unavailable', 'oauth: check without a token checker');
    let verdict;
    try {
      verdict = await checker.check(creds.token);
    } catch (e) {
      if (e instanceof CheckerUnavailable) throw new LoginFailed('unavailable', e.message);
      throw e;
    }
    if (!verdict.ok) throw new LoginFailed('auth-failed', `token refused: ${verdict.why}`, { ...this.refusalExtras(), status: verdict.status });
    const login = normalizeLogin(verdict.login, this.ctx.defaultDomain);
    // A good token for one user is no key to another's mailbox.
    if (claimed !== undefined && normalizeLogin(claimed, this.ctx.defaultDomain) !== login) {
      throw new LoginFailed('auth-failed', 'token names another user than the login', { ...this.refusalExtras(), status: 'invalid_token' });
    }
    return login;
  }

  private refusalExtras(): Omit<TokenRefusal, 'status'> {
    const o = this.ctx.oauth;
    return { ...(o?.scope ? { scope: o.scope } : {}), ...(o?.openid_configuration ? { openidConfiguration: o.openid_configuration } : {}) };
  }

  /** What to log in with on the route's backend, by its slot group's identity rule. */
  private async backendCreds(creds: Credentials, route: Route): Promise<BackendCredentials> {
    const identity = identityFor(this.ctx.backend, route.slot);
    if (creds.kind === 'token') {
      if (identity.oauth !== 'check') return backendToken(identity, creds, route);
      await this.checkToken(creds, route.login);
      const admin = adminCredentials(identity, route);
      if (!admin) throw new LoginFailed('unavailable', `slot ${route.slot}: oauth: check without admin_user`);
      return admin;
    }
    // The config refuses this; a backend must never be told "trust me" for an unchecked password.
    if (identity.mode === 'admin' && !this.ctx.passwords) throw new BackendRefused('unavailable', `slot ${route.slot}: admin identity without a password checker`);
    return backendCredentials(identity, creds, route);
  }

  private async failAfterDelay(started: number, e: LoginFailed): Promise<never> {
    await this.ctx.failureDelay.after(started);
    throw e;
  }

  private async verify<T>(
    protocol: Protocol,
    login: string,
    prepare: (route: Route) => Promise<BackendCredentials>,
    dialogue: BackendDialogue<T>,
    logout: (result: T) => void,
  ): Promise<{ route: Route; result: T }> {
    let route: Route;
    let locked: LookupFailure | undefined;
    const t0 = Date.now();
    this.routeMs = this.connectMs = this.backendMs = 0;
    try {
      route = await this.ctx.router.resolve(login);
      this.routeMs = Date.now() - t0;
    } catch (e) {
      if (!(e instanceof LookupFailure)) throw e;
      if (e.kind === 'unknown-user') throw new LoginFailed('auth-failed', e.message);
      if (e.kind !== 'locked' || !e.route?.ports[protocol]) throw new LoginFailed('unavailable', `${e.message} (password not checked)`);
      route = e.route;
      locked = e;
    }
    const port = route.ports[protocol];
    if (!port) throw new LoginFailed('unavailable', `slot ${route.slot} has no ${protocol} port`);
    // Before any backend connection: a token checked here may be refused.
    const backendCreds = await prepare(route);
    const { slotLogins } = this.ctx;
    const placed = slotLogins.acquire(route.slot);
    if (placed !== true && !(placed !== false && (await placed))) {
      throw new LoginFailed('unavailable', `slot ${route.slot} busy: too many backend logins at once (backend.logins_per_slot)`);
    }
    try {
      return await this.onBackend(protocol, route, port, locked, backendCreds, dialogue, logout);
    } finally {
      slotLogins.release(route.slot);
    }
  }

  /** The backend part of a login, holding one of the slot's login places. */
  private async onBackend<T>(
    protocol: Protocol,
    route: Route,
    port: number,
    locked: LookupFailure | undefined,
    backendCreds: BackendCredentials,
    dialogue: BackendDialogue<T>,
    logout: (result: T) => void,
  ): Promise<{ route: Route; result: T }> {
    this.deadline = Math.min(this.loginDeadline, Date.now() + this.ctx.backend.login_timeout_ms);
    this.ctx.sweep.add(this); // again: the login deadline may have fired during the lookup
    let result: T;
    const { meters } = this.ctx;
    let stage: 'connect' | 'loop' | 'login' = 'connect';
    const t1 = Date.now();
    try {
      const tls = backendTlsFor(this.ctx.backend, route.slot, protocol);
      const preamble = (protocol === 'imap' || protocol === 'pop3') && sendsProxyHeader(this.ctx.backend, route.slot, protocol) ? this.proxyHeader() : undefined;
      const sock = await openBackend(route.host, port, { connectTimeoutMs: this.ctx.backend.connect_timeout_ms, tls, landing: true, ...(preamble ? { preamble } : {}) });
      const t2 = Date.now();
      this.connectMs = t2 - t1;
      meters.backendConnectSeconds.observe({ slot: route.slot }, this.connectMs / 1000);
      this.backendSocket = sock;
      if (this.ctx.ownListeners.reaches(sock)) {
        stage = 'loop';
        this.ctx.log.error('routing loop: slot points at this proxy', { slot: route.slot, host: route.host, port, protocol });
        throw new BackendRefused('unavailable', `slot ${route.slot} (${route.host}:${port}) points at this proxy`);
      }
      stage = 'login';
      result = await dialogue(route, sock, tls, backendCreds);
      this.backendMs = Date.now() - t2;
      meters.backendLoginSeconds.observe({ slot: route.slot }, this.backendMs / 1000);
    } catch (e) {
      const timedOut = this.backendSocket === undefined && stage === 'login'; // the sweep took it (expire)
      this.backendSocket?.destroy();
      if (e instanceof BackendRefused) {
        if (e.kind !== 'auth') meters.backendFailures.inc({ slot: route.slot, reason: backendFailure(stage, e.kind, timedOut) });
        const refusal = e.kind === 'auth' && backendCreds.kind === 'token' ? { ...this.refusalExtras(), status: 'invalid_token' as const } : undefined;
        throw new LoginFailed(e.kind === 'auth' ? 'auth-failed' : e.kind, `${route.slot}: ${e.message}`, refusal);
      }
      meters.backendFailures.inc({ slot: route.slot, reason: backendFailure(stage, undefined, timedOut || /timed? ?out|in time/i.test((e as Error).message)) });
      throw new LoginFailed('unavailable', `${route.slot}: ${(e as Error).message}`);
    } finally {
      this.backendSocket = undefined;
      this.deadline = this.loginDeadline;
    }
    if (locked) {
      logout(result);
      throw new LoginFailed('locked', `${locked.message} (password checked on ${route.slot})`);
    }
    return { route, result };
  }

  /**
   * Logs in on the login's route and hands the connection to the splice. If an event changed
   * the route while the backend login ran, that backend gets nothing from the client: we log
   * out of it and log in once more on the new route (the credentials are still at hand); a
   * second change fails the login as unavailable.
   */
  async loginAndSplice<T extends BackendSession>(
    protocol: Protocol,
    creds: Credentials,
    dialogue: BackendDialogue<T>,
    handover: (result: T) => Handover,
  ): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      const { route, result } = await this.toBackend(protocol, creds, dialogue, (r) => logOut(r.socket, handover(r).logout, this.ctx));
      const h = handover(result);
      if (this.splice(protocol, route, result.socket, result.rest, h.toClient, h.farewell, h.refuseCompress)) return;
      this.ctx.registry.endedByEvents++;
      logOut(result.socket, h.logout, this.ctx);
      this.ctx.log.info('route changed during login', { protocol, login: route.login, store: route.store, slot: route.slot, ip: this.clientIp, attempt });
      if (attempt >= 2) throw new LoginFailed('unavailable', 'route changed during login');
    }
  }

  /**
   * Hands the connection over to the splice, unless the route no longer holds: an event may
   * have changed it while we were logging in, and would have missed this session. Then
   * nothing is written either way and false comes back. The check and the registration happen
   * in one go, so any later event finds the session.
   */
  splice(
    protocol: Protocol,
    route: Route,
    backend: Socket,
    backendRest: Buffer,
    toClient: string,
    farewell?: (reason: string) => string,
    refuseCompress = false,
  ): boolean {
    if (!this.ctx.router.stillValid(route, protocol)) return false;
    this.ctx.sweep.delete(this);
    const clientRest = this.reader.detach();
    if (this.socket.destroyed || this.socket.writableEnded) {
      backend.destroy(); // the client is gone (or we are shutting down): so is its backend session
      return true;
    }
    this.ctx.counters.logins[protocol].ok++;
    const now = Date.now();
    const info: SessionInfo = { id: this.sessionId, started: now, ip: this.clientIp, port: this.clientPort, listener: this.client.listener, tls: this.client.tls?.version ?? 'none' };
    const session = new SplicedSession(protocol, route, this.socket, backend, info, this.ctx, farewell, refuseCompress);
    this.socket.write(toClient);
    this.ctx.meters.loginSeconds.observe({ protocol, slot: route.slot }, (now - this.loginStarted) / 1000);
    this.ctx.log.info('login', {
      session: info.id,
      protocol,
      login: route.login,
      backend_login: route.backendLogin,
      // The client as accept found it (with sni, and via: the load balancer of a PROXY header); tls `none` when cleartext.
      ...clientFields(this.client),
      tls: info.tls,
      store: route.store,
      slot: route.slot,
      backend: `${route.host}:${route.ports[protocol] ?? ''}`,
      route_ms: this.routeMs,
      connect_ms: this.connectMs,
      backend_ms: this.backendMs,
    });
    // What was pipelined across the login, for whoever debugs a client (debug level only).
    this.ctx.log.debug('login spliced', { session: info.id, login: route.login, pipelined_by_client: clientRest.length, sent_past_login_by_backend: backendRest.length });
    // The client may have half-closed (or left) while the backend login ran: its end of
    // stream was read then and is passed on by start().
    session.start(clientRest, backendRest, this.socket.readableEnded);
    return true;
  }

  /** The PROXY v2 header for a backend: the client, and the address it connected to. */
  private proxyHeader(): Buffer {
    const c = this.client;
    return encodeProxyV2(c.transport === 'tcp' ? { address: c.address, port: c.port } : undefined, { address: c.localAddress, port: c.localPort });
  }

  /** Records a failed login for metrics and the log (refused attempts: the throttle logs them, summed). */
  noteFailure(protocol: Protocol, e: LoginFailed, login: string): void {
    const result = e.result === 'in-use' ? 'unavailable' : e.result;
    this.ctx.counters.logins[protocol][result]++;
    if (result === 'throttled') return;
    const level = result === 'unavailable' ? 'warn' : 'info';
    this.ctx.log[level]('login failed', { protocol, login, ip: this.clientIp, result: e.result, why: e.message, session: this.sessionId });
  }
}

/** A backend failure's reason label (bounded). */
function backendFailure(stage: 'connect' | 'loop' | 'login', kind: string | undefined, timedOut: boolean): BackendFailure {
  if (stage === 'loop') return 'loop';
  if (kind === 'in-use') return 'in-use';
  if (timedOut) return 'timeout';
  if (stage === 'connect') return 'connect';
  return kind === undefined ? 'lost' : 'refused';
}

/**
 * Logs out of a backend session that is no longer the route, politely (the backend ends the
 * session now rather than at its idle timeout), and closes the connection when it answers,
 * or after the backend login deadline at the latest. Rare (a login that raced an event), so
 * a closure or two here cost nothing.
 */
function logOut(sock: Socket, command: string, ctx: ProxyContext): void {
  const bound = { deadline: Date.now() + ctx.backend.login_timeout_ms, expire: () => sock.destroy() };
  ctx.sweep.add(bound);
  sock.on('error', () => sock.destroy());
  sock.once('close', () => ctx.sweep.delete(bound));
  sock.on('end', () => sock.destroy());
  sock.resume(); // its answer is read and dropped
  sock.end(command);
}
