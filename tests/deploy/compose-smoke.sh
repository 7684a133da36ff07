#!/usr/bin/env bash
# Smoke test of the compose deployment, for real, from the host (run as root after
# tests/host/setup-docker.sh and deploy/build-wheelhouse.sh):
#
#   tests/deploy/compose-smoke.sh
#
# Builds the images when absent (BUILD=1 rebuilds), starts certs, superlink, proxy, fusion and
# service under a compose project of its own, and checks that
#   - /health answers 200 through the proxy over TLS (verified with the deployment CA) and
#     the Control and Runtime APIs, /docs and /openapi.json answer 404 there;
#   - the proxy and the service are published on 127.0.0.1 only, the SuperLink not at all;
#   - a registered SuperNode (the host's flower-supernode, through the proxy) comes online, an
#     unregistered one is refused (HTTP 412);
#   - the adaptation service answers a health check with mutual TLS.
# Everything it started is stopped at the end (`docker compose -p NAME down -v`, supernodes by
# process group), also on failure.
#
# Environment: PROJECT (pf-smoke-<pid>), BASE_IMAGE (protofuse-base:bookworm), PROTOFUSE_TAG
# (0.2.0), PYTHON_BIN (.venv/bin: flower-supernode, flwr, protofuse on the host), KEEP_PKI (a
# folder to copy the deployment's certificates and keys to).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
PROJECT=${PROJECT:-pf-smoke-$$}
export BASE_IMAGE=${BASE_IMAGE:-protofuse-base:bookworm}
export PROTOFUSE_TAG=${PROTOFUSE_TAG:-0.2.0}
PYTHON_BIN=${PYTHON_BIN:-$root/.venv/bin}
export PATH="$PYTHON_BIN:$PATH"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export FLEET_PORT=${FLEET_PORT:-$(free_port)}
export SERVICE_PORT=${SERVICE_PORT:-$(free_port)}
work=$(mktemp -d /tmp/protofuse-smoke.XXXXXX)
pids=()
t_all=$SECONDS
say() { printf '[smoke %3ds] %s\n' "$((SECONDS - t_all))" "$*"; }
fail() { say "FAIL: $*"; exit 1; }
dc() { docker compose -p "$PROJECT" "$@"; }

cleanup() {
    local rc=$?
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    if [ "$rc" != 0 ]; then
        dc logs --no-color --tail 40 superlink proxy fusion service > "$work/compose.log" 2>&1 || true
        say "logs kept in $work"
    fi
    timeout 120 docker compose -p "$PROJECT" --profile operator down -v --timeout 10 >/dev/null 2>&1 || true
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    [ "$rc" = 0 ] && rm -rf "$work"
    say "cleaned up project $PROJECT (rc $rc)"
}
trap cleanup EXIT

# Images -------------------------------------------------------------------------------------
if [ "${BUILD:-0}" = 1 ] || ! docker image inspect "protofuse:$PROTOFUSE_TAG" >/dev/null 2>&1; then
    say "building protofuse:$PROTOFUSE_TAG"
    docker build -q --network none --build-arg "BASE=$BASE_IMAGE" -f deploy/Dockerfile \
        -t "protofuse:$PROTOFUSE_TAG" deploy
fi
if [ "${BUILD:-0}" = 1 ] || ! docker image inspect "protofuse-proxy:$PROTOFUSE_TAG" >/dev/null 2>&1; then
    say "building protofuse-proxy:$PROTOFUSE_TAG"
    docker build -q --network host --build-arg "BASE=$BASE_IMAGE" \
        -t "protofuse-proxy:$PROTOFUSE_TAG" deploy/proxy
fi

# Up -----------------------------------------------------------------------------------------
say "up (project $PROJECT, fleet 127.0.0.1:$FLEET_PORT, service 127.0.0.1:$SERVICE_PORT)"
dc up -d --wait --wait-timeout 180 superlink proxy fusion service >/dev/null 2>&1 \
    || { dc ps -a; fail "services did not become healthy"; }
say "all healthy"
dc run --rm --no-deps -T operator tar -C /pki -c . | tar -x --no-same-owner -C "$work"
ca="$work/ca.crt"
[ -s "$ca" ] || fail "no ca.crt in the pki volume"
[ -n "${KEEP_PKI:-}" ] && mkdir -p "$KEEP_PKI" && cp -r "$work"/. "$KEEP_PKI"/

