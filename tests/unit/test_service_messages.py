"""The adaptation service's messages (protofuse/protocol/service.py) as a hostile or outdated sender
could make them, decoded without a server: each tensor check on the decoder's side, what each
refusal says, the bank description and the expert list (GetBank, ListExperts). Round trips of
requests and responses are in test_service_codec.py; the served end to end (status codes, TLS,
limits) is in tests/integration/test_service.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protofuse.protocol.federation import (
    FORMAT_VERSION,
    BankManifest,
    DiscriminativeHead,
    ExpertDistribution,
    WireError,
)
from protofuse.protocol.service import (
    MAX_CLASSES,
    MAX_ONNX_SIGNATURE_BYTES,
    MAX_ONNX_TEXT_BYTES,
    MAX_OPTION_LENGTH,
    MAX_WIDTH,
    AdaptRequest,
    AdaptResponse,
    BankInfo,
    ExpertList,
    ExpertSummary,
    FitMetrics,
    OnnxExport,
    check_onnx_name,
    decode_adapt_request,
    decode_adapt_response,
    decode_bank_info,
    decode_expert_list,
    encode_adapt_request,
    encode_adapt_response,
    encode_bank_info,
    encode_expert_list,
)
from protofuse.records import ExpertRecord, Fidelity
from protofuse.v1 import fusion_pb2

DIGEST = "0123456789abcdef" * 4
LABELS = ("cat", "dog", "cat", "eel", "dog", "eel")


def _x(dtype=np.float32, rows: int = 6, width: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, width)).astype(dtype)


def _request(**changes) -> AdaptRequest:
    fields = {
        "x": _x(),
        "labels": LABELS,
        "options": {"seed": "3"},
        "known_bank_weights_digest": "",
    }
    return AdaptRequest(**(fields | changes))


def _raw_request(x: np.ndarray | None = None, **tensor) -> bytes:
    """A request as a hostile or outdated sender could build it, bypassing the encoder's checks."""
    x = _x() if x is None else x
    msg = fusion_pb2.AdaptRequest(format_version=FORMAT_VERSION, labels=list(LABELS))
    msg.x.dtype = tensor.get("dtype", fusion_pb2.Tensor.FLOAT32)
    msg.x.shape.extend(tensor.get("shape", x.shape))
    msg.x.data = tensor.get("data", np.ascontiguousarray(x, dtype="<f4").tobytes())
    return msg.SerializeToString()


def _refused(call, path: str) -> str:
    with pytest.raises(WireError) as err:
        call()
    assert str(err.value).startswith(path), f"expected the error to name {path!r}: {err.value}"
    return str(err.value)


# -- AdaptRequest ------------------------------------------------------------------------------


def test_a_request_is_checked_against_the_bank_being_served():
    data = encode_adapt_request(_request(x=_x(np.float64), known_bank_weights_digest=DIGEST))
    got = decode_adapt_request(
        data, max_support=6, input_width=4, option_names=frozenset({"seed", "prior_strength"})
    )
    assert (got.labels, got.known_bank_weights_digest, got.x.dtype) == (LABELS, DIGEST, np.float64)
    text = _refused(lambda: decode_adapt_request(data, max_support=5), "AdaptRequest.x.shape")
    assert "6 support examples" in text and "limit of 5" in text
    text = _refused(lambda: decode_adapt_request(data, input_width=5), "AdaptRequest.x.shape")
    assert "rows of width 4, but the bank's inputs have width 5" in text
    text = _refused(
        lambda: decode_adapt_request(data, option_names=frozenset({"prior_strength"})),
        "AdaptRequest.options['seed']",
    )
    assert "unknown option" in text and "prior_strength" in text


def _with_nan(row: int) -> np.ndarray:
    x = _x()
    x[row, 1] = np.nan
    return x


def _huge(row: int) -> np.ndarray:
    """float64 inputs a float32 network turns into infinities (passed validation before)."""
    x = _x(np.float64)
    x[row, 0] = -1e39
    return x


