import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { parseNetwork } from './net/networks.js';

// The config file is YAML. Every object is strict: a misspelt key stops the program with
// the file and the key's path in the message, rather than silently meaning "default".

const port = z.number().int().min(1).max(65535);
const tlsMode = z.enum(['none', 'starttls', 'implicit']);

const certPair = z.strictObject({ cert: z.string(), key: z.string() });

/** host:port, e.g. a sentinel: 10.0.0.5:26379, [::1]:26379. */
const hostPort = z
  .string()
  .regex(/^(\[[0-9a-fA-F:.]+\]|[^\s:[\]]+):\d{1,5}$/, 'host:port (an IPv6 address in brackets)')
  .refine((s) => {
    const p = Number(s.slice(s.lastIndexOf(':') + 1));
    return p >= 1 && p <= 65535;
  }, 'port 1-65535');

const redisTls = z.strictObject({
  /** CA bundle that signs the Redis (and sentinel) certificates; the system store when absent. */
  ca: z.string().optional(),
  servername: z.string().optional(),
  verify: z.boolean().default(true),
  /** Speak TLS to the sentinels as well. */
  sentinels: z.boolean().default(true),
});

const listener = z
  .strictObject({
    name: z.string().optional(),
    /** sieve: ManageSieve (RFC 5804), port 4190 unless given. */
    protocol: z.enum(['imap', 'pop3', 'lmtp', 'sieve']),
    address: z.string().default('127.0.0.1'),
    port: port.optional(),
    /** LMTP only: listen on a unix socket instead of (or as well as) TCP. */
    path: z.string().optional(),
    tls: tlsMode.default('none'),
    cert: z.string().optional(),
    key: z.string().optional(),
    /** Extra certificates chosen by the name the client asks for (SNI). */
    sni: z.record(z.string(), certPair).optional(),
    min_tls_version: z.enum(['TLSv1.2', 'TLSv1.3']).default('TLSv1.2'),
    /**
     * Allow LOGIN / USER+PASS / AUTH PLAIN before TLS. Defaults to true only on a `tls: none`
     * listener on a loopback address (like Dovecot's default): elsewhere passwords would cross
     * the network in clear.
     */
    plaintext_auth: z.boolean().optional(),
    max_connections: z.number().int().positive().default(20000),
    /**
     * PROXY protocol (v1 and v2) from load balancers (HAProxy send-proxy/send-proxy-v2, a
     * cloud TCP balancer): the address in the header is then the client's everywhere.
     * `required`: every connection must come from trusted_networks and start with a header
     * (others are refused); `from_trusted`: connections from trusted_networks must start with
     * a header, others are clients connecting directly (no header is read from them). TCP only.
     */
    proxy_protocol: z.enum(['off', 'required', 'from_trusted']).default('off'),
    /** Who may send a PROXY header: networks (10.0.0.0/8, 2001:db8::/32) or single addresses. */
    trusted_networks: z
      .array(
        z.string().superRefine((t, ctx) => {
          const n = parseNetwork(t);
          if (typeof n === 'string') ctx.addIssue({ code: 'custom', message: n });
        }),
      )
      .default([]),
    /** LMTP unix socket: permissions (an octal string, quoted in YAML), owner and group (name or number). */
    socket_mode: z
      .string()
      .regex(/^0?[0-7]{3}$/, 'an octal mode in quotes, such as "0660"')
      .default('0660'),
    socket_owner: z.string().min(1).optional(),
    socket_group: z.string().min(1).optional(),
  })
  .transform((l) => (l.protocol === 'sieve' && l.port === undefined ? { ...l, port: 4190 } : l))
  .superRefine((l, ctx) => {
    if (l.port === undefined && l.path === undefined) ctx.addIssue({ code: 'custom', message: 'needs a port (or a path for lmtp)' });
    if (l.path !== undefined && l.protocol !== 'lmtp') ctx.addIssue({ code: 'custom', path: ['path'], message: 'only lmtp listeners take a unix socket path' });
    if (l.tls !== 'none' && (!l.cert || !l.key)) ctx.addIssue({ code: 'custom', path: ['tls'], message: `tls: ${l.tls} needs cert and key` });
    if (l.proxy_protocol !== 'off' && l.trusted_networks.length === 0) {
      ctx.addIssue({ code: 'custom', path: ['trusted_networks'], message: `proxy_protocol: ${l.proxy_protocol} needs trusted_networks (the load balancers' addresses)` });
    }
    if (l.proxy_protocol === 'off' && l.trusted_networks.length > 0) {
      ctx.addIssue({ code: 'custom', path: ['trusted_networks'], message: 'trusted_networks only applies with proxy_protocol: required or from_trusted' });
    }
    if (l.proxy_protocol !== 'off' && l.path !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['proxy_protocol'], message: 'a PROXY header is read on TCP only, not on a unix socket (path); use a listener of its own' });
    }
    if (l.path === undefined && (l.socket_owner !== undefined || l.socket_group !== undefined)) {
      ctx.addIssue({ code: 'custom', path: ['socket_owner'], message: 'socket_owner and socket_group apply to a unix socket (path)' });
    }
  });

