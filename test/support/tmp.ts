import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

// Temp dirs a test file makes: all removed when the file is done (test/support/cleanup.ts,
// a vitest setup file, calls removeTempDirs in afterAll). test/support/tmp-check.ts fails
// the run if a /tmp/mailsplice-* dir is left behind by anyone.

const made: string[] = [];

/** A fresh /tmp/mailsplice-<what>-XXXXXX, removed after the test file. */
export function tempDir(what: string): string {
  const dir = mkdtempSync(join(tmpdir(), `mailsplice-${what}-`));
  made.push(dir);
  return dir;
}

export function removeTempDirs(): void {
  for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
}
