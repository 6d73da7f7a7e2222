import { Counter, Gauge, Registry, collectDefaultMetrics, type Aggregator } from 'prom-client';
import type { ProxyContext } from './session/core.js';
import { spliceTotals } from './session/splice.js';
import { registerLmtpMetrics } from './lmtp/metrics.js';

/**
 * Prometheus metrics. The hot paths only bump plain counters in the ProxyContext; values
 * are read into prom-client when scraped, so a login costs no metrics library call.
 */
export function createMetrics(ctx: ProxyContext): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'mailsplice_process_' });
  new Gauge({
    name: 'mailsplice_sessions',
    help: 'Logged-in sessions being spliced, by protocol',
    labelNames: ['protocol'],
    registers: [registry],
    collect() {
      for (const [protocol, n] of Object.entries(ctx.registry.countByProtocol())) this.set({ protocol }, n);
    },
  });
  new Gauge({
    name: 'mailsplice_slot_sessions',
    help: 'Logged-in IMAP/POP3 sessions and LMTP deliveries under way, by slot',
    labelNames: ['slot'],
    registers: [registry],
    collect() {
      this.reset(); // a slot with no session left has no series
      for (const [slot, n] of Object.entries(ctx.registry.countBy('slot'))) this.set({ slot }, n);
    },
  });
  new Gauge({
    name: 'mailsplice_store_sessions',
    help: 'Logged-in IMAP/POP3 sessions and LMTP deliveries under way, by store',
    labelNames: ['store'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [store, n] of Object.entries(ctx.registry.countBy('store'))) this.set({ store }, n);
    },
  });
  new Gauge({
    name: 'mailsplice_preauth_connections',
    help: 'Connections still in the pre-auth dialogue',
    registers: [registry],
    collect() {
      this.set(ctx.sweep.size);
    },
  });
  new Counter({
    name: 'mailsplice_logins_total',
    help: 'Login attempts by protocol and result',
    labelNames: ['protocol', 'result'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [protocol, results] of Object.entries(ctx.counters.logins)) {
        for (const [result, n] of Object.entries(results)) this.inc({ protocol, result }, n);
      }
    },
  });
  const perSlot = (name: string, help: string, counts: Map<string, number>) =>
    new Counter({
      name,
      help,
      labelNames: ['slot'],
      registers: [registry],
      collect() {
        this.reset();
        for (const [slot, n] of counts) this.inc({ slot }, n);
      },
    });
  perSlot('mailsplice_slot_logins_queued_total', 'Backend logins that waited for a place (backend.logins_per_slot), by slot', ctx.slotLogins.queued);
  perSlot('mailsplice_slot_logins_refused_total', 'Logins answered with the temporary error because the slot had no place and its queue was full or the wait ran out, by slot', ctx.slotLogins.refused);
  new Counter({
    name: 'mailsplice_proxy_headers_total',
    help: 'PROXY protocol headers awaited from load balancers, by result (proxied, local, untrusted, invalid, timeout)',
    labelNames: ['result'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [result, n] of Object.entries(ctx.counters.proxyHeaders)) this.inc({ result }, n);
    },
  });
  // `aggregator`: how the primary of a multi-process instance merges the workers' values
  // (src/cluster/instance.ts); the default is their sum.
  const simple = (name: string, help: string, read: () => number, kind: 'counter' | 'gauge' = 'counter', aggregator: Aggregator = 'sum') => {
    const Metric = kind === 'counter' ? Counter : Gauge;
    new Metric({
      name,
      help,
      aggregator,
      registers: [registry],
      collect(this: Counter | Gauge) {
        this.reset();
        if (this instanceof Gauge) this.set(read());
        else this.inc(read());
      },
    });
  };
  const stats = ctx.router.stats;
  simple('mailsplice_rejected_connections_total', 'Connections turned away by connection limits', () => ctx.counters.rejectedConnections);
  simple('mailsplice_route_cache_hits_total', 'Logins routed from the in-process cache', () => stats.cacheHits);
  simple('mailsplice_route_cache_misses_total', 'Logins that read the lookup source', () => stats.cacheMisses);
  simple('mailsplice_route_events_total', 'Change events applied', () => stats.events);
  simple('mailsplice_route_resyncs_total', 'Full resyncs after the event stream was lost', () => stats.resyncs);
  // With workers: 1 only while every worker's events flow.
  simple('mailsplice_route_events_live', '1 while change events are flowing', () => (stats.live ? 1 : 0), 'gauge', 'min');
  simple('mailsplice_route_resync_failures_total', 'Resyncs that did not complete (source unreachable, or it looked emptied)', () => stats.resyncFailures);
  simple('mailsplice_route_mass_removals_refused_total', 'Resyncs not believed because most known routes had vanished (an emptied Redis)', () => stats.massRemovalsRefused);
  simple('mailsplice_route_older_epochs_ignored_total', 'Store changes ignored because their epoch was lower than the one known', () => stats.olderEpochsIgnored);
  simple('mailsplice_route_records_malformed', 'Route records that do not parse (each counts as locked)', () => stats.malformed, 'gauge', 'max');
  simple('mailsplice_sessions_ended_by_events_total', 'Sessions ended because an event changed their route (a login whose route changed while it ran counts too)', () => ctx.registry.endedByEvents);
  simple('mailsplice_spliced_bytes_client_to_backend_total', 'Bytes spliced from clients to backends', () => spliceTotals.clientToBackend);
  simple('mailsplice_spliced_bytes_backend_to_client_total', 'Bytes spliced from backends to clients', () => spliceTotals.backendToClient);
  registerLmtpMetrics(registry);
  ctx.meters.register(registry);
  return registry;
}
