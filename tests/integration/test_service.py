"""The adaptation service for real: a gRPC server on 127.0.0.1 with mutual TLS, called through
FusionClient and through raw bytes (for requests the SDK would never send)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from polling import wait_until
from toys import clusters, two_experts

from client_sdk import FusionClient, FusionError, SignatureError, load_adapted
from protofuse import artifacts
from protofuse.adapted import HeldBank
from protofuse.bank import fit_bank, load_bank
from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings
from protofuse.v1 import fusion_pb2
from protofuse_server.certs import init
from protofuse_server.service.server import Credentials, build_server
from protofuse_server.service.settings import ServiceSettings

torch.set_num_threads(1)
X, Y, _ = clusters(0)


def _bank(family: str, seed: int = 0):
    return fit_bank(
        two_experts(X, Y),
        ModelSettings(family=family, feat_dim=8, hidden=32),
        TrainingSettings(epochs=12 if family == "discriminative" else 30, lr=5e-3, seed=seed),
        AdaptSettings(n_z=8),
        None,
        "bernoulli",
    )


def _support(classes=(0, 2, 3), k=3, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(c == Y), k, replace=False) for c in classes])
    return X[idx], Y[idx].astype(str)


@contextlib.contextmanager
def _serving(folder, certs, settings: ServiceSettings):
    """A mutual-TLS service on 127.0.0.1 over ``folder`` (a bank or a run folder), stopped
    after: its address and its bank holder."""
    server, port, holder = build_server(
        folder, "127.0.0.1:0", settings, Credentials.from_folder(certs)
    )
    try:
        yield f"127.0.0.1:{port}", holder
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    init(folder, supernodes=0)
    return folder


@pytest.fixture(scope="module")
def served(certs, tmp_path_factory):
    """A TLS service over a discriminative bank, small limits so the tests can reach them."""
    folder = tmp_path_factory.mktemp("bank")
    _bank("discriminative").save(folder)
    settings = ServiceSettings(
        max_support=40,
        max_message_mb=1.0,
        max_concurrent=1,
        reload_interval_s=0.2,
        max_classes=4,
        max_work=100,
    )
    with _serving(folder, certs, settings) as (address, holder):
        yield address, folder, holder


def test_adapt_returns_a_signed_model_that_names_its_bank_and_predicts(served, certs, tmp_path):
    address, folder, _ = served
    x, y = _support()
    with FusionClient(address, certs=certs) as client:
        model = client.adapt(x, y, out=tmp_path / "model", seed=3)
        response = client.adapt_response(x, y, seed=3)
    version = load_bank(folder).version
    assert model.bank_meta["version"] == response.bank_version == version
    assert list(model.classes_) == ["0", "2", "3"] == list(response.metrics.classes)
    assert response.metrics.n_support == 9 and response.metrics.support_accuracy == 1.0
    keep = np.isin(Y, [0, 2, 3])
    assert (model.predict(X[keep]) == Y[keep].astype(str)).mean() > 0.9
    # What was written is exactly what the server signed, and it matches local adaptation.
    again = load_adapted(tmp_path / "model", certs / "signing.pub")
    local = load_bank(folder).adapt(x, y, seed=3)
    np.testing.assert_allclose(
        again.predict_proba(X), local.predict_proba(X), atol=1e-4
    )  # L-BFGS in another thread


def test_a_client_that_holds_the_bank_weights_gets_only_the_task_and_the_same_signed_model(
    served, certs, tmp_path
):
    address, _, _ = served
    x, y = _support()
    with FusionClient(address, certs=certs) as fresh:
        full = fresh.adapt_response(x, y, seed=1)
    with FusionClient(address, certs=certs) as client:
        client.adapt(
            x, y, seed=2
        )  # the first reply carries everything; the client keeps the bank's part
        assert (
            client._bank_weights is not None and client._bank_weights[0] == full.bank_weights_digest
        )
        partial = client.adapt_response(x, y, seed=1)
        assert partial.bank_weights_omitted and not full.bank_weights_omitted
        assert len(partial.files["weights.npz"]) < len(full.files["weights.npz"]) / 10
        model = client.adapt(x, y, seed=1, out=tmp_path / "model")
        # the complete file, put back from the held bank weights, byte for byte the server's
        assert (tmp_path / "model" / "weights.npz").read_bytes() == full.files["weights.npz"]
        assert (
            load_adapted(tmp_path / "model", certs / "signing.pub").classes_.tolist()
            == model.classes_.tolist()
        )
        # Each model gets networks of its own (copied while the service works): a change to one
        # reaches no other.
        again = client.adapt(x, y, seed=1)
        assert again.task.model is not model.task.model
        want = again.predict_proba(x)
        with torch.no_grad():
            for p in model.task.model.parameters():
                p.mul_(1.5)
        np.testing.assert_array_equal(again.predict_proba(x), want)
        # A damaged copy of the bank's weights cannot pass for the signed model; it is dropped.
        digest, held = client._bank_weights
        arrays = {k: v.copy() for k, v in held.prefix.arrays.items()}
        arrays[next(iter(arrays))] += 1.0
        damaged = HeldBank(artifacts.HashedPrefix.of(arrays), held.family, held.config)
        client._bank_weights = (digest, damaged)
        with pytest.raises(Exception, match="checksum mismatch"):
            client.adapt(x, y, seed=1)
        assert client._bank_weights is None
        assert client.adapt(x, y, seed=1).classes_.tolist() == model.classes_.tolist()


def test_served_networks_changed_in_memory_are_sent_whole_and_signed_as_they_are(certs, tmp_path):
    """Should the served networks change in place after loading (nothing in protofuse does so),
    the service sees it (their bytes are compared again) and sends a caller holding the bank the
    whole model, signed over the weights it ran on, not a task-only reply that the served
    version's bytes would complete into a file it was not adapted on."""
    _bank("discriminative").save(tmp_path / "bank")
    with _serving(tmp_path / "bank", certs, ServiceSettings(max_concurrent=1)) as (address, holder):
        x, y = _support()
        with FusionClient(address, certs=certs) as client:
            client.adapt(x, y, seed=0)  # the client holds the bank's weights from here on
            assert client.adapt_response(x, y, seed=0).bank_weights_omitted
            networks = holder.get().bank.model
            with torch.no_grad():
                networks.prototypes.add_(0.25)
            assert not client.adapt_response(x, y, seed=0).bank_weights_omitted
            model = client.adapt(x, y, seed=0)
            np.testing.assert_array_equal(
                model.task.model.prototypes.detach().numpy(),
                networks.prototypes.detach().numpy(),
            )


