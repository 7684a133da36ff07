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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from client_sdk.experts import query_expert
from client_sdk.federation import DEFAULT_RECIPES, ROBUSTNESS_RECIPES, BuiltExpert, ExpertRecipe, build_federation
from protofuse.bank import Bank, fit_bank
from protofuse.model.recompose import predict_log_proba
from protofuse.data import Dataset, Splits, load_dataset, make_splits, sample_support, task_subset
from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings
from protofuse.triples import Triples, assemble

from . import baselines
from .report import write_report

SHOTS = (1, 5, 10)


# Banks fitted per seed: name -> (model settings, training settings) overrides of the defaults.
BANKS: dict[str, tuple[dict, dict]] = {
    "protofuse": ({}, {}),
    "generative": ({"family": "generative"}, {}),
}
ABLATIONS: dict[str, tuple[dict, dict]] = {
    "protofuse, mlp encoder": ({"encoder": "mlp"}, {}),
    "protofuse, shifts only": ({}, {"max_rotation": 0, "max_scale": 0}),
    "protofuse, no consensus distillation": ({}, {"distill": 0}),
    "protofuse, no reweighting": ({}, {"reweight": False}),
}


@dataclass
class Federation:
    """One seed's world: data splits, experts, their answers on the query pool, fitted banks."""

    dataset: Dataset
    splits: Splits
    experts: list[BuiltExpert]
    triples: Triples
    banks: dict[str, Bank]
    imitators: dict[str, baselines.Imitator]
    timings: dict[str, float]


def uncovered_tasks(recipes: tuple[ExpertRecipe, ...], labels: tuple[str, ...], ways: int, n: int, rng: np.random.Generator, must_include: str | None = None) -> list[tuple[str, ...]]:
    """Up to n class combinations of size ``ways`` that no single expert covers entirely."""
    sets = [set(r.classes) for r in recipes]
    combos = [c for c in itertools.combinations(labels, ways) if not any(set(c) <= s for s in sets) and (must_include is None or must_include in c)]
    pick = rng.choice(len(combos), size=min(n, len(combos)), replace=False)
    return [combos[i] for i in sorted(pick)]


def hide_label(recipes: tuple[ExpertRecipe, ...], label: str) -> tuple[ExpertRecipe, ...]:
    """The same federation with ``label`` removed from every expert: no expert covers it."""
    return tuple(replace(r, classes=tuple(c for c in r.classes if c != label)) for r in recipes)


def build_world(name: str, seed: int, recipes: tuple[ExpertRecipe, ...], banks: dict[str, tuple[dict, dict]], epochs: int | None, imitator_encoders: list[str]) -> Federation:
    ds = load_dataset(name)
    splits = make_splits(ds, seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    experts = build_federation(splits.expert_train, recipes, seed)
    timings["experts"] = time.perf_counter() - t0
    qx = splits.queries.x
    outputs = [query_expert(e.expert, qx, e.name) for e in experts]
    triples = assemble([e.name for e in experts], [e.labels for e in experts], [qx] * len(experts), outputs, shared=[0] * len(experts))
    fitted = {}
    for bank_name, (model_over, train_over) in banks.items():
        t0 = time.perf_counter()
        training = TrainingSettings(**{"epochs": epochs, "seed": seed, **train_over})
        fitted[bank_name] = fit_bank(triples, ModelSettings(**model_over), training, AdaptSettings(), ds.image_shape, ds.likelihood)
        timings[f"fit {bank_name}"] = time.perf_counter() - t0
    imitators = {}
    for encoder in imitator_encoders:
        if encoder == "conv" and ds.image_shape is None:
            continue
        t0 = time.perf_counter()
        # The bank's own defaults: same epochs, learning rate and augmentation.
        training = TrainingSettings(epochs=epochs)
        imitator = baselines.Imitator(qx.shape[1], ds.image_shape, encoder, epochs=training.resolved_epochs("discriminative", round(len(qx) * (1 - training.holdout))), augmentation=training.resolved_augmentation(ds.image_shape), seed=seed, lr=training.lr, batch_size=training.batch_size)
        imitators[f"imitator ({encoder}) + probe"] = imitator.fit(qx, [baselines.ExpertOutput(e.labels, o) for e, o in zip(experts, outputs)])
        timings[f"fit imitator {encoder}"] = time.perf_counter() - t0
    return Federation(ds, splits, experts, triples, fitted, imitators, timings)


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(1) == y).mean())