@pytest.mark.parametrize(
    "changes,path,says",
    [
        ({"x": _x().astype(np.int32)}, "AdaptRequest.x.dtype", "int32"),
        ({"x": _x()[0]}, "AdaptRequest.x.shape", "1 dimensions"),
        ({"x": _x(rows=0), "labels": ()}, "AdaptRequest.x.shape", "support set is empty"),
        ({"x": _with_nan(2)}, "AdaptRequest.x.data", "row 2 holds NaN"),
        ({"labels": LABELS[:5]}, "AdaptRequest.labels", "5 labels for 6 rows"),
        ({"labels": ("cat",) * 6}, "AdaptRequest.labels", "at least two classes"),
        ({"labels": ("cat", "", "dog", "eel", "dog", "eel")}, "AdaptRequest.labels[1]", "empty"),
        ({"labels": ("cat", 3, "dog", "eel", "dog", "eel")}, "AdaptRequest.labels[1]", "string"),
        ({"options": {"seed": "9" * 257}}, "AdaptRequest.options['seed']", "257 characters"),
        ({"options": {"seed": 3}}, "AdaptRequest.options['seed']", "string"),
        ({"options": {3: "x"}}, "AdaptRequest.options", "string"),
        ({"x": _huge(3)}, "AdaptRequest.x.data", "row 3 holds values beyond float32's range"),
        (
            {"labels": ("cat", "d" * 257, "dog", "eel", "dog", "eel")},
            "AdaptRequest.labels[1]",
            "257 characters",
        ),
        (
            {"labels": ("cat", "dog\x00", "dog", "eel", "dog", "eel")},
            "AdaptRequest.labels[1]",
            "control characters",  # numpy turns "dog\x00" into "dog": two labels would merge
        ),
        ({"known_bank_weights_digest": "abc"}, "AdaptRequest.known_bank_weights_digest", "sha256"),
        (
            {"known_bank_weights_digest": DIGEST.upper()},
            "AdaptRequest.known_bank_weights_digest",
            "lowercase",
        ),
    ],
)
def test_the_encoder_says_what_is_wrong_with_a_request(changes, path, says):
    assert says in _refused(lambda: encode_adapt_request(_request(**changes)), path)


def test_an_option_value_of_the_maximum_length_is_sent():
    long = "9" * MAX_OPTION_LENGTH
    got = decode_adapt_request(encode_adapt_request(_request(options={"seed": long})))
    assert got.options == {"seed": long}


@pytest.mark.parametrize(
    "data,path,says",
    [
        (b"\xff\xff\xff", "AdaptRequest", "do not parse"),
        (
            fusion_pb2.AdaptRequest(format_version=FORMAT_VERSION).SerializeToString(),
            "AdaptRequest.x",
            "missing",
        ),
        (
            _raw_request(dtype=fusion_pb2.Tensor.DTYPE_UNSPECIFIED),
            "AdaptRequest.x.dtype",
            "DTYPE_UNSPECIFIED is not accepted",
        ),
        (_raw_request(dtype=7), "AdaptRequest.x.dtype", "7 is not accepted"),
        (_raw_request(shape=(6, 2, 2)), "AdaptRequest.x.shape", "3 dimensions"),
        (_raw_request(shape=(6, 0), data=b""), "AdaptRequest.x.shape", "width 0 is outside"),
        (
            _raw_request(shape=(0, MAX_WIDTH + 1), data=b""),
            "AdaptRequest.x.shape",
            f"width {MAX_WIDTH + 1} is outside",
        ),
        (_raw_request(data=b"\x00" * 12), "AdaptRequest.x.data", "12 bytes for shape [6, 4]"),
        (_raw_request(x=_with_nan(4)), "AdaptRequest.x.data", "row 4"),
    ],
)
def test_the_decoder_refuses_a_bad_request_naming_the_field(data, path, says):
    assert says in _refused(lambda: decode_adapt_request(data), path)


def test_the_widest_rows_pass_the_width_bound_and_float64_bytes_are_read_as_float64():
    # (0, MAX_WIDTH) passes the tensor's width bound and is refused next, as an empty support set
    text = _refused(
        lambda: decode_adapt_request(_raw_request(shape=(0, MAX_WIDTH), data=b"")),
        "AdaptRequest.x.shape",
    )
    assert "support set is empty" in text
    x = _x(np.float64)
    got = decode_adapt_request(
        _raw_request(
            x=x, dtype=fusion_pb2.Tensor.FLOAT64, data=np.ascontiguousarray(x, "<f8").tobytes()
        )
    )
    assert got.x.dtype == np.float64
    np.testing.assert_array_equal(got.x, x)


# -- AdaptResponse -----------------------------------------------------------------------------

METRICS = FitMetrics(("cat", "dog", "eel"), 6, 0.5, 1.25, "recompose", ("eel",))
FILES = {"weights.npz": b"npz", "meta.json": b"{}", "signature.json": b"sig"}


def _response(**changes) -> AdaptResponse:
    fields = {"bank_version": "bank-3", "files": FILES, "metrics": METRICS}
    return AdaptResponse(**(fields | changes))


def test_an_unsigned_response_has_no_signature_file():
    files = {"weights.npz": b"npz", "meta.json": b"{}"}
    got = decode_adapt_response(encode_adapt_response(_response(files=files)))
    assert got.files == files and got.bank_weights_digest == "" and not got.bank_weights_omitted