def test_the_service_exports_the_model_as_signed_onnx_on_request(served, certs, tmp_path):
    import onnxruntime as ort

    from protofuse.export import verify_export, verify_export_files

    address, _, _ = served
    repo = tmp_path / "repo"
    x, y = _support()
    with FusionClient(address, certs=certs) as client:
        model = client.adapt(x, y, seed=3, onnx=repo, onnx_name="task", onnx_version=2)
        # a second task: the bank version's encoder graph is reused, the head is this task's
        other = client.adapt(*_support(classes=(1, 3), seed=1), onnx=repo, onnx_name="other")
        reply = client.adapt_response(x, y, seed=3, onnx=("task", 3))
    for name, version, adapted, classes in (
        ("task", "2", model, ["0", "2", "3"]),
        ("other", "1", other, ["1", "3"]),
    ):
        folder = repo / name / version
        verify_export(folder, certs / "signing.pub")
        assert (repo / name / "labels.txt").read_text().splitlines() == classes
        session = ort.InferenceSession(str(folder / "model.onnx"))
        got = session.run(["proba"], {"input": X.astype(np.float32)})[0]
        np.testing.assert_allclose(got, adapted.predict_proba(X), atol=1e-5, rtol=0)
    assert reply.onnx is not None and 0 <= reply.onnx.parity <= 1e-5
    assert verify_export_files(reply.onnx, certs / "signing.pub", "reply")
    # an export altered on the way, or moved to another version, does not verify
    for forged in (
        dataclasses.replace(reply.onnx, model=reply.onnx.model + b"\0"),
        dataclasses.replace(reply.onnx, version=4),
    ):
        with pytest.raises(SignatureError, match="the signature is for another artifact"):
            verify_export_files(forged, certs / "signing.pub", "reply")


