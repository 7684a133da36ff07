"""client_sdk.model_servers against real servers on 127.0.0.1.

MLServer (Open Inference Protocol, scikit-learn runtime) and MLflow's scoring server
(``mlflow models serve --env-manager local``) run from the separate virtualenv made by
tests/host/setup-model-servers.sh (.venv-mlserver, or the one PROTOFUSE_MLSERVER points into);
their tests skip when it is absent. The model is fitted and dumped by that venv's own python, and
the expected probabilities come from there too, so no pickle crosses between environments.
Timeouts and retries are tested against standard-library HTTP servers in a thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from client_sdk.experts import Expert, ExpertOutputError, query_expert
from client_sdk.model_servers import (
    MLflowExpert,
    ModelServerError,
    OpenInferenceExpert,
    model_server_expert,
)

REPO = Path(__file__).resolve().parents[2]
SETUP = "tests/host/setup-model-servers.sh"
LABELS = ["0", "1", "2"]
MODEL = "digits"

# Run by the server venv's python: fit, dump for MLServer (joblib) and MLflow, write queries and
# the estimator's own predict_proba as .npy (plain arrays: no pickle leaves that environment).
FIT_SCRIPT = r"""
import json, sys
from pathlib import Path
import joblib, numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

out = Path(sys.argv[1])
x, y = load_digits(return_X_y=True)
keep = y < 3
x, y = x[keep], y[keep]
clf = LogisticRegression(max_iter=3000).fit(x[:400], y[:400])
queries = x[400:]
np.save(out / "x.npy", queries.astype(np.float64))
np.save(out / "expected.npy", clf.predict_proba(queries))
np.save(out / "expected32.npy", clf.predict_proba(queries.astype(np.float32)).astype(np.float64))
model_dir = out / "repo" / "digits"
model_dir.mkdir(parents=True)
joblib.dump(clf, model_dir / "model.joblib")
(model_dir / "model-settings.json").write_text(json.dumps({
    "name": "digits", "implementation": "mlserver_sklearn.SKLearnModel",
    "parameters": {"uri": "./model.joblib", "version": "v1"}}))
try:
    import mlflow.sklearn
except ImportError:
    print("no mlflow")
else:
    mlflow.sklearn.save_model(clf, str(out / "mlflow-model"), pyfunc_predict_fn="predict_proba",
                              serialization_format="cloudpickle")
