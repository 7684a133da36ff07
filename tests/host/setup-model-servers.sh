#!/usr/bin/env bash
# Installs real model servers for tests/integration/test_model_servers.py into a separate virtualenv,
# .venv-mlserver at the repository root: MLServer (Open Inference Protocol, scikit-learn
# runtime) and MLflow's scoring server (mlflow-skinny; `mlflow models serve --env-manager local`).
# They live apart from .venv because their dependencies (protobuf, grpcio, fastapi, ...) must
# not move the project's own pins (flwr).
#
# Idempotent: a stamp inside the venv records the hash of the pins below; when it matches and
# the server binaries exist, nothing is installed. Re-run after editing the pins.
#
#   bash tests/host/setup-model-servers.sh          # uses python3 (3.11 or 3.12)
#   PYTHON=python3.12 bash tests/host/setup-model-servers.sh
#   VENV=/elsewhere bash tests/host/setup-model-servers.sh  # then PROTOFUSE_MLSERVER=/elsewhere/bin/mlserver
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv-mlserver}"
PYTHON="${PYTHON:-python3}"

# Exact versions tested together (Python 3.11, Linux x86_64): the direct packages first, then
# the full resolved set so that a later release of any dependency cannot change the servers.
PINS="$(cat <<'PINS'
mlserver==1.7.1
mlserver-sklearn==1.7.1
mlflow-skinny==3.17.2
scikit-learn==1.9.1
joblib==1.6.0
numpy==2.4.6
pandas==3.1.1
scipy==1.17.1
cloudpickle==3.1.3
fastapi==0.115.14
starlette==0.46.2
uvicorn==0.54.0
uvloop==0.23.0
pydantic==2.14.4
pydantic-settings==2.16.3
pydantic_core==2.50.5
grpcio==1.85.3
protobuf==6.33.6
aiofiles==25.1.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiokafka==0.14.0
aiosignal==1.4.0
annotated-types==0.8.0
anyio==4.16.0
asgiref==3.13.0
async-timeout==5.0.1
attrs==26.1.0
brotli==1.2.1
cachetools==7.3.3
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
click==8.5.1
cryptography==50.0.2
databricks-sdk==0.162.0
frozenlist==1.8.0
gevent==26.9.0
geventhttpclient==2.6.1
gitdb==4.0.12
GitPython==3.2.1
google-auth==2.63.0
googleapis-common-protos==1.76.0
greenlet==3.3.2
h11==0.16.0
idna==3.20
importlib_metadata==9.1.0
importlib_resources==6.5.2
ml_dtypes==0.5.4
multidict==7.2.1
narwhals==2.29.0
opentelemetry-api==1.45.2
opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-instrumentation==0.66b2
opentelemetry-instrumentation-asgi==0.66b2
opentelemetry-instrumentation-fastapi==0.66b2
opentelemetry-instrumentation-grpc==0.66b2
opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-util-http==0.66b2
orjson==3.13.0
packaging==26.4
prometheus_client==0.26.0
propcache==0.5.4
py-grpc-prometheus==0.8.0
pyasn1==0.6.5
pyasn1_modules==0.4.2
pycparser==3.12
python-dateutil==4.0.0
python-dotenv==1.2.4
python-multipart==0.0.34
python-rapidjson==1.25
PyYAML==6.0.4
requests==2.34.2
smmap==5.0.3
sqlparse==0.6.1
starlette_exporter==0.24.0
threadpoolctl==3.8.0
tritonclient==2.73.0
typing-inspection==0.4.5
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
wrapt==2.5.2
yarl==1.25.1
zipp==4.1.2
zope.event==6.2
zope.interface==8.7
PINS
)"
STAMP="$VENV/.protofuse-model-servers"
WANT="$(printf '%s\n' "$PINS" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/mlserver" && -x "$VENV/bin/mlflow" ]]; then
    echo "setup-model-servers: $VENV is up to date (mlserver 1.7.1, mlserver-sklearn 1.7.1, mlflow-skinny 3.17.2); nothing to do"
    exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup-model-servers: $PYTHON not found; set PYTHON to a Python 3.11 or 3.12 interpreter" >&2
    exit 1
fi
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$PYVER" in
    3.11|3.12) ;;
    *) echo "setup-model-servers: $PYTHON is Python $PYVER; MLServer 1.7.1 needs 3.9-3.12 and these pins need >= 3.11: set PYTHON to a 3.11 or 3.12 interpreter" >&2
       exit 1 ;;
esac

start=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup-model-servers: creating virtualenv $VENV with $PYTHON (Python $PYVER)"
    "$PYTHON" -m venv "$VENV"
else
    echo "setup-model-servers: reusing virtualenv $VENV (pins changed or install incomplete)"
fi
rm -f "$STAMP"
echo "setup-model-servers: installing mlserver 1.7.1, mlserver-sklearn 1.7.1, mlflow-skinny 3.17.2 and their pinned dependencies"
REQ="$(mktemp)"
trap 'rm -f "$REQ"' EXIT
printf '%s\n' "$PINS" > "$REQ"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("mlserver", "mlserver-sklearn", "mlflow-skinny", "scikit-learn", "numpy"):
    print(f"setup-model-servers: installed {name} {md.version(name)}")
PY
printf '%s\n' "$WANT" > "$STAMP"
echo "setup-model-servers: done in $((SECONDS - start)) s; tests find $VENV/bin/mlserver (or set PROTOFUSE_MLSERVER)"
