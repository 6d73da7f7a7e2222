#!/usr/bin/env bash
# `npm run demo`: a working mailsplice on this machine in one command. Installs what it
# needs (Dovecot and friends from Debian, npm packages), starts two Dovecot slots on
# loopback with demo users, and mailsplice in front of them on the embedded file lookup.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(dovecot-imapd dovecot-pop3d dovecot-lmtpd openssl curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "demo: needs ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "demo: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  service dovecot stop >/dev/null 2>&1 || true
fi
[ -d node_modules ] || npm ci
exec node --import tsx scripts/demo.ts
