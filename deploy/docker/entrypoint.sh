#!/bin/sh
# The image's entrypoint: first-start.sh for `serve` with the image's config dir, then mailsplice.
set -eu
if [ "${1:-}" = serve ]; then /opt/mailsplice/first-start.sh; fi
exec node /opt/mailsplice/dist/cli.js "$@"