const backendTlsFields = {
  mode: tlsMode.default('none'),
  /** CA bundle that signs the backends' certificates; the system store when absent. */
  ca: z.string().optional(),
  /** Name to check the certificate against; the slot's host when absent. */
  servername: z.string().optional(),
  verify: z.boolean().default(true),
};

/**
 * TLS for one protocol of a slot group, over the group's own settings: a key left out is the
 * group's. A Cyrus slot can then take IMAP and POP3 over implicit TLS and LMTP over STARTTLS
 * (or over a trusted cleartext port) although the slot record has one host.
 */
const backendTlsOverride = z.strictObject({
  mode: tlsMode.optional(),
  ca: z.string().optional(),
  servername: z.string().optional(),
  verify: z.boolean().optional(),
});

export const BACKEND_PROTOCOLS = ['imap', 'pop3', 'lmtp', 'sieve'] as const;
export type BackendProtocol = (typeof BACKEND_PROTOCOLS)[number];

/**
 * A group of slots (globs as in tls_groups) whose backends are sent a PROXY v2 header, on
 * the protocols listed. LMTP is not among them: its backend connections are pooled and
 * carry many clients' messages, so no one client's address could stand for one.
 */
const proxyProtocolGroup = z.strictObject({
  slots: z.array(z.string().regex(/^[^\s]+$/, 'a slot id or glob')).min(1),
  protocols: z.array(z.enum(['imap', 'pop3'])).min(1).default(['imap', 'pop3']),
});

const backendTlsWithProtocols = z.strictObject({
  ...backendTlsFields,
  imap: backendTlsOverride.optional(),
  pop3: backendTlsOverride.optional(),
  lmtp: backendTlsOverride.optional(),
  /** ManageSieve (STARTTLS on the slot's sieve port, or implicit). */
  sieve: backendTlsOverride.optional(),
});

/**
 * TLS settings for a group of slots, overriding backend.tls. `slots` are globs on the slot
 * id (`*` any run of characters, `?` one; no wildcard means that exact id); the first group
 * with a matching pattern wins, a slot in no group uses backend.tls.
 */
const backendTlsGroup = backendTlsWithProtocols.extend({
  slots: z.array(z.string().regex(/^[^\s]+$/, 'a slot id or glob')).min(1),
});

/**
 * How mailsplice logs in to the backends of a group of slots (`slots`: globs as in
 * tls_groups, first match wins; a slot in none is passthrough). `admin_user` with
 * `admin_password_file` is the slot group's admin: IMAP/POP3 log in as it on the user's
 * behalf when `identity: admin` (src/auth/identity.ts), and LMTP always authenticates as it
 * (AUTH PLAIN) when the backend offers AUTH, whatever the IMAP/POP3 identity (Cyrus's
 * lmtpd without -a wants an authenticated client).
 */