@pytest.mark.parametrize(
    "changes,path",
    [
        ({"bank_version": ""}, "AdaptResponse.bank_version"),
        ({"files": {"meta.json": b"{}"}}, "AdaptResponse.artifact.weights_npz"),
        ({"files": {"weights.npz": b"npz", "meta.json": b""}}, "AdaptResponse.artifact.meta_json"),
        ({"bank_weights_digest": "abc"}, "AdaptResponse.artifact.bank_weights_digest"),
        ({"bank_weights_omitted": True}, "AdaptResponse.artifact.bank_weights_omitted"),
        ({"metrics": FitMetrics((), 6, 0.5, 1.0, "m")}, "AdaptResponse.metrics.classes"),
        (
            {"metrics": FitMetrics(("a",), 6, 1.5, 1.0, "m")},
            "AdaptResponse.metrics.support_accuracy",
        ),
        ({"metrics": FitMetrics(("a",), 6, 0.5, np.inf, "m")}, "AdaptResponse.metrics.seconds"),
        ({"metrics": FitMetrics(("a",), -1, 0.5, 1.0, "m")}, "AdaptResponse.metrics.n_support"),
    ],
)
def test_a_bad_response_is_refused_naming_the_field(changes, path):
    _refused(lambda: encode_adapt_response(_response(**changes)), path)


ONNX = OnnxExport("task", 2, b"onnx", b"cat\ndog\neel\n", b"config", b"sig", 3e-7)


def test_an_onnx_export_travels_with_the_response_and_a_bad_one_is_refused_naming_the_field():
    got = decode_adapt_response(encode_adapt_response(_response(onnx=ONNX)))
    assert got.onnx == ONNX
    assert decode_adapt_response(encode_adapt_response(_response())).onnx is None
    for changes, path in [
        ({"name": "../up"}, "AdaptResponse.onnx.name"),
        ({"name": ""}, "AdaptResponse.onnx.name"),
        ({"version": 0}, "AdaptResponse.onnx.version"),
        ({"model": b""}, "AdaptResponse.onnx.model_onnx"),
        ({"labels": b""}, "AdaptResponse.onnx.labels_txt"),
        ({"parity": float("nan")}, "AdaptResponse.onnx.parity"),
        ({"parity": -1.0}, "AdaptResponse.onnx.parity"),
        ({"labels": b"a" * (MAX_ONNX_TEXT_BYTES + 1)}, "AdaptResponse.onnx.labels_txt"),
        ({"config": b"a" * (MAX_ONNX_TEXT_BYTES + 1)}, "AdaptResponse.onnx.config_pbtxt"),
        ({"signature": b"a" * (MAX_ONNX_SIGNATURE_BYTES + 1)}, "AdaptResponse.onnx.signature_json"),
    ]:
        bad = dataclasses.replace(ONNX, **changes)
        _refused(lambda bad=bad: encode_adapt_response(_response(onnx=bad)), path)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=140), st.integers(-(2**40), 2**40))
def test_an_onnx_request_names_a_folder_and_a_version_or_is_refused(name, version):
    try:
        check_onnx_name(name, version, path="AdaptRequest.onnx")
    except WireError as err:
        assert str(err).startswith("AdaptRequest.onnx.")
        return
    assert 1 <= version <= 2**31 - 1 and "/" not in name and not name.startswith(".")
    assert name not in ("", ".", "..") and len(name) <= 128


def test_a_request_asking_for_onnx_carries_its_name_and_version():
    data = encode_adapt_request(_request(onnx=("task", 7)))
    assert decode_adapt_request(data).onnx == ("task", 7)
    assert decode_adapt_request(encode_adapt_request(_request())).onnx is None
    _refused(lambda: encode_adapt_request(_request(onnx=("a/b", 1))), "AdaptRequest.onnx.name")


def test_a_response_without_weights_is_refused_by_the_reader():
    msg = fusion_pb2.AdaptResponse(format_version=FORMAT_VERSION, bank_version="bank-3")
    msg.artifact.meta_json = b"{}"
    msg.metrics.classes.append("cat")
    _refused(
        lambda: decode_adapt_response(msg.SerializeToString()), "AdaptResponse.artifact.weights_npz"
    )


# -- GetBank, ListExperts ----------------------------------------------------------------------

RECORD = ExpertRecord("expert-1", ("cat", "dog"), Fidelity(0.9, 0.1, 40), 500, 0.75, 0.8)
MANIFEST = BankManifest("bank-3", 4, ("cat", "dog", "eel"), DIGEST, "discriminative", (RECORD,))
DISTRIBUTION = ExpertDistribution(
    "expert-1", ("cat", "dog"), 4, DiscriminativeHead(log_temperature=0.0, label_bias=(0.5, -1.0))
)


def test_bank_info_round_trips():
    got = decode_bank_info(encode_bank_info(BankInfo(MANIFEST, 64)))
    assert got.input_width == 64
    assert got.manifest.version == "bank-3" and got.manifest.vocabulary == ("cat", "dog", "eel")
    assert [e.name for e in got.manifest.experts] == ["expert-1"]


