"""The benchmark's episode machinery: uncovered tasks, hidden labels, paired scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.report import paired_gaps, summarize
from bench.run import build_world, hide_label, run_episode, uncovered_tasks
from client_sdk.federation import DEFAULT_RECIPES

torch.set_num_threads(1)


def test_new_tasks_are_covered_by_no_single_expert():
    labels = tuple(str(i) for i in range(10))
    tasks = uncovered_tasks(DEFAULT_RECIPES, labels, 5, 10, np.random.default_rng(0))
    assert len(tasks) == 10 and len(set(tasks)) == 10
    for task in tasks:
        assert not any(set(task) <= set(r.classes) for r in DEFAULT_RECIPES)
    with_nine = uncovered_tasks(DEFAULT_RECIPES, labels, 2, 4, np.random.default_rng(0), must_include="9")
    assert all("9" in t for t in with_nine)


def test_hide_label_removes_it_from_every_expert():
    hidden = hide_label(DEFAULT_RECIPES, "9")
    assert all("9" not in r.classes for r in hidden)
    assert [r.name for r in hidden] == [r.name for r in DEFAULT_RECIPES]


@pytest.fixture(scope="module")
def world():
    return build_world("digits", 0, DEFAULT_RECIPES, {"protofuse": ({}, {})}, 3, ["mlp"])


def test_every_method_is_scored_on_the_same_episode(world):
    task = ("1", "4", "9")
    acc = run_episode(world, task, 2, np.random.default_rng(0), 60, {"all"})
    expected = {"protofuse", "protofuse zero-shot", "expert vote (experts online)", "stacking (experts online)", "scratch", "nearest class mean", "imitator (mlp) + probe"}
    assert expected <= set(acc)
    assert all(0.0 <= a <= 1.0 for a in acc.values())
    assert acc["expert vote (experts online)"] > 0.6  # three-way chance is 0.33
    again = run_episode(world, task, 2, np.random.default_rng(0), 60, {"all"})
    assert again == acc  # the same seed draws the same support and test sets


def test_recall_of_one_label_is_scored_on_its_own_examples(world):
    task = ("1", "4", "9")
    recalls: dict[str, float] = {}
    acc = run_episode(world, task, 2, np.random.default_rng(0), 60, {"all"}, recall_of="9", recalls=recalls)
    assert set(recalls) == set(acc)  # every scored method, all-data bound included
    # Recall is measured on the 9s alone, so it differs from task accuracy for some method.
    assert all(0.0 <= r <= 1.0 for r in recalls.values())
    assert any(recalls[m] != acc[m] for m in acc)
    none: dict[str, float] = {}
    run_episode(world, task, 2, np.random.default_rng(0), 60, {"all"}, recall_of="7", recalls=none)
    assert none == {}  # a label outside the task has no recall


def test_report_pairs_episodes_and_measures_spread():
    rows = [{"dataset": "d", "seed": s, "ways": 2, "task": t, "k": 1, "method": m, "accuracy": a}
            for s, t, m, a in [(0, "a", "protofuse", 0.9), (0, "a", "b", 0.8), (1, "a", "protofuse", 0.7), (1, "a", "b", 0.9)]]
    gap = {g["method"]: g for g in paired_gaps(rows)}["b"]
    assert gap["mean_gap"] == pytest.approx(-0.05) and gap["win_or_tie"] == 0.5 and gap["n"] == 2
    cell = {s["method"]: s for s in summarize(rows)}["protofuse"]
    assert cell["mean"] == pytest.approx(0.8) and cell["std"] == pytest.approx(np.std([0.9, 0.7], ddof=1)) and cell["n"] == 2
