import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Temp dirs from test/support/tmp.ts are removed after each file; the global check fails
    // the run if any /tmp/mailsplice-* dir is left over.
    setupFiles: ['test/support/cleanup.ts'],
    globalSetup: ['test/support/tmp-check.ts'],
    // Real daemons (Dovecot, Redis) start per file; give them room.
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Child processes rather than worker threads: each test file owns its
    // daemons, and the harness' process 'exit' hook kills them if a file crashes.
    pool: 'forks',
    // Files run in parallel (each world picks its own free ports), but the CI
    // machine has 2 cores.
    maxWorkers: 2,
  },
});
