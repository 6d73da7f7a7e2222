// One JSON object per line on stderr: what journald and every log shipper read without a
// parser of ours. Levels below the configured one cost a comparison and nothing else.

export type Level = 'debug' | 'info' | 'warn' | 'error';
const rank: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type LogFields = Record<string, string | number | boolean | undefined>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A new level from here on (SIGHUP); loggers that have none keep theirs. */
  setLevel?(level: Level): void;
}

export function createLogger(level: Level = 'info', write: (line: string) => void = (l) => process.stderr.write(l)): Logger {
  let min = rank[level];
  const emit = (lvl: Level, msg: string, fields?: LogFields) => {
    if (rank[lvl] < min) return;
    write(`${JSON.stringify({ t: new Date().toISOString(), level: lvl, msg, ...fields })}\n`);
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    setLevel: (l) => (min = rank[l]),
  };
}

export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };
