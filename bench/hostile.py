"""Hostile clients against the federation's defences: new-task accuracy of the bank a federation
makes with 1 or 2 of its 7 clients attacking, paired against the same federation without
attackers (same experts, queries and tasks), and where trust ranks the attackers.

    python -m bench.hostile --out bench-results/hostile                      # reported seeds
    python -m bench.hostile --seeds 0 --rounds 10 --attacks flip --out /tmp/dev  # development
    python -m bench.hostile --reuse --out bench-results/hostile  # resume; score what is there

The federation is the benchmark's MNIST-5k one with its poor and overconfident experts (7
clients, shared query pool). The attacks are bench/hostile_client.py's (scaled, sign-flipped and
noise updates; lying counts and agreement; a label-flipping expert that also lies; a client
declaring labels it has no expert for); the first one or two of the five sound experts turn
hostile. ``clean, defences off`` is the clean federation with the settings that switch the
defences off (no clipping, no weight cap, no evidence): the defences' clean-run cost is its gap to
``clean``. ``absent xN`` is the federation without the N clients that turn hostile: an attacker can
always withhold what its expert knows, so it is the reference for a defence that excludes the
attackers (not a bound: an attack that still sends some real knowledge can score above it).
Writes results.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from bench.datasets import DATASETS
from bench.federated import score, summarize, write_spec
from bench.federations import DEFAULT_RECIPES, ROBUSTNESS_RECIPES
from bench.run import (
    REPORT_SEEDS,
    SHOTS,
    build_world,
    episode_tasks,
    log,
)
from protofuse.bank import Bank, load_bank
from protofuse.flower.simulation import app_dir, simulate

ATTACKS = ("scale", "flip", "noise", "liar", "labelflip", "phantom")
DEFENCES_OFF = {"clip_factor": 1e6, "max_weight_ratio": 1e6, "evidence": False, "combine": "mean"}
CLIENT_APP = 'clientapp = "client_sdk.clientapp.app:app"'
HOSTILE = Path(__file__).with_name("hostile_client.py")


def hostile_app(folder: Path) -> Path:
    """A copy of protofuse's Flower app whose ClientApp is bench/hostile_client.py's."""
    app = folder / "hostile-app"
    app.mkdir(parents=True, exist_ok=True)
    pyproject = (app_dir() / "pyproject.toml").read_text()
    if CLIENT_APP not in pyproject:
        raise SystemExit("protofuse's Flower app names another ClientApp: update bench/hostile.py")
    (app / "pyproject.toml").write_text(
        pyproject.replace(CLIENT_APP, 'clientapp = "hostile_client:app"')
    )
    shutil.copy(HOSTILE, app)
    return app


FINISHED = "finished.json"  # written beside a scenario's run once its federation completed


def finished(folder: Path, settings: dict[str, str]) -> float | None:
    """The seconds a scenario's completed federation took (``FINISHED``), or None where it did
    not complete (a bank without the marker may be an interrupted run's last checkpoint) or ran
    with other ``settings``."""
    try:
        done = json.loads((folder / FINISHED).read_text())
        return float(done["seconds"]) if done["settings"] == settings else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def scenarios(attacks: list[str], counts: list[int]) -> list[tuple[str, str | None, int]]:
    """(name, attack, number of hostile clients); the clean runs first, then the federations
    without the clients that turn hostile (the reference for a defence that excludes them: an
    attacker can always withhold its expert's knowledge)."""
    out: list[tuple[str, str | None, int]] = [("clean", None, 0), ("clean, defences off", None, 0)]
    out += [(f"absent x{n}", "absent", n) for n in counts]
    return out + [(f"{a} x{n}", a, n) for a in attacks for n in counts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k", choices=DATASETS)
    p.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--hostile", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--tasks", type=int, default=10, help="new 5-way tasks per seed")
    p.add_argument("--max-test", type=int, default=300)
    p.add_argument(
        "--normalization",
        choices=["batch", "layer"],
        help="[model] normalization (default: the spec's, auto: layer norm in a federation)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="SCENARIO",
        help='run only these scenarios, e.g. "clean" "labelflip x2" (default: every one)',
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="score a scenario's finished federation under --out instead of running it again "
        "(to resume an interrupted run, or to score runs made in several invocations together; "
        "the marker records the settings, not the code: empty --out after changing the code)",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    model = {"normalization": args.normalization} if args.normalization else None
    args.out = args.out.resolve()  # Flower's processes run in other folders
    recipes = DEFAULT_RECIPES + ROBUSTNESS_RECIPES
    args.out.mkdir(parents=True, exist_ok=True)
    app = hostile_app(args.out)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    for seed in args.seeds:
        world = build_world(args.dataset, seed, recipes, {}, None, [], ceiling=False)
        tasks = episode_tasks(recipes, world.dataset.label_names, [5], args.tasks, seed)
        banks: dict[str, Bank] = {}
        for name, attack, n in scenarios(args.attacks, args.hostile):
            if args.only and name not in args.only:
                continue
            attackers = [r.name for r in DEFAULT_RECIPES[:n]]
            plan = {
                a: {"attack": attack, "labels": list(world.dataset.label_names)}
                for a in attackers
                if attack != "absent"
            }
            members = [r for r in recipes if attack != "absent" or r.name not in attackers]
            os.environ["PROTOFUSE_BENCH_HOSTILE"] = json.dumps(plan)
            folder = args.out / f"seed{seed}" / name.replace(" ", "_").replace(",", "")
            settings = {
                "dataset": args.dataset,
                "seed": str(seed),
                "scenario": name,
                "rounds": str(args.rounds),
                "normalization": str(args.normalization),
            }
            seconds = finished(folder, settings) if args.reuse else None
            if seconds is None:
                spec = write_spec(
                    folder / "spec",
                    world,
                    members,
                    args.dataset,
                    seed,
                    "shared",
                    args.rounds,
                    federation=DEFENCES_OFF if name == "clean, defences off" else None,
                    model=model,
                )
                t0 = time.perf_counter()
                simulate(spec, folder / "run", echo=lambda line: None, app=app)
                seconds = time.perf_counter() - t0
                (folder / FINISHED).write_text(
                    json.dumps({"seconds": seconds, "settings": settings})
                )
            banks[name] = load_bank(folder / "run")
            trust = {e.name: e.weight for e in banks[name].experts}
            honest = [v for k, v in trust.items() if k not in attackers]
            attackers = attackers if attack != "absent" else []
            results["runs"].append(
                {
                    "seed": seed,
                    "scenario": name,
                    "attackers": attackers,
                    "trust": trust,
                    "ranked_below": bool(attackers)
                    and max(trust.get(a, 0.0) for a in attackers) < min(honest),
                    "seconds": seconds,
                }
            )
            log(f"seed {seed} {name}: {seconds:.0f}s, trust {trust}")
        rows = score(banks, world, tasks, seed, args.max_test, zero_shot=False)
        for run in results["runs"]:
            if run["seed"] == seed:
                n = run["scenario"].rpartition(" x")[2]
                run["rows"] = [
                    {
                        "task": r["task"],
                        "k": r["k"],
                        "acc": r[run["scenario"]],
                        "clean": r["clean"],
                        "absent": r.get(f"absent x{n}", float("nan")),
                    }
                    for r in rows
                ]
        os.environ.pop("PROTOFUSE_BENCH_HOSTILE", None)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / "results.md").write_text(report(results))
    print(report(results))
    return 0


def report(results: dict) -> str:
    names = list(dict.fromkeys(r["scenario"] for r in results["runs"]))
    seeds = sorted({r["seed"] for r in results["runs"]})
    lines = [
        "# Hostile clients against the federation's defences",
        "",
        f"Settings: {results['args']}",
        "",
        "New-task accuracy (5-way, %) of each federation's bank, and its paired gap to the clean "
        f"federation (same tasks and supports; seeds {seeds}; ± one standard error).",
        "",
        "| scenario | " + " | ".join(f"k={k} | gap k={k}" for k in SHOTS) + " | attackers ranked "
        "below every honest client |",
        "|---|" + "---|---|" * len(SHOTS) + "---|",
    ]
    for name in names:
        runs = [r for r in results["runs"] if r["scenario"] == name]
        rows = [
            {"k": x["k"], "scenario": x["acc"], "clean": x["clean"]}
            for r in runs
            for x in r["rows"]
        ]
        s = summarize(rows, "scenario", "clean")
        cells = " | ".join(
            f"{v['scenario']:.1f} | {v['gap']:+.2f} ± {v['gap_se']:.2f}" for v in s.values()
        )
        ranked = (
            "n/a"
            if not runs[0]["attackers"]
            else f"{sum(r['ranked_below'] for r in runs)} / {len(runs)} seeds"
        )
        lines.append(f"| {name} | {cells} | {ranked} |")
    lines += [
        "",
        "Paired gap of each attacked federation to the same federation without its attackers "
        "(`absent`: what an attacker that withholds its expert costs; the reference for a "
        "defence that excludes the attackers, not a bound):",
        "",
        "| scenario | " + " | ".join(f"gap k={k}" for k in SHOTS) + " |",
        "|---|" + "---|" * len(SHOTS),
    ]
    for name in names:
        runs = [r for r in results["runs"] if r["scenario"] == name]
        if not runs[0]["attackers"]:
            continue
        rows = [
            {"k": x["k"], "scenario": x["acc"], "absent": x["absent"]}
            for r in runs
            for x in r["rows"]
        ]
        s = summarize(rows, "scenario", "absent")
        cells = " | ".join(f"{v['gap']:+.2f} ± {v['gap_se']:.2f}" for v in s.values())
        lines.append(f"| {name} | {cells} |")
    lines += ["", "Trust per expert (seed by seed):", ""]
    experts = sorted({e for r in results["runs"] for e in r["trust"]})
    lines += ["| scenario | " + " | ".join(experts) + " |", "|---|" + "---|" * len(experts)]
    for name in names:
        runs = [r for r in results["runs"] if r["scenario"] == name]
        lines.append(
            f"| {name} | "
            + " | ".join(
                " / ".join(
                    ("**" if e in r["attackers"] else "")
                    + f"{r['trust'].get(e, float('nan')):.2f}"
                    + ("**" if e in r["attackers"] else "")
                    for r in runs
                )
                for e in experts
            )
            + " |"
        )
    seconds = np.mean([r["seconds"] for r in results["runs"]])
    lines += [
        "",
        f"Attackers in bold; an attacker without a trust value never got a record (every reply "
        f"refused). The liar claims more examples than the queries it declared, so its replies "
        f"are refused from its first round: its rows are what losing its client costs. "
        f"Rounds: {results['args']['rounds']}. "
        f"Time per federation: {seconds:.0f} s (1 torch thread per process, 2 cores).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
