r"""The benchmark: expert federations on real data, held-out new tasks, every method on the same
episodes.

    python -m bench.run --out bench-results        # both datasets, the reported seeds
    python -m bench.run --dev --ablations          # development seeds: where defaults are chosen
    python -m bench.run --datasets digits --seeds 100 --tasks 2 --quick
    python -m bench.run --dev --datasets digits-flat mnist5k-flat segment \
        --no-generative --no-ceiling               # tables

For each (dataset, seed): splits, a federation of heterogeneous experts trained on overlapping
class subsets, one bank per family fitted on the experts' answers to the query pool, and the
baselines. For each new task (a class combination that no single expert of the federation covers,
added experts included) one test set and one nested support set are drawn (the k = 1 examples are
among the k = 5, those among the k = 10), and every method is scored on exactly those at every k
(paired episodes).

Seeds: defaults and ablations are chosen on DEV_SEEDS; reported tables use REPORT_SEEDS, which no
choice ever looked at.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.datasets import (
    DATASETS,
    Dataset,
    Splits,
    load_dataset,
    make_splits,
    sample_support,
    task_subset,
)
from bench.federations import (
    ROBUSTNESS_RECIPES,
    BuiltExpert,
    ExpertRecipe,
    build_federation,
    recipes_for,
)
from client_sdk.experts import query_expert
from protofuse.bank import Bank, fit_bank, load_bank
from protofuse.families import GenerativeTask
from protofuse.model.networks import FeatureAugmentation
from protofuse.model.recompose import predict_log_proba
from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings
from protofuse.triples import Triples, assemble

from . import baselines
from .report import write_report

SHOTS = (1, 5, 10)
DEV_SEEDS = (0, 1, 2)  # defaults, ablations and settings are chosen here (and on any seed < 100)
REPORT_SEEDS = (100, 101, 102)  # the reported runs: never used to choose anything


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
    "protofuse, layer normalization": ({"normalization": "layer"}, {}),
}
# Ablations that change nothing on a table (its encoder is the MLP already; no image transforms).
IMAGE_ONLY = ("protofuse, mlp encoder", "protofuse, shifts only")
# On tables the default bank is also fitted without table augmentation: what the augmentation adds.
TABLE_BANKS: dict[str, tuple[dict, dict]] = {
    "protofuse, no table augmentation": ({}, {"feature_dropout": 0.0, "feature_noise": 0.0})
}
# Adaptation settings tried on the development seeds, on the default bank: name -> adapt options.
ADAPT_VARIANTS: dict[str, dict] = {
    f"protofuse, prior_strength {v:g}": {"prior_strength": v} for v in (0.1, 0.3, 3.0, 10.0)
}
# With bad participants, the paired effect of reweighting is the question.
ROBUSTNESS_BANKS = {"protofuse, no reweighting": ABLATIONS["protofuse, no reweighting"]}


@dataclass
class Federation:
    """One seed's world: data splits, experts, their answers on the query pool, fitted banks."""

    dataset: Dataset
    splits: Splits
    experts: list[BuiltExpert]
    triples: Triples
    banks: dict[str, Bank]
    imitators: dict[
        str, baselines.Imitator
    ]  # "conv", "mlp" (the bank's augmentation), "mlp, no augmentation" (tables)
    ceiling: baselines.Ceiling | None
    timings: dict[str, float]