class in_task_order:  # noqa: N801 - reads as a function at the call sites
    """An adapted model's probabilities with columns reordered to the task's class order."""

    def __init__(self, model, task: tuple[str, ...]) -> None:  # noqa: ANN001
        self.model, self.cols = model, [model.classes_.tolist().index(c) for c in task]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(x)[:, self.cols]


def run_episode(world: Federation, task: tuple[str, ...], k: int, rng: np.random.Generator, max_test: int, methods: set[str], with_generative: bool = True, recall_of: str | None = None, recalls: dict[str, float] | None = None) -> dict[str, float]:
    """Every method on one support set and one test set; returns accuracy per method.

    With ``recall_of`` (a label of the task) and a ``recalls`` dict, also fills ``recalls`` with
    each method's recall on that label's test examples alone.
    """
    ds, sp = world.dataset, world.splits
    classes = [ds.label_names.index(c) for c in task]
    sx, sy = sample_support(sp.support, classes, k, rng)
    tx, ty = task_subset(sp.test, classes)
    if len(tx) > max_test:
        keep = rng.choice(len(tx), max_test, replace=False)
        tx, ty = tx[keep], ty[keep]
    names = np.asarray(task)[sy]  # label names of the support examples; task is sorted, like classes_
    out: dict[str, float] = {}

    focus = ty == task.index(recall_of) if recall_of in task else None

    def score(method: str, fn) -> None:  # noqa: ANN001 - a thunk returning probabilities
        if method in methods or "all" in methods:
            proba = fn()
            out[method] = accuracy(proba, ty)
            if recalls is not None and focus is not None and focus.any():
                recalls[method] = accuracy(proba[focus], ty[focus])

    for bank_name, bank in world.banks.items():
        if bank.family == "discriminative":
            score(bank_name, lambda b=bank: in_task_order(b.adapt(sx, names), task).predict_proba(tx))
            if all(c in bank.label_names for c in task):
                score(f"{bank_name} zero-shot", lambda b=bank: in_task_order(b.zero_shot(list(task)), task).predict_proba(tx))
        elif with_generative and all(c in bank.label_names for c in task):
            for recompose in ("gaussian", "mixture"):
                model = bank.adapt(sx, names, recompose=recompose, n_z=16)
                cols = [model.classes_.tolist().index(c) for c in task]
                log_joint = model.task.log_joint(torch.from_numpy(tx))  # shared by both prediction forms
                for form in ("conditional", "joint"):
                    score(f"{bank_name} {recompose}/{form}", lambda f=form, m=model: predict_log_proba(log_joint, m.task.q, f).exp().numpy()[:, cols])
            score(f"{bank_name} zero-shot", lambda b=bank: in_task_order(b.zero_shot(list(task), n_z=16), task).predict_proba(tx))
    test_out = [baselines.ExpertOutput(e.labels, query_expert(e.expert, tx, e.name)) for e in world.experts]
    sup_out = [baselines.ExpertOutput(e.labels, query_expert(e.expert, sx, e.name)) for e in world.experts]
    score("expert vote (experts online)", lambda: baselines.expert_vote(test_out, task))
    score("stacking (experts online)", lambda: baselines.stacking(sup_out, sy, test_out, task))
    score("scratch", lambda: baselines.scratch(sx, sy, tx, n_classes=len(task)))
    score("nearest class mean", lambda: baselines.nearest_class_mean(sx, sy, tx, n_classes=len(task)))
    for imitator_name, imitator in world.imitators.items():
        score(imitator_name, lambda i=imitator: i.probe(sx, sy, tx, n_classes=len(task)))
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
    p.add_argument("--no-generative", action="store_true", help="skip the generative family (its episodes are the slowest)")
    p.add_argument("--generative-tasks", type=int, default=3, help="tasks per (ways, seed) on which the generative variants run (they cost ~20 s an episode on MNIST)")
    p.add_argument("--ablations", action="store_true", help="also fit the ablation banks (mlp encoder, shifts only, no consensus distillation, no reweighting) and an mlp imitator")
    p.add_argument("--hide-label", help="remove this label from every expert: tasks then include a label no expert covers")
    p.add_argument("--max-test", type=int, default=300, help="test examples per episode (the same for every method)")
    p.add_argument("--robustness", action="store_true", help="add a poor and an overconfident expert to the federation")
    p.add_argument("--quick", action="store_true", help="few epochs: a smoke run, not a measurement")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    recipes = DEFAULT_RECIPES + (ROBUSTNESS_RECIPES if args.robustness else ())
    if args.hide_label:
        recipes = hide_label(recipes, args.hide_label)
    banks = {k: v for k, v in BANKS.items() if not (args.no_generative and v[0].get("family") == "generative")}
    banks |= ABLATIONS if args.ablations else {}
    imitator_encoders = ["conv", "mlp"] if args.ablations else ["conv"]
    epochs = 3 if args.quick else None
    rows: list[dict] = []
    recall_rows: list[dict] = []  # with --hide-label: recall of the hidden label, same schema as rows
    fidelity: list[dict] = []
    timings: list[dict] = []
    from rich.progress import Progress

    with Progress() as bar:
        for name in args.datasets:
            for seed in range(args.seeds):
                job = bar.add_task(f"{name} seed {seed}: fitting", total=None)
                world = build_world(name, seed, recipes, banks, epochs, imitator_encoders)
                log(f"{name} seed {seed}: fitted in " + ", ".join(f"{k} {v:.0f}s" for k, v in world.timings.items()))
                timings.append({"dataset": name, "seed": seed, **world.timings})
                for bank_name, bank in world.banks.items():
                    fidelity += [{"dataset": name, "seed": seed, "bank": bank_name, "expert": e.name, "labels": " ".join(e.labels), "agreement": e.fidelity.agreement, "kl": e.fidelity.kl, "consensus": e.consensus, "weight": e.weight} for e in bank.experts]
                rng = np.random.default_rng(1000 + seed)
                tasks = [(ways, i, t) for ways in args.ways for i, t in enumerate(uncovered_tasks(DEFAULT_RECIPES, world.dataset.label_names, ways, args.tasks, rng, args.hide_label))]
                bar.update(job, description=f"{name} seed {seed}: episodes", total=len(tasks) * len(SHOTS), completed=0)
                for ti, (ways, i, task) in enumerate(tasks):
                    for k in SHOTS:
                        erng = np.random.default_rng([seed, ti, k])
                        t0 = time.perf_counter()
                        hidden: dict[str, float] = {}
                        acc = run_episode(world, task, k, erng, args.max_test, {"all"}, with_generative=i < args.generative_tasks, recall_of=args.hide_label, recalls=hidden)
                        episode = {"dataset": name, "seed": seed, "ways": ways, "task": " ".join(task), "k": k}
                        rows += [{**episode, "method": m, "accuracy": a} for m, a in acc.items()]
                        recall_rows += [{**episode, "method": m, "accuracy": a} for m, a in hidden.items()]
                        bar.advance(job)
                        log(f"{name} seed {seed} {ways}-way {' '.join(task)} k={k}: " + ", ".join(f"{m} {100 * a:.1f}" for m, a in acc.items() if m.startswith("protofuse")) + f" ({time.perf_counter() - t0:.0f}s)")
                        timings.append({"dataset": name, "seed": seed, "episode_s": time.perf_counter() - t0})
    write_report(args.out, rows, fidelity, timings, vars(args) | {"out": str(args.out)}, recall_rows, args.hide_label)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
