import { passwordCredentials, type Credentials } from './credentials.js';
import { parseOauthBearer, parseXoauth2 } from './oauth-payload.js';
import { decodeBase64, encodeBase64, parsePlain } from './sasl.js';

// The client SASL mechanisms, one table for IMAP AUTHENTICATE and POP3 AUTH. Each yields
// the one Credentials shape. A mechanism is a small state machine over decoded responses;
// the dialogue (`runSasl`) does the wire: base64, `*` to cancel, and a bound on rounds.

export type SaslStep =
  | { kind: 'challenge'; challenge: Buffer }
  | { kind: 'done'; credentials: Credentials }
  | { kind: 'malformed' };

/** One exchange in progress: `undefined` is "no initial response". */
export interface SaslServer {
  step(response: Buffer | undefined): SaslStep;
}

export interface Mechanism {
  name: string;
  /** Offered only when the proxy checks passwords itself (see auth.ldap). */
  needsPasswordCheck: boolean;
  /** A bearer-token mechanism: offered only when auth.oauth is configured. */
  token?: boolean;
  start(): SaslServer;
}

const EMPTY = Buffer.alloc(0);

/**
 * A mechanism of one client message, parsed by `parse`. Without an initial response the
 * server asks with an empty challenge (RFC 4616, RFC 7628); asking twice is malformed.
 * Token mechanisms (`token`) are offered only with auth.oauth.
 */
function oneMessage(name: string, parse: (raw: Buffer) => Credentials | undefined, token = false): Mechanism {
  return {
    name,
    needsPasswordCheck: false,
    ...(token ? { token } : {}),
    start: () => {
      let asked = false;
      return {
        step(response) {
          if (response === undefined) {
            if (asked) return { kind: 'malformed' };
            asked = true;
            return { kind: 'challenge', challenge: EMPTY };
          }
          const creds = parse(response);
          return creds ? { kind: 'done', credentials: creds } : { kind: 'malformed' };
        },
      };
    },
  };
}

/** RFC 4616: one message, authzid NUL authcid NUL password. */
const PLAIN = oneMessage('PLAIN', parsePlain);

/**
 * draft-murchison-sasl-login: "Username:" then "Password:". An initial response (some
 * clients send one with SASL-IR) is the user name. LOGIN carries no authzid.
 */
const LOGIN: Mechanism = {
  name: 'LOGIN',
  needsPasswordCheck: true,
  start: () => {
    let user: Buffer | undefined;
    let asked = false;
    return {
      step(response) {
        if (response === undefined) {
          if (asked || user) return { kind: 'malformed' };
          asked = true;
          return { kind: 'challenge', challenge: Buffer.from('Username:') };
        }
        if (!user) {
          if (response.length === 0 || response.includes(0)) return { kind: 'malformed' };
          user = response;
          return { kind: 'challenge', challenge: Buffer.from('Password:') };
        }
        if (response.includes(0)) return { kind: 'malformed' };
        return { kind: 'done', credentials: passwordCredentials(user, response) };
      },
    };
  },
};

/** RFC 7628: GS2 header with the login as authzid, then `auth=Bearer <token>`. */
const OAUTHBEARER = oneMessage('OAUTHBEARER', parseOauthBearer, true);
/** Google's XOAUTH2 (Outlook, Gmail clients): `user=<login>` and `auth=Bearer <token>`. */
const XOAUTH2 = oneMessage('XOAUTH2', parseXoauth2, true);

/** Keyed by upper-case name. */
export const MECHANISMS: ReadonlyMap<string, Mechanism> = new Map([PLAIN, LOGIN, OAUTHBEARER, XOAUTH2].map((m) => [m.name, m]));

/** What a connection may be offered: LOGIN needs a password check here, the token mechanisms auth.oauth. */
function allowed(m: Mechanism, passwordsChecked: boolean, tokens: boolean): boolean {
  return (passwordsChecked || !m.needsPasswordCheck) && (tokens || !m.token);
}

/** The mechanisms a client may use, in the order to advertise them. */
export function offeredMechanisms(passwordsChecked: boolean, tokens = false): Mechanism[] {
  return [...MECHANISMS.values()].filter((m) => allowed(m, passwordsChecked, tokens));
}

export function findMechanism(name: string, passwordsChecked: boolean, tokens = false): Mechanism | undefined {
  const m = MECHANISMS.get(name.toUpperCase());
  return m && allowed(m, passwordsChecked, tokens) ? m : undefined;
}

/** No mechanism here needs more; a client that keeps answering is refused. */
export const MAX_SASL_ROUNDS = 4;

export type SaslOutcome = { kind: 'ok'; credentials: Credentials } | { kind: 'cancelled' } | { kind: 'malformed' };

/** How a front end sends a challenge and reads the next response line (bounded by its line reader). */
export interface SaslWire {
  /** Writes `+ <base64>` (IMAP and POP3 alike). */
  challenge(b64: string): void;
  response(): Promise<string>;
}

/**
 * Runs one exchange. `initial` is the initial response as sent on the command line
 * (`=` for empty), undefined when there was none.
 */
export async function runSasl(mech: Mechanism, initial: string | undefined, wire: SaslWire): Promise<SaslOutcome> {
  const server = mech.start();
  let step: SaslStep;
  if (initial !== undefined) {
    const raw = decodeBase64(initial);
    if (raw === undefined) return { kind: 'malformed' };
    step = server.step(raw);
  } else {
    step = server.step(undefined);
  }
  for (let round = 0; ; round++) {
    if (step.kind === 'done') return { kind: 'ok', credentials: step.credentials };
    if (step.kind === 'malformed' || round >= MAX_SASL_ROUNDS) return { kind: 'malformed' };
    wire.challenge(encodeBase64(step.challenge));
    const line = await wire.response();
    if (line === '*') return { kind: 'cancelled' };
    const raw = decodeBase64(line);
    if (raw === undefined) return { kind: 'malformed' };
    step = server.step(raw);
  }
}
