"""Paired gaps between two versions of one dataset scored on the same episodes.

    python -m bench.compare bench-results/images digits-colour:digits mnist5k-colour:mnist5k
    mnist5k-64:mnist5k

The colour and resized sets keep every row of the set they come from, in order, so a seed
draws the same splits, tasks, supports and test rows from both: the gap between them on each
episode is the effect of the inputs alone. Appends a table to the results folder's results.md
(and writes comparison.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METHODS = ("protofuse", "protofuse zero-shot")


def paired_gaps(
    episodes: list[dict], variant: str, base: str, method: str
) -> dict[int, tuple[float, float, int]]:
    """k -> (mean gap in points, its standard error, episodes) of ``variant`` minus ``base``."""
    key = lambda e: (e["seed"], e["task"], e["k"], e["method"])  # noqa: E731
    base_acc = {key(e): e["accuracy"] for e in episodes if e["dataset"] == base}
    out = {}
    for k in sorted({e["k"] for e in episodes}):
        gaps = np.array(
            [
                100 * (e["accuracy"] - base_acc[key(e)])
                for e in episodes
                if e["dataset"] == variant
                and e["k"] == k
                and e["method"] == method
                and key(e) in base_acc
            ]
        )
        if len(gaps):
            se = float(gaps.std(ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else float("nan")
            out[k] = (float(gaps.mean()), se, len(gaps))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("results", type=Path, help="a bench.run output folder holding results.json")
    p.add_argument("pairs", nargs="+", help="VARIANT:BASE dataset names, e.g. digits-colour:digits")
    args = p.parse_args(argv)
    episodes = json.loads((args.results / "results.json").read_text())["episodes"]
    table = {}
    lines = [
        "",
        "### Each variant minus the set it was built from, paired over the same episodes (points; "
        "± standard error)",
        "",
    ]
    ks = sorted({e["k"] for e in episodes})
    lines += [
        "| variant - base | method | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for pair in args.pairs:
        variant, _, base = pair.partition(":")
        for method in METHODS:
            gaps = paired_gaps(episodes, variant, base, method)
            if not gaps:
                continue
            table[f"{pair} {method}"] = {str(k): v for k, v in gaps.items()}
            lines.append(
                f"| {variant} - {base} | {method} | "
                + " | ".join(
                    f"{gaps[k][0]:+.1f} ± {gaps[k][1]:.1f} (n = {gaps[k][2]})" if k in gaps else ""
                    for k in ks
                )
                + " |"
            )
    (args.results / "comparison.json").write_text(json.dumps(table, indent=1))
    with open(args.results / "results.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