def test_a_signed_onnx_export_of_another_model_or_name_is_refused(served, certs):
    """The signature says the service made the files; the client also checks they are the model
    it verified, under the name and version it asked for (a replayed or mixed-up reply)."""
    address, _, _ = served
    x, y = _support()
    with FusionClient(address, certs=certs) as client:
        model = client.adapt(x, y, seed=3)
        same_classes = client.adapt_response(*_support(seed=5), seed=4, onnx=("task", 3))
        other_classes = client.adapt_response(*_support(classes=(1, 3)), onnx=("task", 3))
        own = client.adapt_response(x, y, seed=3, onnx=("task", 3))
        assert client._checked_onnx(own, model, ("task", 3)) == own.onnx
        for reply, asked, why in (
            (own, ("task", 4), "is 'task' version 3, not 'task' version 4"),
            (own, ("other", 3), "is 'task' version 3, not 'other' version 3"),
            (other_classes, ("task", 3), "describes other classes"),
            (same_classes, ("task", 3), "does not give the adapted model's answers"),
        ):
            with pytest.raises(FusionError, match=why) as refused:
                client._checked_onnx(reply, model, asked)
            assert refused.value.code == grpc.StatusCode.DATA_LOSS


def test_get_bank_and_list_experts_describe_the_bank_and_nothing_private(served, certs):
    address, folder, _ = served
    bank = load_bank(folder)
    with FusionClient(address, certs=certs) as client:
        info = client.bank()
        experts = client.experts()
    assert info.manifest.version == bank.version and info.input_width == X.shape[1]
    assert info.manifest.vocabulary == bank.label_names and info.manifest.family == "discriminative"
    assert [e.expert.pseudonym for e in experts.experts] == ["a", "b"]
    assert experts.experts[1].expert.label_names == ("2", "3")
    assert len(experts.experts[1].distribution.head.label_bias) == 2
    for e in experts.experts:
        assert 0.0 <= e.expert.trust <= 1.0 and e.expert.fidelity.n > 0


def test_a_generative_bank_lists_its_experts_moments(certs, tmp_path):
    _bank("generative").save(tmp_path / "bank")
    with _serving(tmp_path / "bank", certs, ServiceSettings(max_work=2000)) as (address, _):
        with FusionClient(address, certs=certs) as client:
            experts = client.experts().experts
            # n_z multiplies the generative fit's cost (4096 samples: 30 s for 100 examples):
            # it counts in the work limit, 9 examples x 3 classes x (4096 / the bank's 8)
            with pytest.raises(FusionError) as err:
                client.adapt(*_support(), n_z=4096)
            assert client.adapt(*_support(), n_z=8).classes_.tolist() == ["0", "2", "3"]
            # its models predict by sampling: no ONNX graph, refused before the work
            with pytest.raises(FusionError) as no_onnx:
                client.adapt(*_support(), n_z=8, onnx=tmp_path / "repo")
        assert no_onnx.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "AdaptRequest.onnx: this service's bank is of the generative family" in (
            no_onnx.value.details
        )
        assert not (tmp_path / "repo").exists()
        assert (
            experts[0].distribution.head.posterior.cov.shape[0]
            == experts[0].distribution.head.posterior.mean.shape[0]
        )
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "AdaptRequest.options['n_z']: 4096 samples (512x the bank's 8)" in err.value.details


def test_health_and_reflection_are_served(served, certs):
    address, _, _ = served
    with FusionClient(address, certs=certs) as client:
        assert client.health() == "SERVING"
        assert client.health("protofuse.v1.Fusion") == "SERVING"
        db = ProtoReflectionDescriptorDatabase(client._channel)
        names = set(db.get_services())
    assert {"protofuse.v1.Fusion", "grpc.health.v1.Health"} <= names


def test_callers_without_a_certificate_of_the_deployment_are_refused(served, certs, tmp_path):
    address, _, _ = served
    x, y = _support()
    # TLS but no client certificate: the handshake fails before any method runs.
    with (
        FusionClient(
            address, root_certificates=certs / "ca.crt", public_key=certs / "signing.pub", timeout=5
        ) as client,
        pytest.raises(FusionError) as err,
    ):
        client.adapt(x, y)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    # A certificate from another CA.
    init(tmp_path / "other", supernodes=0)
    other = tmp_path / "other"
    with (
        FusionClient(
            address,
            root_certificates=certs / "ca.crt",
            certificate=other / "client.crt",
            private_key=other / "client.key",
            public_key=certs / "signing.pub",
            timeout=5,
        ) as client,
        pytest.raises(FusionError) as err,
    ):
        client.bank()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    # Plain text to a TLS port.
    with (
        FusionClient(address, insecure=True, unsigned_ok=True, timeout=5) as client,
        pytest.raises(FusionError),
    ):
        client.bank()


