#!/usr/bin/env bash
# Build deploy/wheels/: every wheel the protofuse image installs, so that
# `docker build --network none` installs offline (`pip install --no-index --find-links`). The
# image is the server and organizations' clients, so the wheelhouse holds exactly the closure of
# protofuse[server,client] (EXTRAS): Flower without Ray, gRPC, torch; no scikit-learn,
# matplotlib or mlxtend (the benchmark's), no Ray (`protofuse simulate`, a researcher's host).
#   deploy/wheels/*.whl                its dependencies (torch pinned to the CPU wheel by
#                                      constraints.txt), the Dockerfile's first, slow layer;
#   deploy/wheels/app/protofuse-*.whl  the project's own wheel, its own layer (a code change
#                                      rebuilds the image without reinstalling torch).
#
#   deploy/build-wheelhouse.sh            # from anywhere; works on the repository it lives in
#   PYTHON=/path/to/python3 deploy/build-wheelhouse.sh
#
# PYTHON (default: the repository's .venv/bin/python, else python3) must have pip and run the
# same Python minor version as the image (3.11) on the same platform (linux x86_64).
# Skipped when deploy/wheels/.stamp matches a hash of pyproject.toml, constraints.txt and the
# package sources; FORCE=1 rebuilds.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=deploy/wheels
# The extras the image installs (deploy/Dockerfile installs protofuse[server,client]: keep both
# in step).
EXTRAS=server,client
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# What the wheelhouse depends on: the build inputs and every source file that lands in the wheel.
inputs_hash() {
    {
        sha256sum pyproject.toml constraints.txt deploy/build-wheelhouse.sh
        find protofuse client_sdk server -type f \
            ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
        "$PYTHON" -c 'import sys, platform; print(sys.version_info[:2], platform.machine())'
    } | sha256sum | cut -d' ' -f1
}

t0=$SECONDS
want=$(inputs_hash)
if [ "${FORCE:-0}" != 1 ] && [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$want" ] \
    && ls "$out"/app/protofuse-*.whl >/dev/null 2>&1; then
    echo "[wheelhouse] up to date: $out ($(du -sh "$out" | cut -f1), $(ls "$out"/*.whl | wc -l) wheels)"
    exit 0
fi

mkdir -p "$out/app"
rm -f "$out/.stamp" "$out"/protofuse-*.whl "$out"/app/*.whl
pipq() { "$PYTHON" -m pip --disable-pip-version-check "$@"; }
# The project's own wheel (its version does not change with every commit: always rebuilt).
# A fresh copy of build/ each time: setuptools reuses stale files from an old build/.
rm -rf build
pipq wheel --quiet --no-deps -w "$out/app" .
rm -rf build
# Its dependencies with the image's extras, resolved against the constraints; wheels already in
# $out are reused. pip writes the protofuse wheel there too: moved back to app/.
app=$(ls "$out"/app/protofuse-*.whl)
pipq wheel --quiet -w "$out" --find-links "$out" -c constraints.txt "$app[$EXTRAS]"
rm -f "$out"/protofuse-*.whl
# Wheels no longer needed (an upgraded dependency) would be installed too: keep only what a
# fresh resolution asks for.
"$PYTHON" - "$out" "$app[$EXTRAS]" <<'PY'
import json, pathlib, subprocess, sys, urllib.parse
out, app = pathlib.Path(sys.argv[1]), sys.argv[2]
report = subprocess.run(
    [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--dry-run", "--quiet",
     "--ignore-installed", "--no-index", "--find-links", str(out), "--report", "-", app],
    check=True, capture_output=True, text=True).stdout
wanted = {urllib.parse.unquote(i["download_info"]["url"].rsplit("/", 1)[-1])
          for i in json.loads(report)["install"]}
for whl in out.glob("*.whl"):
    if whl.name not in wanted:
        print(f"[wheelhouse] removing unused {whl.name}")
        whl.unlink()
# What the image must not hold: the benchmark's libraries and the simulation engine.
heavy = sorted(w.name for w in out.glob("*.whl") if w.name.split("-")[0].lower() in ("ray", "scikit_learn", "matplotlib", "mlxtend", "scipy", "pandas"))
if heavy:
    sys.exit(f"[wheelhouse] the image would hold what no service runs: {heavy}")
PY
# Anything that is not a wheel (an sdist pip could not build) would break the offline install.
if ls "$out" | grep -vqE '(\.whl|^app)$'; then
    echo "[wheelhouse] not wheels:" >&2; ls "$out" | grep -vE '(\.whl|^app)$' >&2; exit 1
fi
echo "$want" > "$out/.stamp"
echo "[wheelhouse] built $out in $((SECONDS - t0)) s: $(du -sh "$out" | cut -f1), $(ls "$out"/*.whl | wc -l) wheels"