const identityGroup = z
  .strictObject({
    slots: z.array(z.string().regex(/^[^\s]+$/, 'a slot id or glob')).min(1),
    /** passthrough: the client's own credentials; admin: the admin below acting for the user (needs auth.ldap). */
    identity: z.enum(['passthrough', 'admin']).default('passthrough'),
    admin_user: z.string().min(1).optional(),
    /** A file holding the admin's password (one line; a final newline is not part of it). */
    admin_password_file: z.string().optional(),
    /** The user's name on the backend when the user record has no backend_login: the full address or its local part (a Cyrus without virtdomains). */
    login_name: z.enum(['full', 'local_part']).default('full'),
    /** authzid: SASL PLAIN with authzid = user (Cyrus proxyservers, Dovecot); separator: LOGIN as user<separator>admin (Dovecot). */
    master_login_form: z.enum(['authzid', 'separator']).default('authzid'),
    master_separator: z.string().min(1).max(8).default('*'),
    /**
     * OAUTHBEARER/XOAUTH2 logins (auth.oauth): passthrough hands the token to the backend,
     * which checks it (Dovecot's oauth2 passdb); check verifies it here (auth.oauth
     * introspection or jwt) and logs in as admin_user for the user.
     */
    oauth: z.enum(['passthrough', 'check']).default('passthrough'),
  })
  .superRefine((g, ctx) => {
    if ((g.admin_user === undefined) !== (g.admin_password_file === undefined)) {
      ctx.addIssue({ code: 'custom', path: ['admin_password_file'], message: 'admin_user and admin_password_file go together' });
    }
    if (g.identity === 'admin' && g.admin_user === undefined) {
      ctx.addIssue({ code: 'custom', path: ['admin_user'], message: 'identity: admin needs admin_user and admin_password_file' });
    }
    if (g.oauth === 'check' && g.admin_user === undefined) {
      ctx.addIssue({ code: 'custom', path: ['admin_user'], message: 'oauth: check needs admin_user and admin_password_file (the proxy logs in as it for the token\'s user)' });
    }
  });

/** Passwords checked by the proxy against an LDAP directory (src/auth/ldap.ts). */
const ldapAuth = z
  .strictObject({
    /** ldap://host[:port] (then starttls: true off loopback) or ldaps://host[:port]. */
    url: z.string().regex(/^ldaps?:\/\/[^/]+\/?$/, 'ldap://host[:port] or ldaps://host[:port]'),
    starttls: z.boolean().default(false),
    /** CA bundle for the directory's certificate; the system store when absent. */
    ca: z.string().optional(),
    servername: z.string().optional(),
    verify: z.boolean().default(true),
    /** The service DN that searches users; anonymous when absent. */
    bind_dn: z.string().optional(),
    bind_password_file: z.string().optional(),
    base_dn: z.string().min(1),
    /** Finds the user's entry: %u the login, %n its local part, %d its domain (values escaped). */
    filter: z.string().regex(/%[und]/, 'must use %u, %n or %d').default('(mail=%u)'),
    /** Attribute of the entry whose value is the login to route by (alias logins map to it); the client's login when absent. */
    login_attribute: z.string().regex(/^[A-Za-z][A-Za-z0-9-]*$/).optional(),
    pool_size: z.number().int().min(1).max(64).default(4),
    /** Checks waiting for a connection beyond this are answered UNAVAILABLE at once. */
    queue_limit: z.number().int().min(0).default(256),
    /** Per LDAP operation, and the longest wait for a pooled connection. */
    timeout_ms: z.number().int().positive().default(5000),
    connect_timeout_ms: z.number().int().positive().default(3000),
  })
  .superRefine((l, ctx) => {
    if (l.starttls && l.url.startsWith('ldaps://')) ctx.addIssue({ code: 'custom', path: ['starttls'], message: 'starttls with ldaps:// (TLS is already on)' });
    if ((l.bind_dn === undefined) !== (l.bind_password_file === undefined)) {
      ctx.addIssue({ code: 'custom', path: ['bind_dn'], message: 'set both bind_dn and bind_password_file, or neither (anonymous search)' });
    }
  });

