// A tiny IMAP backend for the memory and failover scenarios: it greets with capabilities,
// accepts any LOGIN or AUTHENTICATE PLAIN, answers CAPABILITY/NOOP/LOGOUT/ID, any FETCH with
// one 1 MiB message (bench/tools/fetch-cpu.ts) and otherwise just holds the connection. A proxy's memory per idle session does not depend on what the
// backend is; this one holds ten thousand sessions in one process, which Dovecot (a process
// per session) could not on this machine.
//
//   node --import tsx bench/servers/fake-imap.ts HOST:PORT[,HOST:PORT...] HARD_STOP_SECONDS
//
// Sends {type:'listening', addresses:[{host,port}]} over IPC once every listener is up.

import net from 'node:net';

const CAPS = 'IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN';
const [spec = '', hardStop = '600'] = process.argv.slice(2);

setTimeout(() => {
  process.stderr.write(`fake-imap: hard stop after ${hardStop} s\n`);
  process.exit(3);
}, Number(hardStop) * 1000).unref();
process.on('disconnect', () => process.exit(0));

function serve(sock: net.Socket): void {
  sock.setNoDelay(true);
  sock.on('error', () => sock.destroy());
  let buf = '';
  let skip = 0;
  let command = '';
  sock.setEncoding('latin1');
  sock.write(`* OK [CAPABILITY ${CAPS}] fake backend ready\r\n`);
  sock.on('data', (chunk: string) => {
    buf += chunk;
    for (;;) {
      if (skip > 0) {
        const n = Math.min(skip, buf.length);
        command += 'x'.repeat(n > 64 ? 0 : n);
        buf = buf.slice(n);
        skip -= n;
        if (skip > 0) return;
      }
      const nl = buf.indexOf('\n');
      if (nl < 0) {
        if (buf.length > 65536) sock.destroy();
        return;
      }
      const line = buf.slice(0, nl).replace(/\r$/, '');
      buf = buf.slice(nl + 1);
      const lit = /\{(\d+)(\+?)\}$/.exec(line);
      if (lit) {
        command += line.slice(0, lit.index);
        skip = Number(lit[1]);
        if (!lit[2]) sock.write('+ go ahead\r\n');
        continue;
      }
      command += line;
      answer(sock, command);
      command = '';
    }
  });
}

/** `FETCH ...` answers one 1 MiB message (CRLF lines of 78 bytes), for the splice's CPU per byte. */
const MESSAGE_BYTES = 1 << 20;
const fetchAnswer = (() => {
  const line = Buffer.from(`${'0123456789abcdefghijklmnopqrstuvwxyz'.repeat(3).slice(0, 76)}\r\n`, 'latin1');
  const head = Buffer.from(`* 1 FETCH (BODY[] {${MESSAGE_BYTES}}\r\n`, 'latin1');
  const b = Buffer.alloc(head.length + MESSAGE_BYTES + 3, 'x');
  head.copy(b, 0);
  for (let o = head.length; o + line.length <= head.length + MESSAGE_BYTES; o += line.length) line.copy(b, o);
  b.write(')\r\n', head.length + MESSAGE_BYTES, 'latin1');
  return b;
})();

function answer(sock: net.Socket, command: string): void {
  const [tag = '*', name = ''] = command.split(' ', 2);
  switch (name.toUpperCase()) {
    case 'LOGIN':
    case 'AUTHENTICATE':
      sock.write(`${tag} OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE] Logged in\r\n`);
      return;
    case 'CAPABILITY':
      sock.write(`* CAPABILITY ${CAPS}\r\n${tag} OK done\r\n`);
      return;
    case 'ID':
      sock.write(`* ID NIL\r\n${tag} OK done\r\n`);
      return;
    case 'FETCH':
      // The FETCH scenario's message, in one write as a server with it in memory would.
      sock.write(fetchAnswer);
      sock.write(`${tag} OK done\r\n`);
      return;
    case 'LOGOUT':
      sock.end(`* BYE bye\r\n${tag} OK done\r\n`);
      return;
    default:
      sock.write(`${tag} OK done\r\n`);
  }
}

const addresses: { host: string; port: number }[] = [];
for (const hp of spec.split(',').filter(Boolean)) {
  const [host = '127.0.0.1', port = '0'] = hp.split(':');
  const server = net.createServer({ noDelay: true }, serve);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port: Number(port), backlog: 4096 }, () => resolve());
  });
  const a = server.address() as net.AddressInfo;
  addresses.push({ host: a.address, port: a.port });
}
process.send!({ type: 'listening', addresses });
