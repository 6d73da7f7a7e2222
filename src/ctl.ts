/** `mailsplice ctl`: see issue #5; filled in with the failover work. */
export async function runCtl(_argv: string[]): Promise<number> {
  process.stderr.write('mailsplice ctl: not available in this build\n');
  return 2;
}