/**
 * How many processes serve the listeners: `auto` is one per CPU the process may use
 * (os.availableParallelism()). With 1 the proxy runs in one process as it always did; with
 * more, a primary process (admin listener, no sessions) forks that many workers that share
 * the listening sockets (src/cluster/).
 */
const workers = z.union([z.literal('auto'), z.number().int().min(1).max(256)]).default('auto');

/**
 * OAuth 2.0 bearer tokens (OAUTHBEARER, RFC 7628; XOAUTH2). With this section the
 * mechanisms are offered; each slot group's `oauth` says whether its backend checks the
 * token (passthrough) or the proxy does (check: `introspection` or `jwt` below).
 */
const oauthAuth = z
  .strictObject({
    mechanisms: z.array(z.enum(['OAUTHBEARER', 'XOAUTH2'])).min(1).default(['OAUTHBEARER', 'XOAUTH2']),
    /** The claim (JWT) or introspection field that names the login; it must equal the login the client gave. */
    username_claim: z.string().min(1).default('email'),
    /** When set, a token's `iss` must equal it. */
    issuer: z.string().min(1).optional(),
    /** When set, a token's `aud` (a string or a list) must contain it. */
    audience: z.string().min(1).optional(),
    /** RFC 7662 token introspection. */
    introspection: z
      .strictObject({
        url: z.string().regex(/^https?:\/\/[^/]/, 'an http:// or https:// URL'),
        /** Client authentication at the endpoint (HTTP Basic), both or neither. */
        client_id: z.string().min(1).optional(),
        client_secret_file: z.string().optional(),
      })
      .refine((i) => (i.client_id === undefined) === (i.client_secret_file === undefined), { path: ['client_secret_file'], message: 'client_id and client_secret_file go together' })
      .optional(),
    /** Signed JWT access tokens, checked against a JWKS (a file, or a URL fetched and refreshed). */
    jwt: z
      .strictObject({
        jwks_file: z.string().optional(),
        jwks_url: z.string().regex(/^https?:\/\/[^/]/, 'an http:// or https:// URL').optional(),
        /** How long a fetched JWKS is used before it is fetched again (an unknown key id fetches it sooner, at most once a minute). */
        jwks_refresh_ms: z.number().int().min(60_000).default(3_600_000),
        algorithms: z.array(z.enum(['RS256', 'ES256'])).min(1).default(['RS256', 'ES256']),
        /** Leeway for exp and nbf. */
        clock_skew_s: z.number().int().min(0).max(600).default(30),
      })
      .refine((j) => (j.jwks_file === undefined) !== (j.jwks_url === undefined), { message: 'set exactly one of jwks_file or jwks_url' })
      .optional(),
    /** Each introspection or JWKS request. */
    timeout_ms: z.number().int().positive().default(3000),
    /** A good token's verdict is kept this long (never past its exp), for at most cache_entries tokens. */
    cache_ttl_ms: z.number().int().nonnegative().default(60_000),
    cache_entries: z.number().int().nonnegative().default(10_000),
    /** Told to a client whose token was refused (RFC 7628 error status). */
    scope: z.string().optional(),
    openid_configuration: z.string().optional(),
  })
  .refine((o) => !(o.introspection && o.jwt), { message: 'set introspection or jwt, not both' });

