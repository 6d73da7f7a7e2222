import { BlockList, isIPv4, isIPv6 } from 'node:net';

/** One network as the config writes it: `10.0.0.0/8`, `2001:db8::/32`, or a single address. */
export interface Network {
  address: string;
  prefix: number;
  family: 'ipv4' | 'ipv6';
}

/** Parses a CIDR or a single address; a string saying what is wrong otherwise. */
export function parseNetwork(text: string): Network | string {
  const slash = text.indexOf('/');
  const address = slash < 0 ? text : text.slice(0, slash);
  const family = isIPv4(address) ? 'ipv4' : isIPv6(address) && !address.includes('%') ? 'ipv6' : undefined;
  if (!family) return `"${text}" is not an IPv4 or IPv6 address or network (a.b.c.d/n, x:y::/n)`;
  const max = family === 'ipv4' ? 32 : 128;
  if (slash < 0) return { address, prefix: max, family };
  const bits = text.slice(slash + 1);
  if (!/^\d{1,3}$/.test(bits) || Number(bits) > max) return `"${text}": the prefix length must be 0 to ${max}`;
  return { address, prefix: Number(bits), family };
}

/**
 * The addresses allowed to speak for others (a PROXY header). An IPv4 peer seen on an IPv6
 * socket (`::ffff:10.0.0.5`) matches the IPv4 networks (Node's BlockList does that).
 */
export class TrustedNetworks {
  private readonly list = new BlockList();
  readonly size: number;

  constructor(networks: readonly string[]) {
    for (const text of networks) {
      const n = parseNetwork(text);
      if (typeof n === 'string') throw new Error(n);
      this.list.addSubnet(n.address, n.prefix, n.family);
    }
    this.size = networks.length;
  }

  has(address: string): boolean {
    if (isIPv4(address)) return this.list.check(address, 'ipv4');
    if (isIPv6(address)) return this.list.check(address, 'ipv6');
    return false;
  }
}