def test_bank_info_without_a_manifest_or_a_width_is_refused():
    _refused(lambda: encode_bank_info(BankInfo(MANIFEST, -1)), "GetBankResponse.input_width")
    no_manifest = fusion_pb2.GetBankResponse(format_version=FORMAT_VERSION, input_width=4)
    _refused(lambda: decode_bank_info(no_manifest.SerializeToString()), "GetBankResponse.manifest")
    no_width = fusion_pb2.GetBankResponse()
    no_width.ParseFromString(encode_bank_info(BankInfo(MANIFEST, 64)))
    no_width.input_width = 0
    _refused(lambda: decode_bank_info(no_width.SerializeToString()), "GetBankResponse.input_width")


def test_the_expert_list_round_trips():
    sent = ExpertList("bank-3", (ExpertSummary(RECORD, DISTRIBUTION),))
    got = decode_expert_list(encode_expert_list(sent))
    assert got.bank_version == "bank-3"
    (summary,) = got.experts
    assert summary.distribution == DISTRIBUTION
    assert summary.expert.name == "expert-1" and summary.expert.labels == ("cat", "dog")
    assert summary.expert.weight == pytest.approx(0.8)
    assert decode_expert_list(encode_expert_list(ExpertList("bank-3", ()))).experts == ()


def test_an_expert_paired_with_another_experts_distribution_is_refused():
    other = ExpertRecord("expert-2", ("cat", "dog"), Fidelity(0.9, 0.1, 40), 500)
    text = _refused(
        lambda: encode_expert_list(ExpertList("bank-3", (ExpertSummary(other, DISTRIBUTION),))),
        "ListExpertsResponse.experts",
    )
    assert "'expert-2'" in text and "'expert-1'" in text


def test_a_bank_of_width_one_is_accepted():
    assert decode_bank_info(encode_bank_info(BankInfo(MANIFEST, 1))).input_width == 1


def test_an_expert_list_names_the_field_it_refuses():
    _refused(
        lambda: encode_expert_list(ExpertList(3, ())),  # type: ignore[arg-type]
        "ListExpertsResponse.bank_version",
    )
    bad = ExpertRecord("expert-1", ("cat", "dog"), Fidelity(0.9, 0.1, 40), 500, 0.75, 1.5)
    _refused(
        lambda: encode_expert_list(ExpertList("bank-3", (ExpertSummary(bad, DISTRIBUTION),))),
        "ListExpertsResponse.experts.expert.trust",
    )


def test_garbage_for_a_response_names_the_message():
    _refused(lambda: decode_adapt_response(b"\xff\xff\xff"), "AdaptResponse")


def test_too_many_rows_are_refused_before_the_bytes_are_looked_at():
    """The row limit comes first: a request declaring 10**9 rows is refused on its shape, not
    after its data is sized, copied and reshaped."""
    data = _raw_request(shape=(10**9, 4), data=b"")
    text = _refused(lambda: decode_adapt_request(data, max_support=10), "AdaptRequest.x.shape")
    assert "more than this service's limit of 10" in text


def test_classes_and_work_per_request_are_bounded_before_any_work():
    """Cost grows with examples x classes (2,000 rows of 1,000 new labels took 5-17 s): both are
    limits of the service, checked by the decoder."""
    data = encode_adapt_request(_request())  # 6 examples, 3 classes
    assert decode_adapt_request(data, max_classes=3, max_work=18).labels == LABELS
    text = _refused(lambda: decode_adapt_request(data, max_classes=2), "AdaptRequest.labels")
    assert "3 classes, more than this service's limit of 2" in text and "--max-classes" in text
    text = _refused(lambda: decode_adapt_request(data, max_work=17), "AdaptRequest.labels")
    assert "6 examples x 3 classes = 18" in text and "--max-work" in text
    # without a service limit, the format's own bound holds
    many = tuple(f"c{i}" for i in range(MAX_CLASSES + 1))
    big = _request(x=_x(rows=len(many), width=1), labels=many)
    assert "10001 classes" in _refused(lambda: encode_adapt_request(big), "AdaptRequest.labels")


@given(
    x=hnp.arrays(
        np.float64,
        st.tuples(st.integers(2, 6), st.integers(1, 3)),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=64),
    ),
    labels=st.lists(st.text(max_size=300), min_size=2, max_size=6),
)
@settings(max_examples=300, deadline=None)
def test_any_request_is_accepted_only_with_finite_float32_values_and_sane_labels(x, labels):
    labels = (labels * len(x))[: len(x)]
    try:
        got = decode_adapt_request(encode_adapt_request(_request(x=x, labels=tuple(labels))))
    except WireError:
        return
    assert np.isfinite(got.x.astype(np.float32)).all()
    assert all(0 < len(label) <= 256 for label in got.labels) and len(set(got.labels)) >= 2
