import { execFile, spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { parse } from 'yaml';
import { describe, expect, it } from 'vitest';
import { tempDir } from './support/tmp.js';

// Issue 14 item 10: what ships (the container image, the systemd unit, the demo) works as
// shipped. Docker cannot run here, so the image's config is checked the way the image uses
// it: the same files at the same relative paths, after the same first-start script.

const execFileP = promisify(execFile);
const ROOT = resolve(import.meta.dirname, '..');
const CLI = join(ROOT, 'src/cli.ts');
const read = (p: string) => readFileSync(join(ROOT, p), 'utf8');

describe('container image', () => {
  const dockerfile = read('Dockerfile');

  it("its default config passes check-config with the files the image has", async () => {
    // The image's /etc/mailsplice, as the Dockerfile fills it.
    const copied = [...dockerfile.matchAll(/^COPY (deploy\/docker\/\S+(?: deploy\/docker\/\S+)*) \/etc\/mailsplice\/$/gm)].flatMap((m) => m[1]!.split(' '));
    expect(copied).toEqual(['deploy/docker/mailsplice.yaml', 'deploy/docker/routes.yaml']);
    const etc = tempDir('image-etc');
    for (const f of copied) copyFileSync(join(ROOT, f), join(etc, f.split('/').pop()!));
    // What the entrypoint does before `serve`.
    expect(dockerfile).toMatch(/^ENTRYPOINT \["\/opt\/mailsplice\/entrypoint\.sh"\]$/m);
    expect(read('deploy/docker/entrypoint.sh')).toMatch(/first-start\.sh/);
    await execFileP('sh', [join(ROOT, 'deploy/docker/first-start.sh')], { env: { ...process.env, MAILSPLICE_ETC: etc } });
    const { stdout, stderr } = await execFileP(process.execPath, ['--import', 'tsx', CLI, 'check-config', '--config', join(etc, 'mailsplice.yaml')]);
    expect(stdout).toBe(`${join(etc, 'mailsplice.yaml')}: ok\n`);
    expect(stderr).toMatch(/LMTP on 0\.0\.0\.0 has no authentication/);
    // A second start keeps what the first one made.
    const token = readFileSync(join(etc, 'admin.token'), 'utf8');
    await execFileP('sh', [join(ROOT, 'deploy/docker/first-start.sh')], { env: { ...process.env, MAILSPLICE_ETC: etc } });
    expect(readFileSync(join(etc, 'admin.token'), 'utf8')).toBe(token);
  });

  it('listens where a container can be reached, exposes those ports and has a HEALTHCHECK', () => {
    const cfg = parse(read('deploy/docker/mailsplice.yaml')) as { listeners: { address: string; port: number }[]; admin: { address: string; port: number } };
    const binds = [...cfg.listeners, cfg.admin];
    expect(binds.every((b) => b.address === '0.0.0.0')).toBe(true);
    const exposed = /^EXPOSE (.+)$/m.exec(dockerfile)![1]!.split(' ').map(Number);
    expect(exposed.sort()).toEqual(binds.map((b) => b.port).sort());
    expect(dockerfile).toMatch(/^HEALTHCHECK .*\n?.*CMD \["node", "\/opt\/mailsplice\/dist\/cli\.js", "healthcheck", "--config", "\/etc\/mailsplice\/mailsplice\.yaml"\]/m);
  });
});

describe('systemd unit', () => {
  const unit = read('deploy/mailsplice.service');
  const analyze = spawnSync('systemd-analyze', ['--version']).status === 0;

  it.skipIf(!analyze)('is sandboxed: systemd-analyze security rates it OK (2.5 or less)', async () => {
    const { stdout } = await execFileP('systemd-analyze', ['security', '--offline=yes', join(ROOT, 'deploy/mailsplice.service')]);
    const level = /Overall exposure level for mailsplice\.service: ([\d.]+) (\w+)/.exec(stdout);
    expect(level, stdout).not.toBeNull();
    expect(Number(level![1])).toBeLessThanOrEqual(2.5);
  });

  it('runs the program where the README install steps put it', () => {
    const readme = read('README.md');
    for (const line of unit.split('\n').filter((l) => /^Exec(Start|StartPre)=/.test(l))) {
      const [node, cli] = line.replace(/^[^=]+=/, '').split(' ');
      expect(node).toBe('/usr/bin/node');
      expect(cli).toBe('/opt/mailsplice/dist/cli.js');
    }
    expect(readme).toMatch(/git clone \S+ \/opt\/mailsplice/);
    expect(readme).toMatch(/npm run build/);
    expect(readme).toMatch(/cp deploy\/mailsplice\.service \/etc\/systemd\/system\//);
  });
});

describe('npm run demo', () => {
  it('removes its work folder when stopped', { timeout: 60_000 }, async () => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'scripts/demo.ts')], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((res) => child.once('exit', (code) => res(code)));
    try {
      const dir = await new Promise<string>((res, rej) => {
        const check = () => {
          const m = /removes its work files in (\S+)\)/.exec(out);
          if (m) res(m[1]!);
        };
        child.stdout.on('data', check);
        void exited.then((code) => rej(new Error(`demo exited with ${code}:\n${out}`)));
      });
      expect(existsSync(dir)).toBe(true);
      child.kill('SIGINT');
      expect(await exited).toBe(0);
      expect(existsSync(dir), out).toBe(false);
    } finally {
      // Politely first: a demo killed outright would leave its Dovecots running.
      if (child.exitCode === null) {
        child.kill('SIGINT');
        const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(timer);
      }
    }
  });
});
