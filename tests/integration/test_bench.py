"""The benchmark's episode machinery: uncovered tasks, hidden labels, paired scoring."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from bench.baselines import CEILING
from bench.federations import (
    DEFAULT_RECIPES,
    KINDS,
    ROBUSTNESS_RECIPES,
    SEGMENT_RECIPES,
    recipes_for,
)
from bench.report import paired_gaps, summarize
from bench.run import (
    SHOTS,
    build_world,
    draw_episode,
    episode_tasks,
    hide_label,
    run_episode,
    uncovered_tasks,
)
from protofuse.settings import TrainingSettings

torch.set_num_threads(1)


@pytest.mark.parametrize("ways", [2, 3, 5])
def test_new_tasks_are_covered_by_no_single_expert(ways):
    labels = tuple(str(i) for i in range(10))
    tasks = uncovered_tasks(DEFAULT_RECIPES, labels, ways, 10, np.random.default_rng(0))
    assert len(tasks) == 10 and len(set(tasks)) == 10
    for task in tasks:
        assert len(task) == ways and not any(set(task) <= set(r.classes) for r in DEFAULT_RECIPES)
    with_nine = uncovered_tasks(
        DEFAULT_RECIPES, labels, 2, 4, np.random.default_rng(0), must_include="9"
    )
    assert all("9" in t for t in with_nine)


def test_every_pair_an_expert_covers_is_left_out():
    labels = tuple(str(i) for i in range(10))
    tasks = set(uncovered_tasks(DEFAULT_RECIPES, labels, 2, 1000, np.random.default_rng(0)))
    covered = {
        tuple(sorted(p)) for r in DEFAULT_RECIPES for p in itertools.combinations(r.classes, 2)
    }
    assert len(tasks) == 45 - len(covered) and not tasks & covered


def test_tasks_avoid_what_added_experts_cover_too():
    labels = tuple(str(i) for i in range(10))
    recipes = DEFAULT_RECIPES + ROBUSTNESS_RECIPES
    tasks = episode_tasks(recipes, labels, [2, 5], 10, seed=0)
    assert len(tasks) == 20
    for task in tasks:
        assert not any(set(task) <= set(r.classes) for r in recipes), task
    assert tasks == episode_tasks(recipes, labels, [2, 5], 10, seed=0)  # seeded


def test_hide_label_removes_it_from_every_expert():
    hidden = hide_label(DEFAULT_RECIPES, "9")
    assert all("9" not in r.classes for r in hidden)
    assert [r.name for r in hidden] == [r.name for r in DEFAULT_RECIPES]


def test_the_segment_ring_covers_each_class_thrice_and_leaves_only_the_pairs_three_apart():
    labels = ("brickface", "cement", "foliage", "grass", "path", "sky", "window")
    assert sorted(c for r in SEGMENT_RECIPES for c in r.classes) == sorted(labels * 3)
    assert len({r.name for r in SEGMENT_RECIPES}) == 7 and {r.kind for r in SEGMENT_RECIPES} == set(
        KINDS
    )
    pairs = uncovered_tasks(SEGMENT_RECIPES, labels, 2, 100, np.random.default_rng(0))
    assert len(pairs) == 7 and all(
        (labels.index(b) - labels.index(a)) % 7 in (3, 4) for a, b in pairs
    )
    assert (
        len(uncovered_tasks(SEGMENT_RECIPES, labels, 5, 100, np.random.default_rng(0))) == 21
    )  # every 5-way task
    assert recipes_for("segment") == SEGMENT_RECIPES and recipes_for(
        "digits-flat"
    ) == DEFAULT_RECIPES == recipes_for("mnist5k")


def test_a_table_world_fits_the_bank_and_the_mlp_imitator_with_and_without_table_augmentation():
    banks = {"protofuse": ({}, {}), "protofuse, mlp encoder": ({"encoder": "mlp"}, {})}
    table = build_world("digits-flat", 0, DEFAULT_RECIPES, banks, 2, ["conv"], ceiling=False)
    assert set(table.banks) == {
        "protofuse",
        "protofuse, no table augmentation",
    }  # the image-only ablation is the default here
    assert (
        table.banks["protofuse, no table augmentation"].meta.settings.training.feature_dropout == 0
    )
    assert set(table.imitators) == {"mlp", "mlp, no augmentation", "mlp, feature dropout 0.5"}
    assert (
        table.imitators["mlp"].augmentation
        == TrainingSettings().resolved_augmentation(None, 64)
        is not None
    )  # the bank's own rule
    assert table.imitators["mlp, no augmentation"].augmentation is None
    episode = draw_episode(table, ("1", "4"), np.random.default_rng(0), 40)
    acc = run_episode(table, episode, 1, {"all"})
    assert {
        "protofuse",
        "protofuse, no table augmentation",
        "imitator (mlp) + probe",
        "imitator (mlp, no augmentation) + probe",
        "stacking (experts online)",
    } <= set(acc)


@pytest.fixture(scope="module")
def world():
    return build_world("digits", 0, DEFAULT_RECIPES, {"protofuse": ({}, {})}, 3, ["mlp"])


def test_episodes_keep_their_test_rows_and_nest_their_supports_across_k(world):
    episode = draw_episode(world, ("1", "4", "9"), np.random.default_rng(0), 60)
    assert len(episode.test_x) == 60 and len(episode.support_y) == 3 * max(SHOTS)
    previous = None
    for k in SHOTS:
        sx, sy = episode.support(k)
        assert np.bincount(sy).tolist() == [k, k, k]
        rows = {r.tobytes() for r in sx}
        assert previous is None or previous <= rows  # the k-shot support is inside the larger ones
        previous = rows
    with pytest.raises(ValueError, match="outside"):
        episode.support(max(SHOTS) + 1)
    again = draw_episode(world, ("1", "4", "9"), np.random.default_rng(0), 60)
    np.testing.assert_array_equal(again.test_x, episode.test_x)
    np.testing.assert_array_equal(again.support_x, episode.support_x)


def test_every_method_is_scored_on_the_same_episode(world):
    episode = draw_episode(world, ("1", "4", "9"), np.random.default_rng(0), 60)
    acc = run_episode(world, episode, 2, {"all"})
    expected = {
        "protofuse",
        "protofuse zero-shot",
        "expert vote (experts online)",
        "stacking (experts online)",
        "scratch",
        "nearest class mean",
        "imitator (mlp) + probe",
        "imitator (mlp) + cosine NCM",
        "imitator (mlp) zero-shot vote",
        CEILING,
    }
    assert expected <= set(acc)
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert acc["expert vote (experts online)"] > 0.6  # three-way chance is 0.33
    assert acc[CEILING] > 0.6
    assert run_episode(world, episode, 2, {"all"}) == acc  # deterministic given the episode
    variants = run_episode(
        world,
        episode,
        2,
        {"protofuse", "protofuse, strong prior"},
        adapt_variants={"protofuse, strong prior": {"prior_strength": 1e6}},
    )
    assert (
        variants["protofuse"] == acc["protofuse"]
        and variants["protofuse, strong prior"] == acc["protofuse zero-shot"]
    )  # a rigid prior is the zero-shot model
    one = run_episode(world, episode, 1, {"scratch", "protofuse zero-shot"})
    assert set(one) == {"scratch", "protofuse zero-shot"}
    assert (
        one["protofuse zero-shot"] == acc["protofuse zero-shot"]
    )  # no examples: the same at every k


def test_recall_of_one_label_is_scored_on_its_own_examples(world):
    episode = draw_episode(world, ("1", "4", "9"), np.random.default_rng(0), 60)
    recalls: dict[str, float] = {}
    acc = run_episode(world, episode, 2, {"all"}, recall_of="9", recalls=recalls)
    assert set(recalls) == set(acc)  # every scored method, the ceiling included
    # Recall is measured on the 9s alone, so it differs from task accuracy for some method.
    assert all(0.0 <= r <= 1.0 for r in recalls.values())
    assert any(recalls[m] != acc[m] for m in acc)
    none: dict[str, float] = {}
    run_episode(world, episode, 2, {"all"}, recall_of="7", recalls=none)
    assert none == {}  # a label outside the task has no recall


def test_report_pairs_episodes_and_measures_spread():
    rows = [
        {"dataset": "d", "seed": s, "ways": 2, "task": t, "k": 1, "method": m, "accuracy": a}
        for s, t, m, a in [
            (0, "a", "protofuse", 0.9),
            (0, "a", "b", 0.8),
            (1, "a", "protofuse", 0.7),
            (1, "a", "b", 0.9),
        ]
    ]
    gap = {g["method"]: g for g in paired_gaps(rows)}["b"]
    assert gap["mean_gap"] == pytest.approx(-0.05) and gap["win_or_tie"] == 0.5 and gap["n"] == 2
    cell = {s["method"]: s for s in summarize(rows)}["protofuse"]
    assert (
        cell["mean"] == pytest.approx(0.8)
        and cell["std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
        and cell["n"] == 2
    )


def test_the_table_sweep_reads_its_grid_and_refuses_the_reported_seeds(tmp_path, capsys):
    from bench.table_sweep import grid_point, main

    assert grid_point("0.2:0.3") == (0.2, 0.3) and grid_point("0.5") == (0.5, 0.0)
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "100", "--out", str(tmp_path)])
    assert "development seeds only" in capsys.readouterr().err


def test_the_hostile_benchmark_reuses_only_federations_that_finished_with_its_settings(tmp_path):
    from bench.hostile import FINISHED, finished

    settings = {"dataset": "mnist5k", "seed": "100", "scenario": "flip x2", "rounds": "10"}
    assert finished(tmp_path, settings) is None  # no marker: an interrupted run's checkpoint
    (tmp_path / FINISHED).write_text(json.dumps({"seconds": 12.5, "settings": settings}))
    assert finished(tmp_path, settings) == 12.5
    assert finished(tmp_path, {**settings, "rounds": "40"}) is None
    (tmp_path / FINISHED).write_text("{not json")
    assert finished(tmp_path, settings) is None


def test_epoch_time_benchmark_writes_a_row_per_shape(tmp_path):
    from bench.epoch_time import main as epoch_time

    assert (
        epoch_time(
            [
                "--sides",
                "8",
                "64",
                "--channels",
                "1",
                "3",
                "--queries",
                "40",
                "--repeats",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["side"], r["channels"]) for r in rows] == [(8, 1), (64, 1), (8, 3), (64, 3)]
    assert all(r["epoch_s"] > 0 for r in rows)
    assert [r["blocks"] for r in rows] == [2, 3, 2, 3]
    assert "| 64 x 64 x 3 | 3 |" in (tmp_path / "results.md").read_text()


def test_datasets_are_compared_episode_by_episode():
    from bench.compare import paired_gaps

    def row(dataset, seed, k, accuracy):
        return {
            "dataset": dataset,
            "seed": seed,
            "task": "0 1",
            "k": k,
            "method": "protofuse",
            "accuracy": accuracy,
        }

    episodes = [
        row("a", 0, 1, 0.9),
        row("a", 1, 1, 0.8),
        row("b", 0, 1, 0.8),
        row("b", 1, 1, 0.9),
        row("b", 2, 1, 0.1),
    ]
    gaps = paired_gaps(episodes, "b", "a", "protofuse")
    assert gaps[1][2] == 2  # seed 2 has no partner and is left out
    assert gaps[1][0] == pytest.approx(0.0) and gaps[1][1] == pytest.approx(10.0)


def test_the_privacy_audit_reads_a_batch_norm_mean_back_exactly_and_scores_auc():
    from bench.privacy import auc, recover_activation_mean

    torch.manual_seed(0)
    layer = torch.nn.BatchNorm1d(6)
    layer.running_mean += torch.randn(6)  # what the server sent
    sent = {"bn.running_mean": layer.running_mean.clone().numpy()}
    batches = [torch.randn(32, 6) + 3.0 for _ in range(7)]
    layer.train()
    for b in batches:
        layer(b)
    got = {"bn.running_mean": layer.running_mean.numpy()}
    # The running mean mixes the batch means with decaying weights; the audit reads back their
    # momentum-weighted average, which equals the plain mean when the batches agree.
    estimate = recover_activation_mean(sent, got, steps=len(batches))
    weights = 0.1 * 0.9 ** np.arange(len(batches))[::-1]
    expected = sum(w * b.mean(0).numpy() for w, b in zip(weights, batches, strict=True))
    np.testing.assert_allclose(estimate, expected / weights.sum(), rtol=1e-4, atol=1e-5)
    assert recover_activation_mean({}, {"w": np.zeros(3)}, 5) is None  # no statistic: no attack
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5
