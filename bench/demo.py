"""The demo federation as a user would lay it out: a spec folder, then the public CLI on it.

    python -m bench.demo --out runs/demo          # writes runs/demo/federation/
    python -m bench.demo --score runs/demo        # scores runs/demo/pred.npz

The folder holds ``spec.toml``, ``experts.py`` (the black boxes, rebuilt deterministically from
the dataset: no pickled models), ``queries.npy``, a new task's ``support.npz`` and a labeled test
set (``test_x.npy``, ``test_y.npy``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench.datasets import DATASETS, load_dataset, make_splits, sample_support, task_subset
from bench.federations import DEFAULT_RECIPES

REPO = Path(__file__).resolve().parent.parent  # the checkout holding bench/
DEMO_TASK = ("1", "4", "5", "8", "9")  # no single expert covers these five classes

EXPERTS_PY = '''\
"""The demo's black-box experts, trained deterministically on the {dataset} expert split.

They come from the benchmark package of the protofuse checkout that wrote this folder (it is
not part of the installed SDK), so that checkout goes on the import path first."""
import sys

sys.path.insert(0, {repo!r})
from bench.federations import demo_expert  # noqa: E402

{lines}
'''


def spec_entry(name: str, predict: str, labels: tuple[str, ...] | list[str], queries: str) -> str:
    """One ``[[experts]]`` table of a spec."""
    quoted = ", ".join(f'"{c}"' for c in labels)
    return (
        f'[[experts]]\nname = "{name}"\npredict = "{predict}"\nlabels = [{quoted}]\nqueries = '
        f'"{queries}"\n'
    )


def write_federation(
    folder: Path,
    dataset: str = "digits",
    k: int = 5,
    seed: int = 0,
    task: tuple[str, ...] = DEMO_TASK,
) -> Path:
    """Write a spec folder for the demo federation; returns the spec's path."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(dataset)
    splits = make_splits(ds, seed)
    np.save(folder / "queries.npy", splits.queries.x)
    lines = "\n".join(
        f'{r.name} = demo_expert("{dataset}", "{r.name}", seed={seed}, split_seed={seed})'
        for r in DEFAULT_RECIPES
    )
    (folder / "experts.py").write_text(
        EXPERTS_PY.format(dataset=dataset, lines=lines, repo=str(REPO))
    )
    entries = "\n".join(
        spec_entry(r.name, f"experts:{r.name}", r.classes, "queries.npy") for r in DEFAULT_RECIPES
    )
    shape = list(ds.image_shape) if ds.image_shape else None
    header = (
        f"# Demo federation on {dataset}: {len(DEFAULT_RECIPES)} experts over overlapping class "
        f"subsets.\n\n[data]\nimage_shape = {shape}\n\n"
        if shape
        else ""
    )
    (folder / "spec.toml").write_text(header + entries)
    classes = [ds.label_names.index(c) for c in task]
    sx, sy = sample_support(splits.support, classes, k, np.random.default_rng(seed))
    np.savez(folder / "support.npz", x=sx, y=np.asarray(task)[sy].astype(str))
    tx, ty = task_subset(splits.test, classes)
    np.save(folder / "test_x.npy", tx)
    np.save(folder / "test_y.npy", np.asarray(task)[ty].astype(str))
    return folder / "spec.toml"


def score(run: Path) -> float:
    pred = np.load(run / "pred.npz", allow_pickle=False)
    truth = np.load(run / "federation" / "test_y.npy", allow_pickle=False)
    acc = float((pred["classes"][pred["proba"].argmax(1)] == truth).mean())
    print(
        f"new task {pred['classes'].tolist()}: accuracy {acc:.3f} on {len(truth)} held-out examples"
    )
    return acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.demo",
        description="Write the demo federation, or score the demo's predictions.",
    )
    p.add_argument("--out", type=Path, help="run folder to write federation/ into")
    p.add_argument("--score", type=Path, help="run folder whose pred.npz to score")
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--k", type=int, default=5, help="labeled examples per class in support.npz")
    args = p.parse_args(argv)
    if args.out:
        spec = write_federation(args.out / "federation", args.dataset, args.k)
        print(f"wrote {spec}", file=sys.stderr)
    if args.score:
        score(args.score)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
