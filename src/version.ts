import { readFileSync } from 'node:fs';

let cached: string | undefined;

/** mailsplice's version, from package.json (src/ and dist/ both sit next to it). */
export function packageVersion(): string {
  cached ??= (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  return cached;
}
