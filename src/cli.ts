#!/usr/bin/env node
import cluster from 'node:cluster';
import { readFileSync } from 'node:fs';
import { request } from 'node:http';
import { parseArgs } from 'node:util';
import { ConfigError, loadConfig, workerCount, type Config } from './config.js';
import { createLogger } from './log.js';
import { preflight, readAdminToken } from './preflight.js';
import { packageVersion } from './version.js';

const USAGE = `usage:
  mailsplice serve --config FILE         run the proxy
  mailsplice check-config --config FILE  validate a config file (and the files it names) and exit
  mailsplice healthcheck --config FILE   exit 0 if the running proxy's /healthz answers 200
  mailsplice ctl ...                     change routes (mailsplice ctl --help)
  mailsplice --version`;

const HELP: Record<string, string> = {
  serve: `usage: mailsplice serve --config FILE
  Runs the proxy. SIGHUP re-reads the config (limits, log level, backend, listeners,
  certificates; lookup, admin and auth need a restart) and the routes file;
  SIGTERM drains: connections before login are told at once, sessions get BYE spread over
  shutdown.drain_ms, LMTP transactions finish; SIGINT stops at once. Refuses to start, with
  exit code 78, on anything check-config reports as an error.`,
  'check-config': `usage: mailsplice check-config --config FILE
  Validates the config: every key, certificates and keys (readable, valid, matching),
  addresses used twice, the Redis URL, the admin token file. Unsafe but legal settings are
  printed as warnings. Exit code 0 if serve would accept it, 78 if not.`,
  healthcheck: `usage: mailsplice healthcheck --config FILE
  Asks the admin listener of the proxy running with this config for /healthz (with the
  admin token, if any). Exit code 0 on 200, 1 otherwise. For container HEALTHCHECKs.`,
};

function version(): string {
  return packageVersion();
}

/** Parses `--config FILE` (and --help) for a subcommand; undefined when help was printed. */
function configArg(command: string, argv: string[]): string | undefined {
  const { values } = parseArgs({ args: argv, options: { config: { type: 'string', short: 'c' }, help: { type: 'boolean', short: 'h' } } });
  if (values.help) {
    process.stdout.write(`${HELP[command]}\n`);
    return undefined;
  }
  if (!values.config) throw new ConfigError(`${command} needs --config FILE\n${HELP[command]}`);
  return values.config;
}

/** Loads the config and checks the files it names; warnings go to `warn`. */
function loadChecked(file: string, warn: (w: string) => void): Config {
  const cfg = loadConfig(file);
  const { errors, warnings } = preflight(cfg);
  if (errors.length) throw new ConfigError(`invalid config ${file}:\n${errors.map((e) => `  ${e}`).join('\n')}`);
  for (const w of warnings) warn(w);
  return cfg;
}

