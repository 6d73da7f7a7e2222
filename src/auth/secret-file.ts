import { readFileSync } from 'node:fs';

/**
 * A password kept in a file (never in the config itself, which is often world-readable or
 * in version control): one line, its final newline (LF or CRLF) not part of it.
 */
export function readPasswordFile(file: string): Buffer {
  const raw = readFileSync(file);
  let end = raw.length;
  if (end > 0 && raw[end - 1] === 0x0a) end--;
  if (end > 0 && raw[end - 1] === 0x0d) end--;
  return raw.subarray(0, end);
}

/** readPasswordFile, with an error that names the setting, and an empty file refused. */
export function readSecretFile(file: string, what: string): Buffer {
  let data: Buffer;
  try {
    data = readPasswordFile(file);
  } catch (e) {
    throw new Error(`cannot read ${what} ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  if (data.length === 0) throw new Error(`${what} ${file} is empty`);
  return data;
}
