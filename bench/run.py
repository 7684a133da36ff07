"""The benchmark: expert federations on real data, held-out new tasks, every method on the same episodes.

    python -m bench.run --out bench-results            # both datasets, the full grid
    python -m bench.run --datasets digits --seeds 1 --tasks 2 --quick

For each (dataset, seed): splits, a federation of heterogeneous experts trained on overlapping
class subsets, one bank per family fitted on the experts' answers to the query pool, and the
baselines. For each new task (a class combination no single expert covers) and k, one support
set and one test set are drawn and every method is scored on exactly those (paired episodes).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client_sdk.experts import query_expert
from client_sdk.federation import DEFAULT_RECIPES, ROBUSTNESS_RECIPES, BuiltExpert, ExpertRecipe, build_federation
from protofuse.bank import Bank, fit_bank
from protofuse.data import Dataset, Splits, load_dataset, make_splits, sample_support, task_subset
from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings
from protofuse.triples import Triples, assemble

from . import baselines
from .report import write_report

SHOTS = (1, 5, 10)


@dataclass
class Federation:
    """One seed's world: data splits, experts, their answers on the query pool, fitted banks."""

    dataset: Dataset
    splits: Splits
    experts: list[BuiltExpert]
    triples: Triples
    banks: dict[str, Bank]
    imitator: baselines.Imitator | None
    timings: dict[str, float]


