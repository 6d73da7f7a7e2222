import { execFile } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { stringify } from 'yaml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeCA, makeCert, type CertFiles } from './harness/certs.js';
import { freePort } from './harness/ports.js';
import { tempDir } from './support/tmp.js';

// Issue 14 item 8: `check-config` refuses what `serve` would fail on, `serve` fails in one
// line, and the CLI answers --help and --version. Real processes of the real CLI.

const execFileP = promisify(execFile);
const CLI = resolve(import.meta.dirname, '../src/cli.ts');
const dir = tempDir('cli');
const routes = join(dir, 'routes.yaml');
copyFileSync(resolve(import.meta.dirname, '../deploy/routes.example.yaml'), routes);

interface Outcome {
  code: number;
  stdout: string;
  stderr: string;
}

async function cli(...args: string[]): Promise<Outcome> {
  try {
    const { stdout, stderr } = await execFileP(process.execPath, ['--import', 'tsx', CLI, ...args], { timeout: 30_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

let n = 0;
function configFile(doc: Record<string, unknown>): string {
  const p = join(dir, `c${++n}.yaml`);
  writeFileSync(p, stringify({ lookup: { file: routes }, ...doc }));
  return p;
}

let ca: CertFiles;
let cert: CertFiles;
let other: CertFiles;
beforeAll(async () => {
  ca = await makeCA(join(dir, 'ca'));
  cert = await makeCert(join(dir, 'a'), { ca, cn: 'mail.example.test' });
  other = await makeCert(join(dir, 'b'), { ca, cn: 'other.example.test' });
});

describe('the CLI', () => {
  it('answers --version, serve --help and check-config --help', async () => {
    const { version } = JSON.parse(readFileSync(resolve(import.meta.dirname, '../package.json'), 'utf8')) as { version: string };
    expect(await cli('--version')).toMatchObject({ code: 0, stdout: `mailsplice ${version}\n` });
    const serve = await cli('serve', '--help');
    expect(serve).toMatchObject({ code: 0 });
    expect(serve.stdout).toMatch(/^usage: mailsplice serve --config FILE/);
    const check = await cli('check-config', '--help');
    expect(check).toMatchObject({ code: 0 });
    expect(check.stdout).toMatch(/^usage: mailsplice check-config --config FILE/);
  });
});

describe('check-config and serve refuse the same configs', () => {
  const cases: [string, () => Record<string, unknown>, RegExp][] = [
    ['a missing certificate', () => ({ listeners: [{ protocol: 'imap', port: 1993, tls: 'implicit', cert: join(dir, 'nope.pem'), key: cert.keyFile }] }), /listeners\.0 \(imap\): .*nope\.pem does not exist/],
    [
      'a garbage certificate',
      () => {
        const junk = join(dir, 'junk.pem');
        writeFileSync(junk, '-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n');
        return { listeners: [{ protocol: 'imap', port: 1993, tls: 'implicit', cert: junk, key: cert.keyFile }] };
      },
      /listeners\.0 \(imap\): cert .*junk\.pem .*not a valid PEM certificate or key/,
    ],
    ['a key that is not the certificate\'s', () => ({ listeners: [{ protocol: 'pop3', port: 1995, tls: 'implicit', cert: cert.certFile, key: other.keyFile }] }), /listeners\.0 \(pop3\): cert .* or they do not match/],
    [
      'two listeners on one address and port',
      () => ({ listeners: [{ protocol: 'imap', address: '0.0.0.0', port: 1143 }, { protocol: 'pop3', address: '127.0.0.1', port: 1143 }] }),
      /listeners\.1\.port: 127\.0\.0\.1:1143 is also used by listeners\.0 \(imap\)/,
    ],
    ['a Redis URL that is not redis:// or rediss://', () => ({ listeners: [{ protocol: 'imap', port: 1143 }], lookup: { redis: { url: 'http://127.0.0.1:6379' } } }), /lookup\.redis\.url: must be redis:\/\//],
  ];
  for (const [what, doc, message] of cases) {
    it(`refuses ${what}`, async () => {
      const file = configFile(doc());
      const check = await cli('check-config', '--config', file);
      expect(check.code, check.stdout).toBe(78);
      expect(check.stderr).toMatch(message);
      const serve = await cli('serve', '--config', file);
      expect(serve.code).toBe(78);
      expect(serve.stderr).toMatch(message);
    });
  }

  it('passes a good config, with its certificates', async () => {
    const file = configFile({ listeners: [{ protocol: 'imap', port: 1993, tls: 'implicit', cert: cert.certFile, key: cert.keyFile }] });
    expect(await cli('check-config', '--config', file)).toMatchObject({ code: 0, stdout: `${file}: ok\n` });
  });
});

describe('serve when a port is taken', () => {
  let squatter: Server;
  let taken: number;
  beforeAll(async () => {
    taken = await freePort('127.0.0.1');
    squatter = createServer();
    await new Promise<void>((res) => squatter.listen(taken, '127.0.0.1', res));
  });
  afterAll(() => new Promise<void>((res) => squatter.close(() => res())));

  it('says so in one line and exits non-zero: the admin port', async () => {
    const file = configFile({ listeners: [{ protocol: 'imap', port: await freePort('127.0.0.1') }], admin: { port: taken } });
    const serve = await cli('serve', '--config', file);
    expect(serve.code).toBe(1);
    // The JSON lines are the log of what started before; the failure is one plain line.
    expect(serve.stderr.trim().split('\n').filter((l) => !l.startsWith('{'))).toEqual([`mailsplice: admin listener 127.0.0.1:${taken}: address already in use`]);
  });

  it('says so in one line and exits non-zero: a listener port', async () => {
    const file = configFile({ listeners: [{ protocol: 'imap', port: taken }] });
    const serve = await cli('serve', '--config', file);
    expect(serve.code).toBe(1);
    expect(serve.stderr.trim().split('\n').filter((l) => !l.startsWith('{'))).toEqual([`mailsplice: listen EADDRINUSE: address already in use 127.0.0.1:${taken}`]);
  });
});
