import { readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';

// vitest globalSetup: counts /tmp/mailsplice-* before and after the run and fails the run if
// a test (or the harness, or the proxy) left one behind. A failing test may keep its dirs
// for the post-mortem (the world keeps Dovecot's logs): this check then names them.

function ours(): Set<string> {
  return new Set(readdirSync(tmpdir()).filter((n) => n.startsWith('mailsplice-')));
}

let before = new Set<string>();

export function setup(): void {
  before = ours();
}

export function teardown(): void {
  const left = [...ours()].filter((n) => !before.has(n));
  if (left.length) throw new Error(`the test run left ${left.length} temp dir(s) in ${tmpdir()}: ${left.sort().join(' ')}`);
}