def test_a_model_signed_by_another_key_is_refused_by_the_sdk(served, certs, tmp_path):
    address, _, _ = served
    init(tmp_path / "other", supernodes=0)
    x, y = _support()
    with (
        FusionClient(address, certs=certs, public_key=tmp_path / "other" / "signing.pub") as client,
        pytest.raises(SignatureError, match="does not verify"),
    ):
        client.adapt(x, y, out=tmp_path / "model")
    assert not (tmp_path / "model").exists()  # nothing unverified is written


def _raw(address: str, certs, method: str, payload: bytes) -> grpc.RpcError:
    creds = grpc.ssl_channel_credentials(
        (certs / "ca.crt").read_bytes(),
        (certs / "client.key").read_bytes(),
        (certs / "client.crt").read_bytes(),
    )
    with grpc.secure_channel(address, creds) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary(f"/protofuse.v1.Fusion/{method}")(payload, timeout=30)
    return err.value


def _request(
    x=None,
    labels=None,
    options=None,
    dtype=fusion_pb2.Tensor.FLOAT32,
    shape=None,
    data=None,
    version=1,
) -> bytes:
    sx, sy = _support()
    x = sx if x is None else x
    msg = fusion_pb2.AdaptRequest(
        format_version=version, labels=list(sy if labels is None else labels), options=options or {}
    )
    msg.x.dtype = dtype
    msg.x.shape.extend(x.shape if shape is None else shape)
    msg.x.data = (
        np.ascontiguousarray(
            x, dtype="<f4" if dtype != fusion_pb2.Tensor.FLOAT64 else "<f8"
        ).tobytes()
        if data is None
        else data
    )
    return msg.SerializeToString()


def _bad(x):
    x = x.copy()
    x[4, 2] = np.nan
    return x


BAD_REQUESTS = [
    ("not protobuf", b"\xff\xff\xff", "do not parse as a protofuse.v1.AdaptRequest"),
    ("no format version", _request(version=0), "AdaptRequest.format_version"),
    ("unset dtype", _request(dtype=fusion_pb2.Tensor.DTYPE_UNSPECIFIED), "AdaptRequest.x.dtype"),
    ("three dimensions", _request(shape=(9, 4, 4)), "AdaptRequest.x.shape"),
    ("bytes for another shape", _request(data=b"\x00" * 12), "AdaptRequest.x.data"),
    (
        "wrong width",
        _request(x=np.zeros((9, 5), np.float32)),
        "AdaptRequest.x.shape: rows of width 5, but the bank's inputs have width 16",
    ),
    ("empty support", _request(x=np.zeros((0, 16), np.float32), labels=[]), "support set is empty"),
    (
        "over the support limit",
        _request(x=np.zeros((41, 16), np.float32), labels=["0", "1"] * 20 + ["0"]),
        "limit of 40",
    ),
    ("not finite", _request(x=_bad(_support()[0])), "AdaptRequest.x.data: row 4"),
    (
        "labels of another length",
        _request(labels=["0", "2"]),
        "AdaptRequest.labels: 2 labels for 9 rows",
    ),
    ("one class", _request(labels=["0"] * 9), "at least two classes"),
    ("empty label", _request(labels=[""] + ["2"] * 8), "AdaptRequest.labels[0]"),
    (
        "unknown option",
        _request(options={"learning_rate": "3"}),
        "AdaptRequest.options['learning_rate']: unknown option",
    ),
    ("bad option value", _request(options={"prior_strength": "strong"}), "prior_strength"),
    ("bad seed", _request(options={"seed": "x"}), "AdaptRequest.options['seed']"),
    ("seed out of range", _request(options={"seed": str(2**64)}), "AdaptRequest.options['seed']"),
    (
        "absurd width",
        _request(x=np.zeros((0, 16), np.float32), labels=[], shape=(0, 2**40), data=b""),
        "AdaptRequest.x.shape: width",
    ),
    (
        "more classes than the limit",
        _request(labels=["0", "1", "2", "3", "4", "0", "1", "2", "3"]),
        "AdaptRequest.labels: 5 classes, more than this service's limit of 4",
    ),
    (
        "more work than the limit",
        _request(x=np.zeros((30, 16), np.float32), labels=["0", "1", "2", "3"] * 7 + ["0", "1"]),
        "30 examples x 4 classes = 120, more work than this service's limit of 100",
    ),
    ("a label too long", _request(labels=["0" * 257] + ["2"] * 8), "AdaptRequest.labels[0]: 257"),
    (
        "float64 beyond float32",
        _request(x=_support()[0].astype(np.float64) * 1e300, dtype=fusion_pb2.Tensor.FLOAT64),
        "beyond float32's range",
    ),
    (
        "inputs the networks overflow on",
        _request(x=np.where(np.arange(9 * 16).reshape(9, 16) % 2, 3e38, -3e38).astype(np.float32)),
        "AdaptRequest.x: adaptation on these inputs diverged",
    ),
    (
        "prior strength beyond its bound",
        _request(options={"prior_strength": "1e300"}),
        "less than or equal to 1000000",
    ),
    ("prior strength infinite", _request(options={"prior_strength": "inf"}), "prior_strength"),
    (
        "an ONNX name that is not a folder name",
        _request()
        + fusion_pb2.AdaptRequest(
            onnx=fusion_pb2.OnnxExportRequest(name="../up", version=1)
        ).SerializeToString(),
        "AdaptRequest.onnx.name: '../up'",
    ),
    (
        "an ONNX version 0",
        _request()
        + fusion_pb2.AdaptRequest(
            onnx=fusion_pb2.OnnxExportRequest(name="task", version=0)
        ).SerializeToString(),
        "AdaptRequest.onnx.version: 0",
    ),
    (
        "a digest that is not one",
        _request() + fusion_pb2.AdaptRequest(known_bank_weights_digest="abc").SerializeToString(),
        "AdaptRequest.known_bank_weights_digest",
    ),
]


