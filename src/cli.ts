#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { ConfigError, loadConfig } from './config.js';
import { createLogger } from './log.js';

const USAGE = `usage:
  mailsplice serve --config FILE         run the proxy
  mailsplice check-config --config FILE  validate a config file and exit
  mailsplice ctl ...                     change routes (mailsplice ctl --help)`;

async function serve(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { config: { type: 'string', short: 'c' } } });
  if (!values.config) throw new ConfigError(`serve needs --config FILE\n${USAGE}`);
  const cfg = loadConfig(values.config);
  const log = createLogger(cfg.log.level);
  // Loaded here, not at the top: `mailsplice ctl` should not pay for the whole proxy.
  const { startServer } = await import('./server.js');
  const server = await startServer(cfg, log);
  process.on('SIGHUP', () => server.reload());
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) process.exit(1); // a second signal: don't wait
    stopping = true;
    log.info('stopping', { signal });
    server.close().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  log.info('mailsplice started', { config: values.config, lookup: cfg.lookup.redis ? 'redis' : 'file' });
}

async function main(): Promise<void> {
  const [command, ...rest] = process.argv.slice(2);
  switch (command) {
    case 'serve':
      return serve(rest);
    case 'check-config': {
      const { values } = parseArgs({ args: rest, options: { config: { type: 'string', short: 'c' } } });
      if (!values.config) throw new ConfigError(`check-config needs --config FILE`);
      loadConfig(values.config);
      process.stdout.write(`${values.config}: ok\n`);
      return;
    }
    case 'ctl': {
      const { runCtl } = await import('./ctl.js');
      process.exitCode = await runCtl(rest);
      return;
    }
    default:
      process.stderr.write(`${USAGE}\n`);
      process.exitCode = command === undefined || command === '--help' || command === 'help' ? 0 : 2;
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`mailsplice: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(e instanceof ConfigError ? 78 : 1); // 78: EX_CONFIG
});