# The proxy ----------------------------------------------------------------------------------
code() { curl -s -o /dev/null -w '%{http_code}' --cacert "$ca" -X "$1" "https://127.0.0.1:$FLEET_PORT$2"; }
[ "$(code GET /health)" = 200 ] || fail "/health through the proxy"
for path in /v1/control/list-runs /v1/control/start-run /v1/runtime/get-run /docs /openapi.json \
            / /v1/fleet/ /v1/fleet/..%2fcontrol/list-runs /v1/fleet/%2e%2e/control/list-runs \
            '/v1/fleet/pull-messages?x=1' //v1/control/list-runs /health/; do
    for method in GET POST; do
        got=$(code "$method" "$path")
        [ "$got" = 404 ] || fail "$method $path through the proxy answered $got, not 404"
    done
done
[ "$(code POST /v1/fleet/pull-messages)" != 404 ] || fail "the Fleet API is not forwarded"
# A body as large as a model (nginx's default limit, 1 MB, would give the nodes a 413 that they
# do not retry): forwarded, the SuperLink answers (it is not a valid message: 4xx, not 413).
head -c 8000000 /dev/urandom > "$work/big.bin"
got=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$ca" -X POST -H 'Content-Type: application/protobuf' \
    --data-binary "@$work/big.bin" "https://127.0.0.1:$FLEET_PORT/v1/fleet/push-object")
case "$got" in 413|5*|000) fail "an 8 MB Fleet request got $got through the proxy";; esac
curl -s -o /dev/null "https://127.0.0.1:$FLEET_PORT/health" 2>/dev/null \
    && fail "the proxy's certificate is accepted without the deployment CA" || true
say "proxy: /health 200; Control, Runtime, /docs, /openapi.json and odd spellings 404; 8 MB body forwarded ($got)"

# Published ports ----------------------------------------------------------------------------
[ "$(dc port proxy 9443)" = "127.0.0.1:$FLEET_PORT" ] || fail "proxy published as $(dc port proxy 9443)"
[ "$(dc port service 50051)" = "127.0.0.1:$SERVICE_PORT" ] || fail "service published as $(dc port service 50051)"
published=$(docker inspect -f '{{json .HostConfig.PortBindings}}' "$(dc ps -q superlink)")
[ "$published" = "{}" ] || [ "$published" = "null" ] || fail "superlink is published: $published"
say "ports: proxy and service on 127.0.0.1 only, superlink unpublished"

# SuperNode authentication through the proxy -------------------------------------------------
dc run --rm --no-deps -T operator flwr supernode register /pki/supernodes/node-0.pub >/dev/null
start_node() {  # start_node INDEX PORT
    setsid flower-supernode --superlink "127.0.0.1:$FLEET_PORT" --root-certificates "$ca" \
        --auth-supernode-private-key "$work/supernodes/node-$1.key" --port "$2" \
        > "$work/node-$1.log" 2>&1 < /dev/null &
    pids+=($!)
}
start_node 0 "$(free_port)"; registered=${pids[-1]}
start_node 1 "$(free_port)"; unregistered=${pids[-1]}
for _ in $(seq 1 60); do
    if dc run --rm --no-deps -T operator flwr supernode list --format json 2>/dev/null | grep -q '"online"'; then
        online=1; break
    fi
    sleep 2
done
[ "${online:-0}" = 1 ] || fail "the registered SuperNode did not come online through the proxy"
kill -0 "$registered" 2>/dev/null || fail "the registered SuperNode exited"
for _ in $(seq 1 30); do kill -0 "$unregistered" 2>/dev/null || break; sleep 1; done
kill -0 "$unregistered" 2>/dev/null && fail "the unregistered SuperNode is still running"
dc logs --no-color proxy | grep -q '"POST /v1/fleet/[a-z-]* HTTP/1.1" 412' \
    || fail "no 412 for the unregistered SuperNode in the proxy's log"
say "node auth: registered node online through the proxy, unregistered refused (412)"

# The adaptation service ---------------------------------------------------------------------
protofuse health "127.0.0.1:$SERVICE_PORT" --certs "$work" >/dev/null || fail "service health (mutual TLS)"
say "service: healthy over mutual TLS"
say "PASS"
