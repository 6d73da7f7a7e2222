import { afterAll } from 'vitest';
import { removeTempDirs } from './tmp.js';

// Setup file (vitest.config.ts): runs in every test file, after the file's own afterAll
// hooks have stopped what used the dirs.
afterAll(() => removeTempDirs());
