"""The one expert record and the one Fidelity (protofuse.records): what the bank, the server's
store, the strategy and the manifest codec share."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

import protofuse.bank
import protofuse.protocol.federation as wire
import protofuse.training
from protofuse.records import ExpertRecord, Fidelity
from protofuse_server.fusion import store


def test_there_is_one_fidelity_and_one_expert_record():
    assert protofuse.training.Fidelity is wire.Fidelity is Fidelity
    assert protofuse.bank.ExpertRecord is wire.ExpertRecord is ExpertRecord
    assert not hasattr(store, "ExpertState") and not hasattr(wire, "ManifestExpert")


def test_the_names_users_read_and_the_wire_names_are_the_same_fields():
    e = ExpertRecord(
        "org-a", ["0", "1"], Fidelity(0.9, 0.1, 40), 500, 0.8, 0.7, n_examples=400, last_round=3
    )
    assert (
        e.name,
        e.labels,
        e.fidelity.agreement,
        e.fidelity.kl,
        e.n_queries,
        e.consensus,
        e.weight,
    ) == ("org-a", ("0", "1"), 0.9, 0.1, 500, 0.8, 0.7)
    assert (e.pseudonym, e.label_names, e.trust) == (e.name, e.labels, e.weight)
    assert e.distribution == b"" and e.consensus_measured


def test_an_unmeasured_consensus_is_nan_and_records_still_compare_equal():
    a = ExpertRecord("a", ("0",), Fidelity(0.5, 0.2, 3), 10, None)
    b = ExpertRecord(
        "a", ("0",), Fidelity(0.5, 0.2, 3), 10, float("nan")
    )  # as SQLite's NULL or a saved bank's NaN come back
    assert math.isnan(a.consensus) and not a.consensus_measured
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != replace(a, consensus=0.5) and a != replace(a, last_round=1)
    unmeasured = replace(
        a, fidelity=Fidelity(float("nan"), float("nan"), 0)
    )  # a bank fitted without held-out queries
    assert unmeasured == replace(a, fidelity=Fidelity(float("nan"), float("nan"), 0))


def test_a_record_refuses_a_string_for_its_labels_and_copies_bytes():
    with pytest.raises(TypeError, match="labels"):
        ExpertRecord("a", "01", Fidelity(1.0, 0.0, 1), 1)
    assert (
        ExpertRecord(
            "a", ("0",), Fidelity(1.0, 0.0, 1), 1, distribution=bytearray(b"\x01")
        ).distribution
        == b"\x01"
    )


def test_a_records_distribution_is_its_own_immutable_copy():
    source = bytearray(b"\x01\x02")
    record = ExpertRecord("a", ("0",), Fidelity(1.0, 0.0, 1), 1, distribution=source)
    source[0] = 0xFF  # the caller's buffer changes; the record does not
    assert type(record.distribution) is bytes and record.distribution == b"\x01\x02"
    hash(record.distribution)