const sections = z.strictObject({
  listeners: z.array(listener).min(1),
  workers,
  lookup: z
    .strictObject({
      /** The embedded default: routes from a YAML file, watched for changes. */
      file: z.string().optional(),
      redis: z
        .strictObject({
          /** One Redis; redis://127.0.0.1:6379 when neither url nor sentinels is set. */
          url: z.string().optional(),
          /** Redis Sentinel instead of url: the sentinels (host:port) that watch the master group `name`. */
          sentinels: z.array(hostPort).min(1).optional(),
          /** The master group's name in the sentinels' config (`sentinel monitor NAME ...`). */
          name: z.string().min(1).optional(),
          /** Redis ACL user and password (also for the Redis a sentinel names); a url may carry them too. */
          username: z.string().min(1).optional(),
          password: z.string().min(1).optional(),
          /** The sentinels' own password (`requirepass` in sentinel.conf), when they have one. */
          sentinel_password: z.string().min(1).optional(),
          /** TLS to Redis (with a url, rediss:// does the same with the system CAs); `sentinels: false` talks to the sentinels in clear. */
          tls: redisTls.optional(),
          prefix: z.string().default('ms:'),
          command_timeout_ms: z.number().int().positive().default(2000),
          /** How often the event subscription is PINGed. */
          heartbeat_ms: z.number().int().positive().default(1000),
          /** Silence on the event subscription past this counts as "events lost". */
          heartbeat_timeout_ms: z.number().int().positive().default(3000),
          /**
           * How often this proxy writes its heartbeat record (<prefix>proxy:<id>, what
           * `ctl proxies` and `ctl who` read); the record expires after three times this.
           */
          proxy_heartbeat_ms: z.number().int().min(100).default(5000),
          /** This proxy's id in the heartbeat records (default <hostname>:<pid>). */
          proxy_id: z.string().regex(/^[\x21-\x7e]{1,200}$/, 'printable ASCII without spaces').optional(),
        })
        .superRefine((r, ctx) => {
          if (r.heartbeat_timeout_ms <= r.heartbeat_ms) ctx.addIssue({ code: 'custom', path: ['heartbeat_timeout_ms'], message: 'must be more than heartbeat_ms' });
          if (r.sentinels && r.url !== undefined) ctx.addIssue({ code: 'custom', path: ['url'], message: 'set url or sentinels, not both' });
          if (r.sentinels && r.name === undefined) ctx.addIssue({ code: 'custom', path: ['name'], message: 'sentinels need the master group name' });
          if (!r.sentinels && r.name !== undefined) ctx.addIssue({ code: 'custom', path: ['name'], message: 'name goes with sentinels' });
          if (!r.sentinels && r.sentinel_password !== undefined) ctx.addIssue({ code: 'custom', path: ['sentinel_password'], message: 'sentinel_password goes with sentinels' });
        })
        .optional(),
      default_domain: z.string().optional(),
      cache_users: z.number().int().positive().default(1_000_000),
      max_stale_ms: z.number().int().nonnegative().default(5000),
      /** A resync that finds more than this share of the known routes gone is a lookup failure (1: never). */
      max_resync_removed: z.number().min(0).max(1).default(0.5),
      /** Failed resyncs are retried with exponential backoff up to this. */
      resync_retry_max_ms: z.number().int().min(500).default(30_000),
    })
    .superRefine((l, ctx) => {
      if (!l.file === !l.redis) ctx.addIssue({ code: 'custom', message: 'set exactly one of lookup.file or lookup.redis' });
    }),
  limits: z
    .strictObject({
      // 64 KiB: the longest RFC-legal pre-auth command, an RFC 2971 ID of 30 fields with
      // 1024-octet values all quoted with escapes, is about 63 KB. A socket read hands over
      // up to 64 KiB at once anyway, so this costs no more memory per connection than 8 KiB.
      line_length: z.number().int().min(512).default(65536),
      literal_size: z.number().int().min(256).default(8192),
      bad_commands: z.number().int().positive().default(10),
      preauth_commands: z.number().int().positive().default(50),
      auth_failures: z.number().int().positive().default(3),
      login_timeout_ms: z.number().int().positive().default(60_000),
      connections_per_ip: z.number().int().positive().default(500),
      /**
       * Login attempts one client IP may fail per minute before it is turned away. An attempt
       * counts from the moment it starts (a success gives its place back), so logins sent all
       * at once cannot slip past; counted in Redis when the lookup is Redis (shared by every
       * proxy on it), in this process otherwise or while Redis is away.
       */
      auth_failures_per_ip_per_minute: z.number().int().positive().default(60),
      /** After the backend closed a session (e.g. LOGOUT), how long the client may keep its side (and its per-IP slot) open. */
      half_close_timeout_ms: z.number().int().positive().default(5000),
      /** Logins one client IP may have in progress at once on this proxy; more are refused at once. */
      concurrent_logins_per_ip: z.number().int().positive().default(10),
      /**
       * Every failed login is answered this long after it started (like Dovecot's
       * auth_failure_delay), whatever the reason: an unknown user, a wrong password and a
       * throttled address all look alike. 0: answer at once.
       */
      auth_failure_delay_ms: z.number().int().nonnegative().max(60_000).default(2000),
    })
    .superRefine((l, ctx) => {
      // Otherwise every failed login would run into the login deadline before its answer.
      if (l.auth_failure_delay_ms >= l.login_timeout_ms) {
        ctx.addIssue({ code: 'custom', path: ['auth_failure_delay_ms'], message: `must be less than login_timeout_ms (${l.login_timeout_ms})` });
      }
    })
    .prefault({}),
  backend: z
    .strictObject({
      connect_timeout_ms: z.number().int().positive().default(5000),
      login_timeout_ms: z.number().int().positive().default(15_000),
      tls: backendTlsWithProtocols.prefault({}),
      tls_groups: z.array(backendTlsGroup).default([]),
      identity_groups: z.array(identityGroup).default([]),
      /**
       * Slot groups whose backends take a PROXY protocol v2 header (Dovecot: an
       * inet_listener with `haproxy = yes`, the proxies in haproxy_trusted_networks): every
       * IMAP/POP3 connection to them starts with one naming the client. First match wins.
       */
      proxy_protocol_groups: z.array(proxyProtocolGroup).default([]),
      /**
       * Send the client's address to IMAP backends with ID, to POP3 backends with XCLIENT.
       * On by default: a backend's per-address limits (Dovecot's auth penalty) must see the
       * client, not the proxy, or one attacker slows every login. Dovecot takes it only from
       * its login_trusted_networks (list the proxies there) and ignores it from anyone else.
       */
      forward_client_ip: z.boolean().default(true),
      /**
       * Backend logins in progress at once per slot (connect to the end of the login
       * dialogue; LMTP: connect to the envelope's answer). After a failover a store's clients
       * all log in to the new master in the same second: the excess waits in a short queue.
       * 0: no bound.
       */
      logins_per_slot: z.number().int().nonnegative().default(100),
      /** Logins that may wait per slot; past it the temporary error (NO [UNAVAILABLE], -ERR [SYS/TEMP], LMTP 451). */
      login_queue_per_slot: z.number().int().nonnegative().default(500),
      /** The longest wait in that queue, then the temporary error. */
      login_queue_timeout_ms: z.number().int().positive().default(5000),
    })
    .prefault({}),
  auth: z.strictObject({ ldap: ldapAuth.optional(), oauth: oauthAuth.optional() }).prefault({}),
  lmtp: z
    .strictObject({
      hostname: z.string().default('mailsplice'),
      max_message_size: z.number().int().positive().default(50 * 1024 * 1024),
      max_recipients: z.number().int().positive().default(1000),
      timeout_ms: z.number().int().positive().default(120_000),
      // Per client address on TCP (a unix socket's clients have none and are not limited):
      /** Connections at once; more get 421 4.7.0. */
      connections_per_ip: z.number().int().positive().default(100),
      /** RCPT commands per minute; more get 452 4.5.3 (the client sends them later). */
      recipients_per_ip_per_minute: z.number().int().positive().default(100_000),
      /**
       * Unknown-recipient answers (550 5.1.1) per minute. Past it, every RCPT from the address
       * gets 450 4.7.1 until the minute is over, known or not: no more telling them apart.
       */
      unknown_recipients_per_ip_per_minute: z.number().int().positive().default(1000),
      /**
       * Absolute time for one transaction, from the connection (or the end of the previous
       * transaction) to the last reply after DATA, however steadily the client trickles bytes
       * (timeout_ms is for silence). Past it: 421 4.4.2 and the connection closes.
       */
      transaction_timeout_ms: z.number().int().positive().default(600_000),
      /** How long an idle backend LMTP connection is kept for the next message; 0: never kept. */
      backend_idle_ms: z.number().int().nonnegative().default(10_000),
      /** Reserved: the LMTP proxy streams every message with backpressure and never spools. */
      spool_dir: z.string().optional(),
    })
    .prefault({}),
  admin: z
    .strictObject({
      address: z.string().default('127.0.0.1'),
      port: port,
      /** File holding a secret; every request must then send `Authorization: Bearer <secret>`. Required off loopback. */
      token_file: z.string().optional(),
    })
    .optional(),
  log: z.strictObject({ level: z.enum(['debug', 'info', 'warn', 'error']).default('info') }).prefault({}),
  shutdown: z
    .strictObject({
      /**
       * SIGTERM: logged-in IMAP/POP3 sessions get their BYE spread over this long (so the
       * other proxies get the reconnects as a stream), LMTP transactions under way may finish
       * within it; the process exits when nothing is left, or at this deadline.
       */
      drain_ms: z.number().int().nonnegative().default(10_000),
    })
    .prefault({}),
});

