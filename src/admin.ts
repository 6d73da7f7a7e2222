import { timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Config } from './config.js';
import type { SessionList } from './fleet/sessions.js';
import { readAdminToken } from './preflight.js';

/** What the admin endpoints read from (and, for POST /kick, do to) the running proxy. */
export interface AdminSources {
  metrics(): Promise<{ contentType: string; text: string }>;
  health(): Promise<{ live: boolean; body: Record<string, unknown> }>;
  /** Ready for traffic: listeners bound, lookup reachable, events flowing (every worker). */
  ready?(): Promise<{ live: boolean; body: Record<string, unknown> }>;
  /** The sessions matching a /sessions query string (an error text for a bad query). */
  sessions?(query: URLSearchParams): Promise<SessionList | string>;
  /** Ends the sessions a kick names on this instance only; how many. */
  kick?(query: URLSearchParams): Promise<{ ended: number } | string>;
}

const READS = new Set(['/metrics', '/healthz', '/readyz', '/sessions']);

/**
 * The admin HTTP server. Reads (GET, HEAD): /metrics (Prometheus), /healthz, /readyz,
 * /sessions (JSON). One write (POST): /kick?user=|store=|slot= ends those sessions on this
 * proxy only (the Redis kick event reaches every proxy); writes are refused (403) unless
 * admin.token_file is set, so a token always guards them. With admin.token_file (required
 * off loopback) every request must carry `Authorization: Bearer <token>`.
 */
export async function startAdmin(cfg: NonNullable<Config['admin']>, sources: AdminSources): Promise<Server> {
  const token = cfg.token_file === undefined ? undefined : Buffer.from(readAdminToken(cfg.token_file));
  const server = createServer((req, res) => {
    if (token && !authorized(req, token)) {
      res.writeHead(401, { 'www-authenticate': 'Bearer realm="mailsplice"', 'content-type': 'text/plain' }).end('token required\n');
      return;
    }
    const url = new URL(req.url ?? '/', 'http://admin');
    const path = url.pathname;
    if (path === '/kick' && sources.kick) {
      if (req.method !== 'POST') {
        res.writeHead(405, { allow: 'POST', 'content-type': 'text/plain' }).end('method not allowed\n');
        return;
      }
      if (!token) {
        res.writeHead(403, { 'content-type': 'text/plain' }).end('write actions need admin.token_file in the config\n');
        return;
      }
      req.resume(); // no body is read
      void serveJson(res, () => sources.kick!(url.searchParams));
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
      return;
    }
    if (!READS.has(path) || (path === '/readyz' && !sources.ready) || (path === '/sessions' && !sources.sessions)) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
      return;
    }
    if (path === '/metrics') void serveMetrics(res, sources);
    else if (path === '/healthz') void serveHealth(res, () => sources.health());
    else if (path === '/readyz') void serveHealth(res, () => sources.ready!());
    else void serveJson(res, () => sources.sessions!(url.searchParams));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(cfg.port, cfg.address, () => {
      server.off('error', reject);
      resolve();
    });
  }).catch((e: NodeJS.ErrnoException) => {
    throw new Error(`admin listener ${cfg.address}:${cfg.port}: ${e.code === 'EADDRINUSE' ? 'address already in use' : e.message}`);
  });
  return server;
}

async function serveMetrics(res: ServerResponse, sources: AdminSources): Promise<void> {
  try {
    const { contentType, text } = await sources.metrics();
    res.writeHead(200, { 'content-type': contentType }).end(text);
  } catch (e) {
    res.writeHead(500, { 'content-type': 'text/plain' }).end(`metrics failed: ${(e as Error).message}\n`);
  }
}

/** A JSON answer, or 400 with the text when the request was bad. */
async function serveJson(res: ServerResponse, answer: () => Promise<object | string>): Promise<void> {
  try {
    const a = await answer();
    if (typeof a === 'string') res.writeHead(400, { 'content-type': 'text/plain' }).end(`${a}\n`);
    else res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(a));
  } catch (e) {
    res.writeHead(500, { 'content-type': 'text/plain' }).end(`failed: ${(e as Error).message}\n`);
  }
}

async function serveHealth(res: ServerResponse, read: () => Promise<{ live: boolean; body: Record<string, unknown> }>): Promise<void> {
  try {
    const { live, body } = await read();
    res.writeHead(live ? 200 : 503, { 'content-type': 'application/json' }).end(JSON.stringify(body));
  } catch (e) {
    res.writeHead(503, { 'content-type': 'application/json' }).end(JSON.stringify({ error: (e as Error).message }));
  }
}

function authorized(req: IncomingMessage, token: Buffer): boolean {
  const m = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
  if (!m) return false;
  const given = Buffer.from(m[1]!);
  // Constant time, so the token cannot be guessed a byte at a time from response times.
  return given.length === token.length && timingSafeEqual(given, token);
}
