import type { PasswordCredentials } from './credentials.js';

/** The answer of a password check done by the proxy itself. */
export type CheckResult =
  /** `login`: the canonical login to route by (an alias login maps to its owner's). */
  | { ok: true; login: string }
  | { ok: false; why: string };

/** The checker could not tell (directory down, slow, or refusing us): never a pass. */
export class CheckerUnavailable extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CheckerUnavailable';
  }
}

export interface PasswordChecker {
  /** Resolves with the verdict, or rejects with CheckerUnavailable. Never logs the password. */
  check(creds: PasswordCredentials): Promise<CheckResult>;
  close(): Promise<void>;
}