def uncovered_tasks(recipes: tuple[ExpertRecipe, ...], labels: tuple[str, ...], ways: int, n: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Up to n class combinations of size ``ways`` that no single expert covers entirely."""
    sets = [set(r.classes) for r in recipes]
    combos = [c for c in itertools.combinations(labels, ways) if not any(set(c) <= s for s in sets)]
    pick = rng.choice(len(combos), size=min(n, len(combos)), replace=False)
    return [combos[i] for i in sorted(pick)]


def build_world(name: str, seed: int, recipes: tuple[ExpertRecipe, ...], families: list[str], epochs: dict[str, int], with_imitator: bool) -> Federation:
    ds = load_dataset(name)
    splits = make_splits(ds, seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    experts = build_federation(splits.expert_train, recipes, seed)
    timings["experts"] = time.perf_counter() - t0
    qx = splits.queries.x
    outputs = [query_expert(e.expert, qx, e.name) for e in experts]
    triples = assemble([e.name for e in experts], [e.labels for e in experts], [qx] * len(experts), outputs, shared=[0] * len(experts))
    banks = {}
    for family in families:
        t0 = time.perf_counter()
        training = TrainingSettings(epochs=epochs.get(family), seed=seed)
        banks[family] = fit_bank(triples, ModelSettings(family=family), training, AdaptSettings(), ds.image_shape, ds.likelihood)
        timings[f"fit {family}"] = time.perf_counter() - t0
    imitator = None
    if with_imitator:
        t0 = time.perf_counter()
        shift = TrainingSettings().resolved_shift(ds.image_shape)
        imitator = baselines.Imitator(qx.shape[1], ds.image_shape, "conv" if ds.image_shape else "mlp", epochs=epochs.get("discriminative", 30), max_shift=shift, seed=seed)
        imitator.fit(qx, [baselines.ExpertOutput(e.labels, o) for e, o in zip(experts, outputs)])
        timings["fit imitator"] = time.perf_counter() - t0
    return Federation(ds, splits, experts, triples, banks, imitator, timings)


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(1) == y).mean())


class in_task_order:  # noqa: N801 - reads as a function at the call sites
    """An adapted model's probabilities with columns reordered to the task's class order."""

    def __init__(self, model, task: tuple[str, ...]) -> None:  # noqa: ANN001
        self.model, self.cols = model, [model.classes_.tolist().index(c) for c in task]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(x)[:, self.cols]


def run_episode(world: Federation, task: tuple[str, ...], k: int, rng: np.random.Generator, max_test: int, methods: set[str]) -> dict[str, float]:
    """Every method on one support set and one test set; returns accuracy per method."""
    ds, sp = world.dataset, world.splits
    classes = [ds.label_names.index(c) for c in task]
    sx, sy = sample_support(sp.support, classes, k, rng)
    tx, ty = task_subset(sp.test, classes)
    if len(tx) > max_test:
        keep = rng.choice(len(tx), max_test, replace=False)
        tx, ty = tx[keep], ty[keep]
    names = np.asarray(task)[sy]  # label names of the support examples; task is sorted, like classes_
    out: dict[str, float] = {}

    def score(method: str, fn) -> None:  # noqa: ANN001 - a thunk returning probabilities
        if method in methods or "all" in methods:
            out[method] = accuracy(fn(), ty)

    if "discriminative" in world.banks:
        bank = world.banks["discriminative"]
        score("protofuse", lambda: in_task_order(bank.adapt(sx, names), task).predict_proba(tx))
        score("protofuse zero-shot", lambda: in_task_order(bank.zero_shot(list(task)), task).predict_proba(tx))
    if "generative" in world.banks:
        gen = world.banks["generative"]
        for recompose in ("gaussian", "mixture"):
            for form in ("conditional", "joint"):
                score(f"generative {recompose}/{form}", lambda r=recompose, f=form: in_task_order(gen.adapt(sx, names, recompose=r, form=f, n_z=16), task).predict_proba(tx))
        score("generative zero-shot", lambda: in_task_order(gen.zero_shot(list(task), n_z=16), task).predict_proba(tx))
    test_out = [baselines.ExpertOutput(e.labels, query_expert(e.expert, tx, e.name)) for e in world.experts]
    sup_out = [baselines.ExpertOutput(e.labels, query_expert(e.expert, sx, e.name)) for e in world.experts]
    score("expert vote (experts online)", lambda: baselines.expert_vote(test_out, task))
    score("stacking (experts online)", lambda: baselines.stacking(sup_out, sy, test_out, task))
    score("scratch", lambda: baselines.scratch(sx, sy, tx, n_classes=len(task)))
    score("nearest class mean", lambda: baselines.nearest_class_mean(sx, sy, tx, n_classes=len(task)))
    if world.imitator is not None:
        score("imitator + probe", lambda: world.imitator.probe(sx, sy, tx, n_classes=len(task)))
    if k == SHOTS[0]:  # the upper bound does not depend on k: compute once per task
        pool = [task_subset(sp.expert_train, classes), task_subset(sp.queries, classes)]
        score("all-data upper bound", lambda: baselines.all_data(np.concatenate([p[0] for p in pool]), np.concatenate([p[1] for p in pool]), tx, n_classes=len(task)))
    return out


def log(line: str) -> None:
    """A plain progress line on stderr: readable in CI logs, where the progress bar is not drawn."""
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"], choices=["digits", "mnist5k"])
    p.add_argument("--seeds", type=int, default=3, help="bank seeds (split, experts, training)")
    p.add_argument("--tasks", type=int, default=10, help="new tasks per (ways, seed)")
    p.add_argument("--ways", type=int, nargs="+", default=[2, 5])
    p.add_argument("--families", nargs="+", default=["discriminative", "generative"])
    p.add_argument("--max-test", type=int, default=300, help="test examples per episode (the same for every method)")
    p.add_argument("--robustness", action="store_true", help="add a poor and an overconfident expert to the federation")
    p.add_argument("--quick", action="store_true", help="few epochs: a smoke run, not a measurement")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    recipes = DEFAULT_RECIPES + (ROBUSTNESS_RECIPES if args.robustness else ())
    epochs = {"discriminative": 3, "generative": 3} if args.quick else {}
    rows: list[dict] = []
    fidelity: list[dict] = []
    timings: list[dict] = []
    from rich.progress import Progress

    with Progress() as bar:
        for name in args.datasets:
            for seed in range(args.seeds):
                job = bar.add_task(f"{name} seed {seed}: fitting", total=None)
                world = build_world(name, seed, recipes, args.families, epochs, with_imitator=True)
                log(f"{name} seed {seed}: fitted in " + ", ".join(f"{k} {v:.0f}s" for k, v in world.timings.items()))
                timings.append({"dataset": name, "seed": seed, **world.timings})
                for family, bank in world.banks.items():
                    fidelity += [{"dataset": name, "seed": seed, "family": family, "expert": e.name, "labels": " ".join(e.labels), "agreement": e.fidelity.agreement, "kl": e.fidelity.kl} for e in bank.experts]
                rng = np.random.default_rng(1000 + seed)
                tasks = [(ways, t) for ways in args.ways for t in uncovered_tasks(DEFAULT_RECIPES, world.dataset.label_names, ways, args.tasks, rng)]
                bar.update(job, description=f"{name} seed {seed}: episodes", total=len(tasks) * len(SHOTS), completed=0)
                for ti, (ways, task) in enumerate(tasks):
                    for k in SHOTS:
                        erng = np.random.default_rng([seed, ti, k])
                        t0 = time.perf_counter()
                        acc = run_episode(world, task, k, erng, args.max_test, {"all"})
                        rows += [{"dataset": name, "seed": seed, "ways": ways, "task": " ".join(task), "k": k, "method": m, "accuracy": a} for m, a in acc.items()]
                        bar.advance(job)
                        log(f"{name} seed {seed} {ways}-way {' '.join(task)} k={k}: " + ", ".join(f"{m} {100 * a:.1f}" for m, a in acc.items() if m.startswith("protofuse")) + f" ({time.perf_counter() - t0:.0f}s)")
                        timings.append({"dataset": name, "seed": seed, "episode_s": time.perf_counter() - t0})
    write_report(args.out, rows, fidelity, timings, vars(args) | {"out": str(args.out)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
