#!/usr/bin/env bash
# Stops what tests/host/setup.sh started and nothing else: the Docker daemon, only when
# setup-docker.sh started it (its PID file exists). Images stay as a build cache.
PIDFILE=${DOCKERD_PIDFILE:-/run/protofuse-dockerd.pid}
if [ -f "$PIDFILE" ]; then
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
fi
