// MAIL FROM / RCPT TO arguments (RFC 5321 section 4.1.2, as far as LMTP needs it) and the
// +detail convention. Pure functions; the session maps their errors to replies.

export interface PathArgument {
  /** The mailbox inside <>, source route dropped; "" for the null reverse path. */
  address: string;
  /** ESMTP parameters, keyword upper-cased; a keyword without "=" maps to true. */
  params: Map<string, string | true>;
}

const KEYWORD = /^[A-Za-z0-9][A-Za-z0-9-]*$/;
// esmtp-value: any printable ASCII except "=" and space (RFC 5321 section 4.1.2).
const VALUE = /^[\x21-\x3c\x3e-\x7e]+$/;

/**
 * Parses the text after MAIL / RCPT ("FROM:<a@b> SIZE=10"). `keyword` is FROM or TO. Returns
 * a short reason string when the syntax is wrong. Only printable ASCII is accepted in the
 * address: we do not offer SMTPUTF8, so nothing else may arrive there.
 */
export function parsePathArgument(text: string, keyword: 'FROM' | 'TO'): PathArgument | string {
  const head = `${keyword}:`;
  if (text.slice(0, head.length).toUpperCase() !== head) return `expected ${keyword}:<address>`;
  let i = head.length;
  while (text[i] === ' ') i++; // not in RFC 5321, but common and harmless
  if (text[i] !== '<') return 'address must be in <>';
  const open = i++;
  let quoted = false;
  for (; i < text.length; i++) {
    const c = text[i]!;
    const code = c.charCodeAt(0);
    if (code < 0x20 || code > 0x7e) return 'address has characters outside printable ASCII';
    if (quoted) {
      if (c === '\\') i++;
      else if (c === '"') quoted = false;
    } else if (c === '"') quoted = true;
    else if (c === '>') break;
    else if (c === '<' || c === ' ') return 'address syntax';
  }
  if (i >= text.length) return 'unterminated <address>';
  let address = text.slice(open + 1, i);
  // A source route ("@relay1,@relay2:user@host") must be accepted and ignored.
  const route = /^@[^:,<>\s]+(?:,@[^:,<>\s]+)*:/.exec(address);
  if (route) address = address.slice(route[0].length);
  const params = new Map<string, string | true>();
  const rest = text.slice(i + 1);
  if (rest !== '' && !rest.startsWith(' ')) return 'garbage after address';
  for (const p of rest.split(' ')) {
    if (p === '') continue;
    const eq = p.indexOf('=');
    const key = (eq < 0 ? p : p.slice(0, eq)).toUpperCase();
    if (!KEYWORD.test(key)) return `bad parameter ${p.slice(0, 40)}`;
    if (params.has(key)) return `duplicate parameter ${key}`;
    if (eq < 0) params.set(key, true);
    else {
      const value = p.slice(eq + 1);
      if (!VALUE.test(value)) return `bad value for ${key}`;
      params.set(key, value);
    }
  }
  return { address, params };
}

/** Index of the "@" that separates local part and domain (the last one outside quotes), or -1. */
function atIndex(address: string): number {
  let quoted = false;
  let at = -1;
  for (let i = 0; i < address.length; i++) {
    const c = address[i];
    if (quoted && c === '\\') i++;
    else if (c === '"') quoted = !quoted;
    else if (c === '@' && !quoted) at = i;
  }
  return at;
}

// RFC 5321 section 4.1.2: Local-part = Dot-string / Quoted-string; Domain = sub-domain
// *("." sub-domain) / address-literal. "_" is let through in domains: some hosts have one.
const DOT_STRING = /^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*$/;
const QUOTED_STRING = /^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$/;
const DOMAIN = /^[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*$/;
const ADDRESS_LITERAL = /^\[[\x21-\x5a\x5e-\x7e]+\]$/;

/**
 * A recipient in one canonical spelling, or undefined when it is not a mailbox RFC 5321
 * allows (or the bare "postmaster", section 4.5.1). A quoted local part whose quotes are not
 * needed loses them (`"alice"@x` is `alice@x`, section 4.1.2: they are the same mailbox);
 * one that needs them keeps them with minimal escapes. Since every unquoted local part is
 * a Dot-string, a +detail taken from it holds no "@", quote or space, and backends accept it.
 */
export function canonicalRecipient(address: string): string | undefined {
  if (address.toLowerCase() === 'postmaster') return address;
  const at = atIndex(address);
  if (at <= 0) return undefined;
  const local = address.slice(0, at);
  const domain = address.slice(at + 1);
  if (!DOMAIN.test(domain) && !ADDRESS_LITERAL.test(domain)) return undefined;
  if (DOT_STRING.test(local)) return address;
  if (!QUOTED_STRING.test(local)) return undefined;
  const unquoted = local.slice(1, -1).replace(/\\(.)/g, '$1');
  if (DOT_STRING.test(unquoted)) return `${unquoted}@${domain}`;
  return `"${unquoted.replace(/[\\"]/g, (c) => `\\${c}`)}"@${domain}`;
}

/** A recipient must be local@domain, or the bare "postmaster" (RFC 5321 section 4.5.1). */
export function validRecipient(address: string): boolean {
  return canonicalRecipient(address) !== undefined;
}

/**
 * "user+detail@domain" -> { base: "user@domain", detail: "detail" }; undefined when the
 * local part has no "+" (a quoted local part is never split, nor a leading "+").
 */
export function splitDetail(address: string): { base: string; detail: string } | undefined {
  const at = atIndex(address);
  const local = at < 0 ? address : address.slice(0, at);
  if (local.startsWith('"')) return undefined;
  const plus = local.indexOf('+');
  if (plus <= 0) return undefined;
  return { base: local.slice(0, plus) + (at < 0 ? '' : address.slice(at)), detail: local.slice(plus + 1) };
}

/** Puts "+detail" back into a mailbox name ("user@domain" or a bare "user"). */
export function withDetail(mailbox: string, detail: string): string {
  const at = atIndex(mailbox);
  return at < 0 ? `${mailbox}+${detail}` : `${mailbox.slice(0, at)}+${detail}${mailbox.slice(at)}`;
}
