"""Training triples: which output column lands on which label, the vocabulary, the held-out
split."""

from __future__ import annotations

import numpy as np
import pytest

from protofuse.triples import Triples, assemble, vocabulary


def _answers(n: int, k: int, seed: int) -> np.ndarray:
    """Distinct, row-normalised answers, so a column landing in the wrong place shows."""
    p = np.random.default_rng(seed).random((n, k)).astype(np.float32) + 0.05
    return p / p.sum(1, keepdims=True)


def test_vocabulary_is_the_union_in_order_of_first_appearance():
    assert vocabulary([("7", "2", "9"), ("2", "cat"), ("9", "7", "0")]) == (
        "7",
        "2",
        "9",
        "cat",
        "0",
    )
    assert vocabulary([("b", "a")]) == ("b", "a")  # declared order, not sorted


def test_outputs_land_on_their_declared_labels_with_unsorted_overlapping_label_sets():
    labels = [("3", "1", "0"), ("1", "5"), ("5", "3", "9", "1")]
    x = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    outs = [_answers(6, len(lab), seed) for seed, lab in enumerate(labels)]
    triples = assemble(["a", "b", "c"], labels, [x, x, x], outs, shared=[0, 0, 0])
    assert triples.label_names == ("3", "1", "0", "5", "9")
    for e, lab in enumerate(labels):
        for j, name in enumerate(lab):
            np.testing.assert_array_equal(
                triples.eta[:, e, triples.label_names.index(name)], outs[e][:, j]
            )
        others = [i for i, name in enumerate(triples.label_names) if name not in lab]
        assert (triples.eta[:, e, others] == 0).all()
    tau = triples.tau
    assert tau.shape == (3, 5)
    for e, lab in enumerate(labels):
        assert {triples.label_names[i] for i in np.flatnonzero(tau[e])} == set(lab)
    np.testing.assert_allclose(triples.eta.sum(-1), 1.0, rtol=1e-6)
    assert triples.expert_labels == tuple(labels)


def test_private_pools_are_stacked_and_each_expert_answers_only_its_own_rows():
    xa = np.full((3, 2), 1.0, dtype=np.float64)  # stored as float32 whatever comes in
    xb = np.full((2, 2), 2.0, dtype=np.float32)
    outs = [_answers(3, 2, 0), _answers(2, 2, 1)]
    triples = assemble(["a", "b"], [("x", "y"), ("y", "z")], [xa, xb], outs)
    np.testing.assert_array_equal(triples.x, np.concatenate([xa, xb]))
    assert triples.x.dtype == np.float32
    np.testing.assert_array_equal(triples.mask, [[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]])
    np.testing.assert_array_equal(triples.eta[3:, 1, 1:], outs[1])  # b's rows: y and z
    assert (triples.eta[:3, 1] == 0).all() and (triples.eta[3:, 0] == 0).all()


def test_experts_sharing_a_pool_share_its_rows():
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    other = np.full((2, 2), -1.0, dtype=np.float32)
    outs = [_answers(4, 2, 0), _answers(2, 2, 1), _answers(4, 2, 2)]
    triples = assemble(
        ["a", "b", "c"], [("0", "1"), ("1", "2"), ("2", "0")], [x, other, x], outs, shared=[7, 3, 7]
    )
    assert len(triples.x) == 6
    np.testing.assert_array_equal(triples.x[:4], x)
    np.testing.assert_array_equal(triples.mask[:, 0], triples.mask[:, 2])
    np.testing.assert_array_equal(triples.eta[:4, 2, [2, 0]], outs[2])


def test_held_out_split_is_a_seeded_disjoint_cover_of_the_inputs():
    n = 50
    x = np.arange(n, dtype=np.float32)[:, None]
    triples = assemble(["a"], [("0", "1")], [x], [_answers(n, 2, 0)])
    train, held = triples.split(0.2, seed=3)
    assert len(held.x) == 10 and len(train.x) == 40
    ids = lambda t: set(t.x[:, 0].astype(int).tolist())  # noqa: E731
    assert ids(train).isdisjoint(ids(held)) and ids(train) | ids(held) == set(range(n))
    # Rows travel with their answers.
    for part in (train, held):
        np.testing.assert_array_equal(part.eta, triples.eta[part.x[:, 0].astype(int)])
    again, _ = triples.split(0.2, seed=3)
    other, _ = triples.split(0.2, seed=4)
    np.testing.assert_array_equal(again.x, train.x)
    assert not np.array_equal(other.x, train.x)
    train_idx, held_idx = triples.split_indices(0.2, seed=3)
    np.testing.assert_array_equal(triples.x[held_idx], held.x)
    np.testing.assert_array_equal(triples.x[train_idx], train.x)
    everything, nothing = triples.split(0.0, seed=3)
    assert len(everything.x) == n and len(nothing.x) == 0


def test_triples_are_immutable_records():
    triples = assemble(["a"], [("0", "1")], [np.zeros((2, 3), np.float32)], [_answers(2, 2, 0)])
    assert isinstance(triples, Triples)
    with pytest.raises(AttributeError):
        triples.x = np.zeros(1)  # type: ignore[misc]
