"""Three organizations for the deployment tests (integration and deploy tiers) and the fault
benchmark (bench/faults.py): a ring of three experts over the digits, each with its own spec
folder and private shard of the query pool, and a task none of them knows (``TASK``) with its
support and test examples."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bench.datasets import Splits, load_dataset, make_splits, sample_support, task_subset
from bench.demo import EXPERTS_PY, REPO, spec_entry
from bench.federations import ExpertRecipe

# A ring of three experts over the ten digits: each pair shares a label, no expert knows the task.
RECIPES = (
    ExpertRecipe("north", "logreg", ("0", "1", "2", "3")),
    ExpertRecipe("east", "logreg", ("3", "4", "5", "6")),
    ExpertRecipe("west", "logreg", ("6", "7", "8", "9", "0")),
)
TASK = ("1", "5", "8")

EXPERTS = (
    EXPERTS_PY
    + """
from bench.federations import build_expert, ExpertRecipe  # noqa: E402
from bench.datasets import load_dataset, make_splits  # noqa: E402

_train = make_splits(load_dataset("digits"), 0).expert_train
{recipes}
"""
)


def held_out_task(splits: Splits) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """TASK's 5-shot support set and its test examples, labels as names: (sx, sy, tx, ty)."""
    classes = [splits.support.label_names.index(c) for c in TASK]
    sx, sy = sample_support(splits.support, classes, 5, np.random.default_rng(1))
    tx, ty = task_subset(splits.test, classes)
    return sx, np.asarray(TASK)[sy], tx, np.asarray(TASK)[ty]


def make_folders(
    tmp_path: Path, rounds: int = 10, federation: str = "min_clients = 3\n"
) -> tuple[Path, list[Path], Path, Splits]:
    """One spec folder per organization: its expert and its own shard of the query pool; and the
    server's spec (``rounds`` and the other ``[federation]`` lines)."""
    splits = make_splits(load_dataset("digits"), 0)
    shards = np.array_split(
        np.random.default_rng(0).permutation(len(splits.queries.x)), len(RECIPES)
    )
    specs = []
    for recipe, rows in zip(RECIPES, shards, strict=True):
        org = tmp_path / recipe.name
        org.mkdir()
        np.save(org / "queries.npy", splits.queries.x[np.sort(rows)])
        line = (
            f"{recipe.name} = build_expert(ExpertRecipe({recipe.name!r}, 'logreg', "
            f"{recipe.classes!r}), _train, 0).expert"
        )
        (org / "experts.py").write_text(
            EXPERTS.format(dataset="digits", lines="", repo=str(REPO), recipes=line)
        )
        (org / "spec.toml").write_text(
            spec_entry(recipe.name, f"experts:{recipe.name}", recipe.classes, "queries.npy")
        )
        specs.append(org / "spec.toml")
    server = tmp_path / "server.toml"
    server.write_text(
        f"[data]\nimage_shape = [8, 8]\n\n[federation]\nrounds = {rounds}\n{federation}"
    )
    return tmp_path, specs, server, splits


def client_command(spec: Path, superlink_port: int, port: int) -> list[str]:
    """``protofuse client`` for one organization's spec, insecure, against a SuperLink on
    127.0.0.1 (its SuperNode serves its ClientApp on ``port``)."""
    return [
        sys.executable,
        "-m",
        "protofuse_cli.main",
        "client",
        str(spec),
        "--superlink",
        f"127.0.0.1:{superlink_port}",
        "--port",
        str(port),
        "--insecure",
    ]
