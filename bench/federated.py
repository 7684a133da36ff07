"""Federated against central: the bank from ``protofuse simulate`` and the bank from ``fit`` on the
same experts and queries, scored on the same paired episodes (new 5-way tasks no expert covers).

    python -m bench.federated --out bench-results/federated            # reported seeds
    python -m bench.federated --modes shards --seeds 0 --out /tmp/dev   # a development run

Modes: ``shared`` (every expert answers the whole query pool, as in ``bench.run``) and ``shards``
(the pool split into disjoint private shards, one per expert). ``--robust`` adds the poor and the
overconfident expert. Writes results.md and results.json (accuracy per k, paired gaps, rounds,
traffic per client and round against the shared weights, trust per expert).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench.datasets import DATASETS
from bench.demo import EXPERTS_PY, REPO, spec_entry
from bench.federations import DEFAULT_RECIPES, ROBUSTNESS_RECIPES, SPARSE_RECIPES
from bench.run import (
    REPORT_SEEDS,
    SHOTS,
    accuracy,
    build_world,
    draw_episode,
    episode_tasks,
    in_task_order,
    log,
)
from protofuse.bank import Bank, load_bank
from protofuse.flower.simulation import simulate


def shard_rows(n: int, parts: int, seed: int) -> list[np.ndarray]:
    """Disjoint private shards of a query pool of n rows (sorted row indices), one per expert."""
    return [
        np.sort(rows) for rows in np.array_split(np.random.default_rng(seed).permutation(n), parts)
    ]


def write_spec(
    folder: Path,
    world,
    recipes,
    dataset: str,
    seed: int,
    mode: str,
    rounds: int,
    aggregation: str = "rowwise",
    keep: int = 2,
    federation: dict[str, object] | None = None,
    model: dict[str, object] | None = None,
    privacy: dict[str, object] | None = None,
) -> Path:
    """A spec folder for the world's experts: shared pool or one disjoint shard per expert;
    ``federation``, ``model`` and ``privacy``: ``[federation]``, ``[model]`` and ``[privacy]``
    settings (TOML values as Python values)."""
    folder.mkdir(parents=True, exist_ok=True)
    qx = world.splits.queries.x
    files = {}
    if mode == "shared":
        np.save(folder / "queries.npy", qx)
        files = {r.name: "queries.npy" for r in recipes}
    else:
        for i, (r, rows) in enumerate(
            zip(recipes, shard_rows(len(qx), len(recipes), seed), strict=True)
        ):
            np.save(folder / f"shard{i}.npy", qx[rows])
            files[r.name] = f"shard{i}.npy"
    lines = "\n".join(
        f'{r.name} = demo_expert("{dataset}", "{r.name}", seed={seed}, split_seed={seed})'
        for r in recipes
    )
    (folder / "experts.py").write_text(
        EXPERTS_PY.format(dataset=dataset, lines=lines, repo=str(REPO))
    )
    shape = world.dataset.image_shape
    tables = {
        "data": {"image_shape": list(shape)} if shape else {},
        "model": model or {},
        "training": {"seed": seed},
        "federation": {
            "rounds": rounds,
            "aggregation": aggregation,
            "keep_checkpoints": keep,
            **(federation or {}),
        },
        "privacy": privacy or {},
    }
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()) + "\n"
        for name, values in tables.items()
        if values
    )
    text += "\n".join(
        spec_entry(r.name, f"experts:{r.name}", r.classes, files[r.name]) for r in recipes
    )
    (folder / "spec.toml").write_text(text)
    return folder / "spec.toml"


def central_bank(world, recipes, mode: str, seed: int, model: dict | None = None) -> Bank:
    """``fit`` on exactly the triples the federation trains on (shared pool, or shards), with
    the same ``[model]`` settings."""
    if mode == "shared":
        return world.banks["protofuse"]
    from client_sdk.experts import query_expert
    from protofuse.bank import fit_bank
    from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings
    from protofuse.triples import assemble

    qx = world.splits.queries.x
    shards = [qx[rows] for rows in shard_rows(len(qx), len(recipes), seed)]
    outputs = [
        query_expert(e.expert, s, e.name) for e, s in zip(world.experts, shards, strict=True)
    ]
    triples = assemble(
        [e.name for e in world.experts], [e.labels for e in world.experts], shards, outputs
    )
    return fit_bank(
        triples,
        ModelSettings(**(model or {})),
        TrainingSettings(seed=seed),
        AdaptSettings(),
        world.dataset.image_shape,
        world.dataset.likelihood,
    )


def score(
    banks: dict[str, Bank], world, tasks, seed: int, max_test: int, zero_shot: bool = True
) -> list[dict]:
    """Every bank on the same episodes (same tasks, supports and test sets), adapted from k
    examples and, with ``zero_shot``, from the task's label names alone."""
    rng = np.random.default_rng(seed + 7)
    rows = []
    for task in tasks:
        ep = draw_episode(world, task, rng, max_test)
        for k in SHOTS:
            sx, sy = ep.support(k)
            names = np.asarray(task)[sy]
            row = {"task": list(task), "k": k}
            for name, bank in banks.items():
                row[name] = _scored(partial(bank.adapt, sx, names), task, ep, row, name)
                if zero_shot:
                    row[f"{name} zero-shot"] = _scored(
                        partial(bank.zero_shot, list(task)), task, ep, row, f"{name} zero-shot"
                    )
            rows.append(row)
    return rows