const schema = sections.superRefine(crossChecks);

/** Checks that span sections: what `serve` would otherwise only find out when it binds or connects. */
function crossChecks(cfg: z.infer<typeof sections>, ctx: z.RefinementCtx): void {
  const url = cfg.lookup.redis?.url;
  if (url !== undefined && cfg.lookup.redis?.sentinels === undefined && !/^rediss?:\/\/[^/]/.test(url)) {
    // ioredis reads anything else (http://…) as a unix socket path and retries it for ever.
    ctx.addIssue({ code: 'custom', path: ['lookup', 'redis', 'url'], message: `must be redis://host[:port][/db] or rediss://… (got ${JSON.stringify(url)})` });
  }
  if (cfg.admin && !isLoopback(cfg.admin.address) && cfg.admin.token_file === undefined) {
    ctx.addIssue({
      code: 'custom',
      path: ['admin', 'token_file'],
      message: `admin.address ${cfg.admin.address} is not loopback: set admin.token_file (requests must then send Authorization: Bearer <token>)`,
    });
  }
  // Two sockets on one address and port: the second bind fails at start, so say it here.
  const binds: { what: string; address: string; port: number; path: (string | number)[] }[] = cfg.listeners.flatMap((l, i) =>
    l.port === undefined ? [] : [{ what: `listeners.${i} (${l.name ?? l.protocol})`, address: l.address, port: l.port, path: ['listeners', i, 'port'] }],
  );
  if (cfg.admin) binds.push({ what: 'admin', address: cfg.admin.address, port: cfg.admin.port, path: ['admin', 'port'] });
  binds.forEach((b, i) => {
    const clash = binds.slice(0, i).find((o) => o.port === b.port && (o.address === b.address || isWildcard(o.address) || isWildcard(b.address)));
    if (clash) ctx.addIssue({ code: 'custom', path: b.path, message: `${b.address}:${b.port} is also used by ${clash.what}` });
  });
  // Admin mode logs in for a user whatever password the client gave: only after the proxy checked it.
  cfg.backend.identity_groups.forEach((g, i) => {
    if (g.identity === 'admin' && !cfg.auth.ldap) {
      ctx.addIssue({ code: 'custom', path: ['backend', 'identity_groups', i, 'identity'], message: 'identity: admin needs a password checker at the proxy (auth.ldap)' });
    }
    // Likewise a token: the admin logs in for whoever the token names, so it must be checked here.
    if (g.oauth === 'check' && !cfg.auth.oauth?.introspection && !cfg.auth.oauth?.jwt) {
      ctx.addIssue({ code: 'custom', path: ['backend', 'identity_groups', i, 'oauth'], message: 'oauth: check needs auth.oauth.introspection or auth.oauth.jwt' });
    }
  });
  const paths = new Map<string, number>();
  cfg.listeners.forEach((l, i) => {
    if (l.path === undefined) return;
    if (paths.has(l.path)) ctx.addIssue({ code: 'custom', path: ['listeners', i, 'path'], message: `${l.path} is also used by listeners.${paths.get(l.path)}` });
    paths.set(l.path, i);
  });
}

