import { timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Config } from './config.js';
import { readAdminToken } from './preflight.js';

/** What the admin endpoints read from the running proxy. */
export interface AdminSources {
  metrics(): Promise<{ contentType: string; text: string }>;
  health(): Promise<{ live: boolean; body: Record<string, unknown> }>;
}

/**
 * The admin HTTP server: GET /metrics (Prometheus) and GET /healthz, nothing else. Read-only,
 * so every other method is 405. With admin.token_file (required off loopback) every request
 * must carry `Authorization: Bearer <token>`.
 */
export async function startAdmin(cfg: NonNullable<Config['admin']>, sources: AdminSources): Promise<Server> {
  const token = cfg.token_file === undefined ? undefined : Buffer.from(readAdminToken(cfg.token_file));
  const server = createServer((req, res) => {
    if (token && !authorized(req, token)) {
      res.writeHead(401, { 'www-authenticate': 'Bearer realm="mailsplice"', 'content-type': 'text/plain' }).end('token required\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
      return;
    }
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/metrics' && path !== '/healthz') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
      return;
    }
    if (path === '/metrics') void serveMetrics(res, sources);
    else void serveHealth(res, sources);
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

async function serveHealth(res: ServerResponse, sources: AdminSources): Promise<void> {
  try {
    const { live, body } = await sources.health();
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
