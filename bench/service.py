"""The adaptation service's cost: latency against the same adaptation in-process, and throughput.

    python -m bench.service --bank RUN_OR_BANK --dataset mnist5k --out bench-results/service

1. Latency: k-shot, n-way tasks drawn from the dataset's support split, adapted (a) in-process
   with ``bank.adapt`` and (b) through ``protofuse serve`` (its own process, mutual TLS,
   ``--max-concurrent 1``) with ``FusionClient.adapt``, which includes encoding, TLS, signing,
   sending the model back and verifying its signature. Calls alternate between the two, same
   tasks and seeds, after warm-up calls. The ratio of medians is the service's overhead.
2. Throughput: ``--callers`` threads, each with its own FusionClient, adapt in a loop for
   ``--seconds`` against a service with the default concurrency (one slot per CPU). Requests per
   second, errors, and the service's peak resident memory (VmHWM from /proc).

One torch thread in this process and one per service worker. Without ``--bank`` a bank is fitted
centrally first (``protofuse fit`` on the dataset's demo federation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.datasets import load_dataset, make_splits, sample_support
from client_sdk import FusionClient
from protofuse.bank import load_bank
from protofuse.flower.launcher import free_port
from protofuse_server.certs import init


def tasks(
    dataset: str, split_seed: int, ways: int, k: int, n: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    splits = make_splits(load_dataset(dataset), split_seed)
    rng = np.random.default_rng(seed)
    names = np.asarray(splits.support.label_names)
    out = []
    for _ in range(n):
        classes = sorted(rng.choice(len(names), ways, replace=False).tolist())
        x, y = sample_support(splits.support, classes, k, rng)
        out.append((x.astype(np.float32), names[classes][y]))
    return out


def percentiles(ms: list[float]) -> dict[str, float]:
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(np.mean(ms)),
        "n": len(ms),
    }


def start_service(
    bank: Path, certs: Path, port: int, log: Path, extra: list[str]
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "protofuse_cli.main",
        "serve",
        str(bank),
        "--address",
        f"127.0.0.1:{port}",
        "--certs",
        str(certs),
        *extra,
    ]
    with open(log, "wb") as out:  # the child keeps its own copy
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    with FusionClient(f"127.0.0.1:{port}", certs=certs, timeout=5) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client.health("protofuse.v1.Fusion") == "SERVING":
                    return proc
            except Exception:
                pass
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the service did not come up; see {log}")


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        / 1024
    )


def latency(bank_path: Path, certs: Path, work: list, warmup: int, out: Path) -> dict:
    bank = load_bank(bank_path)
    port = free_port()
    proc = start_service(
        bank_path, certs, port, out / "service-latency.log", ["--max-concurrent", "1"]
    )
    local, remote = [], []
    try:
        with FusionClient(f"127.0.0.1:{port}", certs=certs) as client:
            for i, (x, y) in enumerate(work):
                t0 = time.perf_counter()
                bank.adapt(x, y, seed=i)
                t1 = time.perf_counter()
                client.adapt(x, y, seed=i)
                t2 = time.perf_counter()
                if i >= warmup:
                    local.append(1000 * (t1 - t0))
                    remote.append(1000 * (t2 - t1))
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    a, b = percentiles(local), percentiles(remote)
    return {
        "in_process_ms": a,
        "service_ms": b,
        "ratio_p50": b["p50"] / a["p50"],
        "ratio_p99": b["p99"] / a["p99"],
        "service_peak_rss_mib": rss,
    }


def throughput(
    bank_path: Path, certs: Path, work: list, callers: int, seconds: float, out: Path
) -> dict:
    port = free_port()
    proc = start_service(bank_path, certs, port, out / "service-throughput.log", [])
    counts = [0] * callers
    errors: list[str] = []
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    def caller(c: int) -> None:
        torch.set_num_threads(1)
        with FusionClient(f"127.0.0.1:{port}", certs=certs) as client:
            i = c
            while time.monotonic() < stop_at:
                x, y = work[i % len(work)]
                t0 = time.perf_counter()
                try:
                    client.adapt(x, y, seed=i)
                    counts[c] += 1
                    latencies.append(1000 * (time.perf_counter() - t0))
                except Exception as err:
                    errors.append(f"{type(err).__name__}: {err}")
                i += callers

    try:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "callers": callers,
        "seconds": elapsed,
        "requests": sum(counts),
        "requests_per_s": sum(counts) / elapsed,
        "errors": len(errors),
        "first_errors": errors[:3],
        "latency_ms": percentiles(latencies) if latencies else None,
        "service_peak_rss_mib": rss,
    }


def certs_and_bank(
    out: Path, bank: Path | None, dataset: str, split_seed: int, k: int
) -> tuple[Path, Path]:
    """A deployment's certificates under ``out`` and the bank to serve: ``bank``, or one fitted
    centrally on the dataset's demo federation (kept in ``out`` for the next run)."""
    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    if not (certs / "ca.crt").exists():
        init(certs, supernodes=0)
    if bank is None:
        from bench.demo import write_federation
        from protofuse_cli.main import main as cli

        spec = write_federation(out / "federation", dataset, k=k, seed=split_seed)
        bank = out / "bank"
        if not (bank / "meta.json").exists():
            assert cli(["fit", str(spec), "--out", str(bank)]) == 0
    return certs, bank


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.splitlines()[0])
    p.add_argument(
        "--bank",
        type=Path,
        help="bank or run folder (default: fit one on the dataset's demo federation)",
    )
    p.add_argument("--dataset", default="mnist5k", choices=["digits", "mnist5k"])
    p.add_argument(
        "--split-seed",
        type=int,
        default=100,
        help="split the tasks are drawn from (the bank's own, for a bank built by the benchmarks)",
    )
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--k", type=int, default=5)
    p.add_argument(
        "--calls", type=int, default=60, help="latency: measured calls each way, after --warmup"
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--callers",
        type=int,
        nargs="*",
        default=[8, 32],
        help="throughput: concurrent callers, one run for each count (default: 8 32; none: "
        "latency only)",
    )
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    certs, bank = certs_and_bank(args.out, args.bank, args.dataset, args.split_seed, args.k)
    work = tasks(args.dataset, args.split_seed, args.ways, args.k, args.calls + args.warmup, seed=1)
    print(
        f"latency: {args.calls} calls each way ({args.ways}-way, k = {args.k}, {args.dataset}) ...",
        file=sys.stderr,
    )
    lat = latency(bank, certs, work, args.warmup, args.out)
    runs = []
    for callers in args.callers:
        print(f"throughput: {callers} callers for {args.seconds:.0f} s ...", file=sys.stderr)
        runs.append(throughput(bank, certs, work, callers, args.seconds, args.out))
    result = {
        "bank": str(bank),
        "version": load_bank(bank).version,
        "dataset": args.dataset,
        "ways": args.ways,
        "k": args.k,
        "torch_threads": 1,
        "latency": lat,
        "throughput": runs,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    a, b = lat["in_process_ms"], lat["service_ms"]
    table = [
        f"# Adaptation service: {args.ways}-way, k = {args.k}, {args.dataset} (bank "
        f"{result['version']})",
        "",
        "| | p50 (ms) | p99 (ms) | mean (ms) | calls |",
        "|---|---|---|---|---|",
        f"| in-process `bank.adapt` | {a['p50']:.0f} | {a['p99']:.0f} | {a['mean']:.0f} | {a['n']} "
        "|",
        f"| through the service (`FusionClient.adapt`, mTLS, signed and verified) | {b['p50']:.0f} "
        f"| {b['p99']:.0f} | {b['mean']:.0f} | {b['n']} |",
        f"| ratio | {lat['ratio_p50']:.2f} | {lat['ratio_p99']:.2f} | | |",
        "",
        "| concurrent callers | seconds | requests | per second | errors | p50 (ms) | p99 (ms) | "
        "service peak memory (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {t['callers']} | {t['seconds']:.0f} | {t['requests']} | "
            f"{t['requests_per_s']:.2f} | {t['errors']} | "
            + (
                f"{t['latency_ms']['p50']:.0f} | {t['latency_ms']['p99']:.0f}"
                if t["latency_ms"]
                else "- | -"
            )
            + f" | {t['service_peak_rss_mib']:.0f} |"
            for t in runs
        ),
        "",
        f"Latency run: the service's peak memory {lat['service_peak_rss_mib']:.0f} MiB. One torch "
        "thread per process and per service worker; callers and service share the machine's cores.",
    ]
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if all(t["errors"] == 0 for t in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