/** Whether only this host can reach an address (127.0.0.0/8, ::1, localhost). */
export function isLoopback(address: string): boolean {
  const a = address.toLowerCase().replace(/^\[|\]$/g, '');
  return a === 'localhost' || a === '::1' || /^(::ffff:)?127\.\d+\.\d+\.\d+$/.test(a);
}

function isWildcard(address: string): boolean {
  return address === '0.0.0.0' || address === '::' || address === '' || address === '[::]';
}

export type Config = z.infer<typeof schema>;
export type ListenerConfig = Config['listeners'][number];
/** One resolved TLS setting towards a backend (the per-protocol overrides already applied). */
export type BackendTlsConfig = Pick<Config['backend']['tls'], 'mode' | 'ca' | 'servername' | 'verify'>;
export type IdentityGroupConfig = Config['backend']['identity_groups'][number];
export type RedisLookupConfig = NonNullable<Config['lookup']['redis']>;
export type OauthConfig = NonNullable<Config['auth']['oauth']>;

export class ConfigError extends Error {}

/** Validates a parsed document; `source` names the file in error messages. */
export function parseConfig(doc: unknown, source: string, baseDir = '.'): Config {
  const result = schema.safeParse(doc);
  if (!result.success) {
    const lines = result.error.issues.map((i) => {
      const where = i.path.length ? i.path.join('.') : '(top level)';
      return `  ${where}: ${i.message}`;
    });
    throw new ConfigError(`invalid config ${source}:\n${lines.join('\n')}`);
  }
  const cfg = result.data;
  // Paths in the file are relative to the file, so a config dir can be moved whole.
  const abs = (p: string | undefined) => (p === undefined ? undefined : resolve(baseDir, p));
  if (cfg.lookup.file) cfg.lookup.file = abs(cfg.lookup.file);
  const redis = cfg.lookup.redis;
  if (redis && !redis.sentinels) redis.url ??= 'redis://127.0.0.1:6379';
  if (redis?.tls) redis.tls.ca = abs(redis.tls.ca);
  for (const l of cfg.listeners) {
    l.cert = abs(l.cert);
    l.key = abs(l.key);
    l.path = abs(l.path);
    for (const pair of Object.values(l.sni ?? {})) {
      pair.cert = abs(pair.cert)!;
      pair.key = abs(pair.key)!;
    }
  }
  if (cfg.admin) cfg.admin.token_file = abs(cfg.admin.token_file);
  for (const t of [cfg.backend.tls, ...cfg.backend.tls_groups]) {
    t.ca = abs(t.ca);
    for (const p of BACKEND_PROTOCOLS) if (t[p]) t[p].ca = abs(t[p].ca);
  }
  for (const g of cfg.backend.identity_groups) g.admin_password_file = abs(g.admin_password_file);
  if (cfg.lmtp.spool_dir) cfg.lmtp.spool_dir = abs(cfg.lmtp.spool_dir);
  if (cfg.auth.oauth) {
    const o = cfg.auth.oauth;
    if (o.introspection) o.introspection.client_secret_file = abs(o.introspection.client_secret_file);
    if (o.jwt) o.jwt.jwks_file = abs(o.jwt.jwks_file);
  }
  if (cfg.auth.ldap) {
    cfg.auth.ldap.ca = abs(cfg.auth.ldap.ca);
    cfg.auth.ldap.bind_password_file = abs(cfg.auth.ldap.bind_password_file);
  }
  return cfg;
}

export function loadConfig(file: string): Config {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError(`cannot read config ${file}: ${(e as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (e) {
    throw new ConfigError(`config ${file} is not valid YAML: ${(e as Error).message}`);
  }
  return parseConfig(doc, file, dirname(resolve(file)));
}

/** Whether a listener accepts cleartext credentials before TLS. */
export function plaintextAllowed(l: ListenerConfig): boolean {
  return l.plaintext_auth ?? (l.tls === 'none' && isLoopback(l.address));
}

/** The number of processes `workers` means on this machine. */
export function workerCount(workers: Config['workers']): number {
  return workers === 'auto' ? availableParallelism() : workers;
}
