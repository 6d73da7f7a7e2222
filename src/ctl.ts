// `mailsplice ctl`: the supported way for failover tools and operators to change routes.
// This file parses the command line, opens the target (Redis or the routes file), runs one
// command and turns every failure into a message on stderr and an exit code (src/ctl/).

import { parseArgs } from 'node:util';
import { COMMANDS, type Command, type OptionSpec, type Values } from './ctl/commands.js';
import { CtlError, EXIT, usageError } from './ctl/errors.js';
import { openTarget } from './ctl/target.js';
import { RefusedRecord } from './lookup/admin.js';

export { EXIT } from './ctl/errors.js';

/** Where ctl talks to; tests run it in-process with their own. */
export interface CtlIo {
  stdout(text: string): void;
  stderr(text: string): void;
  env: NodeJS.ProcessEnv;
}

const processIo: CtlIo = {
  stdout: (t) => process.stdout.write(t),
  stderr: (t) => process.stderr.write(t),
  env: process.env,
};

const GLOBAL_OPTIONS: OptionSpec = {
  config: { type: 'string', short: 'c' },
  redis: { type: 'string' },
  prefix: { type: 'string' },
  file: { type: 'string' },
  'default-domain': { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
};

function mainHelp(): string {
  const width = Math.max(...COMMANDS.map((c) => c.summary.length));
  return `usage: mailsplice ctl COMMAND ... [--json] [where]

Changes routes the supported way: every change is written together with its event
({"kind":"user"|"store"|"slot","id":...} on <prefix>events) in one MULTI/EXEC, and
read-modify-write steps are guarded with WATCH, so no proxy misses a change and two
tools racing cannot lose one. ctl kick publishes {"kind":"kick",...} (no route changes);
ctl proxies and ctl who read the proxies' heartbeat records (Redis only). With the routes
file (lookup.file), the file is rewritten atomically (temp file, fsync, rename) under
<file>.lock; the proxies watch it. Comments in the file are kept, except the trailing
comment of an entry a command rewrites.

commands:
${COMMANDS.map((c) => `  ${c.summary.padEnd(width)}  ${c.about}`).join('\n')}

where (one of):
  --config FILE          the lookup section of a mailsplice config (default: $MAILSPLICE_CONFIG)
  --redis URL            redis://[:password@]host:port[/db], with --prefix (default ms:)
  --file PATH            a routes file (YAML or JSON); created by the first write
  --default-domain D     added to logins without @ (with --config: lookup.default_domain)

--json prints machine-readable output for reads and for successful writes.
exit codes: 0 ok, 1 run-time failure (Redis down, interrupted), 2 bad usage or refused
request, 3 not found.
mailsplice ctl COMMAND --help shows a command's options.`;
}

/** Every option any command knows: enough to find the command among the arguments. */
function allOptions(): OptionSpec {
  return Object.assign({}, GLOBAL_OPTIONS, ...COMMANDS.map((c) => c.options)) as OptionSpec;
}

function parse(argv: string[], options: OptionSpec): { values: Values; positionals: string[] } {
  try {
    const { values, positionals } = parseArgs({ args: argv, options, allowPositionals: true, strict: true });
    return { values: values as Values, positionals };
  } catch (e) {
    throw usageError((e as Error).message);
  }
}

export async function runCtl(argv: string[], io: CtlIo = processIo): Promise<number> {
  const out = (t: string) => io.stdout(t.endsWith('\n') ? t : `${t}\n`);
  let command: Command | undefined;
  // `--wait` alone means the default time: parseArgs has no optional option values.
  argv = argv.map((a) => (a === '--wait' ? '--wait=' : a));
  try {
    const first = parse(argv, allOptions());
    const [name, ...args] = first.positionals;
    command = name === 'help' ? COMMANDS.find((c) => c.name === args[0]) : COMMANDS.find((c) => c.name === name);
    if (name === undefined || (name === 'help' && !command)) {
      if (first.values.help || name === 'help') {
        out(mainHelp());
        return EXIT.ok;
      }
      io.stderr(`${mainHelp()}\n`);
      return EXIT.usage;
    }
    if (!command) throw usageError(`unknown command ${JSON.stringify(name)}; see mailsplice ctl --help`);
    if (first.values.help || name === 'help') {
      out(command.help);
      return EXIT.ok;
    }
    // Again with only this command's options, so that `--master` on `user set` is an error.
    const { values: v } = parse(argv, { ...GLOBAL_OPTIONS, ...command.options });
    const target = await openTarget(
      { config: str(v.config), redis: str(v.redis), prefix: str(v.prefix), file: str(v.file), defaultDomain: str(v['default-domain']) },
      io.env,
    );
    try {
      await command.run(
        { admin: target.admin, ...(target.fleet ? { fleet: target.fleet, fence: target.fleet } : {}), ...(target.adminTokenFile ? { adminTokenFile: target.adminTokenFile } : {}), defaultDomain: target.defaultDomain, json: v.json === true, out, note: (t) => io.stderr(`${t}\n`) },
        args,
        v,
      );
    } finally {
      await target.admin.close();
    }
    return EXIT.ok;
  } catch (e) {
    const err = e instanceof CtlError ? e : e instanceof RefusedRecord ? usageError(e.message) : new CtlError(EXIT.runtime, e instanceof Error ? e.message : String(e));
    const hint = err.exit === EXIT.usage && command && /^(missing|too many|usage)/.test(err.message) ? `\n${command.help.split('\n\n')[0]}` : '';
    io.stderr(`mailsplice ctl: ${err.message}${hint}\n`);
    return err.exit;
  }
}

function str(x: string | boolean | undefined): string | undefined {
  return typeof x === 'string' ? x : undefined;
}
