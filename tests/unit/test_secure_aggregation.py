"""Secure aggregation's arithmetic and checks (``[privacy] mode = "secagg"``): what a client masks,
the step the server reads back from Flower's unmasked mean, the sums it refuses, and the client's
side of the round. The whole protocol, with Flower's SecAgg+ on a real simulation, is
tests/integration/test_simulation.py's."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from client_sdk.clientapp.secure_aggregation import as_fit_result, secure_aggregation_mod
from protofuse.protocol import federation as wire
from protofuse.protocol import secure_sum
from protofuse.settings import FederationSettings, PrivacySettings, TrainingSettings
from protofuse.spec import Spec
from protofuse_server.fusion import defences
from protofuse_server.fusion.aggregation import to_record
from protofuse_server.fusion.secure_aggregation import _CheckedGrid

MOD = 2**32
# The client's side builds Flower Messages by hand.
pytestmark = pytest.mark.usefixtures("as_a_node")  # tests/conftest.py


def flower_mean(vectors: list[list[np.ndarray]], weights: list[int]) -> list[np.ndarray]:
    """The mean SecAgg+ unmasks, by Flower's own arithmetic: each client scales its vector by its
    stated weight, quantizes it (clipped to the range) and prepends the weight; the server sums
    modulo 2**32 (the masks cancel in the sum and are left out here), dequantizes and divides by
    the summed weight."""
    total = None
    for vector, weight in zip(vectors, weights, strict=True):
        q_ratio = round(weight * secure_sum.QUANTIZATION_RANGE)
        scaled = [v * (q_ratio / secure_sum.QUANTIZATION_RANGE) for v in vector]
        q = quantize(scaled, secure_sum.CLIP_RANGE, secure_sum.QUANTIZATION_RANGE)
        q = [a.astype(np.int64) for a in factor_combine(q_ratio, q)]
        total = q if total is None else parameters_addition(total, q)
    assert total is not None
    q_total, summed = factor_extract(parameters_mod(total, MOD))
    mean = dequantize(summed, secure_sum.CLIP_RANGE, secure_sum.QUANTIZATION_RANGE)
    return [
        (m - (len(vectors) - 1) * secure_sum.CLIP_RANGE) * (secure_sum.QUANTIZATION_RANGE / q_total)
        for m in mean
    ]


def _sent(rng: np.random.Generator, n_labels: int) -> dict[str, np.ndarray]:
    return {
        "encoder.w": rng.normal(size=(3, 4)).astype(np.float32),
        "prototypes": rng.normal(size=(n_labels, 4)).astype(np.float32),
        "bias": rng.normal(size=n_labels).astype(np.float32),
        "steps": np.array(5, dtype=np.int64),  # an integer array: never masked, never moved
    }


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 7),
    n_labels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-4, 1e-2, 0.5]),
)
def test_the_step_from_flowers_mean_is_the_equal_weight_rowwise_mean(k, n_labels, seed, scale):
    rng = np.random.default_rng(seed)
    sent = _sent(rng, n_labels)
    covers = (rng.random((k, n_labels)) < 0.6).astype(float)
    trained = [
        {
            key: (v + scale * rng.normal(size=v.shape)).astype(v.dtype)
            if np.issubdtype(v.dtype, np.floating)
            else v
            for key, v in sent.items()
        }
        for _ in range(k)
    ]
    vectors = [
        secure_sum.masked_vector(sent, t, covers[i], rowwise=True) for i, t in enumerate(trained)
    ]
    assert [v.shape for v in vectors[0]] == secure_sum.layout(sent)
    step = secure_sum.step(flower_mean(vectors, [1] * k), sent, covers, rowwise=True)

    # What the plain path computes with every client weighing 1 and nothing clipped.
    deltas = defences.deltas_of(trained, sent)
    bounds = defences.Bounds(clip_factor=None)
    expected = defences.combine(deltas, np.ones(k), covers, bounds, rowwise=True)
    assert set(step) == set(expected) == {"encoder.w", "prototypes", "bias"}
    # Stochastic rounding: off by under one quantization step per client, per value.
    q = 2 * secure_sum.CLIP_RANGE / secure_sum.QUANTIZATION_RANGE
    for key in step:
        np.testing.assert_allclose(step[key], expected[key], rtol=0, atol=k * q)
    # A row nobody covers does not move.
    assert not step["prototypes"][covers.sum(0) == 0].any()


def test_a_client_stating_a_larger_weight_spoils_the_canary_and_the_sum_is_refused():
    rng = np.random.default_rng(0)
    sent = _sent(rng, 3)
    covers = np.ones((4, 3))
    trained = {k: v + 0.01 if v.dtype == np.float32 else v for k, v in sent.items()}
    vectors = [secure_sum.masked_vector(sent, trained, covers[i], True) for i in range(4)]
    assert secure_sum.step(flower_mean(vectors, [1, 1, 1, 1]), sent, covers, True)
    for weight in (2, 10, 1000):
        with pytest.raises(secure_sum.SecureSumError, match="canary"):
            secure_sum.step(flower_mean(vectors, [1, 1, 1, weight]), sent, covers, True)


def test_a_mean_outside_the_clipping_range_or_of_another_layout_is_refused():
    rng = np.random.default_rng(1)
    sent = _sent(rng, 2)
    covers = np.ones((2, 2))
    good = [np.zeros(s) for s in secure_sum.layout(sent)[:-1]] + [np.array([secure_sum.CLIP_RANGE])]
    assert secure_sum.step(good, sent, covers, True)
    forged = [a.copy() for a in good]
    forged[1][0, 0] = 100.0  # only a forged masked vector can put the mean there
    with pytest.raises(secure_sum.SecureSumError, match="forged"):
        secure_sum.step(forged, sent, covers, True)
    with pytest.raises(secure_sum.SecureSumError, match="shapes"):
        secure_sum.step(good[1:], sent, covers, True)


def _raw(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


LAYOUT = [(3, 4), (2,), (1,)]  # a round's arrays (the canary last)


def _honest_vector() -> list[bytes]:
    return [_raw(np.array([2**22]))] + [_raw(np.zeros(s, np.int64)) for s in LAYOUT]


def _exchange(stage: str, reply_configs: dict, node: int = 2) -> Message:
    """One stage of SecAgg+ through the server's checks: a message to ``node`` asking for
    ``stage``, answered with ``reply_configs``; what the workflow gets back."""
    from flwr.common import Code, FitRes, Parameters, Status
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.compat.common import recorddict_compat as compat

    asked = Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})}),
        dst_node_id=node,
        message_type="train",
    )
    content = compat.fitres_to_recorddict(
        FitRes(Status(Code.OK, "ok"), Parameters([], ""), 1, {}), keep_input=True
    )
    content[RECORD_KEY_CONFIGS] = ConfigRecord(reply_configs)

    class Nodes:  # the real grid's part the check uses: send, then receive the replies
        def send_and_receive(self, messages, *, timeout=None):
            return [Message(content, reply_to=m) for m in messages]

    refused: list[int] = []
    checked = _CheckedGrid(Nodes(), {1, 2, 3}, LAYOUT, lambda n, why: refused.append(n))  # type: ignore[arg-type]
    (reply,) = checked.send_and_receive([asked])
    assert reply.has_error() == bool(refused)
    return reply


def _public_key() -> bytes:
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    return public_key_to_bytes(generate_key_pairs()[1])


def test_well_formed_replies_of_every_stage_reach_flower():
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    assert not _exchange(
        Stage.SETUP, {Key.PUBLIC_KEY_1: _public_key(), Key.PUBLIC_KEY_2: _public_key()}
    ).has_error()
    assert not _exchange(
        Stage.SHARE_KEYS, {Key.DESTINATION_LIST: [1, 3], Key.CIPHERTEXT_LIST: [b"x", b"y"]}
    ).has_error()
    assert not _exchange(
        Stage.COLLECT_MASKED_VECTORS, {Key.MASKED_PARAMETERS: _honest_vector()}
    ).has_error()
    assert not _exchange(
        Stage.UNMASK, {Key.NODE_ID_LIST: [1, 2], Key.SHARE_LIST: [b"s", b"t"]}
    ).has_error()


_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=64),
    st.text(max_size=8),
    st.lists(st.integers(-5, 5), max_size=4),
    st.lists(st.binary(max_size=8), max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(
    stage=st.sampled_from(["setup", "share_keys", "collect_masked_vectors", "unmask"]),
    configs=st.dictionaries(
        st.sampled_from(["pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares"]),
        _values,
        max_size=4,
    ),
)
def test_a_malformed_reply_of_any_stage_is_refused_never_raised(stage, configs):
    """Whatever a client answers, the server's check answers for it: the reply is passed on only
    when the workflow can read it, else turned into an error reply (a dropout, a strike)."""
    reply = _exchange(stage, configs)  # never raises
    if not reply.has_error():  # then it holds what Flower reads next, of the right types
        from protofuse_server.fusion.secure_aggregation import _list_of

        got = reply.content.config_records["secaggplus_configs"]
        if stage == "share_keys":
            assert len(_list_of(got, "dsts", int)) == len(_list_of(got, "ctxts", bytes))
        if stage == "unmask":
            assert set(_list_of(got, "nids", int)) <= {1, 2, 3}


@settings(max_examples=100, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=0, max_size=4),
    dtype=st.sampled_from([np.int64, np.uint64, np.int32, np.float64]),
    high=st.sampled_from([0, 2**32]),
)
def test_only_masked_vectors_of_the_rounds_layout_are_summed(shapes, dtype, high):
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    candidate = [tuple(s) for s in shapes]
    vector = [_raw(np.array([2**22]))] + [
        _raw(np.full(s, high, np.int64).astype(dtype)) for s in candidate
    ]
    reply = _exchange(Stage.COLLECT_MASKED_VECTORS, {Key.MASKED_PARAMETERS: vector})
    well_formed = candidate == LAYOUT and dtype == np.int64 and high == 0
    assert reply.has_error() != well_formed
    for bad in (
        [b""],
        [b"PK\x03\x04junk"],
        "not a list",
        [_raw(np.zeros(0, np.int64)), *vector[1:]],
    ):
        assert _exchange(Stage.COLLECT_MASKED_VECTORS, {Key.MASKED_PARAMETERS: bad}).has_error()


def test_secure_aggregation_refuses_a_robust_combination_rule_naming_the_fields():
    with pytest.raises(ValueError, match=r"federation.combine.*privacy.mode = 'secagg'"):
        Spec(
            privacy=PrivacySettings(mode="secagg"),
            federation=FederationSettings(combine="median"),
        )
    with pytest.raises(ValueError, match="secagg_threshold"):
        PrivacySettings(mode="secagg", secagg_threshold=0)


# -- the client's side ------------------------------------------------------------------------


def _round(sent: dict[str, np.ndarray], phase: str = "consensus") -> Message:
    plan = wire.RoundPlan(
        1,
        phase,
        0,
        2,
        ("a", "b", "c"),
        {"x_dim": 4},
        TrainingSettings(),
        FederationSettings(),
    )
    config = ConfigRecord({wire.ROUND_PLAN_KEY: wire.encode_round_plan(plan)})
    return Message(
        RecordDict({"arrays": to_record(sent), "config": config}),
        dst_node_id=7,
        message_type="train",
    )


def _reply(msg: Message, trained: dict[str, np.ndarray]) -> Message:
    dist = wire.ExpertDistribution("e", ("a", "c"), 1, wire.DiscriminativeHead(0.0, (0.0, 0.0)))
    stats = wire.ImitatorStats("e", 1, 10, 20, wire.Fidelity(1.0, 0.0, 2), None, 0.5)
    fusion = ConfigRecord(
        {"distribution": wire.encode_distribution(dist), "stats": wire.encode_stats(stats)}
    )
    from flwr.app import MetricRecord

    return Message(
        RecordDict(
            {
                "arrays": to_record(trained),
                "metrics": MetricRecord({"num-examples": 10}),
                "fusion": fusion,
            }
        ),
        reply_to=msg,
    )


def test_the_client_masks_its_change_with_weight_one_and_keeps_its_weights():
    rng = np.random.default_rng(2)
    sent = _sent(rng, 3)
    trained = {k: v + 0.25 if v.dtype == np.float32 else v for k, v in sent.items()}
    msg = _round(sent)
    out = as_fit_result(msg, _reply(msg, trained))
    assert "arrays" not in out.content.array_records  # the trained weights are not in it
    assert out.content.metric_records["fitres.num_examples"]["num_examples"] == 1
    vector = [a.numpy() for a in out.content.array_records["fitres.parameters"].values()]
    assert [v.shape for v in vector] == secure_sum.layout(sent)
    by_key = dict(zip(secure_sum.float_keys(sent), vector, strict=False))
    np.testing.assert_allclose(by_key["encoder.w"], 0.25, atol=1e-6)
    # Its expert covers labels a and c: row b, which it does not cover, is not in its vector.
    np.testing.assert_allclose(by_key["prototypes"][[0, 2]], 0.25, atol=1e-6)
    assert not by_key["prototypes"][1].any() and by_key["bias"][1] == 0
    assert vector[-1][0] == secure_sum.CLIP_RANGE
    assert set(out.content.config_records["fusion"]) == {"distribution", "stats"}


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_round_with_weights():
    sent = _sent(np.random.default_rng(3), 3)
    context = Context(1, 7, {"require-secure-aggregation": True}, RecordDict(), {})
    msg = _round(sent)

    def handler(m: Message, c: Context) -> Message:
        return _reply(m, sent)

    with pytest.raises(wire.WireError, match="requires secure aggregation"):
        secure_aggregation_mod(msg, context, handler)
    # A round that sends no weights back (the agreement round) is answered.
    empty = _reply(msg, {})
    assert secure_aggregation_mod(msg, context, lambda m, c: empty) is empty
    # Without the setting a plain round is answered as it always was.
    plain = Context(1, 7, {}, RecordDict(), {})
    assert "arrays" in secure_aggregation_mod(msg, plain, handler).content.array_records
