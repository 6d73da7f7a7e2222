#!/bin/sh
# Installs what `npm run bench` needs beyond the test suite's packages: nginx with its mail
# module (the bar we measure against). Idempotent: does nothing when everything is there.
# Debian/Ubuntu only; elsewhere it says what is missing and the bench runs without nginx.
set -eu

need=""
command -v nginx >/dev/null 2>&1 || need="$need nginx-light"
[ -f /usr/lib/nginx/modules/ngx_mail_module.so ] || need="$need libnginx-mod-mail"
for cmd in dovecot redis-server; do
  command -v "$cmd" >/dev/null 2>&1 || echo "bench/setup.sh: $cmd missing (the test suite's packages: dovecot-imapd, redis-server)" >&2
done
[ -z "$need" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "bench/setup.sh: no apt-get; install$need yourself to compare with nginx" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Installing nginx must not start the distribution's nginx on port 80: when no policy-rc.d
# exists, put one in place for the install (and only then remove it again).
policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  ours=1
fi
cleanup() { [ -z "$ours" ] || $SUDO rm -f "$policy"; }
trap cleanup EXIT

echo "bench/setup.sh: installing$need" >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need >/dev/null ||
  { $SUDO apt-get update >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need >/dev/null; } ||
  echo "bench/setup.sh: could not install$need; the bench runs without nginx" >&2
# Debian's package enables the site on :80 for a service we never start; the bench runs its
# own nginx from a temp dir with its own config.
exit 0
