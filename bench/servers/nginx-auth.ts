// The auth_http lookup service nginx's mail proxy needs: for each login nginx sends an HTTP
// request with Auth-User/Auth-Pass; we answer where that user's backend is, from an
// in-memory map (the same job mailsplice's route cache does in-process). The backend checks
// the password, as with mailsplice. Plain node:http, as a team would write it.
//
//   node --import tsx bench/servers/nginx-auth.ts HARD_STOP_SECONDS
//
// Receives {users: [login, host, imapPort, pop3Port?][]} over IPC (nginx says which protocol
// in Auth-Protocol), then listens on 127.0.0.1 (free port)
// and answers {type:'listening', port, pid}.

import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';

const [hardStop = '600'] = process.argv.slice(2);
setTimeout(() => {
  process.stderr.write(`nginx-auth: hard stop after ${hardStop} s\n`);
  process.exit(3);
}, Number(hardStop) * 1000).unref();
process.on('disconnect', () => process.exit(0));

type Route = [login: string, host: string, imap: number, pop3?: number];
const msg = await new Promise<{ users: Route[] }>((r) => process.once('message', (m) => r(m as { users: Route[] })));
const routes = new Map<string, { host: string; imap: string; pop3: string }>();
for (const [login, host, imap, pop3] of msg.users) routes.set(login.toLowerCase(), { host, imap: String(imap), pop3: String(pop3 ?? 0) });

let requests = 0;
const server = createServer((req, res) => {
  requests++;
  const user = decodeURIComponent(String(req.headers['auth-user'] ?? '')).toLowerCase();
  const r = routes.get(user);
  if (r) {
    res.writeHead(200, { 'Auth-Status': 'OK', 'Auth-Server': r.host, 'Auth-Port': req.headers['auth-protocol'] === 'pop3' ? r.pop3 : r.imap });
  } else {
    res.writeHead(200, { 'Auth-Status': 'Invalid login or password', 'Auth-Wait': '1' });
  }
  res.end();
});
server.listen({ host: '127.0.0.1', port: 0, backlog: 4096 }, () => {
  process.send!({ type: 'listening', port: (server.address() as AddressInfo).port, pid: process.pid });
});
process.on('message', (m: { type?: string }) => {
  if (m.type === 'stats') process.send!({ type: 'stats', requests });
});
