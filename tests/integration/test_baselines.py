"""Baselines on sklearn digits with a small federation of logistic-regression experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from bench.baselines import (
    Ceiling,
    ExpertOutput,
    Imitator,
    expert_vote,
    nearest_class_mean,
    scratch,
    stacking,
)
from protofuse.model.networks import Augmentation, FeatureAugmentation

torch.set_num_threads(1)

EXPERT_CLASSES = [(0, 1, 2), (2, 3, 4), (4, 5, 0)]
COVERED_TASK = ("0", "2", "4")  # each class covered twice, no expert covers all three
NEW_TASK = ("1", "3", "5")  # each class covered by exactly one expert


class Digits:
    """Digits split into train / test, with experts trained on class subsets of train."""

    def __init__(self) -> None:
        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        self.train_x, self.test_x, self.train_y, self.test_y = train_test_split(
            x, y, test_size=0.3, random_state=0, stratify=y
        )
        self.experts = [self._expert(classes) for classes in EXPERT_CLASSES]

    def _expert(self, classes: tuple[int, ...]) -> tuple[tuple[str, ...], LogisticRegression]:
        keep = np.isin(self.train_y, classes)
        clf = LogisticRegression(max_iter=1000).fit(self.train_x[keep], self.train_y[keep])
        return tuple(str(c) for c in clf.classes_), clf

    def outputs(self, x: np.ndarray) -> list[ExpertOutput]:
        return [ExpertOutput(labels, clf.predict_proba(x)) for labels, clf in self.experts]

    def task(
        self, labels: tuple[str, ...], k: int, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """k support examples per class from train, every test example of the task's classes."""
        rng = np.random.default_rng(seed)
        classes = [int(c) for c in labels]
        idx = np.concatenate(
            [rng.choice(np.flatnonzero(self.train_y == c), k, replace=False) for c in classes]
        )
        test = np.isin(self.test_y, classes)
        to_task = {c: i for i, c in enumerate(classes)}
        support_y = np.array([to_task[c] for c in self.train_y[idx]])
        test_y = np.array([to_task[c] for c in self.test_y[test]])
        return self.train_x[idx], support_y, self.test_x[test], test_y


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


def _accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(1) == y).mean())


def _check_proba(proba: np.ndarray, n: int, k: int) -> None:
    assert proba.shape == (n, k)
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Support-set-only baselines


@pytest.mark.parametrize("k", [1, 5])
def test_scratch_and_ncm_shapes_and_accuracy(digits: Digits, k: int) -> None:
    sx, sy, tx, ty = digits.task(NEW_TASK, k)
    for proba in (scratch(sx, sy, tx, seed=0), nearest_class_mean(sx, sy, tx)):
        _check_proba(proba, len(tx), 3)
        if k == 5:
            assert _accuracy(proba, ty) > 0.7  # chance is 1/3


def test_ncm_temperature_keeps_probabilities_soft(digits: Digits) -> None:
    sx, sy, tx, _ = digits.task(NEW_TASK, 5)
    proba = nearest_class_mean(sx, sy, tx)
    # Untempered squared pixel distances would make nearly every row one-hot.
    assert np.median(proba.max(1)) < 0.99


def test_missing_support_class_gets_zero_probability(digits: Digits) -> None:
    sx, sy, tx, _ = digits.task(NEW_TASK, 5)
    keep = sy != 2
    for proba in (
        scratch(sx[keep], sy[keep], tx, n_classes=3),
        nearest_class_mean(sx[keep], sy[keep], tx, n_classes=3),
    ):
        _check_proba(proba, len(tx), 3)
        assert np.all(proba[:, 2] == 0)


def test_ceiling_learns_every_label_and_restricts_to_the_task(digits: Digits) -> None:
    names = tuple(str(c) for c in range(10))
    ceiling = Ceiling(
        names, in_dim=64, image_shape=(8, 8), encoder="mlp", feat_dim=32, epochs=15, seed=0
    ).fit(digits.train_x, digits.train_y)
    _, _, tx, ty = digits.task(NEW_TASK, 1)
    proba = ceiling.predict_proba(tx, NEW_TASK)
    _check_proba(proba, len(tx), 3)
    assert _accuracy(proba, ty) > 0.95
    # Column order follows the task's labels, not the vocabulary's.
    reversed_task = tuple(reversed(NEW_TASK))
    np.testing.assert_allclose(ceiling.predict_proba(tx, reversed_task), proba[:, ::-1])


