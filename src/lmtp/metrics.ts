import { Counter, Gauge, type Registry } from 'prom-client';

/** How a RCPT TO was answered. */
export type RcptResult = 'accepted' | 'unknown' | 'locked' | 'unavailable' | 'refused';
/** The final answer a recipient got after DATA: 2xx, 4xx or 5xx. */
export type DeliveryResult = 'delivered' | 'deferred' | 'rejected';

/**
 * LMTP counters for the whole process. The hot path bumps plain numbers; prom-client reads
 * them when scraped (the pattern of src/metrics.ts), so a delivery costs no library call.
 */
export interface LmtpTotals {
  connections: number;
  transactions: number;
  /** Decoded message bytes received from clients. */
  bytes: number;
  rcpt: Record<RcptResult, number>;
  delivery: Record<DeliveryResult, number>;
  /** Backend transactions that failed (connect, timeout, lost connection). */
  backendFailures: number;
  /** Of those, the ones where the backend refused MAIL FROM (e.g. Cyrus's 430 without AUTH). */
  backendMailRefusals: number;
}

export function newLmtpTotals(): LmtpTotals {
  return {
    connections: 0,
    transactions: 0,
    bytes: 0,
    rcpt: { accepted: 0, unknown: 0, locked: 0, unavailable: 0, refused: 0 },
    delivery: { delivered: 0, deferred: 0, rejected: 0 },
    backendFailures: 0,
    backendMailRefusals: 0,
  };
}

/** The process-wide totals every LMTP listener counts into. */
export const lmtpTotals: LmtpTotals = newLmtpTotals();

/** Registers the LMTP metrics into `registry` (called from src/metrics.ts). */
export function registerLmtpMetrics(registry: Registry, totals: LmtpTotals = lmtpTotals): void {
  new Gauge({
    name: 'mailsplice_lmtp_connections',
    help: 'Open LMTP client connections',
    registers: [registry],
    collect() {
      this.set(totals.connections);
    },
  });
  const counter = (name: string, help: string, read: () => number) =>
    new Counter({
      name,
      help,
      registers: [registry],
      collect() {
        this.reset();
        this.inc(read());
      },
    });
  counter('mailsplice_lmtp_transactions_total', 'LMTP mail transactions that reached the end of DATA', () => totals.transactions);
  counter('mailsplice_lmtp_bytes_total', 'Message bytes received over LMTP', () => totals.bytes);
  counter('mailsplice_lmtp_backend_failures_total', 'Backend LMTP transactions that failed (connect, AUTH, MAIL refused, timeout, connection lost)', () => totals.backendFailures);
  counter(
    'mailsplice_lmtp_backend_mail_refusals_total',
    'Backend LMTP transactions whose MAIL FROM the backend refused (e.g. 430 Authentication required); the recipients got 451',
    () => totals.backendMailRefusals,
  );
  new Counter({
    name: 'mailsplice_lmtp_rcpt_total',
    help: 'RCPT TO answers by result',
    labelNames: ['result'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [result, n] of Object.entries(totals.rcpt)) this.inc({ result }, n);
    },
  });
  new Counter({
    name: 'mailsplice_lmtp_deliveries_total',
    help: 'Per-recipient answers after DATA: delivered (2xx), deferred (4xx), rejected (5xx)',
    labelNames: ['result'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [result, n] of Object.entries(totals.delivery)) this.inc({ result }, n);
    },
  });
}
