"""Accuracy against k on an evaluation set: what the bank is for, measured on the run's own
report. Episodes as the benchmark draws them: ``ways`` labels of the set, ``k`` examples of each
to adapt on, up to ``queries`` others of each to score."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from protofuse.bank import Bank


@dataclass(frozen=True)
class Accuracy:
    """Per k: mean and standard deviation of the episodes' accuracy."""

    ways: int
    episodes: int
    by_k: dict[int, tuple[float, float]]


def accuracy_against_k(
    bank: Bank,
    x: np.ndarray,
    y: np.ndarray,
    shots: Sequence[int] = (1, 5, 10),
    ways: int = 5,
    episodes: int = 10,
    queries: int = 50,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Accuracy:
    """Adapt the bank to ``episodes`` random ``ways``-way tasks of the evaluation set (x (n, d),
    y (n,) label names) for each k of ``shots`` and score each on held-out examples.

    Only labels with more than k examples take part; fewer than two such labels: ValueError naming
    the set's shortfall. The same tasks for every k (paired), drawn from ``seed``."""
    y = np.asarray(y).astype(str)
    counts = {c: int(n) for c, n in zip(*np.unique(y, return_counts=True), strict=True)}
    top = max(shots)
    usable = sorted(c for c, n in counts.items() if n > top)
    if len(usable) < 2:
        raise ValueError(
            f"evaluation set: {len(usable)} label(s) with more than {top} examples (k = {top} "
            "needs k to adapt and at least one to score); give more examples per label or "
            "smaller --shots"
        )
    ways = min(ways, len(usable))
    rng = np.random.default_rng(seed)
    tasks = [
        (labels, {c: rng.permutation(np.flatnonzero(y == c)) for c in labels})
        for labels in (list(rng.choice(usable, ways, replace=False)) for _ in range(episodes))
    ]
    by_k: dict[int, tuple[float, float]] = {}
    done = 0
    for k in sorted(set(shots)):
        scores = []
        for e, (labels, order) in enumerate(tasks):
            support = np.concatenate([order[c][:k] for c in labels])
            held = np.concatenate([order[c][k : k + queries] for c in labels])
            model = bank.adapt(x[support], y[support], seed=seed + e)
            predicted = model.classes_[model.predict_proba(x[held]).argmax(axis=1)]
            scores.append(float(np.mean(predicted == y[held])))
            done += 1
            if progress:
                progress(done, len(tasks) * len(set(shots)))
        by_k[k] = (float(np.mean(scores)), float(np.std(scores)))
    return Accuracy(ways, episodes, by_k)
