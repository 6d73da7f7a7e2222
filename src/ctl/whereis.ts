import { parseAs, type RouteAdmin } from '../lookup/admin.js';
import { LookupFailure, routeFrom, type Protocol, type SlotRecord } from '../lookup/model.js';
import { notFound } from './errors.js';

export interface SlotView {
  id: string;
  /** Absent when the store names a slot that is not defined. */
  host?: string;
  ports?: Partial<Record<Protocol, number>>;
  status?: 'up' | 'down';
}

export interface WhereIs {
  login: string;
  backendLogin: string;
  userStatus: 'active' | 'locked';
  store: string;
  /** Absent when the user's store is not defined. */
  storeStatus?: 'active' | 'locked';
  epoch?: number;
  master?: SlotView;
  replicas: SlotView[];
  /** What a proxy would do with a login right now. */
  route: { ok: true; slot: string; host: string; ports: Partial<Record<Protocol, number>> } | { ok: false; failure: string; reason: string };
}

function view(id: string, s: SlotRecord | undefined): SlotView {
  return s ? { id, host: s.host, ports: s.ports, status: s.status } : { id };
}

/** The whole chain for one login, read the way a proxy reads it, with every lock state. */
export async function whereis(admin: RouteAdmin, login: string): Promise<WhereIs> {
  const user = await admin.get('user', login);
  if (!user) throw notFound(`unknown user ${login}`);
  const store = await admin.get('store', user.store);
  const slotIds = store ? [store.master, ...store.replicas].filter(Boolean) : [];
  const hashes = await admin.store.read(slotIds.map((id) => ({ kind: 'slot', id })));
  const slots = new Map<string, SlotRecord | undefined>(slotIds.map((id, i) => [id, parseAs('slot', hashes[i], id)]));
  const master = store?.master ? slots.get(store.master) : undefined;
  let route: WhereIs['route'];
  try {
    const r = routeFrom(login, user, store, master);
    route = { ok: true, slot: r.slot, host: r.host, ports: r.ports };
  } catch (e) {
    if (!(e instanceof LookupFailure)) throw e;
    route = { ok: false, failure: e.kind, reason: e.message };
  }
  return {
    login,
    backendLogin: user.backendLogin ?? login,
    userStatus: user.status,
    store: user.store,
    ...(store ? { storeStatus: store.status, epoch: store.epoch } : {}),
    ...(store?.master ? { master: view(store.master, master) } : {}),
    replicas: (store?.replicas ?? []).map((id) => view(id, slots.get(id))),
    route,
  };
}
