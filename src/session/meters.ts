import { Counter, Histogram, type Metric, type Registry } from 'prom-client';

// Metrics observed as things happen, once per login, backend failure, session end, route
// event or LMTP recipient (never per byte or per command): prom-client objects, one set per
// server, registered into the scrape registry by src/metrics.ts. Labels are bounded:
// protocol, slot, store, result, reason, kind; never a user or an address. Counters and
// histograms add up across worker processes.

/** Seconds: a login on a healthy backend takes milliseconds; the top buckets are the timeouts. */
const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

/** Why a backend did not give a session (mailsplice_backend_failures_total's `reason`). */
export type BackendFailure = 'connect' | 'timeout' | 'refused' | 'lost' | 'loop' | 'in-use' | 'lmtp';

export class Meters {
  readonly loginSeconds = new Histogram({
    name: 'mailsplice_login_seconds',
    help: 'Successful logins, from the login command to the spliced session, by protocol and slot',
    labelNames: ['protocol', 'slot'],
    buckets: LATENCY_BUCKETS,
    registers: [],
  });
  readonly backendConnectSeconds = new Histogram({
    name: 'mailsplice_backend_connect_seconds',
    help: 'Backend connections made for a login (TCP, and TLS where configured), by slot',
    labelNames: ['slot'],
    buckets: LATENCY_BUCKETS,
    registers: [],
  });
  readonly backendLoginSeconds = new Histogram({
    name: 'mailsplice_backend_login_seconds',
    help: 'Backend login dialogues (greeting to the answer to the login), by slot',
    labelNames: ['slot'],
    buckets: LATENCY_BUCKETS,
    registers: [],
  });
  readonly backendFailures = new Counter({
    name: 'mailsplice_backend_failures_total',
    help: 'Logins a backend could not serve, by slot and reason (connect, timeout, refused, lost, loop, in-use); lmtp: a backend LMTP transaction that failed',
    labelNames: ['slot', 'reason'],
    registers: [],
  });
  readonly sessionsEnded = new Counter({
    name: 'mailsplice_sessions_ended_total',
    help: 'Spliced sessions ended, by protocol and who ended them (client, backend, failover, lock, move, kick, limit, shutdown, ...)',
    labelNames: ['protocol', 'reason'],
    registers: [],
  });
  readonly routeEvents = new Counter({
    name: 'mailsplice_route_events_applied_total',
    help: 'Route events applied (user, store, slot, kick), resyncs not included',
    labelNames: ['kind'],
    registers: [],
  });
  readonly eventLag = new Histogram({
    name: 'mailsplice_route_event_lag_seconds',
    help: 'From publish (the event\'s ts) to applied here, for events that carry a ts',
    labelNames: ['kind'],
    buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [],
  });
  readonly lmtpDeliveries = new Counter({
    name: 'mailsplice_lmtp_slot_deliveries_total',
    help: 'Per-recipient answers after DATA by slot: delivered (2xx), deferred (4xx), rejected (5xx)',
    labelNames: ['slot', 'result'],
    registers: [],
  });

  register(registry: Registry): void {
    for (const m of [
      this.loginSeconds,
      this.backendConnectSeconds,
      this.backendLoginSeconds,
      this.backendFailures,
      this.sessionsEnded,
      this.routeEvents,
      this.eventLag,
      this.lmtpDeliveries,
    ] as unknown as Metric[]) {
      registry.registerMetric(m);
    }
  }
}
