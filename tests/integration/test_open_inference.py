"""Adapted models over the Open Inference Protocol v2 REST API (protofuse.open_inference), on a
real server on 127.0.0.1: an existing client (the SDK's OpenInferenceExpert, the adapter
organizations already point at KServe, Triton or MLServer) gets predict_proba's answers; health,
metadata and versions answer as the protocol says; every bad request is a 4xx naming the field,
never a crash; signed models are verified before the server starts."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polling import wait_until
from toys import toy_bank

from client_sdk.model_servers import OpenInferenceExpert
from protofuse import signing
from protofuse.open_inference import Limits, run_in_thread, serve

KEY = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """Two models: 'task' (one version, signed) and 'versioned' (versions 1 and 2, signed)."""
    bank, x, labels = toy_bank(n=300)
    root = tmp_path_factory.mktemp("models")
    models = {}
    for name, classes in (
        ("task", ("0", "1", "3")),
        ("versioned/1", ("0", "2")),
        ("versioned/2", ("1", "2", "3")),
    ):
        keep = np.isin(labels, classes)
        models[name] = bank.adapt(x[keep][:40], labels[keep][:40])
        models[name].save(root / name, signing_key=KEY)
    key = root.parent / "signing.pub"
    key.write_bytes(_pem(KEY))
    return root, key, models, x


@contextmanager
def _running(root, key, limits=None):
    server = serve(root, "127.0.0.1", 0, public_key=key, limits=limits)
    run_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


def _call(url, method, path, body=None, raw=None, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    payload = json.loads(response.read() or b"null")
    conn.close()
    return response.status, payload


def test_an_existing_oip_client_gets_predict_proba(repository):
    root, key, models, x = repository
    with _running(root, key) as (url, _):
        expert = OpenInferenceExpert(url, "task", ["0", "1", "3"], output="proba")
        np.testing.assert_allclose(
            expert.predict_proba(x), models["task"].predict_proba(x), atol=1e-6, rtol=0
        )
        for version, model in (("1", models["versioned/1"]), ("2", models["versioned/2"])):
            expert = OpenInferenceExpert(
                url, "versioned", model.classes_.tolist(), version=version, output="proba"
            )
            np.testing.assert_allclose(
                expert.predict_proba(x[:50]), model.predict_proba(x[:50]), atol=1e-6, rtol=0
            )


def test_health_metadata_and_labels_answer_as_the_protocol_says(repository):
    root, key, models, x = repository
    with _running(root, key) as (url, _):
        assert _call(url, "GET", "/v2/health/live") == (200, {"live": True})
        assert _call(url, "GET", "/v2/health/ready") == (200, {"ready": True})
        assert _call(url, "GET", "/v2")[1]["name"] == "protofuse"
        status, meta = _call(url, "GET", "/v2/models/versioned")
        assert status == 200 and meta["versions"] == ["1", "2"]
        assert meta["parameters"]["classes"] == ["1", "2", "3"]  # the latest version
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
        assert _call(url, "GET", "/v2/models/versioned/versions/1/ready")[1]["ready"] is True
        status, answer = _call(
            url,
            "POST",
            "/v2/models/task/infer",
            {
                "id": "r1",
                "inputs": [
                    {"name": "input", "shape": [3, 16], "datatype": "FP64", "data": x[:3].tolist()}
                ],
                "outputs": [{"name": "label"}, {"name": "proba"}],
            },
        )
        assert status == 200 and answer["id"] == "r1" and answer["model_version"] == "1"
        label, proba = answer["outputs"]
        assert label["data"] == models["task"].predict(x[:3]).tolist()
        assert proba["shape"] == [3, 3]
        assert _call(url, "GET", "/v2/models/nothing")[0] == 404
        assert _call(url, "GET", "/v2/models/task/versions/9")[0] == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "JSON object"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}] * 2}, "inputs"),
        ({"inputs": [{"shape": [1, 15], "datatype": "FP32", "data": [0.0] * 15}]}, "shape"),
        ({"inputs": [{"shape": [0, 16], "datatype": "FP32", "data": []}]}, "shape"),
        ({"inputs": [{"shape": [1, 16], "datatype": "BYTES", "data": ["a"] * 16}]}, "datatype"),
        ({"inputs": [{"shape": [2, 16], "datatype": "FP32", "data": [0.0] * 16}]}, "16 values"),
        ({"inputs": [{"shape": [1, 16], "datatype": "FP32", "data": [[0.0], [1.0] * 15]}]}, "data"),
        ({"inputs": [{"shape": [1, 16], "datatype": "FP32", "data": ["x"] * 16}]}, "data"),
        ({"inputs": [{"shape": [1, 16], "datatype": "FP32", "data": [1e400] * 16}]}, "non-finite"),
        (
            {
                "inputs": [{"shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}],
                "outputs": [{"name": "logits"}],
            },
            "outputs",
        ),
    ],
)
def test_a_bad_request_is_a_400_naming_the_field(repository, body, field):
    root, key, _, _ = repository
    with _running(root, key) as (url, _):
        status, answer = _call(url, "POST", "/v2/models/task/infer", body)
        assert status == 400 and field in answer["error"]
        assert _call(url, "GET", "/v2/health/live")[0] == 200  # and the server goes on


def test_a_body_over_the_limit_is_refused_before_it_is_read(repository):
    root, key, _, _ = repository
    with _running(root, key, Limits(max_body_bytes=1000, max_rows=5)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            # declares 10 GB and sends none of it: answered at once, not after reading
            sock.sendall(
                b"POST /v2/models/task/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000"
                b"\r\n\r\n"
            )
            head = sock.recv(4096).decode()
        assert head.startswith("HTTP/1.1 413"), head
        body = {"inputs": [{"shape": [6, 16], "datatype": "FP32", "data": [0.0] * 96}]}
        assert _call(url, "POST", "/v2/models/task/infer", body)[0] in (400, 413)
        assert _call(url, "POST", "/v2/models/task/infer", raw=b"{", headers={})[0] == 400


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.floats(), max_size=20),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda inputs, outputs: json.dumps({"inputs": inputs, "outputs": outputs}).encode(),
            st.lists(
                st.dictionaries(st.sampled_from(["name", "shape", "datatype", "data"]), _values),
                max_size=2,
            ),
            st.one_of(st.none(), st.lists(st.dictionaries(st.just("name"), _values), max_size=2)),
        ),
    )
)
def test_generated_requests_are_answered_never_crash_the_server(served, raw):
    url, _ = served
    status, answer = _call(url, "POST", "/v2/models/task/infer", raw=raw)
    assert status in (200, 400, 422), (status, answer)
    assert status == 200 or "error" in answer


@pytest.fixture(scope="module")
def served(repository):
    root, key, _, _ = repository
    with _running(root, key) as running:
        yield running


def test_models_that_do_not_verify_keep_the_server_from_starting(repository, tmp_path):
    root, _, models, _ = repository
    other = tmp_path / "other.pub"
    other.write_bytes(_pem(Ed25519PrivateKey.generate()))
    with pytest.raises(signing.SignatureError):
        serve(root, "127.0.0.1", 0, public_key=other)
    models["task"].save(tmp_path / "models" / "mine")  # unsigned
    with pytest.raises(signing.SignatureError, match="unsigned"):
        serve(tmp_path / "models", "127.0.0.1", 0, public_key=other)
    (tmp_path / "models" / "junk").mkdir()
    with pytest.raises(ValueError, match="junk"):
        serve(tmp_path / "models", "127.0.0.1", 0, unsigned_ok=True)


def test_protofuse_serve_models_as_a_process(repository):
    root, key, models, x = repository
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "protofuse_cli.main",
            "serve-models",
            str(root),
            "--address",
            f"127.0.0.1:{port}",
            "--public-key",
            str(key),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _healthy(url), timeout=60), "protofuse serve-models never ready"
        expert = OpenInferenceExpert(url, "task", ["0", "1", "3"], output="proba")
        np.testing.assert_allclose(
            expert.predict_proba(x[:20]), models["task"].predict_proba(x[:20]), atol=1e-6
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "serving {'task': ['1'], 'versioned': ['1', '2']}" in err


def _healthy(url: str) -> bool:
    try:
        return _call(url, "GET", "/v2/health/ready")[0] == 200
    except OSError:
        return False


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("values", "status", "field"),
    [
        ([1e300] * 16, 400, "float32's range"),
        (["1"] * 16, 400, "numbers only"),
        ([True] * 16, 400, "numbers only"),
        ([3e38] * 16, 422, "not finite"),  # a legal float32 whose prediction overflows
    ],
)
def test_inputs_beyond_what_the_networks_compute_never_get_a_nan_answer(
    served, values, status, field
):
    url, _ = served
    body = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": values}]}
    got, answer = _call(url, "POST", "/v2/models/task/infer", body)
    if got == 200:  # some banks stay finite even there: then the answer must be finite too
        assert field == "not finite" and all(np.isfinite(answer["outputs"][0]["data"]))
    else:
        assert (got, field in answer["error"]) == (status, True), answer


def test_an_error_closes_the_connection_so_an_unread_body_is_never_a_second_request(served):
    """A POST to an unknown model is answered before its body is read: the body (here a whole
    GET request) must not be taken as the connection's next request."""
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    smuggled = b"GET /v2/models/task HTTP/1.1\r\nHost: x\r\n\r\n"
    head = (
        b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(len(smuggled)).encode()
        + b"\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + smuggled)
        received = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 1 and received.startswith(b"HTTP/1.1 404")


def test_idle_connections_are_bounded_and_dropped(repository):
    root, key, _, _ = repository
    with _running(root, key, Limits(max_connections=3, timeout_s=1.0)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
        try:
            extra = socket.create_connection((host, int(port)), timeout=10)
            assert extra.recv(10) == b""  # full: closed at once
            extra.close()
            for sock in idle:  # a silent caller is dropped after timeout_s
                assert sock.recv(10) == b""
        finally:
            for sock in idle:
                sock.close()
        assert wait_until(lambda: _healthy(url), timeout=10)  # places free again
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            # a body declared and never sent: answered 408 after timeout_s, not held open
            slow.sendall(b"POST /v2/models/task/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
            assert slow.recv(4096).startswith(b"HTTP/1.1 408")


def test_symlinked_and_oddly_numbered_version_folders_are_not_served(repository, tmp_path):
    root, key, models, _ = repository
    models["task"].save(tmp_path / "models" / "m" / "1", signing_key=KEY)
    (tmp_path / "models" / "m" / "2").symlink_to(root / "versioned" / "2")
    models["task"].save(tmp_path / "models" / "m" / "\u00b2", signing_key=KEY)  # '²'.isdigit()
    server = serve(tmp_path / "models", "127.0.0.1", 0, public_key=key)
    try:
        assert sorted(server.repository.models["m"]) == ["1"]
    finally:
        server.server_close()