def _scored(adapted, task, ep, row: dict, name: str) -> float:
    """Accuracy of the adapted model on the episode's test set. A bank whose adaptation diverges
    (``Bank.adapt`` refuses: a DP bank's noise can make its features overflow) answers nothing:
    scored as a constant guess of the task's first class, and counted in ``row["diverged"]``."""
    try:
        return accuracy(in_task_order(adapted(), task).predict_proba(ep.test_x), ep.test_y)
    except ValueError as err:
        if "diverged" not in str(err):
            raise
        row.setdefault("diverged", []).append(name)
        return accuracy(np.zeros((len(ep.test_y), len(task))), ep.test_y)


def curve(spec: Path, run: Path, bank: Bank, world, tasks, seed: int, max_test: int) -> list[dict]:
    """The bank's accuracy at k = 5 and zero-shot every 5 rounds (the first seed's run keeps every
    checkpoint)."""
    import copy

    from protofuse.families.discriminative import load_shared
    from protofuse.spec import load_spec
    from protofuse_server.fusion.server_app import STORE, run_key
    from protofuse_server.fusion.store import BankStore

    out = []
    with BankStore(run / STORE, run_key(load_spec(spec, experts_required=False))) as store:
        kept = [r for r, _ in store.rounds()]
        for r in [r for r in kept if r % 5 == 0 or r == kept[-1]]:
            at = copy.deepcopy(bank)
            load_shared(at.model, store.weights(r))
            rows = score({"bank": at}, world, tasks, seed, max_test)
            out.append(
                {
                    "round": r,
                    "k5": 100 * np.mean([x["bank"] for x in rows if x["k"] == 5]),
                    "zero_shot": 100 * np.mean([x["bank zero-shot"] for x in rows if x["k"] == 5]),
                }
            )
    return out


