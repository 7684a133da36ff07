#!/usr/bin/env bash
# What the integration and deploy tiers need from the machine, set up once before pytest runs
# (`make test` and `.ci/run` call this; `make test-fast` needs none of it). Each step is
# idempotent and fast when already done:
#
#   1. the model servers' virtualenv (.venv-mlserver: MLServer, MLflow) for
#      tests/integration/test_model_servers.py;
#   2. nginx, the Fleet-only proxy of tests/deploy/test_secure_deployment.py (Debian's package);
#   3. Debian's Chromium (headless) for tests/integration/test_report_page.py;
#   4. the Docker engine, Compose v2 and the local base image for tests/deploy/test_compose.py
#      (tests/host/setup-docker.sh; a daemon started here is stopped by tests/host/teardown.sh).
#
# Steps 2 to 4 need root. Without root, or when a step fails outside CI, the tests that need it
# skip (saying why); in CI (CI=1) a failed step fails the run here.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
status=0
fail() {  # fail STEP: a failure in CI, a note elsewhere
    if [ -n "${CI:-}" ]; then echo "[host] $1 failed" >&2; status=1; else echo "[host] $1 failed: the tests that need it will skip" >&2; fi
}

bash "$HERE/setup-model-servers.sh" || fail "model servers (.venv-mlserver)"

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    if [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null; } || fail "nginx"
    else
        fail "nginx (not root: apt-get install nginx)"
    fi
fi

# 3. Debian's Chromium, headless, for tests/integration/test_report_page.py (the run report).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
          || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; } || fail "chromium"
    else
        fail "chromium (not root: apt-get install chromium)"
    fi
fi

if [ "$(id -u)" = 0 ]; then
    bash "$HERE/setup-docker.sh" || fail "Docker engine (tests/host/setup-docker.sh)"
else
    fail "Docker engine (not root: run tests/host/setup-docker.sh as root)"
fi
exit $status
