import fc from 'fast-check';
import { stringify } from 'yaml';
import { describe, expect, it } from 'vitest';
import { parseModel } from '../src/lookup/file.js';
import {
  MalformedRecord,
  RecordError,
  parseOrMalformed,
  parseSlot,
  parseStore,
  parseUser,
  slotFields,
  storeFields,
  unusableHost,
  userFields,
  type SlotRecord,
  type StoreRecord,
  type UserRecord,
} from '../src/lookup/model.js';
import { parseEvent } from '../src/lookup/source.js';

// The record parsers and the event parser meet whatever a tool (or a person with redis-cli)
// wrote. Properties: random and malformed input never throws anything but RecordError
// (events: never throws at all), what is accepted satisfies the model's invariants, and
// what ctl writes reads back unchanged. Fixed seed; MAILSPLICE_PROPERTY_RUNS=N for more.

const RUNS = Number(process.env.MAILSPLICE_PROPERTY_RUNS ?? 300);
const params = { seed: 42, numRuns: RUNS };

const FIELD_NAMES = ['store', 'status', 'backend_login', 'master', 'replicas', 'epoch', 'host', 'imap', 'pop3', 'lmtp', 'other'];

/** Values as Redis (strings) or YAML (anything) may hold them, biased towards near misses. */
const fieldValue = fc.oneof(
  fc.string(),
  fc.constantFrom('active', 'locked', 'up', 'down', 'disabled', '', ' ', '143', '0x0d017', '53143.0', '1e3', '0143', '65536', '0', '-1', 'abc', '0.0.0.0', '::', '127.0.0.11', 'slotA'),
  fc.integer({ min: -10, max: 70_000 }),
  fc.double(),
  fc.array(fc.string(), { maxLength: 3 }),
  fc.constant(null),
  fc.boolean(),
  fc.dictionary(fc.string(), fc.string(), { maxKeys: 2 }),
);
const fields = fc.dictionary(fc.oneof(fc.constantFrom(...FIELD_NAMES), fc.string()), fieldValue, { maxKeys: 8 });

/** Runs a parser and fails on any exception that is not a RecordError. */
function outcome<T>(parse: () => T | undefined): T | undefined | RecordError {
  try {
    return parse();
  } catch (e) {
    if (e instanceof RecordError) return e;
    throw e;
  }
}

const ID = fc.stringMatching(/^[a-z0-9][a-z0-9._@-]{0,20}$/);