@pytest.mark.parametrize("payload,message", [pytest.param(p, m, id=i) for i, p, m in BAD_REQUESTS])
def test_malformed_adapt_requests_get_invalid_argument_naming_the_field(
    served, certs, payload, message
):
    err = _raw(served[0], certs, "Adapt", payload)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert message in err.details()


def test_a_request_over_the_message_limit_is_refused_and_the_service_carries_on(served, certs):
    address = served[0]
    big = np.random.default_rng(0).random((40, 16 * 500), dtype=np.float32)  # 1.3 MiB > 1 MiB limit
    err = _raw(address, certs, "Adapt", _request(x=big, labels=["0", "2"] * 20))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with FusionClient(address, certs=certs, timeout=60) as client:
        assert client.health("protofuse.v1.Fusion") == "SERVING"
        # the SDK does not retry a message over the limit (RESOURCE_EXHAUSTED too): it never
        # succeeds, so it is refused at once, not re-sent until the timeout
        t0 = time.monotonic()
        with pytest.raises(FusionError) as refused:
            client.adapt(big, np.array(["0", "2"] * 20))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 10


def test_callers_beyond_the_concurrency_limit_wait_their_turn(served, certs):
    address = served[0]  # max_concurrent = 1
    results: list[object] = []
    fits: list[float] = []

    def call(seed: int) -> None:
        with FusionClient(address, certs=certs) as client:
            try:
                reply = client.adapt_response(*_support(seed=seed), seed=seed)
                results.append(list(reply.metrics.classes))
                fits.append(reply.metrics.seconds)
            except Exception as err:
                results.append(err)

    threads = [threading.Thread(target=call, args=(s,)) for s in range(6)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert results == [["0", "2", "3"]] * 6
    # One slot: the fits ran one after another, so the wall time covers all of them.
    assert elapsed >= 0.95 * sum(fits), (elapsed, fits)


def test_a_new_bank_version_is_served_without_a_restart(certs, tmp_path):
    run = tmp_path / "run"  # a run folder the federation has not written yet
    x, y = _support()
    settings = ServiceSettings(reload_interval_s=0.1)
    with (
        _serving(run, certs, settings) as (address, _),
        FusionClient(address, certs=certs) as client,
    ):
        with pytest.raises(FusionError) as err:
            client.adapt(x, y)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "no bank yet" in err.value.details
        assert wait_until(
            lambda: client.health("protofuse.v1.Fusion") == "NOT_SERVING", 10, interval=0.1
        )
        assert client.health() == "SERVING"
        first = _bank("discriminative", seed=0)
        first.save(run / "bank")
        assert wait_until(
            lambda: client.health("protofuse.v1.Fusion") == "SERVING", 10, interval=0.1
        )
        assert client.adapt(x, y).bank_meta["version"] == first.version
        second = _bank("discriminative", seed=1)
        second.save(run / "bank")  # swapped in atomically, as the federation's export does
        assert second.version != first.version
        assert wait_until(
            lambda: client.bank().manifest.version == second.version, 10, interval=0.1
        )
        assert client.adapt(x, y).bank_meta["version"] == second.version
        assert (
            client._bank_weights is not None
        )  # the new version's weights came in full and were kept
        kept = client._bank_weights[0]
        # A damaged bank swapped in (new files) and a vanished one: the last good version stays.
        third = tmp_path / "third"
        _bank("discriminative", seed=2).save(third)
        weights = (third / "weights.npz").read_bytes()
        (third / "weights.npz").write_bytes(weights[:-100] + bytes(100))
        shutil.rmtree(run / "bank")
        time.sleep(0.3)
        assert client.bank().manifest.version == second.version
        third.rename(run / "bank")
        time.sleep(0.5)
        assert (
            client.bank().manifest.version == second.version
            and client.health("protofuse.v1.Fusion") == "SERVING"
        )
        assert (
            client.adapt(x, y).bank_meta["version"] == second.version
            and client._bank_weights[0] == kept
        )


def test_the_cli_serves_adapts_through_the_server_and_checks_health(served, certs, tmp_path):
    """``protofuse serve`` as its own process; ``adapt --server`` and ``health`` against it."""
    from protofuse.flower.launcher import free_port

    _, folder, _ = served
    port = free_port()
    x, y = _support()
    np.savez(tmp_path / "support.npz", x=x, y=y)
    np.save(tmp_path / "x.npy", X)
    cli = [sys.executable, "-m", "protofuse_cli.main"]
    proc = subprocess.Popen(
        [
            *cli,
            "serve",
            str(folder),
            "--address",
            f"127.0.0.1:{port}",
            "--certs",
            str(certs),
            "--max-concurrent",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_until(
            lambda: (
                subprocess.run(
                    [*cli, "health", f"127.0.0.1:{port}", "--certs", str(certs)],
                    capture_output=True,
                ).returncode
                == 0
            ),
            60,
            interval=0.1,
        )
        run = subprocess.run(
            [
                *cli,
                "adapt",
                "--server",
                f"127.0.0.1:{port}",
                "--certs",
                str(certs),
                "--support",
                str(tmp_path / "support.npz"),
                "--out",
                str(tmp_path / "model"),
                "--onnx",
                str(tmp_path / "repo"),
                "--onnx-name",
                "cli-task",
            ],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        assert "signature verified" in run.stderr and "ONNX export in" in run.stderr
        from protofuse.export import verify_export

        verify_export(tmp_path / "repo" / "cli-task" / "1", certs / "signing.pub")
        pred = subprocess.run(
            [
                *cli,
                "predict",
                str(tmp_path / "model"),
                "--inputs",
                str(tmp_path / "x.npy"),
                "--out",
                str(tmp_path / "p.npz"),
                "--public-key",
                str(certs / "signing.pub"),
            ],
            capture_output=True,
            text=True,
        )
        assert pred.returncode == 0, pred.stderr
        refused = subprocess.run(
            [
                *cli,
                "adapt",
                "--server",
                f"127.0.0.1:{port}",
                "--insecure",
                "--unsigned-ok",
                "--support",
                str(tmp_path / "support.npz"),
                "--out",
                str(tmp_path / "m2"),
            ],
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 2 and "UNAVAILABLE" in refused.stderr
        no_mode = subprocess.run([*cli, "serve", str(folder)], capture_output=True, text=True)
        assert no_mode.returncode == 2 and "--insecure" in no_mode.stderr
        taken = subprocess.run(
            [*cli, "serve", str(folder), "--address", f"127.0.0.1:{port}", "--certs", str(certs)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert taken.returncode == 2 and "cannot listen on" in taken.stderr, taken.stderr
        # A health check needs no signing key: the folder a prober holds may lack signing.pub.
        prober = tmp_path / "prober"
        prober.mkdir()
        for name in ("ca.crt", "client.crt", "client.key"):
            shutil.copy(certs / name, prober / name)
        assert (
            subprocess.run(
                [*cli, "health", f"127.0.0.1:{port}", "--certs", str(prober)], capture_output=True
            ).returncode
            == 0
        )
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Adapt from protofuse client: OK" in out  # callers are named by their certificate


def test_a_bank_with_non_finite_weights_is_never_served_and_health_says_so(certs, tmp_path):
    """The red team's bank of NaN weights was served (every call UNKNOWN) while health said
    SERVING: such a bank is now refused at load, and health reports NOT_SERVING."""
    from protofuse import artifacts

    folder = tmp_path / "bank"
    _bank("discriminative").save(folder)
    arrays, meta = artifacts.load(folder, "protofuse-bank")
    name = next(k for k, v in arrays.items() if v.dtype.kind == "f")
    arrays[name] = np.full_like(arrays[name], np.nan)
    data = artifacts.npz_bytes(arrays)  # written by hand: protofuse itself never writes NaN
    meta["sha256"] = artifacts.checksum(data, meta)
    (folder / artifacts.WEIGHTS).write_bytes(data)
    (folder / artifacts.META).write_text(json.dumps(meta))
    with _serving(folder, certs, ServiceSettings(reload_interval_s=0.2)) as (address, _):
        with FusionClient(address, certs=certs) as client:
            wait_until(lambda: client.health("protofuse.v1.Fusion") == "NOT_SERVING", timeout=10)
            with pytest.raises(FusionError) as err:
                client.adapt(*_support())
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "cannot be served" in err.value.details and "NaN or infinite" in err.value.details


def test_one_caller_cannot_hold_more_than_its_share_of_the_queue(certs, tmp_path):
    """max_per_caller: a caller's requests beyond it are refused at once while its others run or
    wait; the same caller is served again once they finish."""
    folder = tmp_path / "bank"
    _bank("discriminative").save(folder)
    settings = ServiceSettings(
        max_concurrent=1, max_per_caller=2, max_classes=1000, max_work=10**7, max_support=4000
    )
    server, port, _ = build_server(folder, "127.0.0.1:0", settings, Credentials.from_folder(certs))
    address = f"127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    slow = (rng.random((3000, 16), dtype=np.float32), [f"c{i % 1000}" for i in range(3000)])
    outcomes: dict[str, object] = {}

    def call(name: str, x, y, retry_busy: bool = False) -> None:
        with FusionClient(address, certs=certs, timeout=120, retry_busy=retry_busy) as client:
            try:
                outcomes[name] = len(client.adapt_response(x, y).metrics.classes)
            except FusionError as err:
                outcomes[name] = err

    try:
        first = threading.Thread(target=call, args=("slow", *slow))
        first.start()
        time.sleep(0.5)  # the slow fit holds the only slot
        second = threading.Thread(target=call, args=("waiting", *_support()))
        second.start()
        time.sleep(0.3)  # ... and the second waits for it: the caller holds 2
        call("third", *_support())
        still_busy = first.is_alive()
        call("patient", *_support(), retry_busy=True)  # the SDK's default: waits its turn
        first.join()
        second.join()
        call("after", *_support())
    finally:
        server.stop(grace=None)
    assert still_busy, "the slow request ended too soon for the test to mean anything"
    third = outcomes["third"]
    assert isinstance(third, FusionError), outcomes
    assert third.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit per caller" in third.details
    assert (outcomes["slow"], outcomes["waiting"], outcomes["after"]) == (1000, 3, 3), outcomes
    assert outcomes["patient"] == 3, outcomes  # tried again until a place was free


def test_streams_that_never_send_a_body_cannot_fill_the_service(certs, tmp_path):
    """Found by an attacker's review: a stream holds one of max_queued places from its headers
    on, before any per-caller count. One connection now opens at most max_per_caller streams,
    so another caller's calls, and health checks, still get through."""
    folder = tmp_path / "bank"
    _bank("discriminative").save(folder)
    settings = ServiceSettings(max_queued=8, max_per_caller=2, max_concurrent=1)
    server, port, _ = build_server(folder, "127.0.0.1:0", settings, None)
    address = f"127.0.0.1:{port}"
    hold = threading.Event()

    def never():  # request messages that never come
        hold.wait()
        return
        yield

    attacker = grpc.insecure_channel(address)
    try:
        stalls = [
            attacker.stream_unary("/protofuse.v1.Fusion/Adapt").future(never(), timeout=60)
            for _ in range(8)
        ]
        time.sleep(1.0)
        with FusionClient(address, insecure=True, unsigned_ok=True, timeout=20) as client:
            assert client.health("protofuse.v1.Fusion") == "SERVING"
            assert client.adapt(*_support()).classes_.tolist() == ["0", "2", "3"]
    finally:
        hold.set()
        for f in stalls:
            f.cancel()
        attacker.close()
        server.stop(grace=None)
