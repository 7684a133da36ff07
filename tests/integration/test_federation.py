"""Tests for the demo federation: recipes, trained experts' quality and determinism."""

from collections import Counter

import numpy as np
import pytest
import torch

from bench.datasets import Dataset, load_digits, make_splits, task_subset
from bench.federations import (
    DEFAULT_RECIPES,
    ROBUSTNESS_RECIPES,
    BuiltExpert,
    ExpertRecipe,
    build_expert,
    build_federation,
    demo_expert,
)
from client_sdk.experts import Expert, query_expert

torch.set_num_threads(1)

GOOD = {r.name for r in DEFAULT_RECIPES}


@pytest.fixture(scope="module")
def splits():
    return make_splits(load_digits(), seed=0)


@pytest.fixture(scope="module")
def federation(splits):
    return build_federation(splits.expert_train, DEFAULT_RECIPES + ROBUSTNESS_RECIPES, seed=0)


def _own_class_eval(built: BuiltExpert, pool: Dataset) -> tuple[float, float]:
    """Accuracy and mean max-probability on the pool's examples of the expert's own classes."""
    idx = [pool.label_names.index(c) for c in built.labels]
    x, y = task_subset(pool, idx)
    p = query_expert(built.expert, x, built.name)
    return float((p.argmax(axis=1) == y).mean()), float(p.max(axis=1).mean())


def test_default_recipes_cover_every_digit_with_overlaps():
    counts = Counter(c for r in DEFAULT_RECIPES for c in r.classes)
    assert set(counts) == {str(d) for d in range(10)}
    assert sum(v >= 2 for v in counts.values()) >= 6  # most classes seen by two experts
    assert all(len(r.classes) <= 4 for r in DEFAULT_RECIPES)
    assert {r.kind for r in DEFAULT_RECIPES} == {"logreg", "svm", "forest", "knn", "mlp"}
    assert {r.name for r in ROBUSTNESS_RECIPES} == {"poor", "overconfident"}


def test_federation_outputs_follow_labels(federation, splits):
    assert [b.name for b in federation] == [r.name for r in DEFAULT_RECIPES + ROBUSTNESS_RECIPES]
    for built, recipe in zip(federation, DEFAULT_RECIPES + ROBUSTNESS_RECIPES, strict=True):
        assert isinstance(built.expert, Expert)
        assert built.labels == recipe.classes == tuple(built.expert.labels)
        p = query_expert(built.expert, splits.test.x[:17], built.name)
        assert p.shape == (17, len(recipe.classes))


@pytest.mark.parametrize("part", ["queries", "test"])
def test_good_experts_accurate_on_own_classes(federation, splits, part):
    for built in federation:
        if built.name in GOOD:
            acc, _ = _own_class_eval(built, getattr(splits, part))
            assert acc > 0.85, (built.name, acc)


def test_poor_expert_is_worse(federation, splits):
    poor = next(b for b in federation if b.name == "poor")
    acc, _ = _own_class_eval(poor, splits.queries)
    assert 0.55 <= acc <= 0.85, acc


def test_overconfident_expert_is_sharp_but_sound(federation, splits):
    over = next(b for b in federation if b.name == "overconfident")
    acc, mean_max = _own_class_eval(over, splits.queries)
    assert mean_max > 0.99
    assert acc > 0.85  # sharpening keeps the base classifier's ranking


def test_experts_train_only_on_their_own_classes(splits):
    # Poison every other class's inputs: a fit that touched them would fail on NaN.
    train = splits.expert_train
    x = train.x.copy()
    x[~np.isin(train.y, [4, 5, 6, 7])] = np.nan
    poisoned = Dataset(x, train.y, train.label_names, train.image_shape, train.likelihood)
    for recipe in DEFAULT_RECIPES:
        if set(recipe.classes) <= {"4", "5", "6", "7"}:
            built = build_expert(recipe, poisoned, seed=0)
            assert np.isfinite(query_expert(built.expert, splits.test.x[:5], recipe.name)).all()
    mlp = build_expert(ExpertRecipe("m", "mlp", ("4", "6")), poisoned, seed=0)
    assert mlp.labels == ("4", "6")


@pytest.mark.parametrize("kind", ["forest", "mlp", "svm"])
def test_build_expert_deterministic_given_seed(splits, kind):
    recipe = ExpertRecipe(kind, kind, ("3", "8", "5"))
    x = splits.test.x[:40]
    a = query_expert(build_expert(recipe, splits.expert_train, seed=1).expert, x, kind)
    b = query_expert(build_expert(recipe, splits.expert_train, seed=1).expert, x, kind)
    np.testing.assert_array_equal(a, b)
    if kind != "svm":  # the calibrated SVM's folds are not random: the seed cannot change it
        c = query_expert(build_expert(recipe, splits.expert_train, seed=2).expert, x, kind)
        assert not np.array_equal(a, c)


def test_label_noise_depends_on_seed(splits):
    recipe = ExpertRecipe("noisy", "logreg", ("1", "7"), label_noise=0.3)
    x = splits.test.x[:40]
    a, b = (
        query_expert(build_expert(recipe, splits.expert_train, seed=s).expert, x, "noisy")
        for s in (0, 1)
    )
    assert not np.array_equal(a, b)


def test_mlp_training_leaves_global_torch_rng_alone(splits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_expert(ExpertRecipe("m", "mlp", ("0", "1")), splits.expert_train, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_recipe_validation():
    with pytest.raises(ValueError, match=r"'x'.*kind.*logreg"):
        ExpertRecipe("x", "xgboost", ("0", "1"))
    with pytest.raises(ValueError, match=r"'x'.*classes"):
        ExpertRecipe("x", "knn", ("0", "0"))
    with pytest.raises(ValueError, match=r"'x'.*confuse"):
        ExpertRecipe("x", "knn", ("0", "1"), confuse=1.0)


def test_build_expert_unknown_class_names_recipe(splits):
    with pytest.raises(ValueError, match=r"'odd'.*\['ten'\]"):
        build_expert(ExpertRecipe("odd", "logreg", ("1", "ten")), splits.expert_train, seed=0)


def test_build_federation_rejects_duplicate_names(splits):
    r = ExpertRecipe("same", "knn", ("0", "1"))
    with pytest.raises(ValueError, match="same"):
        build_federation(splits.expert_train, (r, r))


def test_demo_expert_cached_and_named():
    a = demo_expert("digits", "knn")
    assert a is demo_expert("digits", "knn")
    assert tuple(a.labels) == next(r.classes for r in DEFAULT_RECIPES if r.name == "knn")
    assert tuple(demo_expert("digits", "poor").labels) == ("1", "3", "5", "7")
    with pytest.raises(KeyError, match="available: logreg, svm"):
        demo_expert("digits", "oracle")
