#!/bin/sh
# Render the nginx configuration from its template, check it, then run nginx in the foreground.
# Each placeholder of the template (an upper-case name in braces after a dollar sign) is replaced
# by that environment variable; an unset one is an error (nginx's own lower-case $variables are
# left alone). The defaults below are the compose deployment's; the compose file or
# `docker run -e` override them.
set -eu
: "${LISTEN:=9443}"
: "${SUPERLINK:=superlink:8000}"
: "${SUPERLINK_TLS_NAME:=superlink}"
: "${CA_CERT:=/certs/ca.crt}"
: "${TLS_CERT:=/certs/server.crt}"
: "${TLS_KEY:=/certs/server.key}"
: "${MAX_BODY_SIZE:=64m}"
: "${RUN_DIR:=/tmp/nginx}"
: "${TEMPLATE:=/etc/protofuse/fleet.conf.template}"
export LISTEN SUPERLINK SUPERLINK_TLS_NAME CA_CERT TLS_CERT TLS_KEY MAX_BODY_SIZE RUN_DIR
mkdir -p "$RUN_DIR"
conf="$RUN_DIR/nginx.conf"
# perl-base is part of every Debian system (envsubst is not in a minimal one).
perl -pe 's/\$\{([A-Z_][A-Z0-9_]*)\}/defined $ENV{$1} ? $ENV{$1} : die "fleet.conf.template: \${$1} is not set\n"/ge' \
    "$TEMPLATE" > "$conf"
nginx -t -q -c "$conf" -e stderr
exec nginx -c "$conf" -e stderr -g 'daemon off;' "$@"
