"""Fuzzing of every decoder, validator and loader that reads bytes from outside: each must return,
or refuse with the project's own error, for any input; never crash, hang or blow up memory.

    python -m bench.fuzz --out bench-results/fuzz         # every target, 10,000 cases each
    python -m bench.fuzz --targets manifest spec --runs 1000 --out /tmp/f

With atheris installed (``pip install atheris``; ``make fuzz`` installs it) each target runs
coverage-guided under libFuzzer in its own process (``-timeout`` for hangs, ``-rss_limit_mb`` for
memory), seeded with valid inputs. Without it a mutation fuzzer (byte flips, insertions, cuts and
splices of the same seeds) runs the same targets with the same limits, in-process per case with
an alarm. Writes results.md (a table: target, cases, accepted, refused, crashes, hangs, peak RSS)
and crashing inputs under ``crashes/``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from protofuse import adapted, artifacts
from protofuse.bank import bank_meta
from protofuse.bank_meta import BankMeta, BankMetaError
from protofuse.families import FAMILIES
from protofuse.io import npz_bytes
from protofuse.protocol import federation as wire
from protofuse.protocol import service
from protofuse.records import ExpertRecord, Fidelity
from protofuse.settings import AdaptSettings, FederationSettings, ModelSettings, TrainingSettings
from protofuse.signing import SignatureError
from protofuse.spec import SpecError, load_spec

# The project's own refusals: anything else escaping a target is a crash.
REFUSALS = (wire.WireError, artifacts.ArtifactError, SignatureError, SpecError, BankMetaError)
TIMEOUT_S = 5
BANK = "protofuse-bank"
RSS_LIMIT_MB = 3072


# -- targets ------------------------------------------------------------------------------------


def _spec(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.toml"
        path.write_bytes(data)
        load_spec(path, experts_required=False)


def _bank_meta(data: bytes) -> None:
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        raise BankMetaError("not JSON") from None  # artifacts.decode refuses it before BankMeta
    BankMeta.from_json(record)


def _split(data: bytes, parts: int) -> list[bytes]:
    """``parts`` byte strings from one input: 2-byte little-endian lengths, then the rest."""
    out, at = [], 0
    for _ in range(parts - 1):
        n = int.from_bytes(data[at : at + 2], "little")
        out.append(data[at + 2 : at + 2 + n])
        at += 2 + n
    return [*out, data[at:]]


def _checksummed(data: bytes, kind: str) -> dict[str, bytes]:
    """An artifact's files whose checksum is right, so the fuzzer gets past it to the parsers."""
    meta_bytes, weights = _split(data, 2)
    try:
        meta = json.loads(meta_bytes)
    except (ValueError, RecursionError):
        return {artifacts.META: meta_bytes, artifacts.WEIGHTS: weights}
    if isinstance(meta, dict):
        meta.update(kind=kind, format_version=artifacts.FORMAT_VERSION)
        meta["sha256"] = artifacts.checksum(weights, meta)
        meta_bytes = json.dumps(meta).encode()
    return {artifacts.META: meta_bytes, artifacts.WEIGHTS: weights}


TARGETS: dict[str, Callable[[bytes], object]] = {
    "distribution": wire.decode_distribution,
    "stats": wire.decode_stats,
    "manifest": lambda d: wire.decode_manifest(d, families=FAMILIES),
    "node-description": wire.decode_node_description,
    "round-plan": wire.decode_round_plan,
    "adapt-request": lambda d: service.decode_adapt_request(
        d, max_support=2000, input_width=64, option_names=frozenset({"seed", "prior_strength"})
    ),
    "adapt-response": service.decode_adapt_response,
    "bank-info": service.decode_bank_info,
    "expert-list": service.decode_expert_list,
    "spec": _spec,
    "bank-meta": _bank_meta,
    "npz": artifacts.npz_arrays,
    "artifact": lambda d: artifacts.decode(
        _checksummed(d, "protofuse-bank"), "protofuse-bank", "f"
    ),
    "adapted-model": lambda d: adapted.from_files(
        _checksummed(d, adapted.KIND), unsigned_ok=True, source="f"
    ),
}


