// FastMail's production.dat layout format (see the seeds), the part the router needs:
//
//   i30 30 t15 0 1000 e 10.202.80.1
//     slot line: slots sloti30t01..sloti30t15 on server 30 (meta size, data size, fs type
//     are for the disk tooling), with IPs 10.202.80.1 .. 10.202.80.15
//   store23 n 0 90 sloti30t01 sloti15t03 slotti5t02 slotsi2d2t01
//     store line: id, location, branch (or 0), target disk %, then its slots, master first
//
// Blank lines and `#` comments are ignored. Pure parsing and formatting; writing is ctl's.

export interface DatSlot {
  id: string;
  host: string;
  line: number;
}

export interface DatStore {
  id: string;
  location: string;
  branch: string;
  diskTarget: string;
  /** Master first, as listed. */
  slots: string[];
  line: number;
}

export interface DatLayout {
  slots: DatSlot[];
  stores: DatStore[];
}

export class DatError extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join('\n'));
    this.name = 'DatError';
  }
}

const IPV4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;

function ipToInt(ip: string): number | undefined {
  const m = IPV4.exec(ip);
  if (!m) return undefined;
  const o = m.slice(1, 5).map(Number);
  if (o.some((x) => x > 255)) return undefined;
  return ((o[0]! << 24) >>> 0) + (o[1]! << 16) + (o[2]! << 8) + o[3]!;
}

function intToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

/** `slot<token>t<nn>`: numbers are two digits at least (t01), more when the count needs it. */
export function slotId(token: string, n: number, count: number): string {
  return `slot${token}t${String(n).padStart(Math.max(2, String(count).length), '0')}`;
}

function isSlotLine(f: string[]): boolean {
  return f.length === 7 && /^t\d+$/.test(f[2]!) && IPV4.test(f[6]!);
}

/** Parses a whole file; every problem is reported at once, with its line number. */
export function parseProductionDat(text: string): DatLayout {
  const layout: DatLayout = { slots: [], stores: [] };
  const problems: string[] = [];
  const slotLine = new Map<string, number>();
  const storeLine = new Map<string, number>();
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = i + 1;
    const content = raw.replace(/#.*$/, '').trim();
    if (content === '') return;
    const f = content.split(/\s+/);
    if (isSlotLine(f)) {
      const [token, , t, , , , ip] = f as [string, string, string, string, string, string, string];
      const count = Number(t.slice(1));
      const base = ipToInt(ip);
      if (count < 1) return void problems.push(`line ${line}: slot count ${t} must be at least t1`);
      if (base === undefined) return void problems.push(`line ${line}: bad IPv4 address ${ip}`);
      if (base + count - 1 > 0xffffffff) return void problems.push(`line ${line}: ${count} addresses from ${ip} run past 255.255.255.255`);
      for (let n = 1; n <= count; n++) {
        const id = slotId(token, n, count);
        const prev = slotLine.get(id);
        if (prev !== undefined) problems.push(`line ${line}: slot ${id} already defined on line ${prev}`);
        slotLine.set(id, line);
        layout.slots.push({ id, host: intToIp(base + n - 1), line });
      }
      return;
    }
    if (f.length >= 5 && /^\d+$/.test(f[3]!)) {
      const [id, location, branch, diskTarget, ...slots] = f as [string, string, string, string, ...string[]];
      const prev = storeLine.get(id);
      if (prev !== undefined) problems.push(`line ${line}: store ${id} already defined on line ${prev}`);
      storeLine.set(id, line);
      const dup = slots.find((s, j) => slots.indexOf(s) !== j);
      if (dup) problems.push(`line ${line}: store ${id} lists slot ${dup} twice`);
      layout.stores.push({ id, location, branch, diskTarget, slots, line });
      return;
    }
    problems.push(
      `line ${line}: neither a slot line (NAME SERVER tCOUNT META DATA FS FIRST-IP) nor a store line (STORE LOCATION BRANCH DISK% MASTER [REPLICA...]): ${content.slice(0, 80)}`,
    );
  });
  if (problems.length > 0) throw new DatError(problems);
  return layout;
}

/** One store line; `-` and `0` stand in for layout fields the lookup does not know. */
export function formatStoreLine(s: { id: string; location?: string; branch?: string; diskTarget?: string; slots: readonly string[] }): string {
  return [s.id, s.location || '-', s.branch || '0', s.diskTarget || '0', ...s.slots].join(' ');
}
