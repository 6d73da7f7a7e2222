#!/usr/bin/env bash
# Makes a private Cyrus IMAP 3.6 (Debian 12) available to the tests, without
# touching Dovecot: Debian's cyrus-imapd / cyrus-pop3d / cyrus-replication
# conflict with dovecot-imapd / dovecot-pop3d, so apt installs only the parts
# that do not conflict, and the other three .debs are unpacked (dpkg-deb -x)
# into a fixed folder that test/harness/cyrus.ts reads:
#
#   ${MAILSPLICE_CYRUS_ROOT:-/opt/mailsplice-test/cyrus}/usr/lib/cyrus/bin/{imapd,pop3d,idled,sync_client,sync_server}
#
# master, lmtpd, ctl_cyrusdb come from cyrus-common in /usr/lib/cyrus/bin/.
# Run as root; idempotent (does nothing when the unpacked version matches the
# installed cyrus-common). Tests start their own instances: this script
# leaves no Cyrus running.
set -euo pipefail

root="${MAILSPLICE_CYRUS_ROOT:-/opt/mailsplice-test/cyrus}"
apt_pkgs=(cyrus-common cyrus-admin cyrus-clients sasl2-bin)
unpacked=(cyrus-imapd cyrus-pop3d cyrus-replication)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
for p in "${apt_pkgs[@]}"; do installed "$p" || missing+=("$p"); done
# apt needs package lists (a fresh machine may have none).
have_lists() { apt-cache show cyrus-common >/dev/null 2>&1; }

if ((${#missing[@]})); then
  echo "setup-cyrus: installing ${missing[*]}"
  have_lists || apt-get update
  # Refuse anything that would remove a package (Dovecot above all).
  if apt-get -s install --no-install-recommends "${missing[@]}" | grep -q '^Remv '; then
    echo "setup-cyrus: apt would remove packages; refusing:" >&2
    apt-get -s install --no-install-recommends "${missing[@]}" | grep '^Remv ' >&2
    exit 1
  fi
  # --no-install-recommends: cyrus-common recommends cyrus-imapd, which removes Dovecot.
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# cyrus-common's postinst starts Debian's own Cyrus where policy-rc.d allows it
# (listening on the standard ports on all addresses): stop it and keep it off.
service cyrus-imapd stop >/dev/null 2>&1 || true
if command -v systemctl >/dev/null 2>&1; then systemctl disable cyrus-imapd >/dev/null 2>&1 || true; fi

# The unpacked binaries link against libcyrus* from cyrus-common: same version.
version="$(dpkg-query -W -f='${Version}' cyrus-common)"
stamp="$root/.version"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$version" && -x "$root/usr/lib/cyrus/bin/imapd" ]]; then
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# apt-get download writes into the current directory; _apt must be able to write there.
chown _apt "$work" 2>/dev/null || chmod 777 "$work"
download() { (cd "$work" && apt-get download "${unpacked[@]/%/=$version}"); }
if ! { have_lists && download; }; then
  # Old lists, or the mirror no longer has the installed version (a security
  # update replaced it): refresh, bring cyrus-common to the candidate, retry.
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends cyrus-common
  service cyrus-imapd stop >/dev/null 2>&1 || true
  version="$(dpkg-query -W -f='${Version}' cyrus-common)"
  rm -f "$work"/*.deb
  download
fi
echo "setup-cyrus: unpacking ${unpacked[*]} $version into $root"
rm -rf "$root.new"
mkdir -p -m 755 "$root.new"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$root.new"; done
printf '%s' "$version" >"$root.new/.version"
rm -rf "$root"
mv "$root.new" "$root"
# The harness runs Cyrus as user cyrus, which must be able to reach the binaries.
chmod 755 "$root"
for b in imapd pop3d idled sync_client sync_server; do
  [[ -x "$root/usr/lib/cyrus/bin/$b" ]] || { echo "setup-cyrus: $b missing after unpack" >&2; exit 1; }
done
# From cyrus-common (apt): the LMTP and ManageSieve (timsieved) services the harness runs.
for b in master lmtpd timsieved; do
  [[ -x "/usr/lib/cyrus/bin/$b" ]] || { echo "setup-cyrus: /usr/lib/cyrus/bin/$b missing (cyrus-common)" >&2; exit 1; }
done
echo "setup-cyrus: done"