# ---------------------------------------------------------------------------------------------
# Expert-querying baselines


def test_vote_arithmetic() -> None:
    # Expert a covers two task classes (renormalised: 0.5, 0.5); expert b covers one (raw 0.3).
    a = ExpertOutput(("a", "b", "x"), np.array([[0.2, 0.2, 0.6]]))
    b = ExpertOutput(("b", "y"), np.array([[0.3, 0.7]]))
    proba = expert_vote([a, b], ("a", "b", "c"))
    np.testing.assert_allclose(proba, [[0.5 / 0.9, 0.4 / 0.9, 0.0]])


def test_vote_uniform_when_nothing_covered() -> None:
    out = ExpertOutput(("x", "y"), np.array([[0.1, 0.9], [0.5, 0.5]]))
    np.testing.assert_allclose(expert_vote([out], ("a", "b", "c", "d")), np.full((2, 4), 0.25))


def test_vote_on_covered_task(digits: Digits) -> None:
    _, _, tx, ty = digits.task(COVERED_TASK, 1)
    proba = expert_vote(digits.outputs(tx), COVERED_TASK)
    _check_proba(proba, len(tx), 3)
    assert _accuracy(proba, ty) > 0.8


def test_vote_gives_zero_to_uncovered_class(digits: Digits) -> None:
    task = ("0", "3", "9")  # no expert knows 9
    _, _, tx, _ = digits.task(task, 1)
    proba = expert_vote(digits.outputs(tx), task)
    _check_proba(proba, len(tx), 3)
    assert np.all(proba[:, 2] == 0)
    assert np.all(proba[:, :2].sum(1) > 0.999)


@pytest.mark.parametrize("k", [1, 5])
def test_stacking(digits: Digits, k: int) -> None:
    sx, sy, tx, ty = digits.task(NEW_TASK, k)
    proba = stacking(digits.outputs(sx), sy, digits.outputs(tx), NEW_TASK, seed=0)
    _check_proba(proba, len(tx), 3)
    if k == 5:
        assert _accuracy(proba, ty) > 0.6


# ---------------------------------------------------------------------------------------------
# Multi-head imitator


@pytest.fixture(scope="module", params=["mlp", "conv"])
def imitator(request: pytest.FixtureRequest, digits: Digits) -> Imitator:
    pool = digits.train_x[:400]
    return Imitator(
        64,
        (8, 8),
        encoder=request.param,
        feat_dim=32,
        epochs=30,
        augmentation=Augmentation(shift=1.0),
        seed=0,
    ).fit(pool, digits.outputs(pool))


def test_imitator_features_and_probe(digits: Digits, imitator: Imitator) -> None:
    sx, sy, tx, ty = digits.task(NEW_TASK, 5)
    feats = imitator.features(tx)
    assert feats.shape == (len(tx), 32)
    assert np.all(np.isfinite(feats))
    for proba in (imitator.probe(sx, sy, tx, seed=0), imitator.cosine_ncm(sx, sy, tx)):
        _check_proba(proba, len(tx), 3)
        assert _accuracy(proba, ty) > 0.6