def summarize(rows: list[dict], a: str, b: str) -> dict:
    out = {}
    for k in SHOTS:
        sel = [r for r in rows if r["k"] == k]
        xa, xb = np.array([r[a] for r in sel]), np.array([r[b] for r in sel])
        gap = xa - xb
        out[k] = {
            a: 100 * xa.mean(),
            b: 100 * xb.mean(),
            "gap": 100 * gap.mean(),
            "gap_se": 100 * gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else float("nan"),
            "n": len(sel),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.federated", description=__doc__.splitlines()[0]
    )
    p.add_argument("--dataset", default="mnist5k", choices=DATASETS)
    p.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS))
    p.add_argument("--modes", nargs="+", default=["shared", "shards"], choices=["shared", "shards"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--tasks", type=int, default=10, help="new 5-way tasks per seed")
    p.add_argument("--max-test", type=int, default=300)
    p.add_argument(
        "--robust", action="store_true", help="add the poor and the overconfident expert"
    )
    p.add_argument(
        "--sparse",
        action="store_true",
        help="sparse label coverage: five experts of three classes, half the labels covered once",
    )
    p.add_argument(
        "--aggregation",
        choices=["rowwise", "fedavg"],
        default="rowwise",
        help="how prototype rows are averaged",
    )
    p.add_argument(
        "--curve-tasks",
        type=int,
        default=5,
        help="tasks of the first seed scored at every 5th round (accuracy against rounds)",
    )
    p.add_argument(
        "--normalization",
        choices=["batch", "layer"],
        help=(
            "[model] normalization of both the federation and central fit (default: the "
            "spec's; auto: layer norm federated, batch norm central)"
        ),
    )
    p.add_argument(
        "--dp-epsilon",
        type=float,
        help="federate with [privacy] mode = 'dp' and this epsilon (central fit stays plain)",
    )
    p.add_argument(
        "--secure-aggregation",
        action="store_true",
        help=(
            "federate with [privacy] mode = 'secagg' (Flower's SecAgg+), and the same federation "
            "plainly, paired"
        ),
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.dp_epsilon and args.secure_aggregation:
        p.error("--dp-epsilon and --secure-aggregation are two privacy modes: choose one")
    model = {"normalization": args.normalization} if args.normalization else {}
    privacy = {"mode": "dp", "epsilon": args.dp_epsilon} if args.dp_epsilon else None
    if args.secure_aggregation:
        privacy = {"mode": "secagg"}
    recipes = (SPARSE_RECIPES if args.sparse else DEFAULT_RECIPES) + (
        ROBUSTNESS_RECIPES if args.robust else ()
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    for seed in args.seeds:
        world = build_world(
            args.dataset, seed, recipes, {"protofuse": (model, {})}, None, [], ceiling=False
        )
        tasks = episode_tasks(recipes, world.dataset.label_names, [5], args.tasks, seed)
        for mode in args.modes:
            t0 = time.perf_counter()
            central = central_bank(world, recipes, mode, seed, model)
            t_central = (
                time.perf_counter()
                - t0
                + (world.timings.get("fit protofuse", 0.0) if mode == "shared" else 0.0)
            )
            spec, run, t_fed = _federate(
                args,
                world,
                recipes,
                seed,
                mode,
                model,
                "",
                keep=args.rounds + 2 if seed == args.seeds[0] else 2,
                privacy=privacy,
            )
            federated = load_bank(run)
            banks = {"federated": federated, "central": central}
            # The same federation without its bad participants (--robust) or without secure
            # aggregation (--secure-aggregation), on the same tasks.
            t_plain = None
            if args.robust:
                _, honest, _ = _federate(args, world, DEFAULT_RECIPES, seed, mode, model, "-honest")
                banks["federated honest"] = load_bank(honest)
            if args.secure_aggregation:
                _, plain, t_plain = _federate(args, world, recipes, seed, mode, model, "-plain")
                banks["federated plain"] = load_bank(plain)
            rows = score(banks, world, tasks, seed, args.max_test)
            rounds = json.loads((run / "rounds.json").read_text())["rounds"]
            traffic = [
                r["bytes_per_client"] / r["shared_bytes"]
                for r in rounds
                if r["phase"] != "agreement"
            ]
            entry = {
                "seed": seed,
                "mode": mode,
                "rows": rows,
                "rounds": rounds,
                "traffic_ratio_max": max(traffic),
                "seconds": {"central": t_central, "federated": t_fed, "plain": t_plain},
                "trust": {
                    e.name: {
                        "federated": e.weight,
                        "central": next(c.weight for c in central.experts if c.name == e.name),
                    }
                    for e in federated.experts
                },
            }
            if seed == args.seeds[0]:
                entry["curve"] = curve(
                    spec, run, federated, world, tasks[: args.curve_tasks], seed, args.max_test
                )
            results["runs"].append(entry)
            s = summarize(rows, "federated", "central")
            log(
                f"seed {seed} {mode}: "
                + "  ".join(
                    f"k={k} fed {v['federated']:.1f} central {v['central']:.1f} gap "
                    f"{v['gap']:+.2f}±{v['gap_se']:.2f}"
                    for k, v in s.items()
                )
                + f"  ({t_fed:.0f}s federated, {t_central:.0f}s central)"
            )
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (args.out / "results.md").write_text(report(results))
    plot_curves(results, args.out / "accuracy_vs_rounds.png")
    print(report(results))
    return 0


def _federate(
    args: argparse.Namespace,
    world,
    recipes,
    seed: int,
    mode: str,
    model: dict,
    suffix: str,
    keep: int = 2,
    privacy: dict[str, object] | None = None,
) -> tuple[Path, Path, float]:
    """One federation of the seed and mode (``run-MODE-SEED{suffix}``): its spec, its run folder
    and its seconds."""
    run = args.out / f"run-{mode}-{seed}{suffix}"
    spec = write_spec(
        args.out / f"spec-{mode}-{seed}{suffix}",
        world,
        recipes,
        args.dataset,
        seed,
        mode,
        args.rounds,
        args.aggregation,
        keep=keep,
        model=model,
        privacy=privacy,
    )
    t0 = time.perf_counter()
    simulate(spec, run, echo=lambda line: None)
    return spec, run, time.perf_counter() - t0


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r.get("curve")]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        rounds = [c["round"] for c in r["curve"]]
        ax.plot(
            rounds,
            [c["k5"] for c in r["curve"]],
            marker="o",
            label=f"seed {r['seed']}, {r['mode']} queries, k = 5",
        )
        ax.plot(
            rounds,
            [c["zero_shot"] for c in r["curve"]],
            linestyle="--",
            label=f"seed {r['seed']}, {r['mode']} queries, zero-shot",
        )
    ax.set_xlabel("round (incl. the agreement round)")
    ax.set_ylabel("accuracy on new 5-way tasks (%)")
    ax.set_title("federated bank against rounds (5 new tasks per curve)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _against(rows: list[dict], other: str, title: str, columns: tuple[str, str]) -> list[str]:
    """The federation's accuracy against a second federation's on the same tasks, paired."""
    g = summarize(rows, "federated", other)
    return [
        f"{title} (both federated, same tasks):",
        "",
        f"| k | {columns[0]} | {columns[1]} | paired gap (± s.e.) |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['federated']:.1f} | {v[other]:.1f} | {v['gap']:+.2f} ± {v['gap_se']:.2f} |"
            for k, v in g.items()
        ),
        "",
    ]


def report(results: dict) -> str:
    lines = [
        "# Federated (protofuse simulate) against central (protofuse fit)",
        "",
        f"Settings: {results['args']}",
        "",
    ]
    for mode in ("shared", "shards"):
        runs = [r for r in results["runs"] if r["mode"] == mode]
        if not runs:
            continue
        rows = [row for r in runs for row in r["rows"]]
        s = summarize(rows, "federated", "central")
        z = summarize(rows, "federated zero-shot", "central zero-shot")
        lines += [
            f"## {mode} queries (seeds {[r['seed'] for r in runs]}, {s[1]['n']} episodes per k)",
            "",
            "| k | federated | central | paired gap (± s.e.) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['federated']:.1f} | {v['central']:.1f} | {v['gap']:+.2f} ± "
            f"{v['gap_se']:.2f} |"
            for k, v in s.items()
        ]
        lines += [
            f"| zero-shot | {z[1]['federated zero-shot']:.1f} | {z[1]['central zero-shot']:.1f} | "
            f"{z[1]['gap']:+.2f} ± {z[1]['gap_se']:.2f} |",
            "",
        ]
        if "federated honest" in rows[0]:
            lines += _against(
                rows,
                "federated honest",
                "With the bad participants against the same federation without them",
                ("with them", "without"),
            )
        if "federated plain" in rows[0]:
            lines += _against(
                rows,
                "federated plain",
                "Secure aggregation against the same federation without it",
                ("secure aggregation", "plain"),
            )
            lines += [
                f"Time: {np.mean([r['seconds']['plain'] for r in runs]):.0f} s plain.",
                "",
            ]
        diverged = [name for row in rows for name in row.get("diverged", [])]
        if diverged:
            lines += [
                f"Adaptation diverged (the bank's features overflow; scored as a constant guess "
                f"of the task's first class) in {len(diverged)} of {len(rows)} scored episodes: "
                + ", ".join(f"{n} {diverged.count(n)}" for n in sorted(set(diverged))),
                "",
            ]
        lines += [
            f"Traffic: at most {max(r['traffic_ratio_max'] for r in runs):.4f} x the shared "
            "weights per client and round. "
            f"Time: {np.mean([r['seconds']['federated'] for r in runs]):.0f} s federated, "
            f"{np.mean([r['seconds']['central'] for r in runs]):.0f} s central (1 torch thread per "
            "process, 2 cores).",
            "",
        ]
        for r in runs:
            if r.get("curve"):
                lines += [
                    f"Accuracy against rounds (seed {r['seed']}, {len(r['curve'])} checkpoints, k "
                    "= 5 / zero-shot): "
                    + ", ".join(
                        f"{c['round']}: {c['k5']:.1f} / {c['zero_shot']:.1f}" for c in r["curve"]
                    ),
                    "",
                ]
        lines += ["| expert | trust federated | trust central |", "|---|---|---|"]
        for name in runs[0]["trust"]:
            lines.append(
                f"| {name} | "
                + " / ".join(f"{r['trust'][name]['federated']:.2f}" for r in runs)
                + " | "
                + " / ".join(f"{r['trust'][name]['central']:.2f}" for r in runs)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
