"""The adaptation service's codecs (protofuse.protocol.service), in-process: every request the
service accepts round-trips, and what it refuses is refused by the codec, naming the field, before
any work (the gRPC server itself is tested in tests/integration/test_service.py)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protofuse.protocol.federation import WireError
from protofuse.protocol.service import (
    AdaptRequest,
    AdaptResponse,
    FitMetrics,
    decode_adapt_request,
    decode_adapt_response,
    decode_empty_request,
    encode_adapt_request,
    encode_adapt_response,
    encode_empty_request,
)

label = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12
)


@st.composite
def requests(draw: st.DrawFn) -> AdaptRequest:
    n = draw(st.integers(2, 12))
    d = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x = draw(hnp.arrays(dtype, (n, d), elements=st.floats(-1e6, 1e6, width=32)))
    names = draw(st.lists(label, min_size=2, max_size=4, unique=True))
    labels = tuple(names[i % len(names)] for i in range(n))
    return AdaptRequest(x, labels, {"seed": str(draw(st.integers(0, 99)))})


@given(requests())
def test_every_valid_request_round_trips(request):
    back = decode_adapt_request(
        encode_adapt_request(request),
        max_support=12,
        input_width=request.x.shape[1],
        option_names=frozenset({"seed"}),
    )
    assert back.x.dtype == request.x.dtype and np.array_equal(back.x, request.x)
    assert back.labels == request.labels and back.options == request.options


def _request(**change) -> AdaptRequest:
    base = {"x": np.zeros((4, 3), np.float32), "labels": ("a", "b", "a", "b"), "options": {}}
    return AdaptRequest(**{**base, **change})


@pytest.mark.parametrize(
    ("request_", "limits", "path"),
    [
        (_request(x=np.zeros((4, 3, 1), np.float32)), {}, "AdaptRequest.x.shape"),
        (_request(x=np.zeros((0, 3), np.float32), labels=()), {}, "AdaptRequest.x.shape"),
        (_request(x=np.full((4, 3), np.nan, np.float32)), {}, "AdaptRequest.x.data"),
        (_request(labels=("a", "b")), {}, "AdaptRequest.labels"),
        (_request(labels=("a", "a", "a", "a")), {}, "AdaptRequest.labels"),
        (_request(labels=("a", "", "a", "b")), {}, "AdaptRequest.labels[1]"),
        (_request(options={"seed": "1" * 300}), {}, "AdaptRequest.options['seed']"),
        (_request(), {"max_support": 3}, "AdaptRequest.x.shape"),
        (_request(), {"input_width": 64}, "AdaptRequest.x.shape"),
        (
            _request(options={"temperature": "2"}),
            {"option_names": frozenset({"seed"})},
            "AdaptRequest.options['temperature']",
        ),
        (
            _request(known_bank_weights_digest="ab" * 10),
            {},
            "AdaptRequest.known_bank_weights_digest",
        ),
    ],
)
def test_a_bad_request_is_refused_naming_the_field(request_, limits, path):
    with pytest.raises(WireError, match=f"^{__import__('re').escape(path)}"):
        if limits:  # refused by the service's limits: only the decoder knows them
            decode_adapt_request(encode_adapt_request(request_), **limits)
        else:  # refused on both sides: the encoder never sends what the decoder would refuse
            encode_adapt_request(request_)


def test_inputs_of_an_unsupported_dtype_are_not_sent():
    with pytest.raises(WireError, match=r"AdaptRequest\.x\.dtype"):
        encode_adapt_request(_request(x=np.zeros((4, 3), np.int64)))


@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_request_or_a_wire_error(data):
    with contextlib.suppress(WireError):
        decode_adapt_request(data, max_support=2000, input_width=8)


def _response(**change) -> AdaptResponse:
    metrics = FitMetrics(("a", "b"), 4, 0.75, 0.1, "map")
    base = {
        "bank_version": "0123456789abcdef",
        "files": {"weights.npz": b"w", "meta.json": b"{}"},
        "metrics": metrics,
    }
    return AdaptResponse(**{**base, **change})


def test_a_response_round_trips_with_its_files():
    r = _response(
        files={"weights.npz": b"w", "meta.json": b"{}", "signature.json": b"s"},
        bank_weights_digest="ab" * 32,
        bank_weights_omitted=True,
    )
    assert decode_adapt_response(encode_adapt_response(r)) == r


@pytest.mark.parametrize(
    ("response", "path"),
    [
        (_response(bank_version=""), "AdaptResponse.bank_version"),
        (_response(files={"meta.json": b"{}"}), "AdaptResponse.artifact.weights_npz"),
        (_response(bank_weights_omitted=True), "AdaptResponse.artifact.bank_weights_omitted"),
        (
            _response(metrics=FitMetrics(("a", "a"), 4, 0.5, 0.1, "map")),
            "AdaptResponse.metrics.classes[1]",
        ),
        (
            _response(metrics=FitMetrics(("a", "b"), 4, 1.5, 0.1, "map")),
            "AdaptResponse.metrics.support_accuracy",
        ),
        (
            _response(metrics=FitMetrics(("a", "b"), 4, 0.5, float("inf"), "map")),
            "AdaptResponse.metrics.seconds",
        ),
    ],
)
def test_a_bad_response_is_refused_naming_the_field(response, path):
    with pytest.raises(WireError, match=__import__("re").escape(path)):
        encode_adapt_response(response)


def test_the_empty_requests_carry_the_format_version():
    for kind in ("GetBankRequest", "ListExpertsRequest"):
        decode_empty_request(kind, encode_empty_request(kind))
        with pytest.raises(WireError, match=rf"{kind}\.format_version"):
            decode_empty_request(kind, b"")


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        (
            "protofuse.wire",
            "protofuse.protocol.federation",
            (
                "WireError",
                "FORMAT_VERSION",
                "encode_distribution",
                "decode_manifest",
                "ExpertDistribution",
            ),
        ),
        (
            "protofuse.wire_service",
            "protofuse.protocol.service",
            ("AdaptRequest", "encode_adapt_request", "decode_expert_list", "SERVICE"),
        ),
        ("client_sdk.client_app", "client_sdk.clientapp.app", ("app",)),
    ],
)
def test_moved_modules_keep_their_old_names_with_a_deprecation_warning(old, new, names):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        alias = importlib.import_module(old)
    target = importlib.import_module(new)
    assert all(getattr(alias, name) is getattr(target, name) for name in names)