describe('record parsers (property)', () => {
  it('parseUser: a record with a store and a known status, undefined, or RecordError', () => {
    fc.assert(
      fc.property(fields, ID, (f, id) => {
        const r = outcome(() => parseUser(f, id));
        if (r === undefined || r instanceof RecordError) return;
        expect(r.store.length).toBeGreaterThan(0);
        expect(['active', 'locked']).toContain(r.status);
      }),
      params,
    );
  });

  it('parseStore: epochs are safe non-negative integers, statuses known', () => {
    fc.assert(
      fc.property(fields, ID, (f, id) => {
        const r = outcome(() => parseStore(f, id));
        if (r === undefined || r instanceof RecordError) return;
        expect(Number.isSafeInteger(r.epoch) && r.epoch >= 0).toBe(true);
        expect(['active', 'locked']).toContain(r.status);
        for (const s of r.replicas) expect(s).toBe(s.trim());
      }),
      params,
    );
  });

  it('parseSlot: ports are integers 1-65535, the host is usable', () => {
    fc.assert(
      fc.property(fields, ID, (f, id) => {
        const r = outcome(() => parseSlot(f, id));
        if (r === undefined || r instanceof RecordError) return;
        expect(unusableHost(r.host)).toBeUndefined();
        for (const p of Object.values(r.ports)) expect(Number.isInteger(p) && p >= 1 && p <= 65535).toBe(true);
        expect(['up', 'down']).toContain(r.status);
      }),
      params,
    );
  });

  it('a port string is accepted exactly when it is a plain decimal 1-65535', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string(), fc.stringMatching(/^[0-9.xXeE+-]{1,7}$/)), (s) => {
        const r = outcome(() => parseSlot({ host: 'mail.example', imap: s }, 'slotA'));
        const t = s.trim();
        const plain = /^[1-9][0-9]{0,4}$/.test(t) && Number(t) <= 65535;
        if (t === '') expect(r).toMatchObject({ ports: {} });
        else if (plain) expect(r).toMatchObject({ ports: { imap: Number(t) } });
        else expect(r).toBeInstanceOf(RecordError);
      }),
      params,
    );
  });

  it('refuses the addresses that mean "this machine" or nothing, in every spelling', () => {
    for (const host of ['0.0.0.0', '0.1.2.3', '::', '::0', '0:0:0:0:0:0:0:0', '::ffff:0.0.0.0', '0', '127.1', '255.255.255.255', '1.2.3.256', 'a b', '-x', '[::1]']) {
      expect(outcome(() => parseSlot({ host }, 'slotA')), host).toBeInstanceOf(RecordError);
    }
    for (const host of ['127.0.0.11', '10.202.80.1', '::1', 'fe80::1', 'imap.example.com', 'slot-a', 'localhost']) {
      expect(outcome(() => parseSlot({ host }, 'slotA')), host).toMatchObject({ host });
    }
  });

  it('what ctl writes reads back as the same record', () => {
    const host = fc.oneof(
      fc.tuple(fc.integer({ min: 1, max: 254 }), fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 255 }), fc.integer({ min: 1, max: 254 })).map((o) => o.join('.')),
      fc.stringMatching(/^[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z][a-z0-9]{0,8}){0,2}$/),
    );
    const port = fc.integer({ min: 1, max: 65535 });
    const slot: fc.Arbitrary<SlotRecord> = fc.record({
      host,
      ports: fc.record({ imap: port, pop3: port, lmtp: port }, { requiredKeys: [] }),
      status: fc.constantFrom('up' as const, 'down' as const),
    });
    const store: fc.Arbitrary<StoreRecord> = fc.record({
      master: ID,
      replicas: fc.array(ID, { maxLength: 3 }),
      status: fc.constantFrom('active' as const, 'locked' as const),
      epoch: fc.nat(),
    });
    const user: fc.Arbitrary<UserRecord> = fc.oneof(
      fc.record({ store: ID, status: fc.constantFrom('active' as const, 'locked' as const) }),
      fc.record({ store: ID, status: fc.constantFrom('active' as const, 'locked' as const), backendLogin: ID }),
    );
    fc.assert(
      fc.property(slot, store, user, (sl, st, u) => {
        expect(parseSlot(slotFields(sl), 'x')).toEqual(sl);
        expect(parseStore(storeFields(st), 'x')).toEqual(st);
        expect(parseUser(userFields(u), 'x')).toEqual(u);
      }),
      params,
    );
  });

  it('parseOrMalformed turns every bad record into a MalformedRecord naming its key', () => {
    fc.assert(
      fc.property(fields, (f) => {
        const r = parseOrMalformed('ms:slot:x', () => parseSlot(f, 'x'));
        if (r instanceof MalformedRecord) {
          expect(r.key).toBe('ms:slot:x');
          expect(r.problem).toMatch(/^slot x: /);
        }
      }),
      params,
    );
  });

  it('a routes file with junk entries loads: each bad entry is one MalformedRecord', () => {
    const section = fc.dictionary(ID, fc.oneof(fields, fieldValue), { maxKeys: 4 });
    fc.assert(
      fc.property(section, section, section, (users, stores, slots) => {
        const model = parseModel(stringify({ users, stores, slots }));
        for (const [id, rec] of model.stores) {
          if (rec instanceof MalformedRecord) expect(rec.key).toBe(`stores.${id}`);
        }
        expect(model.slots.size).toBeLessThanOrEqual(Object.keys(slots).length);
      }),
      params,
    );
  });
});

describe('parseEvent (property)', () => {
  it('never throws; gives a valid event or undefined', () => {
    const eventish = fc.oneof(
      fc.string(),
      fc.json(),
      fc.record({ kind: fc.oneof(fc.constantFrom('user', 'store', 'slot', 'kick', ''), fc.string(), fc.integer()), id: fc.oneof(fc.string(), fc.integer(), fc.constant(null)) }).map((o) => JSON.stringify(o)),
      fc
        .record(
          { kind: fc.constant('kick'), id: fc.oneof(fc.string(), fc.integer()), store: fc.string(), slot: fc.oneof(fc.string(), fc.constant(null)), ts: fc.oneof(fc.integer(), fc.double(), fc.string()) },
          { requiredKeys: ['kind'] },
        )
        .map((o) => JSON.stringify(o)),
    );
    fc.assert(
      fc.property(eventish, (text) => {
        const ev = parseEvent(text);
        if (ev === undefined) return;
        expect(['user', 'store', 'slot', 'kick']).toContain(ev.kind);
        expect(typeof ev.id === 'string' && ev.id.length > 0).toBe(true);
        const o = JSON.parse(text) as Record<string, unknown>;
        if (ev.kind === 'kick') {
          // A kick names exactly one of a login (id), a store or a slot.
          expect(['id', 'store', 'slot'].filter((k) => o[k] !== undefined)).toEqual([ev.scope === 'user' ? 'id' : ev.scope]);
          expect(o[ev.scope === 'user' ? 'id' : ev.scope]).toBe(ev.id);
          return;
        }
        expect(o).toMatchObject(ev);
      }),
      params,
    );
  });
});
