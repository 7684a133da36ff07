"""The adaptation service under hostile load: what one request costs, and the service's memory
while many callers mix valid and worst-case requests.

    python -m bench.service_load --out bench-results/service-load        # MNIST-5k bank, 60 s
    python -m bench.service_load --bank RUN_OR_BANK --seconds 20 --out /tmp/load

1. Cost: in-process ``bank.adapt`` time and the process's peak memory for support sets of n
   examples and K classes (new labels, the dearest kind: their prototypes start from scratch),
   from a typical 5-way task to the largest the service accepts by default (``max_work``
   examples x classes) and beyond it (what the red team sent: 2,000 examples of 1,000 labels,
   refused now).
2. Load: ``protofuse serve`` (its own process, mutual TLS, default limits except
   ``--max-per-caller``, raised to the number of callers so that every request reaches the
   workers: all callers here share one host and one certificate) and ``--callers`` threads for
   ``--seconds``, each cycling through a valid 5-way task, the largest request the service
   accepts, a request over the class limit and one over the work limit. Reported: replies by
   kind and status, the service's resident memory (sampled every 0.5 s from /proc) during the run
   and after it, and its peak.

One torch thread in this process and per service worker; callers and service share the cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.service import certs_and_bank, peak_rss_mib, start_service, tasks
from client_sdk import FusionClient, FusionError
from protofuse.bank import Bank, load_bank
from protofuse.flower.launcher import free_port
from protofuse_server.service.settings import ServiceSettings

DEFAULTS = ServiceSettings()


def hostile_support(bank: Bank, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n inputs in the bank's range and k new labels, each used about equally."""
    rng = np.random.default_rng(seed)
    lo, hi = bank.meta.input_range or (0.0, 1.0)
    x = rng.uniform(lo, hi, size=(n, bank.meta.x_dim)).astype(np.float32)
    y = np.array([f"new-{i % k}" for i in range(n)])
    return x, y


def rss_mib(pid: int | None = None) -> float:
    """Resident memory now (VmRSS), of this process or another."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def cost(bank: Bank, shapes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for n, k in shapes:
        x, y = hostile_support(bank, n, k, seed=n + k)
        before = rss_mib()
        t0 = time.perf_counter()
        bank.adapt(x, y)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "n": n,
                "classes": k,
                "work": n * k,
                "accepted_by_default": n <= DEFAULTS.max_support
                and k <= DEFAULTS.max_classes
                and n * k <= DEFAULTS.max_work,
                "seconds": seconds,
                "rss_growth_mib": rss_mib() - before,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
        print(f"cost: n={n} K={k}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return rows


def load(
    bank_path: Path,
    bank: Bank,
    certs: Path,
    work: list,
    callers: int,
    seconds: float,
    out: Path,
) -> dict:
    largest_k = min(DEFAULTS.max_classes, DEFAULTS.max_work // DEFAULTS.max_support)
    kinds = {
        "valid 5-way": work,
        f"largest accepted ({DEFAULTS.max_support} x {largest_k})": [
            hostile_support(bank, DEFAULTS.max_support, largest_k, seed=1)
        ],
        f"over the class limit ({DEFAULTS.max_classes + 1} classes)": [
            hostile_support(bank, 2 * (DEFAULTS.max_classes + 1), DEFAULTS.max_classes + 1, 2)
        ],
        "over the work limit (2000 x 1000)": [hostile_support(bank, 2000, 1000, seed=3)],
    }
    port = free_port()
    proc = start_service(
        bank_path, certs, port, out / "service.log", ["--max-per-caller", str(callers)]
    )
    outcomes: Counter[tuple[str, str]] = Counter()
    samples: list[tuple[float, float]] = []
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()

    def caller(c: int) -> None:
        torch.set_num_threads(1)
        names = list(kinds)
        # retry_busy=False: a refusal is an outcome to count here, not a wait
        with FusionClient(
            f"127.0.0.1:{port}", certs=certs, timeout=300, retry_busy=False
        ) as client:
            i = c
            while time.monotonic() < stop_at:
                kind = names[i % len(names)]
                x, y = kinds[kind][i % len(kinds[kind])]
                try:
                    client.adapt(x, y, seed=i)
                    status = "OK"
                except FusionError as err:
                    status = err.code.name
                except Exception as err:  # the SDK refusing a reply: a finding
                    status = type(err).__name__
                with lock:
                    outcomes[(kind, status)] += 1
                i += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append((time.monotonic() - t0, rss_mib(proc.pid)))
            time.sleep(0.5)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        time.sleep(2.0)
        after = rss_mib(proc.pid)
        peak = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "callers": callers,
        "seconds": elapsed,
        "outcomes": [
            {"kind": kind, "status": status, "count": n}
            for (kind, status), n in sorted(outcomes.items())
        ],
        "rss_mib_samples": samples,
        "rss_mib_during_max": max(r for _, r in samples),
        "rss_mib_after": after,
        "peak_rss_mib": peak,
    }


def report(result: dict) -> str:
    lines = [
        f"# The adaptation service under hostile load (bank {result['version']}, "
        f"{result['dataset']})",
        "",
        "One torch thread per process and per service worker, callers and service on the same "
        "machine's cores. New labels throughout (their prototypes start from scratch: the "
        "dearest adaptation).",
        "",
        "## What one request costs (in-process `bank.adapt`)",
        "",
        "| examples | classes | work (n x K) | accepted by default | seconds | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['n']} | {r['classes']} | {r['work']} | {'yes' if r['accepted_by_default'] else 'no'}"
        f" | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} |"
        for r in result["cost"]
    ]
    load_ = result["load"]
    lines += [
        "",
        f"## {load_['callers']} callers for {load_['seconds']:.0f} s through `protofuse serve`",
        "",
        "| request | status | replies |",
        "|---|---|---|",
    ]
    lines += [f"| {o['kind']} | {o['status']} | {o['count']} |" for o in load_["outcomes"]]
    lines += [
        "",
        f"Service memory: at most {load_['rss_mib_during_max']:.0f} MiB resident during the run "
        f"(peak {load_['peak_rss_mib']:.0f} MiB), {load_['rss_mib_after']:.0f} MiB two seconds "
        "after it.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.service_load", description=__doc__.splitlines()[0]
    )
    p.add_argument("--bank", type=Path, help="bank or run folder (default: fit one centrally)")
    p.add_argument("--dataset", default="mnist5k", choices=["digits", "mnist5k"])
    p.add_argument("--split-seed", type=int, default=100)
    p.add_argument("--callers", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    certs, bank_path = certs_and_bank(args.out, args.bank, args.dataset, args.split_seed, 5)
    bank = load_bank(bank_path)
    shapes = [(25, 5), (500, 50), (2000, 25), (500, 100), (2000, 100), (2000, 1000)]
    result = {
        "bank": str(bank_path),
        "version": bank.version,
        "dataset": args.dataset,
        "torch_threads": 1,
        "limits": DEFAULTS.model_dump(exclude={"max_concurrent"}),
        "cost": cost(bank, shapes),
    }
    work = tasks(args.dataset, args.split_seed, 5, 5, 20, seed=1)
    print(f"load: {args.callers} callers for {args.seconds:.0f} s ...", file=sys.stderr)
    result["load"] = load(bank_path, bank, certs, work, args.callers, args.seconds, args.out)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
