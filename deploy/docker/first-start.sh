#!/bin/sh
# Run by the image's entrypoint before mailsplice: creates what the default config names
# and is missing, so that the image starts as it is. Never overwrites what is there.
# MAILSPLICE_ETC: the config dir (default /etc/mailsplice).
set -eu
etc=${MAILSPLICE_ETC:-/etc/mailsplice}
if [ ! -e "$etc/tls/fullchain.pem" ] && [ ! -e "$etc/tls/privkey.pem" ]; then
  echo "mailsplice: no certificate in $etc/tls: creating a self-signed one; mount your own for real clients" >&2
  mkdir -p "$etc/tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=${MAILSPLICE_HOSTNAME:-$(cat /etc/hostname 2>/dev/null || echo mailsplice)}" \
    -keyout "$etc/tls/privkey.pem" -out "$etc/tls/fullchain.pem" 2>/dev/null
  chmod 600 "$etc/tls/privkey.pem"
fi
if [ ! -e "$etc/admin.token" ]; then
  echo "mailsplice: creating an admin token in $etc/admin.token (for /metrics and /healthz)" >&2
  (umask 077 && openssl rand -hex 32 >"$etc/admin.token")
fi
