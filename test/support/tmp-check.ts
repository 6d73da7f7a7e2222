import { chmodSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

// vitest globalSetup: every temp dir of the run (tests, harness, daemons, the proxy) goes in
// one fresh /tmp/mailsplice-run-XXXXXX, through TMPDIR, which the test processes and their
// children inherit. At the end it must be empty: the run fails, naming what was left, if a
// test or the harness did not clean up. (A dir of its own rather than counting
// /tmp/mailsplice-*: other runs on the same machine come and go there meanwhile.) A failing
// test may keep its dirs for the post-mortem (the world keeps Dovecot's logs): they are
// then left in place and named here.

let runDir: string | undefined;

export function setup(): void {
  runDir = mkdtempSync(join(tmpdir(), 'mailsplice-run-'));
  chmodSync(runDir, 0o755); // Dovecot's unprivileged processes traverse into the slot dirs
  process.env.TMPDIR = runDir;
}

export function teardown(): void {
  if (!runDir) return;
  // Only ours: tools keep caches there too (tsx compiles into tsx-<uid>).
  const left = readdirSync(runDir).filter((n) => n.startsWith('mailsplice-'));
  if (left.length) {
    // vitest reports an error thrown here but still exits 0: set the exit code ourselves.
    process.stderr.write(`\nFAIL: the test run left ${left.length} temp dir(s) in ${runDir}: ${left.sort().join(' ')}\n`);
    process.exitCode = 1;
    return;
  }
  rmSync(runDir, { recursive: true, force: true });
}
