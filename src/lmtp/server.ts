import type { Config, ListenerConfig } from '../config.js';
import type { ProxyContext } from '../proxy/core.js';

export interface LmtpListener {
  close(): Promise<void>;
}

export async function startLmtpListener(_l: ListenerConfig, _lmtp: Config['lmtp'], _ctx: ProxyContext): Promise<LmtpListener> {
  throw new Error('the LMTP front end is not built yet');
}
