/** Exit codes of `mailsplice ctl`, the contract for scripts. */
export const EXIT = {
  ok: 0,
  /** Something failed at run time: Redis unreachable, file not writable, a failover interrupted. */
  runtime: 1,
  /** Bad usage or a request that is refused as given: unknown option, bad port, unknown slot, not a replica. */
  usage: 2,
  /** The object the command is about does not exist. */
  notFound: 3,
  /**
   * A fence (ctl lock store --wait, ctl failover --wait) did not complete: the lock is in
   * place, but some live proxy has not confirmed it (or a proxy's heartbeat stopped). The
   * old master may still be in use; --json names the proxies.
   */
  fenceIncomplete: 4,
} as const;

export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

/** An error that already says what went wrong in the operator's terms, and how to exit. */
export class CtlError extends Error {
  constructor(
    readonly exit: ExitCode,
    message: string,
  ) {
    super(message);
    this.name = 'CtlError';
  }
}

export const usageError = (msg: string) => new CtlError(EXIT.usage, msg);
export const notFound = (msg: string) => new CtlError(EXIT.notFound, msg);
export const runtimeError = (msg: string) => new CtlError(EXIT.runtime, msg);
export const fenceError = (msg: string) => new CtlError(EXIT.fenceIncomplete, msg);