@dataclass(frozen=True)
class Episode:
    """One task's test rows and nested support: ``max(SHOTS)`` examples per class, in class
    blocks."""

    task: tuple[str, ...]
    support_x: np.ndarray  # (K * k_max, d)
    support_y: np.ndarray  # (K * k_max,) in 0..K-1, k_max per class in order
    test_x: np.ndarray
    test_y: np.ndarray

    def support(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first k examples of each class: the k-shot support is part of every larger one."""
        k_max = len(self.support_y) // len(self.task)
        if not 1 <= k <= k_max:
            raise ValueError(f"k = {k} is outside 1..{k_max}, the support drawn for this episode")
        rows = np.concatenate([j * k_max + np.arange(k) for j in range(len(self.task))])
        return self.support_x[rows], self.support_y[rows]


def uncovered_tasks(
    recipes: tuple[ExpertRecipe, ...],
    labels: tuple[str, ...],
    ways: int,
    n: int,
    rng: np.random.Generator,
    must_include: str | None = None,
) -> list[tuple[str, ...]]:
    """Up to n class combinations of size ``ways`` that no single expert covers entirely.

    ``recipes`` must be the federation's own experts, added ones included: a task that one of them
    covers alone could be solved by asking that expert, which is not the question.
    """
    sets = [set(r.classes) for r in recipes]
    combos = [
        c
        for c in itertools.combinations(labels, ways)
        if not any(set(c) <= s for s in sets) and (must_include is None or must_include in c)
    ]
    pick = rng.choice(len(combos), size=min(n, len(combos)), replace=False)
    return [combos[i] for i in sorted(pick)]


def hide_label(recipes: tuple[ExpertRecipe, ...], label: str) -> tuple[ExpertRecipe, ...]:
    """The same federation with ``label`` removed from every expert: no expert covers it."""
    return tuple(replace(r, classes=tuple(c for c in r.classes if c != label)) for r in recipes)


def build_world(
    name: str,
    seed: int,
    recipes: tuple[ExpertRecipe, ...],
    banks: dict[str, tuple[dict, dict]],
    epochs: int | None,
    imitator_encoders: list[str],
    ceiling: bool = True,
    bank_cache: Path | None = None,
    table_variants: bool = True,
) -> Federation:
    """One seed's world. On a table (no image shape), ``table_variants`` also fits the bank without
    table augmentation and the mlp imitator with and without it, and skips image-only ablations."""
    ds = load_dataset(name)
    splits = make_splits(ds, seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    experts = build_federation(splits.expert_train, recipes, seed)
    timings["experts"] = time.perf_counter() - t0
    qx = splits.queries.x
    outputs = [query_expert(e.expert, qx, e.name) for e in experts]
    triples = assemble(
        [e.name for e in experts],
        [e.labels for e in experts],
        [qx] * len(experts),
        outputs,
        shared=[0] * len(experts),
    )
    fitted = {}
    if ds.image_shape is None and table_variants:
        banks = {k: v for k, v in banks.items() if k not in IMAGE_ONLY} | TABLE_BANKS
    for bank_name, (model_over, train_over) in banks.items():
        t0 = time.perf_counter()
        training = TrainingSettings(**{"epochs": epochs, "seed": seed, **train_over})
        cached = (
            None
            if bank_cache is None
            else bank_cache
            / f"{name}-seed{seed}-{zlib.crc32(repr((recipes, model_over, training)).encode()):08x}"
        )
        if cached is not None and (cached / "meta.json").exists():
            fitted[bank_name] = load_bank(cached)
            continue
        fitted[bank_name] = fit_bank(
            triples,
            ModelSettings(**model_over),
            training,
            AdaptSettings(),
            ds.image_shape,
            ds.likelihood,
        )
        timings[f"fit {bank_name}"] = time.perf_counter() - t0
        if cached is not None:
            fitted[bank_name].save(cached)
    imitators = {}
    for imitator, args in _imitators(
        ds, imitator_encoders, len(qx), epochs, seed, table_variants
    ).items():
        t0 = time.perf_counter()
        imitators[imitator] = baselines.Imitator(**args).fit(
            qx, [baselines.ExpertOutput(e.labels, o) for e, o in zip(experts, outputs, strict=True)]
        )
        timings[f"fit imitator {imitator}"] = time.perf_counter() - t0
    top = None
    if ceiling:
        t0 = time.perf_counter()
        # Every labeled example outside the test split: the experts' training data, the query pool
        # with its true labels and the support pool.
        labeled = [splits.expert_train, splits.queries, splits.support]
        x, y = np.concatenate([p.x for p in labeled]), np.concatenate([p.y for p in labeled])
        encoder = "conv" if ds.image_shape else "mlp"
        top = baselines.Ceiling(
            ds.label_names, **_imitator_args(ds, encoder, len(x), epochs, seed)
        ).fit(x, y)
        timings["fit ceiling"] = time.perf_counter() - t0
    return Federation(ds, splits, experts, triples, fitted, imitators, top, timings)


def _imitator_args(ds: Dataset, encoder: str, n: int, epochs: int | None, seed: int) -> dict:
    """The bank's own defaults (epochs for n inputs, learning rate, batch size, augmentation)."""
    training = TrainingSettings(epochs=epochs)
    return {
        "in_dim": ds.x.shape[1],
        "image_shape": ds.image_shape,
        "encoder": encoder,
        "seed": seed,
        "epochs": training.resolved_epochs("discriminative", round(n * (1 - training.holdout))),
        "augmentation": training.resolved_augmentation(ds.image_shape, ds.x.shape[1]),
        "lr": training.lr,
        "batch_size": training.batch_size,
    }


def _imitators(
    ds: Dataset,
    encoders: list[str],
    n: int,
    epochs: int | None,
    seed: int,
    table_variants: bool = True,
) -> dict[str, dict]:
    """The imitators to fit, by name: one per encoder with the bank's defaults; on a table (with
    ``table_variants``, unless no encoder is asked for) the mlp one with the bank's table
    augmentation, without any, and with half its features dropped (the imitator's own best rate on
    the pixel tables, bench.table_sweep)."""
    if ds.image_shape is not None or not table_variants or not encoders:
        return {
            e: _imitator_args(ds, e, n, epochs, seed)
            for e in encoders
            if e == "mlp" or ds.image_shape is not None
        }
    mlp = _imitator_args(ds, "mlp", n, epochs, seed)
    return {
        "mlp": mlp,
        "mlp, no augmentation": mlp | {"augmentation": None},
        "mlp, feature dropout 0.5": mlp | {"augmentation": FeatureAugmentation(dropout=0.5)},
    }


def draw_episode(
    world: Federation, task: tuple[str, ...], rng: np.random.Generator, max_test: int
) -> Episode:
    """The task's test rows (at most ``max_test``) and its nested support, drawn once for every
    k."""
    ds, sp = world.dataset, world.splits
    classes = [ds.label_names.index(c) for c in task]
    tx, ty = task_subset(sp.test, classes)
    if len(tx) > max_test:
        keep = np.sort(rng.choice(len(tx), max_test, replace=False))
        tx, ty = tx[keep], ty[keep]
    sx, sy = sample_support(sp.support, classes, max(SHOTS), rng)
    return Episode(task, sx, sy, tx, ty)


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    return float((proba.argmax(1) == y).mean())


class in_task_order:
    """An adapted model's probabilities with columns reordered to the task's class order."""

    def __init__(self, model, task: tuple[str, ...]) -> None:
        self.model, self.cols = model, [model.classes_.tolist().index(c) for c in task]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(x)[:, self.cols]


def run_episode(
    world: Federation,
    episode: Episode,
    k: int,
    methods: set[str],
    generative_forms: bool = False,
    recall_of: str | None = None,
    recalls: dict[str, float] | None = None,
    adapt_variants: dict[str, dict] | None = None,
) -> dict[str, float]:
    """Every method on one episode's k-shot support and its test rows; returns accuracy per method.

    ``generative_forms`` scores every (recomposition, prediction form) of the generative family,
    not only its default; ``adapt_variants`` (name -> adaptation options) adapts the default
    bank ("protofuse") with other settings too. With ``recall_of`` (a label of the task) and a
    ``recalls`` dict, also fills ``recalls`` with each method's recall on that label's test examples
    alone.
    """
    task, tx, ty = episode.task, episode.test_x, episode.test_y
    sx, sy = episode.support(k)
    names = np.asarray(task)[
        sy
    ]  # label names of the support examples; task is sorted, like classes_
    out: dict[str, float] = {}
    focus = ty == task.index(recall_of) if recall_of in task else None

    def score(method: str, fn) -> None:
        if method in methods or "all" in methods:
            proba = fn()
            out[method] = accuracy(proba, ty)
            if recalls is not None and focus is not None and focus.any():
                recalls[method] = accuracy(proba[focus], ty[focus])

    for bank_name, bank in world.banks.items():
        covered = all(c in bank.label_names for c in task)
        if bank.family_impl.adapts_uncovered_labels or covered:
            score(
                bank_name,
                lambda b=bank: in_task_order(b.adapt(sx, names, n_z=16), task).predict_proba(tx),
            )
            for variant, options in (
                (adapt_variants or {}).items() if bank_name == "protofuse" else ()
            ):
                score(
                    variant,
                    lambda b=bank, o=options: in_task_order(
                        b.adapt(sx, names, **o), task
                    ).predict_proba(tx),
                )
            if generative_forms and covered:
                for recompose in ("gaussian", "mixture"):
                    model = bank.adapt(sx, names, recompose=recompose, n_z=16)
                    if not isinstance(
                        model.task, GenerativeTask
                    ):  # only the generative family has forms
                        break
                    cols = [model.classes_.tolist().index(c) for c in task]
                    log_joint = model.task.log_joint(
                        torch.from_numpy(tx)
                    )  # shared by both prediction forms
                    for form in ("conditional", "joint"):
                        score(
                            f"{bank_name} {recompose}/{form}",
                            lambda f=form, m=model, lj=log_joint, c=cols: (
                                predict_log_proba(lj, m.task.q, f).exp().numpy()[:, c]
                            ),
                        )
        if covered:
            score(
                f"{bank_name} zero-shot",
                lambda b=bank: in_task_order(b.zero_shot(list(task), n_z=16), task).predict_proba(
                    tx
                ),
            )
    test_out = [
        baselines.ExpertOutput(e.labels, query_expert(e.expert, tx, e.name)) for e in world.experts
    ]
    sup_out = [
        baselines.ExpertOutput(e.labels, query_expert(e.expert, sx, e.name)) for e in world.experts
    ]
    score("expert vote (experts online)", lambda: baselines.expert_vote(test_out, task))
    score("stacking (experts online)", lambda: baselines.stacking(sup_out, sy, test_out, task))
    score("scratch", lambda: baselines.scratch(sx, sy, tx, n_classes=len(task)))
    score(
        "nearest class mean", lambda: baselines.nearest_class_mean(sx, sy, tx, n_classes=len(task))
    )
    for encoder, imitator in world.imitators.items():
        score(
            f"imitator ({encoder}) + probe",
            lambda i=imitator: i.probe(sx, sy, tx, n_classes=len(task)),
        )
        score(
            f"imitator ({encoder}) + cosine NCM",
            lambda i=imitator: i.cosine_ncm(sx, sy, tx, n_classes=len(task)),
        )
        score(f"imitator ({encoder}) zero-shot vote", lambda i=imitator: i.vote(tx, task))
    if world.ceiling is not None:
        score(baselines.CEILING, lambda: world.ceiling.predict_proba(tx, task))
    return out


def episode_tasks(
    recipes: tuple[ExpertRecipe, ...],
    labels: tuple[str, ...],
    ways: list[int],
    n: int,
    seed: int,
    must_include: str | None = None,
) -> list[tuple[str, ...]]:
    """The new tasks of one (dataset, seed): for each size, n combinations no expert of ``recipes``
    covers."""
    rng = np.random.default_rng(1000 + seed)
    return [t for w in ways for t in uncovered_tasks(recipes, labels, w, n, rng, must_include)]


def log(line: str) -> None:
    """A plain progress line on stderr: readable in CI logs, where the progress bar is not drawn."""
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["digits", "mnist5k"],
        choices=DATASETS,
        help=(
            "digits, mnist5k: greyscale images; -colour: the same in random colours; "
            "mnist5k-64: at 64 x 64; -flat: the same pixels as feature vectors; segment: a "
            "real table (river's image-segmentation data, 7 classes)"
        ),
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(REPORT_SEEDS),
        help=(
            "bank seeds (split, experts, training); default: the reported seeds "
            f"{list(REPORT_SEEDS)}"
        ),
    )
    p.add_argument(
        "--dev",
        action="store_true",
        help=(
            f"use the development seeds {list(DEV_SEEDS)}, where defaults and ablations are chosen"
        ),
    )
    p.add_argument("--tasks", type=int, default=10, help="new tasks per (ways, seed)")
    p.add_argument("--ways", type=int, nargs="+", default=[2, 5])
    p.add_argument(
        "--no-generative",
        action="store_true",
        help="skip the generative family (its episodes are the slowest)",
    )
    p.add_argument(
        "--generative-forms",
        action="store_true",
        help=(
            "score every recomposition and prediction form of the generative family, not only "
            "its default"
        ),
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help=(
            "also fit the ablation banks (mlp encoder, shifts only, no consensus distillation, "
            "no reweighting) and an mlp imitator"
        ),
    )
    p.add_argument(
        "--adapt-variants",
        action="store_true",
        help="also adapt the default bank with other prior strengths (0.1, 0.3, 3, 10)",
    )
    p.add_argument(
        "--no-ceiling",
        action="store_true",
        help="skip the supervised ceiling (one extra encoder trained per seed)",
    )
    p.add_argument(
        "--no-imitator",
        action="store_true",
        help="skip the imitator baselines (one extra encoder trained per seed)",
    )
    p.add_argument(
        "--bank-cache",
        type=Path,
        help=(
            "keep fitted banks here and reuse them (keyed by dataset, seed, federation and "
            "settings): re-scores adaptation without refitting; empty it after changing how "
            "banks are trained"
        ),
    )
    p.add_argument(
        "--hide-label",
        help="remove this label from every expert: tasks then include a label no expert covers",
    )
    p.add_argument(
        "--max-test",
        type=int,
        default=300,
        help="test examples per episode (the same for every method and every k)",
    )
    p.add_argument(
        "--robustness",
        action="store_true",
        help=(
            "add a poor and an overconfident expert to the federation, and a bank without "
            "reweighting"
        ),
    )
    p.add_argument(
        "--quick", action="store_true", help="few epochs: a smoke run, not a measurement"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(argv)
    seeds = list(DEV_SEEDS) if args.dev else args.seeds
    torch.set_num_threads(1)
    if (args.robustness or args.hide_label) and "segment" in args.datasets:
        p.error(
            "--robustness and --hide-label are defined for the digit datasets (their experts and "
            "labels); drop segment"
        )
    banks = {
        k: v
        for k, v in BANKS.items()
        if not (args.no_generative and v[0].get("family") == "generative")
    }
    banks |= ABLATIONS if args.ablations else {}
    banks |= ROBUSTNESS_BANKS if args.robustness else {}
    imitator_encoders = [] if args.no_imitator else ["conv", "mlp"] if args.ablations else ["conv"]
    epochs = 3 if args.quick else None
    rows: list[dict] = []
    recall_rows: list[
        dict
    ] = []  # with --hide-label: recall of the hidden label, same schema as rows
    fidelity: list[dict] = []
    timings: list[dict] = []
    from rich.progress import Progress

    with Progress() as bar:
        for name in args.datasets:
            recipes = recipes_for(name) + (ROBUSTNESS_RECIPES if args.robustness else ())
            if args.hide_label:
                recipes = hide_label(recipes, args.hide_label)
            for seed in seeds:
                job = bar.add_task(f"{name} seed {seed}: fitting", total=None)
                world = build_world(
                    name,
                    seed,
                    recipes,
                    banks,
                    epochs,
                    imitator_encoders,
                    ceiling=not args.no_ceiling,
                    bank_cache=args.bank_cache,
                )
                log(
                    f"{name} seed {seed}: fitted in "
                    + ", ".join(f"{k} {v:.0f}s" for k, v in world.timings.items())
                )
                timings.append({"dataset": name, "seed": seed, **world.timings})
                for bank_name, bank in world.banks.items():
                    fidelity += [
                        {
                            "dataset": name,
                            "seed": seed,
                            "bank": bank_name,
                            "expert": e.name,
                            "labels": " ".join(e.labels),
                            "agreement": e.fidelity.agreement,
                            "kl": e.fidelity.kl,
                            "consensus": e.consensus,
                            "weight": e.weight,
                        }
                        for e in bank.experts
                    ]
                tasks = episode_tasks(
                    recipes, world.dataset.label_names, args.ways, args.tasks, seed, args.hide_label
                )
                bar.update(
                    job,
                    description=f"{name} seed {seed}: episodes",
                    total=len(tasks) * len(SHOTS),
                    completed=0,
                )
                for ti, task in enumerate(tasks):
                    episode = draw_episode(
                        world, task, np.random.default_rng([seed, ti]), args.max_test
                    )
                    for k in SHOTS:
                        t0 = time.perf_counter()
                        hidden: dict[str, float] = {}
                        acc = run_episode(
                            world,
                            episode,
                            k,
                            {"all"},
                            args.generative_forms,
                            recall_of=args.hide_label,
                            recalls=hidden,
                            adapt_variants=ADAPT_VARIANTS if args.adapt_variants else None,
                        )
                        record = {
                            "dataset": name,
                            "seed": seed,
                            "ways": len(task),
                            "task": " ".join(task),
                            "k": k,
                        }
                        rows += [{**record, "method": m, "accuracy": a} for m, a in acc.items()]
                        recall_rows += [
                            {**record, "method": m, "accuracy": a} for m, a in hidden.items()
                        ]
                        bar.advance(job)
                        log(
                            f"{name} seed {seed} {len(task)}-way {' '.join(task)} k={k}: "
                            + ", ".join(
                                f"{m} {100 * a:.1f}"
                                for m, a in acc.items()
                                if m.startswith("protofuse")
                            )
                            + f" ({time.perf_counter() - t0:.0f}s)"
                        )
                        timings.append(
                            {"dataset": name, "seed": seed, "episode_s": time.perf_counter() - t0}
                        )
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {
        "seeds": seeds
    }
    write_report(args.out, rows, fidelity, timings, config, recall_rows, args.hide_label)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
