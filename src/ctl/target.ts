import { ConfigError, loadConfig } from '../config.js';
import { RouteAdmin } from '../lookup/admin.js';
import { FileHashStore } from './file-store.js';
import { RedisHashStore } from './redis-store.js';
import type { RedisEndpoint } from '../lookup/redis-endpoint.js';
import { runtimeError, usageError } from './errors.js';
import type { Fleet } from './fleet.js';

/** Where ctl writes: the options every command takes. */
export interface TargetOptions {
  config?: string;
  redis?: string;
  prefix?: string;
  file?: string;
  defaultDomain?: string;
}

export interface Target {
  admin: RouteAdmin;
  /** The running proxies' records: Redis only. */
  fleet?: Fleet;
  /** With --config: its admin.token_file, for asking the proxies' admin listeners (ctl who). */
  adminTokenFile?: string;
  /** From the config's lookup.default_domain or --default-domain: logins are normalised with it. */
  defaultDomain?: string;
}

export const TARGET_HINT =
  'say where the routes live: --config FILE (its lookup section), --redis URL [--prefix ms:], or --file ROUTES.yaml; or set MAILSPLICE_CONFIG';

export async function openTarget(o: TargetOptions, env: NodeJS.ProcessEnv): Promise<Target> {
  const given = [o.config && '--config', o.redis && '--redis', o.file && '--file'].filter(Boolean);
  if (given.length > 1) throw usageError(`${given.join(' and ')} exclude each other; ${TARGET_HINT}`);
  if (o.prefix !== undefined && !o.redis) throw usageError('--prefix goes with --redis (with --config the prefix comes from the config)');
  if (o.redis) return redisTarget(await connect({ url: o.redis }, o.prefix ?? 'ms:'), o.defaultDomain);
  if (o.file) return { admin: new RouteAdmin(new FileHashStore(o.file, o.defaultDomain)), defaultDomain: o.defaultDomain };
  const configFile = o.config ?? env.MAILSPLICE_CONFIG;
  if (!configFile) throw usageError(`no routes given: ${TARGET_HINT}`);
  let lookup;
  let tokenFile: string | undefined;
  try {
    const cfg = loadConfig(configFile);
    lookup = cfg.lookup;
    tokenFile = cfg.admin?.token_file;
  } catch (e) {
    if (e instanceof ConfigError) throw usageError(e.message);
    throw e;
  }
  const defaultDomain = o.defaultDomain ?? lookup.default_domain;
  if (lookup.redis) return { ...redisTarget(await connect(lookup.redis, lookup.redis.prefix), defaultDomain), ...(tokenFile ? { adminTokenFile: tokenFile } : {}) };
  return { admin: new RouteAdmin(new FileHashStore(lookup.file!, defaultDomain)), defaultDomain };
}

function redisTarget(store: RedisHashStore, defaultDomain: string | undefined): Target {
  return { admin: new RouteAdmin(store), fleet: store, ...(defaultDomain !== undefined ? { defaultDomain } : {}) };
}

async function connect(endpoint: RedisEndpoint, prefix: string): Promise<RedisHashStore> {
  try {
    return await RedisHashStore.connect(endpoint, prefix);
  } catch (e) {
    throw runtimeError((e as Error).message);
  }
}