# -- seeds: one valid input per target, so the fuzzer starts where the parsers are ---------------


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(2, "little") + p for p in parts[:-1]) + parts[-1]


def seeds() -> dict[str, list[bytes]]:
    record = ExpertRecord("e1", ("a", "b"), Fidelity(0.9, 0.1, 40), 500, 0.75, 0.8)
    manifest = wire.BankManifest(
        "bank-1", 4, ("a", "b", "c"), "0" * 64, "discriminative", (record,)
    )
    head = wire.DiscriminativeHead(0.0, (0.5, -1.0))
    distribution = wire.ExpertDistribution("e1", ("a", "b"), 4, head)
    stats = wire.ImitatorStats("e1", 4, 100, 500, Fidelity(0.9, 0.1, 40), 0.75, 0.3)
    node = wire.NodeDescription("e1", ("a", "b"), 64, 500, (0.0, 1.0))
    plan = wire.RoundPlan(
        4,
        "weighted",
        1,
        3,
        ("a", "b", "c"),
        {"x_dim": 64},
        TrainingSettings(),
        FederationSettings(),
    )
    x = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    request = service.AdaptRequest(x, ("a", "b", "a", "b", "a", "b"), {"seed": "1"})
    weights = npz_bytes({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    meta = {"family": "discriminative", "config": {"x_dim": 64}, "label_names": ["a", "b"]}
    bank = bank_meta(
        "discriminative",
        {"x_dim": 64, "feat_dim": 16},
        ("a", "b"),
        None,
        "bernoulli",
        ModelSettings(),
        TrainingSettings(),
        AdaptSettings(),
        input_range=(0.0, 1.0),
    )
    bank_json = json.dumps({**bank.to_json(), "sha256": "0" * 64}).encode()
    spec = b'[[experts]]\nname = "a"\npredict = "m:f"\nlabels = ["0", "1"]\nqueries = "q.npy"\n'
    return {
        "distribution": [wire.encode_distribution(distribution)],
        "stats": [wire.encode_stats(stats)],
        "manifest": [wire.encode_manifest(manifest)],
        "node-description": [wire.encode_node_description(node)],
        "round-plan": [wire.encode_round_plan(plan)],
        "adapt-request": [service.encode_adapt_request(request)],
        "adapt-response": [
            service.encode_adapt_response(
                service.AdaptResponse(
                    "bank-1",
                    {artifacts.WEIGHTS: weights, artifacts.META: b"{}"},
                    service.FitMetrics(("a", "b"), 6, 0.5, 1.0, "map", ()),
                )
            )
        ],
        "bank-info": [service.encode_bank_info(service.BankInfo(manifest, 64))],
        "expert-list": [
            service.encode_expert_list(
                service.ExpertList("bank-1", (service.ExpertSummary(record, distribution),))
            )
        ],
        "spec": [spec + b"\n[training]\nlr = 0.001\n[federation]\nrounds = 4\n"],
        "bank-meta": [bank_json],
        "npz": [weights],
        "artifact": [_framed(json.dumps(meta).encode(), weights), _framed(bank_json, weights)],
        "adapted-model": [_adapted_model()],
    }


def _adapted_model() -> bytes:
    """A real adapted model's files (a tiny bank fitted for one epoch on random inputs)."""
    import torch

    from protofuse.bank import fit_bank
    from protofuse.triples import assemble

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.random((64, 8)).astype(np.float32)
    answers = rng.dirichlet(np.ones(2), size=64).astype(np.float32)
    triples = assemble(["p", "q"], [("a", "b"), ("b", "c")], [x, x], [answers, answers], [0, 0])
    settings = ModelSettings(feat_dim=4, hidden=8), TrainingSettings(epochs=1), AdaptSettings()
    bank = fit_bank(triples, *settings, None, "gaussian")
    files = bank.adapt(x[:6], np.array(["a", "c"] * 3)).to_files()
    return _framed(files[artifacts.META], files[artifacts.WEIGHTS])


# -- running one case ---------------------------------------------------------------------------


class Counts:
    def __init__(self) -> None:
        self.cases = self.accepted = self.refused = self.crashes = self.hangs = 0


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang


def run_case(target: Callable[[bytes], object], data: bytes, counts: Counts) -> str | None:
    """Run one input; returns the crash's description (None when it returned or was refused)."""
    counts.cases += 1
    try:
        target(data)
    except REFUSALS:
        counts.refused += 1
        return None
    except _Hang:
        counts.hangs += 1
        return "hang"
    except Exception as err:
        counts.crashes += 1
        return f"{type(err).__name__}: {err}"[:300]
    counts.accepted += 1
    return None


def mutate(data: bytes, pool: list[bytes], rng: random.Random) -> bytes:
    """One random edit: flip, set, insert, delete or duplicate bytes, cut, or splice two inputs."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[i % len(b)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[i % len(b)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:
            del b[i : i + rng.randint(1, 8)]
        elif op == 4 and b:
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randint(1, 32)]
        elif op == 5:
            del b[i:]
        else:
            other = rng.choice(pool)
            b = b[:i] + bytearray(other[rng.randrange(len(other) + 1) :])
    return bytes(b)


def fuzz_in_process(name: str, runs: int, seed: int, crashes: Path) -> Counts:
    """The mutation fuzzer: ``runs`` cases grown from the seeds, each under an alarm."""
    rng = random.Random(seed)
    pool = list(seeds()[name])
    target, counts = TARGETS[name], Counts()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for _ in range(runs):
            data = mutate(rng.choice(pool), pool, rng)
            signal.alarm(TIMEOUT_S)
            try:
                crash = run_case(target, data, counts)
            finally:
                signal.alarm(0)
            if crash is not None:
                _save(crashes, name, data, crash)
            elif len(pool) < 256 and rng.random() < 0.05:
                pool.append(data)  # keep some variety to mutate from
    finally:
        signal.signal(signal.SIGALRM, previous)
    return counts


def _save(crashes: Path, name: str, data: bytes, what: str) -> None:
    crashes.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:16]
    (crashes / f"{name}-{digest}.bin").write_bytes(data)
    (crashes / f"{name}-{digest}.txt").write_text(what + "\n")


# -- atheris: one process per target ------------------------------------------------------------


def atheris_child(name: str, runs: int, out: Path) -> None:
    """Run inside ``python -m bench.fuzz --child NAME``: libFuzzer drives TARGETS[name]."""
    import atheris

    _instrument(atheris)
    counts = Counts()
    target = TARGETS[name]

    def one(data: bytes) -> None:
        crash = run_case(target, data, counts)
        if crash is not None:
            _save(out / "crashes", name, data, crash)
            _dump(out, name, counts)
            raise RuntimeError(f"{name}: crash on a {len(data)}-byte input")  # libFuzzer saves it
        if counts.cases % 500 == 0 or counts.cases >= runs:
            _dump(out, name, counts)

    corpus = out / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    valid = seeds()[name]
    for i, s in enumerate(valid):
        (corpus / f"seed{i}").write_bytes(s)
    max_len = max(65536, 2 * max(len(s) for s in valid))
    atheris.Setup(
        [
            sys.argv[0],
            f"-runs={runs}",
            f"-timeout={TIMEOUT_S}",
            f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-max_len={max_len}",
            f"-artifact_prefix={out / 'crashes'}/{name}-",
            str(corpus),
        ],
        one,
    )
    atheris.Fuzz()


# Coverage guides libFuzzer through our code and the pure-Python parsers it hands outside bytes
# to. Instrumenting every loaded module (atheris.instrument_all: torch, pydantic, grpc too) made
# each case ~30x slower for no coverage that matters here.
INSTRUMENTED = ("protofuse", "server", "client_sdk", "tomllib", "zipfile", "json", "numpy.lib")


def _instrument(atheris: Any) -> int:
    """Instrument the functions and methods of the INSTRUMENTED modules; how many."""
    done = 0
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(INSTRUMENTED):
            continue
        for obj in list(vars(module).values()):
            if getattr(obj, "__module__", None) != module_name:
                continue
            members = vars(obj).values() if inspect.isclass(obj) else (obj,)
            for fn in members:
                if inspect.isfunction(fn):
                    atheris.instrument_func(fn)
                    done += 1
    return done


def _dump(out: Path, name: str, counts: Counts) -> None:
    (out / f"{name}.json").write_text(json.dumps(vars(counts)))


def fuzz_with_atheris(name: str, runs: int, out: Path) -> tuple[Counts, str]:
    (out / "crashes").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fuzz",
            "--child",
            name,
            "--runs",
            str(runs),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=max(600, runs),  # a whole target never runs longer than this
    )
    counts = Counts()
    if (out / f"{name}.json").exists():
        counts.__dict__.update(json.loads((out / f"{name}.json").read_text()))
    log = proc.stdout + proc.stderr
    if "ERROR: libFuzzer: timeout" in log:
        counts.hangs += 1
    if "out-of-memory" in log:
        counts.crashes += 1
    if proc.returncode != 0 and not (counts.crashes or counts.hangs):
        counts.crashes += 1  # the child died some other way (import error, signal): say so
    if proc.returncode != 0:
        (out / "crashes" / f"{name}-child.log").write_text(log[-20_000:])
    return counts, log[-2000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--runs", type=int, default=10_000, help="cases per target")
    p.add_argument("--seed", type=int, default=0, help="the mutation fuzzer's random seed")
    p.add_argument("--engine", choices=["auto", "atheris", "mutation"], default="auto")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        atheris_child(args.child, args.runs, args.out)
        return 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "mutation"
    rows = []
    for name in args.targets:
        t0 = time.perf_counter()
        if engine == "atheris":
            counts, _ = fuzz_with_atheris(name, args.runs, args.out)
        else:
            counts = fuzz_in_process(name, args.runs, args.seed, args.out / "crashes")
        seconds = time.perf_counter() - t0
        rss = (
            resource.getrusage(
                resource.RUSAGE_CHILDREN if engine == "atheris" else resource.RUSAGE_SELF
            ).ru_maxrss
            / 1024
        )
        rows.append({"target": name, **vars(counts), "seconds": seconds, "peak_rss_mb": rss})
        print(
            f"{name}: {counts.cases} cases, {counts.accepted} accepted, {counts.refused} refused, "
            f"{counts.crashes} crashes, {counts.hangs} hangs ({seconds:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    (args.out / "results.json").write_text(json.dumps({"engine": engine, "rows": rows}, indent=1))
    (args.out / "results.md").write_text(report(engine, args.runs, rows))
    print(report(engine, args.runs, rows))
    return 1 if any(r["crashes"] or r["hangs"] for r in rows) else 0


def report(engine: str, runs: int, rows: list[dict]) -> str:
    lines = [
        "# Fuzzing the decoders, validators and loaders",
        "",
        f"Engine: {engine}; {runs} cases per target; a case is a hang after {TIMEOUT_S} s; memory "
        f"limit {RSS_LIMIT_MB} MB (atheris). Refused = the project's own error "
        "(WireError, ArtifactError, SignatureError, SpecError, BankMetaError).",
        "",
        "| target | cases | accepted | refused | crashes | hangs | time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['target']} | {r['cases']} | {r['accepted']} | {r['refused']} | {r['crashes']} | "
        f"{r['hangs']} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
