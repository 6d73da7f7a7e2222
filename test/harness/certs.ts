import { randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { run } from './proc.js';

export interface CertFiles {
  certFile: string;
  keyFile: string;
  certPem: string;
  keyPem: string;
}

export interface CertOptions {
  ca: CertFiles;
  cn: string;
  /** DNS names and IP addresses (e.g. 'localhost', '127.0.0.1') for subjectAltName. */
  altNames?: string[];
  /** Base name for the files in dir; defaults to the CN with unsafe chars replaced. */
  name?: string;
}

// EC P-256 keys: generated in milliseconds (RSA would slow every test run) and
// accepted by Node, OpenSSL/Dovecot and Python alike.
const KEY_ARGS = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

async function load(certFile: string, keyFile: string): Promise<CertFiles> {
  const [certPem, keyPem] = await Promise.all([readFile(certFile, 'utf8'), readFile(keyFile, 'utf8')]);
  return { certFile, keyFile, certPem, keyPem };
}

/** Self-signed CA (ca.crt / ca.key in dir). */
export async function makeCA(dir: string, cn = 'mailsplice test CA'): Promise<CertFiles> {
  await mkdir(dir, { recursive: true });
  const certFile = path.join(dir, 'ca.crt');
  const keyFile = path.join(dir, 'ca.key');
  await run('openssl', ['req', '-x509', ...KEY_ARGS, '-keyout', keyFile, '-out', certFile, '-days', '3650',
    '-subj', `/CN=${cn}`,
    '-addext', 'basicConstraints=critical,CA:TRUE',
    '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  return load(certFile, keyFile);
}

/** Leaf (server) certificate signed by `ca`, with subjectAltName entries. */
export async function makeCert(dir: string, opts: CertOptions): Promise<CertFiles> {
  await mkdir(dir, { recursive: true });
  const name = opts.name ?? opts.cn.replace(/[^A-Za-z0-9._-]/g, '_');
  const keyFile = path.join(dir, `${name}.key`);
  const csrFile = path.join(dir, `${name}.csr`);
  const certFile = path.join(dir, `${name}.crt`);
  const extFile = path.join(dir, `${name}.ext`);
  const san = (opts.altNames ?? [opts.cn]).map((n) => (net.isIP(n) ? `IP:${n}` : `DNS:${n}`)).join(',');
  await writeFile(extFile, [
    'basicConstraints=CA:FALSE',
    'keyUsage=critical,digitalSignature,keyEncipherment',
    'extendedKeyUsage=serverAuth,clientAuth',
    `subjectAltName=${san}`,
    '',
  ].join('\n'));
  await run('openssl', ['req', '-new', ...KEY_ARGS, '-keyout', keyFile, '-out', csrFile, '-subj', `/CN=${opts.cn}`]);
  // A random serial per cert instead of -CAcreateserial, so parallel calls do not race on a serial file.
  await run('openssl', ['x509', '-req', '-in', csrFile, '-CA', opts.ca.certFile, '-CAkey', opts.ca.keyFile,
    '-set_serial', `0x${randomBytes(12).toString('hex')}`,
    '-days', '3650', '-sha256', '-extfile', extFile, '-out', certFile]);
  return load(certFile, keyFile);
}
