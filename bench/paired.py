"""Paired comparison of two ``bench.federated`` runs on the same seeds and tasks (for example
row-wise against plain FedAvg averaging of the prototype rows).

    python -m bench.paired A/results.json B/results.json --names rowwise fedavg [--out table.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def paired(a: dict, b: dict, mode: str, k: int | str, column: str = "federated") -> np.ndarray:
    """Per-episode differences a - b (points) of the federated bank, k-shot or zero-shot
    ("zero-shot")."""
    out = []
    runs_a = [r for r in a["runs"] if r["mode"] == mode]
    runs_b = [r for r in b["runs"] if r["mode"] == mode]
    for ra, rb in zip(runs_a, runs_b, strict=True):
        if ra["seed"] != rb["seed"]:
            raise ValueError(
                f"runs differ in seeds ({ra['seed']} against {rb['seed']}); compare runs of the "
                "same seeds"
            )
        for xa, xb in zip(ra["rows"], rb["rows"], strict=True):
            if xa["task"] != xb["task"] or xa["k"] != xb["k"]:
                raise ValueError("runs differ in tasks; compare runs of the same seeds and --tasks")
            if k == "zero-shot" and xa["k"] == 5:
                out.append(xa[f"{column} zero-shot"] - xb[f"{column} zero-shot"])
            elif xa["k"] == k:
                out.append(xa[column] - xb[column])
    return 100 * np.asarray(out)


def table(a: dict, b: dict, names: tuple[str, str]) -> str:
    lines = [
        f"| queries | k | {names[0]} - {names[1]} (points ± s.e.) | episodes won or tied by "
        f"{names[0]} |",
        "|---|---|---|---|",
    ]
    for mode in ("shards", "shared"):
        for k in (1, 5, 10, "zero-shot"):
            d = paired(a, b, mode, k)
            if len(d):
                lines.append(
                    f"| {mode} | {k} | {d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f} | "
                    f"{np.mean(d >= 0):.0%} of {len(d)} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--names", nargs=2, default=["A", "B"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    text = table(json.loads(args.a.read_text()), json.loads(args.b.read_text()), tuple(args.names))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