async function serve(argv: string[]): Promise<void> {
  if (cluster.isWorker) return serveWorker();
  const file = configArg('serve', argv);
  if (file === undefined) return;
  const warnings: string[] = [];
  const cfg = loadChecked(file, (w) => warnings.push(w));
  const log = createLogger(cfg.log.level);
  for (const w of warnings) log.warn('unsafe setting', { setting: w });
  const workers = workerCount(cfg.workers);
  // Signals are handled from the start: with workers the first ones listen (and may be
  // signalled) before the last is ready, and SIGHUP's default action would kill the primary.
  // With workers the primary passes drain and reload on: each worker drains its own sessions.
  let server: { reload(next: Config): Promise<void>; close(): Promise<void>; drain(): Promise<void> } | undefined;
  let reloadPending = false;
  // SIGHUP: the file is read and checked again as at start. One that does not validate
  // changes nothing: the error (with the key's path) is logged and the running config stays.
  const hup = () => {
    if (!server) {
      reloadPending = true; // applied once started
      return;
    }
    let next: Config;
    try {
      next = loadChecked(file, (w) => log.warn('unsafe setting', { setting: w }));
    } catch (e) {
      log.error('config reload refused; the running config stays', { config: file, error: (e as Error).message });
      return;
    }
    server.reload(next).catch((e: unknown) => log.error('config reload failed', { error: e instanceof Error ? e.message : String(e) }));
  };
  process.on('SIGHUP', hup);
  let stopping = false;
  // SIGTERM (systemctl stop) drains: sessions' BYEs spread over shutdown.drain_ms. SIGINT
  // (an operator's Ctrl-C) ends them at once. A second signal exits without waiting.
  const stop = (signal: string, drain: boolean) => {
    if (stopping) process.exit(1);
    stopping = true;
    log.info('stopping', { signal, ...(drain ? { drain_ms: cfg.shutdown.drain_ms } : {}) });
    if (!server) process.exit(0); // still starting: nothing is being served yet
    (drain ? server.drain() : server.close()).then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM', true));
  process.on('SIGINT', () => stop('SIGINT', false));
  // Loaded here, not at the top: `mailsplice ctl` should not pay for the whole proxy.
  if (workers > 1) {
    const { startPrimary } = await import('./cluster/primary.js');
    const primary = await startPrimary(cfg, log, workers);
    server = { reload: async (next) => primary.reload(next), close: () => primary.close(), drain: () => primary.close() };
  } else {
    const { startServer } = await import('./server.js');
    server = await startServer(cfg, log);
  }
  if (reloadPending) hup();
  log.info('mailsplice started', { config: file, version: version(), lookup: cfg.lookup.redis ? 'redis' : 'file', workers });
}

/** A worker forked by the primary: the primary's config, its own listeners and sessions. */
async function serveWorker(): Promise<void> {
  const { runWorker, workerConfig, workerIndex, withFields } = await import('./cluster/worker.js');
  const { startServer } = await import('./server.js');
  const cfg = workerConfig();
  const log = withFields(createLogger(cfg.log.level), { worker: workerIndex() });
  await runWorker(cfg, log, (role) => startServer(cfg, log, role));
}

async function healthcheck(argv: string[]): Promise<void> {
  const file = configArg('healthcheck', argv);
  if (file === undefined) return;
  const { admin } = loadConfig(file);
  if (!admin) throw new ConfigError(`${file}: healthcheck needs an admin listener (admin.port)`);
  const host = admin.address === '0.0.0.0' ? '127.0.0.1' : admin.address === '::' ? '::1' : admin.address;
  const headers: Record<string, string> = admin.token_file ? { authorization: `Bearer ${readAdminToken(admin.token_file)}` } : {};
  const status = await new Promise<number>((resolve, reject) => {
    const req = request({ host, port: admin.port, path: '/healthz', headers, timeout: 5000 }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('timeout', () => req.destroy(new Error('no answer in 5 s')));
    req.on('error', reject);
    req.end();
  });
  process.stdout.write(`healthz: ${status}\n`);
  process.exitCode = status === 200 ? 0 : 1;
}

async function main(): Promise<void> {
  const [command, ...rest] = process.argv.slice(2);
  switch (command) {
    case 'serve':
      return serve(rest);
    case 'check-config': {
      const file = configArg('check-config', rest);
      if (file === undefined) return;
      loadChecked(file, (w) => process.stderr.write(`warning: ${w}\n`));
      process.stdout.write(`${file}: ok\n`);
      return;
    }
    case 'healthcheck':
      return healthcheck(rest);
    case 'ctl': {
      const { runCtl } = await import('./ctl.js');
      process.exitCode = await runCtl(rest);
      return;
    }
    case '--version':
    case '-V':
    case 'version':
      process.stdout.write(`mailsplice ${version()}\n`);
      return;
    default: {
      const help = command === undefined || command === '--help' || command === '-h' || command === 'help';
      (help ? process.stdout : process.stderr).write(`${USAGE}\n`);
      process.exitCode = help ? 0 : 2;
    }
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`mailsplice: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(e instanceof ConfigError ? 78 : 1); // 78: EX_CONFIG
});
