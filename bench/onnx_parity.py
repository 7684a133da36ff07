"""ONNX parity on the benchmark's datasets: for each, the benchmark's bank (its federation of
experts, seed 100), a model adapted to the first 5-way task with k = 5, exported with
``protofuse export``; onnxruntime's probabilities against ``predict_proba`` on the dataset's whole
test set: the largest absolute difference, and how often the two predict a different class.

    python -m bench.onnx_parity --out bench-results/onnx-parity
    python -m bench.onnx_parity --datasets digits segment --epochs 3 --out /tmp/onnx  # quick

Writes results.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.datasets import DATASETS, sample_support, task_subset
from bench.federations import recipes_for
from bench.run import BANKS, REPORT_SEEDS, build_world, episode_tasks, log
from protofuse.export import INPUT, MODEL_FILE, OUTPUT, export_onnx

DEFAULT_DATASETS = ("digits", "digits-colour", "mnist5k", "mnist5k-colour", "mnist5k-64", "segment")


def parity(dataset: str, seed: int, epochs: int | None, folder: Path) -> dict:
    world = build_world(
        dataset,
        seed,
        recipes_for(dataset),
        {"protofuse": BANKS["protofuse"]},
        epochs,
        imitator_encoders=[],
        ceiling=False,
        table_variants=False,
    )
    bank = world.banks["protofuse"]
    names = world.dataset.label_names
    task = episode_tasks(recipes_for(dataset), names, [5], 1, seed)[0]
    classes = [names.index(c) for c in task]
    sx, sy = sample_support(world.splits.support, classes, 5, np.random.default_rng(seed))
    model = bank.adapt(sx, np.asarray(task)[sy])
    t0 = time.perf_counter()
    done = export_onnx(model, folder, dataset.replace("-", "_"))
    export_s = time.perf_counter() - t0
    test = world.splits.test
    x = test.x.astype(np.float32)
    session = ort.InferenceSession(
        str(done.folder / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    t0 = time.perf_counter()
    got = session.run([OUTPUT], {INPUT: x})[0].astype(np.float64)
    onnx_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = model.predict_proba(x)
    torch_s = time.perf_counter() - t0
    tx, ty = task_subset(test, classes)
    task_pred = session.run([OUTPUT], {INPUT: tx.astype(np.float32)})[0].argmax(1)
    return {
        "dataset": dataset,
        "image_shape": world.dataset.image_shape,
        "x_dim": int(x.shape[1]),
        "n_test": len(x),
        "max_abs_diff": float(np.max(np.abs(got - want))),
        "argmax_disagreements": int(np.sum(got.argmax(1) != want.argmax(1))),
        "accuracy_in_task": float(np.mean(model.classes_[task_pred] == np.asarray(task)[ty])),
        "export_parity_check": done.parity,
        "export_s": export_s,
        "onnxruntime_s": onnx_s,
        "predict_proba_s": torch_s,
        "onnx_bytes": (done.folder / MODEL_FILE).stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), choices=DATASETS)
    p.add_argument("--seed", type=int, default=REPORT_SEEDS[0])
    p.add_argument("--epochs", type=int, help="bank epochs (default: the benchmark's)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            log(f"onnx parity: {name}")
            rows.append(parity(name, args.seed, args.epochs, Path(tmp)))
            log(f"  {json.dumps(rows[-1])}")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# ONNX parity of adapted models",
        "",
        f"Seed {args.seed}; bank epochs: {args.epochs or 'the benchmark default'}; one 5-way task "
        "per dataset, k = 5; onnxruntime (CPU) against predict_proba on the whole test set; torch "
        "1 thread.",
        "",
        "| dataset | input | test rows | max abs diff | argmax disagreements | accuracy in task "
        "(onnxruntime) | onnxruntime s | predict_proba s | model.onnx |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = (
            "x".join(map(str, r["image_shape"])) if r["image_shape"] else f"{r['x_dim']} features"
        )
        lines.append(
            f"| {r['dataset']} | {shape} | {r['n_test']} | {r['max_abs_diff']:.1e} | "
            f"{r['argmax_disagreements']} | {100 * r['accuracy_in_task']:.1f} | "
            f"{r['onnxruntime_s']:.3f} | {r['predict_proba_s']:.3f} | "
            f"{r['onnx_bytes'] / 1e6:.2f} MB |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
