"""The wire format (protofuse/protocol/federation.py, protos/): round trips (examples and
hypothesis), validation of every field on both sides, version skew, garbage bytes, determinism, and
that the
committed generated code matches the schemas."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protofuse.families import FAMILIES
from protofuse.protocol.federation import (
    FORMAT_VERSION,
    MAX_LABEL_LENGTH,
    MAX_LABELS,
    MAX_QUERIES,
    MAX_X_DIM,
    PHASES,
    BankManifest,
    DiscriminativeHead,
    ExpertDistribution,
    Gaussian,
    GenerativeMoments,
    ImitatorStats,
    NodeDescription,
    RoundPlan,
    WireError,
    decode_distribution,
    decode_manifest,
    decode_node_description,
    decode_round_plan,
    decode_stats,
    encode_distribution,
    encode_manifest,
    encode_node_description,
    encode_round_plan,
    encode_stats,
)
from protofuse.records import ExpertRecord, Fidelity
from protofuse.settings import FederationSettings, TrainingSettings
from protofuse.v1 import bank_pb2, federation_pb2

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
NAN, INF = math.nan, math.inf


def _covariance(w: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(w, w))
    return a @ a.T + np.eye(w)  # may be asymmetric in the last bits: the codec must tolerate it


DISCRIMINATIVE = ExpertDistribution(
    pseudonym="expert-1.a_b",
    label_names=("cat", "dog", "eel"),
    round=4,
    head=DiscriminativeHead(log_temperature=-0.25, label_bias=(0.5, -1.0, 2.0)),
)
GENERATIVE = ExpertDistribution(
    pseudonym="expert-2",
    label_names=("dog", "fox"),
    round=7,
    head=GenerativeMoments(
        prior=Gaussian(mean=np.zeros(3), cov=np.eye(3)),
        posterior=Gaussian(mean=np.array([0.1, -2.0, 3.5]), cov=_covariance(3, seed=0)),
    ),
)
STATS = ImitatorStats(
    pseudonym="expert-1.a_b",
    round=4,
    n_examples=120,
    n_queries=500,
    fidelity=Fidelity(agreement=0.9, kl=0.12, n=40),
    consensus_agreement=0.75,
    loss=0.33,
)
MANIFEST = BankManifest(
    version="bank-3",
    round=4,
    vocabulary=("cat", "dog", "eel", "fox"),
    weights_digest="0123456789abcdef" * 4,
    family="discriminative",
    experts=(
        ExpertRecord(
            "expert-1.a_b",
            ("cat", "dog", "eel"),
            Fidelity(0.9, 0.12, 40),
            500,
            0.75,
            0.8,
            n_examples=120,
            last_round=4,
        ),
        ExpertRecord(
            "expert-2",
            ("dog", "fox"),
            Fidelity(1.0, 0.0, 0),
            0,
            None,
            1.0,
            n_examples=0,
            last_round=2,
        ),
    ),
)
NODE = NodeDescription(
    pseudonym="expert-1.a_b",
    label_names=("cat", "dog", "eel"),
    x_dim=64,
    n_queries=500,
    x_range=(0.0, 16.0),
)
PLAN = RoundPlan(
    round=4,
    phase="weighted",
    phase_round=1,
    phase_rounds=3,
    vocabulary=("cat", "dog", "eel", "fox"),
    model={"x_dim": 64, "feat_dim": 32, "encoder": "conv", "image_shape": [8, 8]},
    training=TrainingSettings(seed=3, lr=1e-3),
    federation=FederationSettings(rounds=6, aggregation="fedavg"),
)


def _reencode(message_cls: type, data: bytes, mutate: Callable) -> bytes:
    """Parse valid bytes into the generated class, break it as a hostile sender would, serialise."""
    msg = message_cls()
    msg.ParseFromString(data)
    mutate(msg)
    return msg.SerializeToString()


def _assert_names(err: pytest.ExceptionInfo, path: str) -> None:
    text = str(err.value)
    assert text.startswith(path), f"expected the error to name {path!r}, got {text!r}"
    assert "; " in text, f"the error should say how to fix it: {text!r}"


def _set(seq, i: int, value) -> None:
    seq[i] = value


# ---------------------------------------------------------------------------------------------
# Round trips and determinism
# ---------------------------------------------------------------------------------------------


def test_discriminative_distribution_round_trips():
    decoded = decode_distribution(encode_distribution(DISCRIMINATIVE))
    assert decoded == DISCRIMINATIVE
    assert isinstance(decoded.head, DiscriminativeHead)
    assert decoded.label_names == ("cat", "dog", "eel")


def test_generative_distribution_round_trips():
    decoded = decode_distribution(encode_distribution(GENERATIVE), w_dim=3)
    assert (decoded.pseudonym, decoded.label_names, decoded.round) == (
        "expert-2",
        ("dog", "fox"),
        7,
    )
    assert isinstance(decoded.head, GenerativeMoments)
    for got, sent in (
        (decoded.head.prior, GENERATIVE.head.prior),
        (decoded.head.posterior, GENERATIVE.head.posterior),
    ):
        assert got.mean.shape == (3,) and got.cov.shape == (3, 3) and got.cov.dtype == np.float64
        np.testing.assert_array_equal(got.mean, sent.mean)
        np.testing.assert_array_equal(got.cov, sent.cov)  # doubles travel exactly, row-major
    assert decoded == GENERATIVE


def test_stats_round_trip_keeps_optional_fields_and_their_absence():
    assert decode_stats(encode_stats(STATS)) == STATS
    bare = dataclasses.replace(STATS, consensus_agreement=None, loss=None)
    assert decode_stats(encode_stats(bare)) == bare
    # Presence, not truthiness: a measured 0.0 must not come back as "not measured".
    zeros = dataclasses.replace(STATS, consensus_agreement=0.0, loss=0.0, n_examples=0, n_queries=0)
    decoded = decode_stats(encode_stats(zeros))
    assert decoded.consensus_agreement == 0.0 and decoded.loss == 0.0
    assert decoded == zeros


def test_manifest_round_trips():
    decoded = decode_manifest(encode_manifest(MANIFEST))
    assert decoded == MANIFEST
    assert not decoded.experts[1].consensus_measured and math.isnan(
        decoded.experts[1].consensus
    )  # absent: not measured
    assert (
        decoded.experts[0].name == decoded.experts[0].pseudonym == "expert-1.a_b"
        and decoded.experts[0].trust == 0.8
    )
    empty = dataclasses.replace(MANIFEST, experts=(), family="generative")
    assert decode_manifest(encode_manifest(empty)) == empty


@pytest.mark.parametrize(
    "value, encode, decode",
    [
        (DISCRIMINATIVE, encode_distribution, decode_distribution),
        (GENERATIVE, encode_distribution, decode_distribution),
        (STATS, encode_stats, decode_stats),
        (MANIFEST, encode_manifest, decode_manifest),
        (NODE, encode_node_description, decode_node_description),
        (PLAN, encode_round_plan, decode_round_plan),
    ],
    ids=["discriminative", "generative", "stats", "manifest", "node", "plan"],
)
def test_encoding_is_deterministic(value, encode, decode):
    first = encode(value)
    assert encode(value) == first
    assert encode(decode(first)) == first


def test_gaussians_are_equal_only_when_both_moments_are():
    # the round-trip tests compare distributions with ==: it must see every moment
    g = Gaussian(mean=np.zeros(2), cov=np.eye(2))
    assert g == Gaussian(mean=np.zeros(2), cov=np.eye(2))
    assert g != Gaussian(mean=np.zeros(2), cov=2 * np.eye(2))
    assert g != Gaussian(mean=np.ones(2), cov=np.eye(2))


def test_lists_are_stored_as_tuples_and_arrays_are_frozen_copies():
    mean = np.array([1.0, 2.0])
    g = Gaussian(mean=mean, cov=np.eye(2))
    mean[0] = 99.0
    assert g.mean[0] == 1.0
    with pytest.raises(ValueError):
        g.mean[0] = 5.0
    d = ExpertDistribution("p", ["a", "b"], 0, DiscriminativeHead(0.0, [1.0, 2.0]))
    assert d.label_names == ("a", "b") and d.head.label_bias == (1.0, 2.0)
    assert decode_distribution(encode_distribution(d)) == d


def test_format_version_is_written():
    msg = federation_pb2.ExpertDistribution()
    msg.ParseFromString(encode_distribution(DISCRIMINATIVE))
    assert msg.format_version == FORMAT_VERSION == 1


# ---------------------------------------------------------------------------------------------
# Decoding refuses every invalid field, naming it
# ---------------------------------------------------------------------------------------------

DISTRIBUTION_CASES = [
    # (id, valid message to start from, mutation of the protobuf, field path the error must name)
    (
        "format missing",
        DISCRIMINATIVE,
        lambda m: m.ClearField("format_version"),
        "ExpertDistribution.format_version",
    ),
    (
        "format future",
        DISCRIMINATIVE,
        lambda m: setattr(m, "format_version", 2),
        "ExpertDistribution.format_version",
    ),
    (
        "pseudonym empty",
        DISCRIMINATIVE,
        lambda m: setattr(m, "pseudonym", ""),
        "ExpertDistribution.pseudonym",
    ),
    (
        "pseudonym too long",
        DISCRIMINATIVE,
        lambda m: setattr(m, "pseudonym", "x" * 129),
        "ExpertDistribution.pseudonym",
    ),
    (
        "pseudonym space",
        DISCRIMINATIVE,
        lambda m: setattr(m, "pseudonym", "alice smith"),
        "ExpertDistribution.pseudonym",
    ),
    (
        "pseudonym slash",
        DISCRIMINATIVE,
        lambda m: setattr(m, "pseudonym", "../etc"),
        "ExpertDistribution.pseudonym",
    ),
    (
        "pseudonym newline",
        DISCRIMINATIVE,
        lambda m: setattr(m, "pseudonym", "alice\n"),
        "ExpertDistribution.pseudonym",
    ),
    (
        "pseudonym unicode",
        DISCRIMINATIVE,
        lambda m: setattr(m, "pseudonym", "émile"),
        "ExpertDistribution.pseudonym",
    ),
    (
        "no labels",
        DISCRIMINATIVE,
        lambda m: m.ClearField("label_names"),
        "ExpertDistribution.label_names:",
    ),
    (
        "empty label",
        DISCRIMINATIVE,
        lambda m: _set(m.label_names, 1, ""),
        "ExpertDistribution.label_names[1]",
    ),
    (
        "duplicate label",
        DISCRIMINATIVE,
        lambda m: (m.label_names.append("cat"), m.discriminative.label_bias.append(0.0)),
        "ExpertDistribution.label_names[3]",
    ),
    (
        "bias nan",
        DISCRIMINATIVE,
        lambda m: _set(m.discriminative.label_bias, 1, NAN),
        "ExpertDistribution.discriminative.label_bias[1]",
    ),
    (
        "bias +inf",
        DISCRIMINATIVE,
        lambda m: _set(m.discriminative.label_bias, 2, INF),
        "ExpertDistribution.discriminative.label_bias[2]",
    ),
    (
        "bias -inf",
        DISCRIMINATIVE,
        lambda m: _set(m.discriminative.label_bias, 0, -INF),
        "ExpertDistribution.discriminative.label_bias[0]",
    ),
    (
        "too few biases",
        DISCRIMINATIVE,
        lambda m: m.discriminative.label_bias.pop(),
        "ExpertDistribution.discriminative.label_bias:",
    ),
    (
        "too many biases",
        DISCRIMINATIVE,
        lambda m: m.discriminative.label_bias.append(1.0),
        "ExpertDistribution.discriminative.label_bias:",
    ),
    (
        "no biases",
        DISCRIMINATIVE,
        lambda m: m.discriminative.ClearField("label_bias"),
        "ExpertDistribution.discriminative.label_bias:",
    ),
    (
        "temperature nan",
        DISCRIMINATIVE,
        lambda m: setattr(m.discriminative, "log_temperature", NAN),
        "ExpertDistribution.discriminative.log_temperature",
    ),
    (
        "temperature inf",
        DISCRIMINATIVE,
        lambda m: setattr(m.discriminative, "log_temperature", INF),
        "ExpertDistribution.discriminative.log_temperature",
    ),
    (
        "temperature high",
        DISCRIMINATIVE,
        lambda m: setattr(m.discriminative, "log_temperature", 20.5),
        "ExpertDistribution.discriminative.log_temperature",
    ),
    (
        "temperature low",
        DISCRIMINATIVE,
        lambda m: setattr(m.discriminative, "log_temperature", -21.0),
        "ExpertDistribution.discriminative.log_temperature",
    ),
    (
        "no family",
        DISCRIMINATIVE,
        lambda m: m.ClearField("discriminative"),
        "ExpertDistribution.family",
    ),
    (
        "no family (generative)",
        GENERATIVE,
        lambda m: m.ClearField("family"),
        "ExpertDistribution.family",
    ),
    (
        "empty moments",
        GENERATIVE,
        lambda m: (m.ClearField("generative"), m.generative.SetInParent()),
        "ExpertDistribution.generative.prior",
    ),
    (
        "prior missing",
        GENERATIVE,
        lambda m: m.generative.ClearField("prior"),
        "ExpertDistribution.generative.prior",
    ),
    (
        "posterior missing",
        GENERATIVE,
        lambda m: m.generative.ClearField("posterior"),
        "ExpertDistribution.generative.posterior",
    ),
    (
        "mean nan",
        GENERATIVE,
        lambda m: _set(m.generative.prior.mean, 2, NAN),
        "ExpertDistribution.generative.prior.mean",
    ),
    (
        "mean inf",
        GENERATIVE,
        lambda m: _set(m.generative.posterior.mean, 0, -INF),
        "ExpertDistribution.generative.posterior.mean",
    ),
    (
        "covariance nan",
        GENERATIVE,
        lambda m: _set(m.generative.prior.covariance, 4, NAN),
        "ExpertDistribution.generative.prior.covariance",
    ),
    (
        "covariance inf",
        GENERATIVE,
        lambda m: _set(m.generative.posterior.covariance, 1, INF),
        "ExpertDistribution.generative.posterior.covariance",
    ),
    (
        "covariance short",
        GENERATIVE,
        lambda m: m.generative.prior.covariance.pop(),
        "ExpertDistribution.generative.prior.covariance",
    ),
    (
        "covariance long",
        GENERATIVE,
        lambda m: m.generative.posterior.covariance.append(0.0),
        "ExpertDistribution.generative.posterior.covariance",
    ),
    (
        "mean without covariance",
        GENERATIVE,
        lambda m: m.generative.prior.ClearField("covariance"),
        "ExpertDistribution.generative.prior.covariance",
    ),
    (
        "empty gaussian",
        GENERATIVE,
        lambda m: (
            m.generative.prior.ClearField("mean"),
            m.generative.prior.ClearField("covariance"),
        ),
        "ExpertDistribution.generative.prior.mean",
    ),
    (
        "asymmetric",
        GENERATIVE,
        lambda m: _set(
            m.generative.posterior.covariance, 1, m.generative.posterior.covariance[1] + 0.5
        ),
        "ExpertDistribution.generative.posterior.covariance",
    ),
    (
        "negative variance",
        GENERATIVE,
        lambda m: _set(m.generative.prior.covariance, 8, -1.0),
        "ExpertDistribution.generative.prior.covariance",
    ),
    (
        "posterior in another space",
        GENERATIVE,
        lambda m: (
            m.generative.posterior.mean.append(0.0),
            m.generative.posterior.ClearField("covariance"),
            m.generative.posterior.covariance.extend(np.eye(4).ravel().tolist()),
        ),
        "ExpertDistribution.generative.posterior.mean",
    ),
]


@pytest.mark.parametrize(
    "start, mutate, path",
    [c[1:] for c in DISTRIBUTION_CASES],
    ids=[c[0] for c in DISTRIBUTION_CASES],
)
def test_decode_distribution_refuses(start, mutate, path):
    data = _reencode(federation_pb2.ExpertDistribution, encode_distribution(start), mutate)
    with pytest.raises(WireError) as err:
        decode_distribution(data)
    _assert_names(err, path)


STATS_CASES = [
    ("format missing", lambda m: m.ClearField("format_version"), "ImitatorStats.format_version"),
    ("format future", lambda m: setattr(m, "format_version", 3), "ImitatorStats.format_version"),
    ("pseudonym empty", lambda m: setattr(m, "pseudonym", ""), "ImitatorStats.pseudonym"),
    ("pseudonym bad", lambda m: setattr(m, "pseudonym", "a;b"), "ImitatorStats.pseudonym"),
    ("pseudonym too long", lambda m: setattr(m, "pseudonym", "p" * 200), "ImitatorStats.pseudonym"),
    ("fidelity missing", lambda m: m.ClearField("fidelity"), "ImitatorStats.fidelity"),
    (
        "agreement above 1",
        lambda m: setattr(m.fidelity, "agreement", 1.01),
        "ImitatorStats.fidelity.agreement",
    ),
    (
        "agreement below 0",
        lambda m: setattr(m.fidelity, "agreement", -0.01),
        "ImitatorStats.fidelity.agreement",
    ),
    (
        "agreement nan",
        lambda m: setattr(m.fidelity, "agreement", NAN),
        "ImitatorStats.fidelity.agreement",
    ),
    ("kl negative", lambda m: setattr(m.fidelity, "kl", -0.5), "ImitatorStats.fidelity.kl"),
    ("kl inf", lambda m: setattr(m.fidelity, "kl", INF), "ImitatorStats.fidelity.kl"),
    ("kl nan", lambda m: setattr(m.fidelity, "kl", NAN), "ImitatorStats.fidelity.kl"),
    (
        "consensus above 1",
        lambda m: setattr(m, "consensus_agreement", 1.5),
        "ImitatorStats.consensus_agreement",
    ),
    (
        "consensus below 0",
        lambda m: setattr(m, "consensus_agreement", -0.1),
        "ImitatorStats.consensus_agreement",
    ),
    (
        "consensus nan",
        lambda m: setattr(m, "consensus_agreement", NAN),
        "ImitatorStats.consensus_agreement",
    ),
    ("loss nan", lambda m: setattr(m, "loss", NAN), "ImitatorStats.loss"),
    ("loss inf", lambda m: setattr(m, "loss", INF), "ImitatorStats.loss"),
]


@pytest.mark.parametrize(
    "mutate, path", [c[1:] for c in STATS_CASES], ids=[c[0] for c in STATS_CASES]
)
def test_decode_stats_refuses(mutate, path):
    data = _reencode(federation_pb2.ImitatorStats, encode_stats(STATS), mutate)
    with pytest.raises(WireError) as err:
        decode_stats(data)
    _assert_names(err, path)


MANIFEST_CASES = [
    ("format missing", lambda m: m.ClearField("format_version"), "BankManifest.format_version"),
    ("format future", lambda m: setattr(m, "format_version", 7), "BankManifest.format_version"),
    ("version empty", lambda m: setattr(m, "version", ""), "BankManifest.version"),
    ("vocabulary empty", lambda m: m.ClearField("vocabulary"), "BankManifest.vocabulary:"),
    ("vocabulary empty name", lambda m: m.vocabulary.append(""), "BankManifest.vocabulary[4]"),
    ("vocabulary duplicate", lambda m: m.vocabulary.append("dog"), "BankManifest.vocabulary[4]"),
    (
        "digest uppercase",
        lambda m: setattr(m, "weights_digest", "0123456789ABCDEF" * 4),
        "BankManifest.weights_digest",
    ),
    (
        "digest short",
        lambda m: setattr(m, "weights_digest", "ab" * 31),
        "BankManifest.weights_digest",
    ),
    (
        "digest long",
        lambda m: setattr(m, "weights_digest", "ab" * 33),
        "BankManifest.weights_digest",
    ),
    (
        "digest not hex",
        lambda m: setattr(m, "weights_digest", "zz" * 32),
        "BankManifest.weights_digest",
    ),
    ("digest missing", lambda m: m.ClearField("weights_digest"), "BankManifest.weights_digest"),
    ("family missing", lambda m: m.ClearField("family"), "BankManifest.family"),
    ("family capitalised", lambda m: setattr(m, "family", "Discriminative"), "BankManifest.family"),
    ("family not a name", lambda m: setattr(m, "family", "two words"), "BankManifest.family"),
    (
        "expert pseudonym empty",
        lambda m: setattr(m.experts[0], "pseudonym", ""),
        "BankManifest.experts[0].pseudonym",
    ),
    (
        "expert pseudonym bad",
        lambda m: setattr(m.experts[1], "pseudonym", "bob smith"),
        "BankManifest.experts[1].pseudonym",
    ),
    (
        "expert duplicated",
        lambda m: setattr(m.experts[1], "pseudonym", "expert-1.a_b"),
        "BankManifest.experts[1].pseudonym",
    ),
    (
        "expert labels missing",
        lambda m: m.experts[0].ClearField("label_names"),
        "BankManifest.experts[0].label_names:",
    ),
    (
        "expert label outside vocabulary",
        lambda m: m.experts[0].label_names.append("yak"),
        "BankManifest.experts[0].label_names:",
    ),
    (
        "expert label duplicated",
        lambda m: m.experts[1].label_names.append("dog"),
        "BankManifest.experts[1].label_names[2]",
    ),
    (
        "expert label empty",
        lambda m: _set(m.experts[1].label_names, 0, ""),
        "BankManifest.experts[1].label_names[0]",
    ),
    (
        "trust above 1",
        lambda m: setattr(m.experts[0], "trust", 1.5),
        "BankManifest.experts[0].trust",
    ),
    (
        "trust below 0",
        lambda m: setattr(m.experts[1], "trust", -0.1),
        "BankManifest.experts[1].trust",
    ),
    ("trust nan", lambda m: setattr(m.experts[0], "trust", NAN), "BankManifest.experts[0].trust"),
    (
        "fidelity missing",
        lambda m: m.experts[1].ClearField("fidelity"),
        "BankManifest.experts[1].fidelity",
    ),
    (
        "fidelity agreement",
        lambda m: setattr(m.experts[0].fidelity, "agreement", 2.0),
        "BankManifest.experts[0].fidelity.agreement",
    ),
    (
        "fidelity kl",
        lambda m: setattr(m.experts[0].fidelity, "kl", -1.0),
        "BankManifest.experts[0].fidelity.kl",
    ),
    (
        "fidelity kl nan",
        lambda m: setattr(m.experts[1].fidelity, "kl", NAN),
        "BankManifest.experts[1].fidelity.kl",
    ),
    (
        "consensus above 1",
        lambda m: setattr(m.experts[0], "consensus_agreement", 1.2),
        "BankManifest.experts[0].consensus_agreement",
    ),
    (
        "consensus inf",
        lambda m: setattr(m.experts[1], "consensus_agreement", INF),
        "BankManifest.experts[1].consensus_agreement",
    ),
]


@pytest.mark.parametrize(
    "mutate, path", [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES]
)
def test_decode_manifest_refuses(mutate, path):
    data = _reencode(bank_pb2.BankManifest, encode_manifest(MANIFEST), mutate)
    with pytest.raises(WireError) as err:
        decode_manifest(data)
    _assert_names(err, path)


def test_bias_count_error_says_what_to_send():
    four = dataclasses.replace(
        DISCRIMINATIVE, label_names=("a", "b", "c", "d"), head=DiscriminativeHead(0.0, (0.0,) * 4)
    )
    data = _reencode(
        federation_pb2.ExpertDistribution,
        encode_distribution(four),
        lambda m: m.discriminative.label_bias.pop(),
    )
    with pytest.raises(WireError) as err:
        decode_distribution(data)
    assert str(err.value) == (
        "ExpertDistribution.discriminative.label_bias: 3 values for 4 labels; send one "
        "bias per label"
    )


def test_w_dim_is_enforced_for_generative_moments_only():
    data = encode_distribution(GENERATIVE)
    assert decode_distribution(data, w_dim=3) == GENERATIVE
    with pytest.raises(WireError) as err:
        decode_distribution(data, w_dim=4)
    _assert_names(err, "ExpertDistribution.generative.prior.mean")
    assert decode_distribution(encode_distribution(DISCRIMINATIVE), w_dim=4) == DISCRIMINATIVE
    for bad in (0, True, 2.5):  # a positive integer, and a bool is not one
        with pytest.raises(ValueError, match="w_dim"):
            decode_distribution(data, w_dim=bad)


def test_limits_themselves_are_accepted():
    edge = dataclasses.replace(
        DISCRIMINATIVE,
        pseudonym="P" * 128,
        label_names=("only",),
        head=DiscriminativeHead(log_temperature=20.0, label_bias=(0.0,)),
    )
    assert decode_distribution(encode_distribution(edge)) == edge
    ends = dataclasses.replace(
        STATS, fidelity=Fidelity(0.0, 0.0, 0), consensus_agreement=1.0, loss=-3.5
    )
    assert decode_stats(encode_stats(ends)) == ends


def test_covariance_symmetry_tolerates_rounding_only():
    cov = _covariance(3, seed=1)
    cov[0, 1] += 1e-13  # rounding-sized asymmetry: accepted
    fine = dataclasses.replace(
        GENERATIVE, head=GenerativeMoments(GENERATIVE.head.prior, Gaussian(np.ones(3), cov))
    )
    assert decode_distribution(encode_distribution(fine)) == fine
    cov[0, 1] += 1e-4
    bad = dataclasses.replace(
        GENERATIVE, head=GenerativeMoments(GENERATIVE.head.prior, Gaussian(np.ones(3), cov))
    )
    with pytest.raises(WireError) as err:
        encode_distribution(bad)
    _assert_names(err, "ExpertDistribution.generative.posterior.covariance")


# ---------------------------------------------------------------------------------------------
# Encoding refuses what decoding would refuse
# ---------------------------------------------------------------------------------------------

_replace = dataclasses.replace
_head = DISCRIMINATIVE.head
_expert = MANIFEST.experts[0]

ENCODE_CASES = [
    (
        "bias count",
        _replace(DISCRIMINATIVE, head=DiscriminativeHead(0.0, (1.0, 2.0))),
        "ExpertDistribution.discriminative.label_bias:",
    ),
    (
        "bias nan",
        _replace(DISCRIMINATIVE, head=DiscriminativeHead(0.0, (1.0, NAN, 2.0))),
        "ExpertDistribution.discriminative.label_bias[1]",
    ),
    (
        "bias not a number",
        _replace(DISCRIMINATIVE, head=DiscriminativeHead(0.0, (1.0, "2", 2.0))),
        "ExpertDistribution.discriminative.label_bias[1]",
    ),
    (
        "temperature inf",
        _replace(DISCRIMINATIVE, head=_replace(_head, log_temperature=INF)),
        "ExpertDistribution.discriminative.log_temperature",
    ),
    (
        "temperature high",
        _replace(DISCRIMINATIVE, head=_replace(_head, log_temperature=25)),
        "ExpertDistribution.discriminative.log_temperature",
    ),
    ("pseudonym bad", _replace(DISCRIMINATIVE, pseudonym="a b"), "ExpertDistribution.pseudonym"),
    ("pseudonym not text", _replace(DISCRIMINATIVE, pseudonym=7), "ExpertDistribution.pseudonym"),
    (
        "no labels",
        _replace(DISCRIMINATIVE, label_names=(), head=DiscriminativeHead(0.0, ())),
        "ExpertDistribution.label_names:",
    ),
    (
        "label not text",
        _replace(DISCRIMINATIVE, label_names=("cat", 2, "eel")),
        "ExpertDistribution.label_names[1]",
    ),
    (
        "label lone surrogate",
        _replace(DISCRIMINATIVE, label_names=("cat", "\ud800", "eel")),
        "ExpertDistribution.label_names[1]",
    ),
    ("round negative", _replace(DISCRIMINATIVE, round=-1), "ExpertDistribution.round"),
    ("round too big", _replace(DISCRIMINATIVE, round=2**64), "ExpertDistribution.round"),
    ("round bool", _replace(DISCRIMINATIVE, round=True), "ExpertDistribution.round"),
    ("round float", _replace(DISCRIMINATIVE, round=1.0), "ExpertDistribution.round"),
    ("no family", _replace(DISCRIMINATIVE, head=None), "ExpertDistribution.family"),
    (
        "covariance shape",
        _replace(
            GENERATIVE,
            head=GenerativeMoments(Gaussian(np.zeros(3), np.ones(9)), GENERATIVE.head.posterior),
        ),
        "ExpertDistribution.generative.prior.covariance",
    ),
    (
        "mean shape",
        _replace(
            GENERATIVE,
            head=GenerativeMoments(
                Gaussian(np.zeros((3, 1)), np.eye(3)), GENERATIVE.head.posterior
            ),
        ),
        "ExpertDistribution.generative.prior.mean",
    ),
    (
        "posterior dims",
        _replace(
            GENERATIVE,
            head=GenerativeMoments(GENERATIVE.head.prior, Gaussian(np.zeros(2), np.eye(2))),
        ),
        "ExpertDistribution.generative.posterior.mean",
    ),
    (
        "negative variance",
        _replace(
            GENERATIVE,
            head=GenerativeMoments(GENERATIVE.head.prior, Gaussian(np.zeros(3), -np.eye(3))),
        ),
        "ExpertDistribution.generative.posterior.covariance",
    ),
    (
        "posterior missing",
        _replace(GENERATIVE, head=GenerativeMoments(GENERATIVE.head.prior, None)),
        "ExpertDistribution.generative.posterior",
    ),
    (
        "stats agreement",
        _replace(STATS, fidelity=Fidelity(1.5, 0.0, 3)),
        "ImitatorStats.fidelity.agreement",
    ),
    ("stats kl", _replace(STATS, fidelity=Fidelity(0.5, -0.1, 3)), "ImitatorStats.fidelity.kl"),
    (
        "stats n negative",
        _replace(STATS, fidelity=Fidelity(0.5, 0.1, -3)),
        "ImitatorStats.fidelity.n",
    ),
    ("stats fidelity missing", _replace(STATS, fidelity=None), "ImitatorStats.fidelity"),
    ("stats queries negative", _replace(STATS, n_queries=-1), "ImitatorStats.n_queries"),
    ("stats examples negative", _replace(STATS, n_examples=-5), "ImitatorStats.n_examples"),
    ("stats loss nan", _replace(STATS, loss=NAN), "ImitatorStats.loss"),
    (
        "stats consensus",
        _replace(STATS, consensus_agreement=-0.1),
        "ImitatorStats.consensus_agreement",
    ),
    ("manifest version", _replace(MANIFEST, version=""), "BankManifest.version"),
    (
        "manifest digest",
        _replace(MANIFEST, weights_digest="AB" * 32),
        "BankManifest.weights_digest",
    ),
    ("manifest family", _replace(MANIFEST, family="generative "), "BankManifest.family"),
    (
        "manifest vocabulary",
        _replace(MANIFEST, vocabulary=("cat", "cat")),
        "BankManifest.vocabulary[1]",
    ),
    (
        "manifest duplicate experts",
        _replace(MANIFEST, experts=(_expert, _expert)),
        "BankManifest.experts[1].pseudonym",
    ),
    (
        "manifest unknown label",
        _replace(MANIFEST, experts=(_replace(_expert, labels=("cat", "yak")),)),
        "BankManifest.experts[0].label_names:",
    ),
    (
        "manifest trust",
        _replace(MANIFEST, experts=(_replace(_expert, weight=1.0001),)),
        "BankManifest.experts[0].trust",
    ),
    (
        "manifest consensus",
        _replace(MANIFEST, experts=(_replace(_expert, consensus=1.5),)),
        "BankManifest.experts[0].consensus_agreement",
    ),
    (
        "manifest last round",
        _replace(MANIFEST, experts=(_replace(_expert, last_round=-1),)),
        "BankManifest.experts[0].last_round",
    ),
    ("manifest expert type", _replace(MANIFEST, experts=("expert-1",)), "BankManifest.experts[0]"),
    (
        "manifest expert examples",
        _replace(MANIFEST, experts=(_replace(_expert, n_examples=-1),)),
        "BankManifest.experts[0].n_examples",
    ),
    (
        "manifest expert queries",
        _replace(MANIFEST, experts=(_replace(_expert, n_queries=-1),)),
        "BankManifest.experts[0].n_queries",
    ),
    ("manifest experts not a list", _replace(MANIFEST, experts=7), "BankManifest.experts"),
    ("manifest family not text", _replace(MANIFEST, family=3), "BankManifest.family"),
    (
        "bias not a list",
        _replace(DISCRIMINATIVE, head=DiscriminativeHead(0.0, 2.0)),
        "ExpertDistribution.discriminative.label_bias",
    ),
    ("labels a string", _replace(NODE, label_names="cat"), "NodeDescription.label_names"),
]


@pytest.mark.parametrize(
    "value, path", [c[1:] for c in ENCODE_CASES], ids=[c[0] for c in ENCODE_CASES]
)
def test_encode_refuses(value, path):
    encode = {
        ExpertDistribution: encode_distribution,
        ImitatorStats: encode_stats,
        BankManifest: encode_manifest,
        NodeDescription: encode_node_description,
        RoundPlan: encode_round_plan,
    }[type(value)]
    with pytest.raises(WireError) as err:
        encode(value)
    assert str(err.value).startswith(path), str(err.value)


def test_encode_refuses_the_wrong_dataclass():
    with pytest.raises(WireError, match=r"^ExpertDistribution"):
        encode_distribution(STATS)


# ---------------------------------------------------------------------------------------------
# The node description and the round plan: refusals by field, bounds, version skew
# ---------------------------------------------------------------------------------------------

NODE_CASES = [
    ("format missing", lambda m: m.ClearField("format_version"), "NodeDescription.format_version"),
    (
        "format future",
        lambda m: setattr(m, "format_version", FORMAT_VERSION + 1),
        "NodeDescription.format_version",
    ),
    ("pseudonym empty", lambda m: setattr(m, "pseudonym", ""), "NodeDescription.pseudonym"),
    ("pseudonym bad", lambda m: setattr(m, "pseudonym", "a/b"), "NodeDescription.pseudonym"),
    (
        "pseudonym too long",
        lambda m: setattr(m, "pseudonym", "p" * 129),
        "NodeDescription.pseudonym",
    ),
    ("no labels", lambda m: m.ClearField("label_names"), "NodeDescription.label_names:"),
    ("empty label", lambda m: _set(m.label_names, 2, ""), "NodeDescription.label_names[2]"),
    ("duplicate label", lambda m: m.label_names.append("dog"), "NodeDescription.label_names[3]"),
    (
        "label too long",
        lambda m: _set(m.label_names, 0, "c" * (MAX_LABEL_LENGTH + 1)),
        "NodeDescription.label_names[0]",
    ),
    (
        "too many labels",
        lambda m: (
            m.ClearField("label_names"),
            m.label_names.extend(str(i) for i in range(MAX_LABELS + 1)),
        ),
        "NodeDescription.label_names:",
    ),
    ("x_dim missing", lambda m: m.ClearField("x_dim"), "NodeDescription.x_dim"),
    ("x_dim too wide", lambda m: setattr(m, "x_dim", MAX_X_DIM + 1), "NodeDescription.x_dim"),
    ("n_queries zero", lambda m: setattr(m, "n_queries", 0), "NodeDescription.n_queries"),
    (
        "n_queries too many",
        lambda m: setattr(m, "n_queries", MAX_QUERIES + 1),
        "NodeDescription.n_queries",
    ),
    ("n_queries huge", lambda m: setattr(m, "n_queries", 2**64 - 1), "NodeDescription.n_queries"),
    ("x_range missing", lambda m: m.ClearField("x_range"), "NodeDescription.x_range"),
    ("x_range lo nan", lambda m: setattr(m.x_range, "lo", NAN), "NodeDescription.x_range.lo"),
    ("x_range hi inf", lambda m: setattr(m.x_range, "hi", INF), "NodeDescription.x_range.hi"),
    ("x_range lo -inf", lambda m: setattr(m.x_range, "lo", -INF), "NodeDescription.x_range.lo"),
    ("x_range reversed", lambda m: setattr(m.x_range, "lo", 17.0), "NodeDescription.x_range:"),
]


@pytest.mark.parametrize(
    "mutate, path", [c[1:] for c in NODE_CASES], ids=[c[0] for c in NODE_CASES]
)
def test_decode_node_description_refuses(mutate, path):
    data = _reencode(federation_pb2.NodeDescription, encode_node_description(NODE), mutate)
    with pytest.raises(WireError) as err:
        decode_node_description(data)
    _assert_names(err, path)


def _set_json(field: str, text: str) -> Callable:
    return lambda m: setattr(m, field, text)


PLAN_CASES = [
    ("format missing", lambda m: m.ClearField("format_version"), "RoundPlan.format_version"),
    (
        "format future",
        lambda m: setattr(m, "format_version", FORMAT_VERSION + 1),
        "RoundPlan.format_version",
    ),
    ("round zero", lambda m: setattr(m, "round", 0), "RoundPlan.round"),
    ("phase unset", lambda m: m.ClearField("phase"), "RoundPlan.phase"),
    ("phase unknown", lambda m: setattr(m, "phase", 9), "RoundPlan.phase"),
    ("phase_round past the phase", lambda m: setattr(m, "phase_round", 3), "RoundPlan.phase_round"),
    (
        "phase_rounds zero",
        lambda m: (setattr(m, "phase_rounds", 0), setattr(m, "phase_round", 0)),
        "RoundPlan.phase_rounds",
    ),
    ("phase_rounds huge", lambda m: setattr(m, "phase_rounds", 2**40), "RoundPlan.phase_rounds"),
    ("vocabulary empty", lambda m: m.ClearField("vocabulary"), "RoundPlan.vocabulary:"),
    ("vocabulary duplicate", lambda m: m.vocabulary.append("cat"), "RoundPlan.vocabulary[4]"),
    ("vocabulary empty name", lambda m: _set(m.vocabulary, 1, ""), "RoundPlan.vocabulary[1]"),
    (
        "vocabulary name too long",
        lambda m: _set(m.vocabulary, 3, "f" * (MAX_LABEL_LENGTH + 1)),
        "RoundPlan.vocabulary[3]",
    ),
    ("model not json", _set_json("model_json", "{x_dim: 64"), "RoundPlan.model_json"),
    ("model a list", _set_json("model_json", "[64, 32]"), "RoundPlan.model_json"),
    ("model missing", lambda m: m.ClearField("model_json"), "RoundPlan.model_json"),
    ("training not json", _set_json("training_json", "lr=0.1"), "RoundPlan.training_json"),
    ("training out of bounds", _set_json("training_json", '{"lr": -1}'), "RoundPlan.training_json"),
    (
        "training unknown setting",
        _set_json("training_json", '{"learning_rate": 0.1}'),
        "RoundPlan.training_json",
    ),
    (
        "federation out of bounds",
        _set_json("federation_json", '{"rounds": 0}'),
        "RoundPlan.federation_json",
    ),
    (
        "federation unknown aggregation",
        _set_json("federation_json", '{"aggregation": "median"}'),
        "RoundPlan.federation_json",
    ),
    ("federation missing", lambda m: m.ClearField("federation_json"), "RoundPlan.federation_json"),
]


@pytest.mark.parametrize(
    "mutate, path", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES]
)
def test_decode_round_plan_refuses(mutate, path):
    data = _reencode(federation_pb2.RoundPlan, encode_round_plan(PLAN), mutate)
    with pytest.raises(WireError) as err:
        decode_round_plan(data)
    _assert_names(err, path)


NEW_ENCODE_CASES = [
    ("node x_dim bool", _replace(NODE, x_dim=True), "NodeDescription.x_dim"),
    ("node x_dim zero", _replace(NODE, x_dim=0), "NodeDescription.x_dim"),
    ("node n_queries negative", _replace(NODE, n_queries=-1), "NodeDescription.n_queries"),
    ("node n_queries float", _replace(NODE, n_queries=10.0), "NodeDescription.n_queries"),
    ("node range reversed", _replace(NODE, x_range=(1.0, 0.0)), "NodeDescription.x_range:"),
    (
        "node range three values",
        _replace(NODE, x_range=(0.0, 0.5, 1.0)),
        "NodeDescription.x_range:",
    ),
    ("node range nan", _replace(NODE, x_range=(NAN, 1.0)), "NodeDescription.x_range.lo"),
    (
        "node label not text",
        _replace(NODE, label_names=("cat", 3)),
        "NodeDescription.label_names[1]",
    ),
    ("plan phase unknown", _replace(PLAN, phase="warmup"), "RoundPlan.phase"),
    ("plan round zero", _replace(PLAN, round=0), "RoundPlan.round"),
    ("plan phase_round", _replace(PLAN, phase_round=3), "RoundPlan.phase_round"),
    ("plan model not a dict", _replace(PLAN, model=[1, 2]), "RoundPlan.model_json"),
    ("plan model nan", _replace(PLAN, model={"x": NAN}), "RoundPlan.model_json"),
    ("plan model not json", _replace(PLAN, model={"x": object()}), "RoundPlan.model_json"),
    ("plan training a dict", _replace(PLAN, training={"lr": 0.1}), "RoundPlan.training_json"),
    (
        "plan federation swapped",
        _replace(PLAN, federation=TrainingSettings()),
        "RoundPlan.federation_json",
    ),
]


@pytest.mark.parametrize(
    "value, path", [c[1:] for c in NEW_ENCODE_CASES], ids=[c[0] for c in NEW_ENCODE_CASES]
)
def test_encode_refuses_what_the_new_messages_refuse(value, path):
    test_encode_refuses(value, path)


def test_version_skew_names_both_sides_formats():
    node = _reencode(
        federation_pb2.NodeDescription,
        encode_node_description(NODE),
        lambda m: setattr(m, "format_version", 2),
    )
    with pytest.raises(WireError) as err:
        decode_node_description(node)  # the server reads a newer client's description
    assert str(err.value) == (
        "NodeDescription.format_version: the client speaks federation format 2, this "
        "server format 1; run matching protofuse versions on both sides"
    )
    plan = _reencode(
        federation_pb2.RoundPlan, encode_round_plan(PLAN), lambda m: setattr(m, "format_version", 2)
    )
    with pytest.raises(WireError) as err:
        decode_round_plan(plan)  # a client reads a newer server's plan
    assert str(err.value) == (
        "RoundPlan.format_version: the server speaks federation format 2, this client "
        "format 1; run matching protofuse versions on both sides"
    )


def test_the_limits_of_a_node_description_are_accepted():
    edge = NodeDescription(
        "P" * 128,
        tuple(f"{i:0{MAX_LABEL_LENGTH}d}" for i in range(3)),
        MAX_X_DIM,
        MAX_QUERIES,
        (-1e300, -1e300),
    )
    assert decode_node_description(encode_node_description(edge)) == edge
    small = NodeDescription("a", ("only",), 1, 1, (0.0, 0.0))
    assert decode_node_description(encode_node_description(small)) == small


def test_the_round_plan_carries_validated_settings():
    decoded = decode_round_plan(encode_round_plan(PLAN))
    assert (
        isinstance(decoded.training, TrainingSettings)
        and decoded.training.lr == 1e-3
        and decoded.federation.aggregation == "fedavg"
    )
    assert decoded.model == PLAN.model and decoded.phase in PHASES
    msg = federation_pb2.RoundPlan()
    msg.ParseFromString(encode_round_plan(PLAN))
    assert (
        federation_pb2.Phase.Name(msg.phase) == "PHASE_WEIGHTED"
        and msg.format_version == FORMAT_VERSION
    )


def test_the_manifest_family_is_a_name_the_reader_checks_against_its_registry():
    other = encode_manifest(
        dataclasses.replace(MANIFEST, family="prism")
    )  # a family of some later protofuse
    assert decode_manifest(other).family == "prism"  # the codec checks the name's form only
    with pytest.raises(WireError) as err:
        decode_manifest(other, families=FAMILIES)
    _assert_names(err, "BankManifest.family")
    assert "discriminative, generative" in str(err.value)
    assert decode_manifest(encode_manifest(MANIFEST), families=FAMILIES) == MANIFEST


# ---------------------------------------------------------------------------------------------
# Round trips of arbitrary valid messages (hypothesis)
# ---------------------------------------------------------------------------------------------

_names = st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12
)  # any Unicode but lone surrogates
_pseudonyms = st.from_regex(r"[A-Za-z0-9_.\-]{1,128}", fullmatch=True)
_label_lists = st.lists(_names, min_size=1, max_size=8, unique=True).map(tuple)
_finite = st.floats(allow_nan=False, allow_infinity=False)
_json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _finite | _names
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_names, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def node_descriptions(draw: st.DrawFn) -> NodeDescription:
    lo, hi = sorted((draw(_finite), draw(_finite)))
    return NodeDescription(
        draw(_pseudonyms),
        draw(_label_lists),
        draw(st.integers(1, MAX_X_DIM)),
        draw(st.integers(1, MAX_QUERIES)),
        (lo, hi),
    )


@st.composite
def round_plans(draw: st.DrawFn) -> RoundPlan:
    phase_rounds = draw(st.integers(1, 100_000))
    training = TrainingSettings(
        seed=draw(st.integers(-(2**31), 2**31)),
        lr=draw(st.floats(1e-6, 1.0)),
        reweight=draw(st.booleans()),
    )
    federation = FederationSettings(
        rounds=draw(st.integers(1, 1000)), aggregation=draw(st.sampled_from(["rowwise", "fedavg"]))
    )
    model = draw(st.dictionaries(_names, _json, max_size=4))
    return RoundPlan(
        draw(st.integers(1, 2**63)),
        draw(st.sampled_from(PHASES)),
        draw(st.integers(0, phase_rounds - 1)),
        phase_rounds,
        draw(_label_lists),
        model,
        training,
        federation,
    )


@st.composite
def manifests(draw: st.DrawFn) -> BankManifest:
    vocabulary = draw(_label_lists)
    names = draw(st.lists(_pseudonyms, max_size=4, unique=True))
    experts = tuple(
        ExpertRecord(
            name,
            tuple(draw(st.lists(st.sampled_from(vocabulary), min_size=1, unique=True))),
            Fidelity(
                draw(st.floats(0, 1)), draw(st.floats(0, 1e6)), draw(st.integers(0, 2**64 - 1))
            ),
            draw(st.integers(0, 2**64 - 1)),
            draw(st.none() | st.floats(0, 1)),
            draw(st.floats(0, 1)),
            n_examples=draw(st.integers(0, 2**64 - 1)),
            last_round=draw(st.integers(0, 2**64 - 1)),
        )
        for name in names
    )
    return BankManifest(
        draw(_names),
        draw(st.integers(0, 2**64 - 1)),
        vocabulary,
        draw(st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
        draw(st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)),
        experts,
    )


_examples = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_examples
@given(node_descriptions())
def test_any_valid_node_description_round_trips(d):
    data = encode_node_description(d)
    assert (
        decode_node_description(data) == d
        and encode_node_description(decode_node_description(data)) == data
    )


@_examples
@given(round_plans())
def test_any_valid_round_plan_round_trips(p):
    data = encode_round_plan(p)
    assert decode_round_plan(data) == p and encode_round_plan(decode_round_plan(data)) == data


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # each example is several records: slower to draw
@given(manifests())
def test_any_valid_manifest_round_trips_as_expert_records(m):
    data = encode_manifest(m)
    assert decode_manifest(data) == m and encode_manifest(decode_manifest(data)) == data


@_examples
@given(node_descriptions(), st.integers(0, 2**32 - 1).filter(lambda v: v != FORMAT_VERSION))
def test_a_node_description_of_any_other_format_is_refused_by_its_version(d, version):
    data = _reencode(
        federation_pb2.NodeDescription,
        encode_node_description(d),
        lambda m: setattr(m, "format_version", version),
    )
    with pytest.raises(WireError) as err:
        decode_node_description(data)
    _assert_names(err, "NodeDescription.format_version")


# ---------------------------------------------------------------------------------------------
# Bytes that are not the message
# ---------------------------------------------------------------------------------------------

GARBAGE = {
    "empty": b"",
    "invalid tag": b"\xff\xff\xff\xff",
    "truncated": encode_distribution(DISCRIMINATIVE)[:-3],
    "invalid utf-8 string": b"\x08\x01\x12\x02\xc3\x28",
    "random": np.random.default_rng(0).bytes(97),
    "text": b"hello, world",
}


@pytest.mark.parametrize(
    "decode",
    [
        decode_distribution,
        decode_stats,
        decode_manifest,
        decode_node_description,
        decode_round_plan,
    ],
    ids=["distribution", "stats", "manifest", "node", "plan"],
)
@pytest.mark.parametrize("data", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_is_a_wire_error(decode, data):
    with pytest.raises(WireError):
        decode(data)


@pytest.mark.parametrize(
    "data, decode",
    [
        (encode_manifest(MANIFEST), decode_distribution),
        (encode_manifest(MANIFEST), decode_stats),
        (encode_distribution(DISCRIMINATIVE), decode_manifest),
        (encode_stats(STATS), decode_distribution),
        (encode_node_description(NODE), decode_round_plan),
        (encode_round_plan(PLAN), decode_node_description),
        (encode_distribution(DISCRIMINATIVE), decode_node_description),
    ],
    ids=[
        "manifest as distribution",
        "manifest as stats",
        "distribution as manifest",
        "stats as distribution",
        "node as plan",
        "plan as node",
        "distribution as node",
    ],
)
def test_another_message_is_a_wire_error(data, decode):
    with pytest.raises(WireError):
        decode(data)


def test_decoding_wants_bytes():
    with pytest.raises(TypeError):
        decode_stats("not bytes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The committed generated code matches the schemas
# ---------------------------------------------------------------------------------------------


def _proto_files() -> list[str]:
    return sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))


def _regenerate_command() -> str:
    sources = " ".join(f"protos/{p}" for p in _proto_files())
    return f".venv/bin/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. {sources}"


def _generated_names(proto: str) -> list[str]:
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]


def test_every_proto_has_generated_modules():
    protos = _proto_files()
    assert {"protofuse/v1/federation.proto", "protofuse/v1/bank.proto"} <= set(protos)
    missing = [name for p in protos for name in _generated_names(p) if not (REPO / name).is_file()]
    assert not missing, (
        f"no generated code for {missing}; regenerate from the repository root with:\n  "
        f"{_regenerate_command()}"
    )
    expected = {name for p in protos for name in _generated_names(p)}
    committed = {p.relative_to(REPO).as_posix() for p in (REPO / "protofuse").rglob("*_pb2.py*")}
    orphans = sorted(committed - expected)
    assert not orphans, (
        f"generated code without a .proto in protos/: {orphans}; delete it or restore its schema"
    )


def test_generated_code_is_not_stale(tmp_path):
    protos = _proto_files()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *(f"protos/{p}" for p in protos),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,  # the assertion below reports protoc's stderr
    )
    assert run.returncode == 0, (
        "protoc failed (is grpcio-tools installed? pip install -c constraints.txt -e "
        f"'.[test]'):\n{run.stderr}"
    )
    stale = [
        name
        for p in protos
        for name in _generated_names(p)
        if not (REPO / name).is_file()
        or (tmp_path / name).read_bytes() != (REPO / name).read_bytes()
    ]
    assert not stale, (
        "generated code is stale or was made by another grpcio-tools than constraints.txt pins: "
        f"{stale}\n"
        f"regenerate from the repository root with:\n  {_regenerate_command()}"
    )


def test_only_the_wire_modules_touch_generated_classes():
    # Everything else works with the wire modules' dataclasses, so a schema change stays in the
    # codecs (protofuse.protocol.federation: federation and bank; protofuse.protocol.review: peer
    # review; protofuse.protocol.service: the adaptation service).
    generated = {Path(name).stem for p in _proto_files() for name in _generated_names(p)}
    pattern = re.compile(
        r"(from|import)\s+protofuse[./]v1\b|\b(" + "|".join(map(re.escape, generated)) + r")\b"
    )
    offenders = []
    for folder in ("protofuse", "client_sdk", "server", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if rel in (
                "protofuse/protocol/federation.py",
                "protofuse/protocol/review.py",
                "protofuse/protocol/service.py",
            ) or rel.startswith("protofuse/v1/"):
                continue
            if pattern.search(path.read_text(encoding="utf-8")):
                offenders.append(rel)
    assert not offenders, (
        f"{offenders} use the generated protobuf classes; go through protofuse.protocol.federation "
        "instead"
    )


def test_numpy_arrays_given_for_tuple_fields_become_tuples_of_python_numbers():
    head = DiscriminativeHead(-0.25, np.array([0.5, -1.0, 2.0]))
    assert head.label_bias == (0.5, -1.0, 2.0)
    assert all(type(b) is float for b in head.label_bias)
    assert decode_distribution(encode_distribution(_replace(DISCRIMINATIVE, head=head))) == (
        DISCRIMINATIVE
    )


def test_gaussian_moments_are_stored_as_float64_whatever_they_were_given_as():
    g = Gaussian(mean=np.array([1, 2, 3]), cov=np.eye(3, dtype=np.float32))
    assert g.mean.dtype == np.float64 and g.cov.dtype == np.float64
    assert not g.mean.flags.writeable


def test_covariance_symmetry_is_relative_to_the_matrix_scale():
    """A covariance of entries near 1e6 may carry rounding asymmetry near 1e-5 (1e-9 of its
    scale); an absolute tolerance, or one divided by the scale, would refuse it."""
    cov = 1e6 * _covariance(3, seed=2)
    cov[0, 1] += 1e-5
    fine = dataclasses.replace(
        GENERATIVE, head=GenerativeMoments(GENERATIVE.head.prior, Gaussian(np.ones(3), cov))
    )
    assert decode_distribution(encode_distribution(fine)) == fine


@pytest.mark.parametrize("model", [["x_dim"], {1: "a"}, "x_dim"])
def test_a_round_plans_model_must_be_a_json_object_with_string_keys(model):
    with pytest.raises(WireError) as err:
        encode_round_plan(dataclasses.replace(PLAN, model=model))
    _assert_names(err, "RoundPlan.model_json")
