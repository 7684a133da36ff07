"""Scale of the simulation: wall time and peak memory of an N-client, R-round ``protofuse
simulate`` on this machine, every client sharing one query file (memory-mapped, not copied).

    python -m bench.scale --clients 50 --rounds 3 --out bench-results/scale

Clients are the demo's five experts repeated under distinct names (each a client of its own with
its own seed, cache and optimizer). Memory is sampled every 0.5 s from /proc: the machine's used
memory above its level before the run, and the largest resident set of any Flower or Ray process.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from bench.datasets import DATASETS, load_dataset, make_splits
from bench.demo import EXPERTS_PY, REPO, spec_entry
from bench.federations import DEFAULT_RECIPES
from protofuse.flower.simulation import simulate


def used_memory() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda k: int(info[k].split()[0]) * 1024  # noqa: E731
    return kib("MemTotal") - kib("MemAvailable")


def flower_processes_rss() -> dict[int, int]:
    """Resident set of every process whose command line mentions Flower or Ray."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if any(s in cmd for s in (b"flwr", b"flower", b"ray::", b"raylet", b"gcs_server")):
                status = Path(f"/proc/{pid}/status").read_text()
                out[int(pid)] = (
                    int(
                        next(
                            line for line in status.splitlines() if line.startswith("VmRSS")
                        ).split()[1]
                    )
                    * 1024
                )
        except (OSError, StopIteration, ValueError):
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    folder = args.out / "federation"
    folder.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.dataset)
    np.save(folder / "queries.npy", make_splits(ds, 0).queries.x.astype(np.float32))
    lines = "\n".join(
        f'{r.name} = demo_expert("{args.dataset}", "{r.name}", seed=0, split_seed=0)'
        for r in DEFAULT_RECIPES
    )
    (folder / "experts.py").write_text(
        EXPERTS_PY.format(dataset=args.dataset, lines=lines, repo=str(REPO))
    )
    entries = []
    for i in range(args.clients):
        r = DEFAULT_RECIPES[i % len(DEFAULT_RECIPES)]
        entries.append(spec_entry(f"{r.name}-{i}", f"experts:{r.name}", r.classes, "queries.npy"))
    shape = f"[data]\nimage_shape = {list(ds.image_shape)}\n\n" if ds.image_shape else ""
    (folder / "spec.toml").write_text(
        shape + f"[federation]\nrounds = {args.rounds}\n\n" + "\n".join(entries)
    )

    base = used_memory()
    peak = {"used": 0, "process": 0, "flower_total": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            rss = flower_processes_rss()
            peak["used"] = max(peak["used"], used_memory() - base)
            peak["process"] = max(peak["process"], max(rss.values(), default=0))
            peak["flower_total"] = max(peak["flower_total"], sum(rss.values()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    run = simulate(folder / "spec.toml", args.out / "run", echo=lambda line: None)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    rounds = json.loads((run / "rounds.json").read_text())["rounds"]
    result = {
        "clients": args.clients,
        "rounds": args.rounds,
        "schedule_rounds": len(rounds),
        "dataset": args.dataset,
        "wall_s": wall,
        "peak_used_above_baseline_mb": peak["used"] / 2**20,
        "peak_flower_ray_rss_sum_mb": peak["flower_total"] / 2**20,
        "peak_single_process_mb": peak["process"] / 2**20,
        "queries_file_mb": (folder / "queries.npy").stat().st_size / 2**20,
        "clients_per_round": [r["clients"] for r in rounds],
        "cpus": os.cpu_count(),
        "torch_threads_per_client": 1,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    md = "\n".join(
        f"| {k} | {v if not isinstance(v, float) else round(v, 1)} |" for k, v in result.items()
    )
    (args.out / "results.md").write_text("# Simulation scale\n\n| | |\n|---|---|\n" + md + "\n")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
