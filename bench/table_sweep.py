"""The table augmentation's rates, chosen on the development seeds: banks and mlp imitators
fitted with each (feature dropout, feature noise) of a grid on the tabular datasets, every one
scored on the same episodes as ``bench.run`` (same tasks, test rows and nested supports).

    python -m bench.table_sweep --out bench-results/table-sweep
    python -m bench.table_sweep --datasets segment --bank 0:0 0.1:0 0:0.5 --imitator 0:0 --out
    /tmp/s

A grid point ``D:N`` is ``feature_dropout = D, feature_noise = N``. Only development seeds (< 100).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from client_sdk.experts import query_expert
from protofuse.bank import fit_bank
from protofuse.model.networks import FeatureAugmentation
from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings

from . import baselines
from .federations import recipes_for
from .report import paired_gaps, summarize
from .run import (
    DEV_SEEDS,
    REPORT_SEEDS,
    SHOTS,
    _imitator_args,
    build_world,
    draw_episode,
    episode_tasks,
    log,
    run_episode,
)

STACKING = "stacking (experts online)"


def grid_point(text: str) -> tuple[float, float]:
    dropout, _, noise = text.partition(":")
    return float(dropout), float(noise or 0)


def bank_name(point: tuple[float, float]) -> str:
    return f"protofuse d{point[0]:g} n{point[1]:g}"


def imitator_name(point: tuple[float, float]) -> str:
    return f"mlp d{point[0]:g} n{point[1]:g}"  # scored as "imitator (<name>) + probe"


def sweep_world(
    name: str,
    seed: int,
    bank_grid: list[tuple[float, float]],
    imitator_grid: list[tuple[float, float]],
    ways: list[int],
    tasks: int,
    max_test: int,
) -> list[dict]:
    """Fit every grid point on one (dataset, seed) and score all of them on its episodes."""
    world = build_world(
        name, seed, recipes_for(name), {}, None, [], ceiling=False, table_variants=False
    )
    ds = world.dataset
    if ds.image_shape is not None:
        raise SystemExit(
            f"{name} is an image dataset; the table augmentation applies to feature vectors (use "
            "digits-flat, mnist5k-flat, segment)"
        )
    for point in bank_grid:
        t0 = time.perf_counter()
        training = TrainingSettings(seed=seed, feature_dropout=point[0], feature_noise=point[1])
        world.banks[bank_name(point)] = fit_bank(
            world.triples, ModelSettings(), training, AdaptSettings(), None, ds.likelihood
        )
        log(f"{name} seed {seed}: bank {point} in {time.perf_counter() - t0:.0f}s")
    qx = world.splits.queries.x
    answers = [
        baselines.ExpertOutput(e.labels, query_expert(e.expert, qx, e.name)) for e in world.experts
    ]
    for point in imitator_grid:
        t0 = time.perf_counter()
        aug = FeatureAugmentation(*point)
        args = _imitator_args(ds, "mlp", len(qx), None, seed) | {
            "augmentation": aug if aug.active else None
        }
        world.imitators[imitator_name(point)] = baselines.Imitator(**args).fit(qx, answers)
        log(f"{name} seed {seed}: imitator {point} in {time.perf_counter() - t0:.0f}s")
    methods = set(world.banks) | {f"imitator ({i}) + probe" for i in world.imitators} | {STACKING}
    rows = []
    for ti, task in enumerate(episode_tasks(recipes_for(name), ds.label_names, ways, tasks, seed)):
        episode = draw_episode(world, task, np.random.default_rng([seed, ti]), max_test)
        for k in SHOTS:
            acc = run_episode(world, episode, k, methods)
            record = {
                "dataset": name,
                "seed": seed,
                "ways": len(task),
                "task": " ".join(task),
                "k": k,
            }
            rows += [{**record, "method": m, "accuracy": a} for m, a in acc.items()]
    return rows


def table(rows: list[dict], reference: str) -> str:
    """Mean accuracy per method and k, pooled over ways, and the paired gap to ``reference``."""
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        sub = [{**r, "ways": "all"} for r in rows if r["dataset"] == dataset]
        means = {(s["method"], s["k"]): s["mean"] for s in summarize(sub)}
        gaps = {(g["method"], g["k"]): g for g in paired_gaps(sub, ours=reference)}
        n = len({(r["seed"], r["task"]) for r in sub})
        lines += [
            f"### {dataset} ({n} tasks, 2- and 5-way pooled): accuracy %, and in brackets the "
            f"method minus `{reference}`, paired (points ± s.e.)",
            "",
            "| method | " + " | ".join(f"k = {k}" for k in SHOTS) + " |",
            "|---|" + "---|" * len(SHOTS),
        ]
        for m in sorted({m for m, _ in means}):
            cells = []
            for k in SHOTS:
                g = gaps.get((m, k))
                cells.append(
                    f"{100 * means[(m, k)]:.1f}"
                    + (f" ({-100 * g['mean_gap']:+.1f} ± {100 * g['stderr']:.1f})" if g else "")
                )
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.table_sweep", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--datasets", nargs="+", default=["segment", "digits-flat", "mnist5k-flat"])
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEV_SEEDS))
    p.add_argument(
        "--bank",
        nargs="+",
        default=["0:0", "0.1:0", "0.2:0", "0.3:0", "0.5:0", "0:0.2", "0:0.5", "0:0.8"],
        help="grid points D:N of the bank",
    )
    p.add_argument(
        "--imitator", nargs="+", default=["0:0"], help="grid points D:N of the mlp imitator"
    )
    p.add_argument("--ways", type=int, nargs="+", default=[2, 5])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--max-test", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("bench-results/table-sweep"))
    args = p.parse_args(argv)
    if any(s >= min(REPORT_SEEDS) for s in args.seeds):
        p.error(
            f"rates are chosen on development seeds only; seeds from {min(REPORT_SEEDS)} on are "
            "the reported ones"
        )
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for name in args.datasets:
        for seed in args.seeds:
            rows += sweep_world(
                name,
                seed,
                [grid_point(g) for g in args.bank],
                [grid_point(g) for g in args.imitator],
                args.ways,
                args.tasks,
                args.max_test,
            )
            (args.out / "rows.json").write_text(
                json.dumps({"config": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=0)
            )
    text = table(rows, bank_name(grid_point(args.bank[0])))
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