print("fitted", list(clf.classes_))
"""


def _server_bin() -> Path:
    env = os.environ.get("PROTOFUSE_MLSERVER")
    return Path(env) if env else REPO / ".venv-mlserver" / "bin" / "mlserver"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_env(bin_dir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER_", "MLFLOW_", "PYTHON"))
    }
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # mlflow execs uvicorn from PATH
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: its own process group
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _start(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    ready_url: str,
    log: Path,
    request,
    limit: float = 90.0,
) -> None:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    request.addfinalizer(lambda: _stop(proc))
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"{cmd[0]} exited with {proc.returncode} before it was "
                f"ready:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(ready_url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    _stop(proc)
    pytest.fail(
        f"{cmd[0]} was not ready at {ready_url} within {limit:.0f} s:\n{log.read_text()[-3000:]}"
    )


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    server = _server_bin()
    if not server.exists():
        pytest.skip(
            f"no MLServer at {server}: run `bash {SETUP}` (or set PROTOFUSE_MLSERVER to an "
            "mlserver binary)"
        )
    out = tmp_path_factory.mktemp("model-servers")
    python = server.parent / "python"
    done = subprocess.run(
        [str(python), "-c", FIT_SCRIPT, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=_server_env(server.parent),
        cwd=out,
    )
    assert done.returncode == 0, f"fitting with {python} failed:\n{done.stdout}\n{done.stderr}"
    return out


@pytest.fixture(scope="module")
def expected(artifacts):
    return np.load(artifacts / "x.npy"), np.load(artifacts / "expected.npy")


@pytest.fixture(scope="module")
def mlserver_url(artifacts, request):
    server = _server_bin()
    http_port, grpc_port = _free_port(), _free_port()
    repo = artifacts / "repo"
    (repo / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_endpoint": None,
                "parallel_workers": 0,
            }
        )
    )
    url = f"http://127.0.0.1:{http_port}"
    _start(
        [str(server), "start", str(repo)],
        repo,
        _server_env(server.parent),
        url + "/v2/health/ready",
        artifacts / "mlserver.log",
        request,
    )
    return url


@pytest.fixture(scope="module")
def mlflow_url(artifacts, request):
    server = _server_bin()
    mlflow = Path(os.environ.get("PROTOFUSE_MLFLOW", server.parent / "mlflow"))
    if not mlflow.exists() or not (artifacts / "mlflow-model").exists():
        pytest.skip(
            f"no MLflow next to {server}: run `bash {SETUP}` (it installs mlflow-skinny) or set "
            "PROTOFUSE_MLFLOW"
        )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    _start(
        [
            str(mlflow),
            "models",
            "serve",
            "-m",
            str(artifacts / "mlflow-model"),
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        artifacts,
        _server_env(server.parent),
        url + "/ping",
        artifacts / "mlflow.log",
        request,
    )
    return url


def _oip(url: str, **kw) -> OpenInferenceExpert:
    kw.setdefault("output", "predict_proba")
    return OpenInferenceExpert(url, kw.pop("model", MODEL), LABELS, **kw)


# ---- MLServer: Open Inference Protocol --------------------------------------------------------


def test_open_inference_probabilities_equal_the_estimators(mlserver_url, expected):
    x, want = expected
    expert = model_server_expert(
        "open-inference", mlserver_url, LABELS, model=MODEL, output="predict_proba"
    )
    got = expert.predict_proba(x)
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    versioned = _oip(mlserver_url, version="v1")
    np.testing.assert_allclose(versioned.predict_proba(x[:5]), want[:5], rtol=1e-12, atol=1e-15)


def test_open_inference_float32_queries_travel_as_fp32(mlserver_url, artifacts, expected):
    x, _ = expected
    want32 = np.load(artifacts / "expected32.npy")
    got = _oip(mlserver_url).predict_proba(x[:20].astype(np.float32))
    np.testing.assert_allclose(got, want32[:20], atol=1e-6)


def test_open_inference_batches_split_requests(mlserver_url, expected):
    x, want = expected
    expert = _oip(mlserver_url, batch_size=10)
    got = expert.predict_proba(x[:25])
    assert (expert.n_requests, expert.n_rows, expert.n_attempts) == (3, 25, 3)
    np.testing.assert_allclose(got, want[:25], rtol=1e-12, atol=1e-15)
    expert.predict_proba(x[:10])
    assert (expert.n_requests, expert.n_rows) == (4, 35)


def test_query_expert_accepts_the_open_inference_adapter(mlserver_url, expected):
    x, want = expected
    expert = _oip(mlserver_url, batch_size=64)
    assert isinstance(expert, Expert)
    got = query_expert(expert, x, "digits-over-http", batch_size=100)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert expert.n_rows == len(x)


def test_wrong_model_name_fails_at_once_naming_model_and_status(mlserver_url, expected):
    x, _ = expected
    expert = _oip(mlserver_url, model="no-such-model")
    began = time.monotonic()
    with pytest.raises(ModelServerError) as info:
        expert.predict_proba(x[:3])
    assert time.monotonic() - began < 5
    err = info.value
    assert err.status == 404 and err.model == "no-such-model"
    assert expert.n_attempts == 1 and expert.n_requests == 0  # a 404 is not retried
    text = str(err)
    assert "no-such-model" in text and "404" in text and mlserver_url in text
    assert "model-settings.json" in text  # says what to check
    assert "'digits (version v1)'" in text  # and what the server does serve


def test_wrong_version_is_named(mlserver_url, expected):
    x, _ = expected
    with pytest.raises(ModelServerError, match=r"(?s)404.*version 'v9'") as info:
        _oip(mlserver_url, version="v9").predict_proba(x[:2])
    assert info.value.status == 404


def test_wrong_input_width_gives_the_models_own_complaint(mlserver_url, expected):
    x, _ = expected
    expert = _oip(mlserver_url, retries=1)
    expert.backoff_base = 0.01
    with pytest.raises(ModelServerError) as info:
        expert.predict_proba(x[:4, :10])
    text = str(info.value)
    # MLServer answers 500 with the traceback (debug mode, its default); its last line is kept.
    assert info.value.status == 500
    assert "10 features" in text and "64 features" in text
    assert "4 rows x 10 columns" in text and "width" in text
    assert expert.n_attempts == 2  # a 5xx is retried, as many times as asked


def test_unrequested_output_returns_class_labels_and_says_so(mlserver_url, expected):
    x, _ = expected
    expert = OpenInferenceExpert(mlserver_url, MODEL, LABELS)  # MLServer's sklearn default: predict
    with pytest.raises(ModelServerError, match=r"class predictions.*output='predict_proba'"):
        expert.predict_proba(x[:3])


def test_unknown_output_name_is_a_client_error(mlserver_url, expected):
    x, _ = expected
    expert = _oip(mlserver_url, output="probabilities")
    with pytest.raises(ModelServerError) as info:
        expert.predict_proba(x[:3])
    assert info.value.status == 400 and expert.n_attempts == 1
    assert "only supports 'predict', 'predict_proba'" in str(info.value)


def test_wrong_label_count_is_caught(mlserver_url, expected):
    x, _ = expected
    expert = OpenInferenceExpert(mlserver_url, MODEL, ["a", "b", "c", "d"], output="predict_proba")
    with pytest.raises(ModelServerError, match=r"shape \[3, 3\], expected \(3, 4\)"):
        expert.predict_proba(x[:3])


# ---- MLflow: mlflow models serve ---------------------------------------------------------------


def test_mlflow_probabilities_equal_the_estimators(mlflow_url, expected):
    x, want = expected
    expert = model_server_expert("mlflow", mlflow_url, LABELS, batch_size=10)
    got = expert.predict_proba(x[:25])
    assert (expert.n_requests, expert.n_rows, expert.n_attempts) == (3, 25, 3)
    np.testing.assert_allclose(got, want[:25], rtol=1e-12, atol=1e-15)
    got = query_expert(expert, x, "mlflow-digits")
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_mlflow_wrong_width_fails_at_once_with_the_models_complaint(mlflow_url, expected):
    x, _ = expected
    expert = MLflowExpert(mlflow_url, LABELS)
    with pytest.raises(ModelServerError) as info:
        expert.predict_proba(x[:2, :7])
    assert info.value.status == 400 and expert.n_attempts == 1
    text = str(info.value)
    assert "7 features" in text and "64 features" in text and "2 rows x 7 columns" in text


def test_mlflow_wrong_path_names_the_endpoint(mlflow_url, expected):
    x, _ = expected
    with pytest.raises(ModelServerError, match=r"404.*url must be the root"):
        MLflowExpert(mlflow_url + "/some/prefix", LABELS).predict_proba(x[:1])


# ---- timeouts and retries against standard-library servers -------------------------------------


class _Recorder:
    def __init__(self, behave):
        self.behave = (
            behave  # (attempt number from 0, parsed request body) -> (status, headers, body, delay)
        )
        self.bodies: list = []
        self.lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.bodies)


@contextmanager
def _local_server(behave):
    rec = _Recorder(behave)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with rec.lock:
                attempt = len(rec.bodies)
                rec.bodies.append(
                    (self.path, self.headers.get("Content-Type"), json.loads(raw or b"null"))
                )
            status, headers, body, delay = rec.behave(attempt, rec.bodies[-1][2])
            time.sleep(delay)
            try:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", rec
    finally:
        server.shutdown()
        server.server_close()


def _oip_answer(body, output="predict_proba"):
    n = body["inputs"][0]["shape"][0]
    row = [0.2, 0.3, 0.5]
    return {
        "model_name": MODEL,
        "outputs": [{"name": output, "shape": [n, 3], "datatype": "FP64", "data": row * n}],
    }


def _mlflow_answer(body):
    return {"predictions": [[0.2, 0.3, 0.5]] * len(body["inputs"])}


def _fast(expert):
    expert.backoff_base = 0.01
    return expert


def test_slow_server_times_out_after_retries_plus_one_attempts():
    x = np.zeros((2, 4))
    with _local_server(lambda i, body: (200, {}, _oip_answer(body), 1.0)) as (url, rec):
        expert = _fast(_oip(url, timeout=0.25, retries=2))
        began = time.monotonic()
        with pytest.raises(ModelServerError) as info:
            expert.predict_proba(x)
        spent = time.monotonic() - began
        assert rec.count == 3 and expert.n_attempts == 3 and expert.n_requests == 0
    assert spent < 2.5
    err = info.value
    assert (
        err.status is None
        and "3 attempts" in str(err)
        and "timeout=0.25" in str(err)
        and url in str(err)
    )


@pytest.mark.parametrize("protocol", ["open-inference", "mlflow"])
@pytest.mark.parametrize("failures", [(503, 503), (429, 502)])
def test_transient_failures_are_retried_until_success(protocol, failures):
    answer = _oip_answer if protocol == "open-inference" else _mlflow_answer

    def behave(i, body):
        if i < len(failures):
            return (
                failures[i],
                {"Retry-After": "0"} if failures[i] == 429 else {},
                {"error": "busy"},
                0,
            )
        return 200, {}, answer(body), 0

    with _local_server(behave) as (url, rec):
        kw = {"model": MODEL, "output": "predict_proba"} if protocol == "open-inference" else {}
        expert = _fast(model_server_expert(protocol, url, LABELS, **kw))
        got = expert.predict_proba(np.arange(8, dtype=np.float64).reshape(2, 4))
    np.testing.assert_allclose(got, [[0.2, 0.3, 0.5]] * 2)
    assert rec.count == 3 and (expert.n_attempts, expert.n_requests, expert.n_rows) == (3, 1, 2)
    path, content_type, body = rec.bodies[-1]
    assert content_type == "application/json"
    if protocol == "open-inference":
        assert path == "/v2/models/digits/infer"
        assert body["inputs"][0]["shape"] == [2, 4] and body["inputs"][0]["datatype"] == "FP64"
        assert body["inputs"][0]["data"] == list(range(8))  # flat, row-major
        assert body["outputs"] == [{"name": "predict_proba"}]
    else:
        assert path == "/invocations" and body == {"inputs": [[0, 1, 2, 3], [4, 5, 6, 7]]}


def test_persistent_server_errors_give_up_with_the_last_answer():
    with _local_server(lambda i, body: (503, {}, {"error": "model is loading"}, 0)) as (url, rec):
        expert = _fast(_oip(url, retries=1))
        with pytest.raises(
            ModelServerError, match=r"(?s)2 attempts.*HTTP 503: model is loading.*[Uu]navailable"
        ) as info:
            expert.predict_proba(np.zeros((1, 4)))
    assert (
        rec.count == 2
        and info.value.status == 503
        and info.value.server_message == "model is loading"
    )


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(status):
    with _local_server(lambda i, body: (status, {}, {"error": f"bad thing {status}"}, 0)) as (
        url,
        rec,
    ):
        expert = _fast(_oip(url, retries=5))
        with pytest.raises(ModelServerError) as info:
            expert.predict_proba(np.zeros((1, 4)))
    infer = [path for path, _, _ in rec.bodies if path.endswith("/infer")]
    assert len(infer) == 1 and expert.n_attempts == 1  # (a 404 also asks /v2/repository/index once)
    assert (
        info.value.status == status
        and f"HTTP {status}" in str(info.value)
        and f"bad thing {status}" in str(info.value)
    )
    assert isinstance(info.value, ExpertOutputError) and isinstance(info.value, ValueError)


def test_nothing_listening_is_a_connection_error_after_retries():
    port = _free_port()
    expert = _fast(_oip(f"http://127.0.0.1:{port}", retries=2))
    with pytest.raises(
        ModelServerError, match=r"3 attempts.*connection refused.*Check that the server is running"
    ):
        expert.predict_proba(np.zeros((1, 4)))
    assert expert.n_attempts == 3


def test_non_json_answer_is_reported():
    with (
        _local_server(lambda i, body: (200, {}, b"<html>login</html>", 0)) as (url, _),
        pytest.raises(ModelServerError, match="not JSON"),
    ):
        _oip(url).predict_proba(np.zeros((1, 4)))


def test_mlflow_accepts_a_bare_list_and_records_ordered_by_label():
    with _local_server(lambda i, body: (200, {}, [[0.1, 0.2, 0.7]] * len(body["inputs"]), 0)) as (
        url,
        _,
    ):
        np.testing.assert_allclose(
            MLflowExpert(url, LABELS).predict_proba(np.zeros((2, 3))), [[0.1, 0.2, 0.7]] * 2
        )
    records = [{"2": 0.7, "0": 0.1, "1": 0.2}]
    with _local_server(
        lambda i, body: (200, {}, {"predictions": records * len(body["inputs"])}, 0)
    ) as (url, _):
        np.testing.assert_allclose(
            MLflowExpert(url, LABELS).predict_proba(np.zeros((2, 3))), [[0.1, 0.2, 0.7]] * 2
        )
    with (
        _local_server(lambda i, body: (200, {}, {"predictions": [1] * len(body["inputs"])}, 0)) as (
            url,
            _,
        ),
        pytest.raises(ModelServerError, match="pyfunc_predict_fn='predict_proba'"),
    ):
        MLflowExpert(url, LABELS).predict_proba(np.zeros((2, 3)))


def test_open_inference_picks_the_only_output_and_names_several():
    with _local_server(lambda i, body: (200, {}, _oip_answer(body, "probabilities"), 0)) as (
        url,
        _,
    ):
        got = OpenInferenceExpert(url, MODEL, LABELS).predict_proba(
            np.zeros((3, 2), dtype=np.float32)
        )
    np.testing.assert_allclose(got, [[0.2, 0.3, 0.5]] * 3)

    def two(i, body):
        answer = _oip_answer(body)
        answer["outputs"].append(dict(answer["outputs"][0], name="other"))
        return 200, {}, answer, 0

    with (
        _local_server(two) as (url, rec),
        pytest.raises(ModelServerError, match=r"several outputs \['predict_proba', 'other'\]"),
    ):
        OpenInferenceExpert(url, MODEL, LABELS).predict_proba(np.zeros((1, 2), dtype=np.float32))
    assert rec.bodies[0][2]["inputs"][0]["datatype"] == "FP32" and "outputs" not in rec.bodies[0][2]


def test_query_expert_wraps_server_errors():
    with (
        _local_server(lambda i, body: (400, {}, {"error": "nope"}, 0)) as (url, _),
        pytest.raises(
            ExpertOutputError,
            match=r"expert 'remote' failed.*HTTP 400 at .*/v2/models/digits/infer: nope",
        ),
    ):
        query_expert(_oip(url), np.zeros((2, 4)), "remote")


def test_headers_are_sent():
    seen = {}

    class Probe(BaseHTTPRequestHandler):
        def do_POST(self):
            seen["auth"] = self.headers.get("Authorization")
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps(_mlflow_answer(body)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Probe)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        MLflowExpert(url, LABELS, headers={"Authorization": "Bearer t0ken"}).predict_proba(
            np.zeros((1, 2))
        )
    finally:
        server.shutdown()
        server.server_close()
    assert seen["auth"] == "Bearer t0ken"


# ---- argument validation (no server) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: model_server_expert("grpc", "http://h:1", LABELS, model="m"), "open-inference"),
        (lambda: model_server_expert("open-inference", "http://h:1", LABELS), "needs model="),
        (
            lambda: model_server_expert("open-inference", "h:8080", LABELS, model="m"),
            "http:// or https://",
        ),
        (lambda: model_server_expert("mlflow", "ftp://h", LABELS), "http:// or https://"),
        (lambda: model_server_expert("mlflow", "http://h:1", LABELS, model="m"), "takes no model"),
        (lambda: model_server_expert("mlflow", "http://h:1/invocations", LABELS), "server root"),
        (
            lambda: model_server_expert(
                "open-inference", "http://h:1/v2/models/m", LABELS, model="m"
            ),
            "server root",
        ),
        (lambda: model_server_expert("open-inference", "http://h:1", LABELS, model="a/b"), "model"),
        (
            lambda: model_server_expert(
                "open-inference", "http://h:1", LABELS, model="m", batch_size=0
            ),
            "batch_size",
        ),
        (
            lambda: model_server_expert(
                "open-inference", "http://h:1", LABELS, model="m", retries=-1
            ),
            "retries",
        ),
        (
            lambda: model_server_expert(
                "open-inference", "http://h:1", LABELS, model="m", timeout=0
            ),
            "timeout",
        ),
        (lambda: model_server_expert("mlflow", "http://h:1", []), "labels is empty"),
        (lambda: model_server_expert("mlflow", "http://h:1", ["a", "a"]), "more than once"),
        (lambda: model_server_expert("mlflow", "http://user:pw@h:1", LABELS), "credentials"),
        (lambda: OpenInferenceExpert("http://h:1", "m", LABELS, datatype="INT8"), "FP32"),
    ],
)
def test_invalid_arguments_are_explained(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_labels_as_in_experts_and_bad_queries_rejected_before_any_request():
    with pytest.raises(TypeError, match="labels is the string"):
        MLflowExpert("http://127.0.0.1:9", "abc")
    expert = MLflowExpert("http://127.0.0.1:9", LABELS)
    with pytest.raises(ValueError, match="NaN or infinity"):
        expert.predict_proba(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match=r"expected \(n, d\)"):
        expert.predict_proba(np.zeros(3))
    assert expert.predict_proba(np.zeros((0, 5))).shape == (0, 3)
    assert expert.n_attempts == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