def test_probes_use_the_query_pools_statistics_not_the_supports(
    digits: Digits, imitator: Imitator
) -> None:
    """At k = 1 a scaler fitted on the three support examples divides by spreads of three points;
    the probe standardises with the query pool's statistics instead (and stays well above
    chance)."""
    pool = imitator.features(digits.train_x[:400])
    np.testing.assert_allclose(imitator.scaler.mean_, pool.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(imitator.scaler.scale_, pool.std(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(imitator.centre, pool.mean(0), rtol=1e-5, atol=1e-5)
    accuracy = [
        _accuracy(imitator.probe(sx, sy, tx), ty)
        for sx, sy, tx, ty in (digits.task(NEW_TASK, 1, seed) for seed in range(5))
    ]
    assert np.mean(accuracy) > 0.65  # three-way chance is 1/3


def test_cosine_ncm_compares_directions_around_the_pool_centre(
    digits: Digits, imitator: Imitator
) -> None:
    """Support features centred on the query pool's mean and normalised; the class means of those
    directions, normalised; a softmax of the tempered cosine. Computed here from the features."""
    sx, sy, tx, _ = digits.task(NEW_TASK, 3)

    def unit(f: np.ndarray) -> np.ndarray:
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    fs, ft = (
        unit(imitator.features(sx) - imitator.centre),
        unit(imitator.features(tx) - imitator.centre),
    )
    means = unit(np.stack([fs[sy == c].mean(0) for c in range(3)]))
    logits = 10.0 * ft @ means.T
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(
        imitator.cosine_ncm(sx, sy, tx),
        expected / expected.sum(1, keepdims=True),
        rtol=1e-5,
        atol=1e-7,
    )


def test_cosine_ncm_gives_a_missing_class_no_probability(
    digits: Digits, imitator: Imitator
) -> None:
    sx, sy, tx, _ = digits.task(NEW_TASK, 2)
    keep = sy != 2
    proba = imitator.cosine_ncm(sx[keep], sy[keep], tx, n_classes=3)
    _check_proba(proba, len(tx), 3)
    assert np.all(proba[:, 2] == 0)


def test_imitator_vote_is_the_expert_vote_on_imitated_answers(
    digits: Digits, imitator: Imitator
) -> None:
    _, _, tx, ty = digits.task(NEW_TASK, 1)
    imitated = [
        ExpertOutput(labels, p)
        for (labels, _), p in zip(digits.experts, imitator.expert_proba(tx), strict=True)
    ]
    proba = imitator.vote(tx, NEW_TASK)
    np.testing.assert_allclose(proba, expert_vote(imitated, NEW_TASK))
    assert _accuracy(proba, ty) > 0.6  # no example at all; three-way chance is 1/3


def test_imitator_heads_agree_with_experts(digits: Digits, imitator: Imitator) -> None:
    # A probe on random features already beats chance (~0.86 here), so check that training
    # imitated: on held-out digits of each expert's own classes, each head's top class should
    # match its expert's (untrained heads: ~1/3). Off-domain answers are near arbitrary.
    outputs = digits.outputs(digits.test_x)
    imitated = imitator.expert_proba(digits.test_x)
    for classes, out, q in zip(EXPERT_CLASSES, outputs, imitated, strict=True):
        assert q.shape == out.proba.shape
        np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)
        own = np.isin(digits.test_y, classes)
        assert float((q[own].argmax(1) == out.proba[own].argmax(1)).mean()) > 0.9


def test_imitator_is_seeded_and_leaves_global_rng_alone(digits: Digits) -> None:
    pool, outs = digits.train_x[:64], digits.outputs(digits.train_x[:64])
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = (
        Imitator(64, (8, 8), encoder="mlp", feat_dim=8, epochs=2, seed=3)
        .fit(pool, outs)
        .features(pool)
    )
    assert torch.rand(1) == expected  # fit must not reseed or consume the caller's generator
    b = (
        Imitator(64, (8, 8), encoder="mlp", feat_dim=8, epochs=2, seed=3)
        .fit(pool, outs)
        .features(pool)
    )
    np.testing.assert_array_equal(a, b)


def test_imitator_trains_on_perturbed_features_when_given_a_table_augmentation(
    digits: Digits,
) -> None:
    pool, outs = digits.train_x[:128], digits.outputs(digits.train_x[:128])

    def features(augmentation: FeatureAugmentation | None) -> np.ndarray:
        return (
            Imitator(
                64, None, encoder="mlp", feat_dim=8, epochs=2, augmentation=augmentation, seed=3
            )
            .fit(pool, outs)
            .features(pool)
        )

    perturbed = features(FeatureAugmentation(dropout=0.3, noise=0.1))
    np.testing.assert_array_equal(
        perturbed, features(FeatureAugmentation(dropout=0.3, noise=0.1))
    )  # seeded
    assert not np.allclose(perturbed, features(None))  # the perturbations reached training
    np.testing.assert_array_equal(
        features(FeatureAugmentation()), features(None)
    )  # all zero: plain training


def test_imitator_rejects_bad_configs(digits: Digits) -> None:
    with pytest.raises(ValueError, match="image shape"):
        Imitator(64, None, encoder="conv")
    with pytest.raises(ValueError, match="unknown encoder"):
        Imitator(64, (8, 8), encoder="resnet")
    with pytest.raises(RuntimeError):
        Imitator(64, None, encoder="mlp").features(digits.test_x[:2])
    with pytest.raises(RuntimeError, match="before fit"):
        Imitator(64, None, encoder="mlp").probe(
            digits.test_x[:2], np.array([0, 1]), digits.test_x[:2]
        )
    bad = [ExpertOutput(("0", "1"), np.full((3, 2), 0.5))]
    with pytest.raises(ValueError, match="shape"):
        Imitator(64, None, encoder="mlp").fit(digits.train_x[:4], bad)
