#!/usr/bin/env bash
# Sizes of protofuse's installs by extra (bench/results/installs/results.md): one fresh venv per
# install under $OUT (default /tmp/after-sizes), `pip install -c constraints.txt SPEC` from the
# repository (torch always pinned to its CPU wheel by constraints.txt), then `du -sm` of the venv,
# its package count, and which heavy packages it holds (size of each from its RECORD).
#
#   bash bench/results/installs/measure.sh              # every install below
#   bash bench/results/installs/measure.sh client core  # some of them
#
# Writes $OUT/NAME.json per install and prints one line each. Installs run one after another:
# pip builds the local project in the source tree.
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
OUT=${OUT:-/tmp/after-sizes}
PYTHON=${PYTHON:-python3}
declare -A SPEC=([core]="." [client]=".[client]" [server]=".[server]" [simulation]=".[simulation]"
                 [bench]=".[bench]" [test]=".[test]" [server-client]=".[server,client]"
                 [report]=".[report]" [tracking]=".[tracking]" [onnx]=".[onnx]")
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(core client server simulation bench test server-client)
mkdir -p "$OUT"
for name in "${names[@]}"; do
    venv=$OUT/$name
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    t0=$SECONDS
    "$venv/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt "${SPEC[$name]}" 2>"$OUT/$name.pip.log" \
        || { cat "$OUT/$name.pip.log" >&2; exit 1; }
    mb=$(du -sm "$venv" | cut -f1)
    "$venv/bin/python" - "$name" "${SPEC[$name]}" "$mb" "$((SECONDS - t0))" > "$OUT/$name.json" <<'PY'
import json, sys
from importlib import metadata
name, spec, mb, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
HEAVY = ["torch", "ray", "scikit-learn", "scipy", "matplotlib", "mlxtend", "pandas", "river", "sympy", "flwr", "grpcio"]
sizes = {}
for dist in metadata.distributions():
    n = dist.metadata["Name"].lower().replace("_", "-")
    sizes[n] = round(sum((f.size or 0) for f in (dist.files or [])) / 1e6, 1)
print(json.dumps({"install": name, "spec": spec, "venv_mb": mb, "packages": len(sizes) - 1,  # pip itself
                  "seconds": seconds, "heavy": {h: sizes[h] for h in HEAVY if h in sizes},
                  "all": dict(sorted(sizes.items(), key=lambda kv: -kv[1]))}))
PY
    "$venv/bin/python" -c "
import json, sys; r = json.load(open(sys.argv[1]))
print(f\"{r['install']:14} {r['spec']:18} {r['venv_mb']:5} MB  {r['packages']:3} packages  {r['seconds']:4} s  heavy: {r['heavy']}\")" "$OUT/$name.json"
done
