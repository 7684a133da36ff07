"""Time of one training epoch of the discriminative bank against the image side and channels.

    python -m bench.epoch_time --out bench-results/epoch-time

One epoch is one pass of ``DiscriminativeTrainer`` over the query pool with the default image
augmentation, exactly what ``protofuse fit`` runs each epoch: encoder, imitation loss of five
experts, optimizer step. Inputs are random pixels (time does not depend on their values); torch
runs on one thread, as the benchmark and every simulated client do.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from protofuse.families.discriminative import config_for
from protofuse.model.discriminative import DiscriminativePrototypes
from protofuse.model.networks import conv_blocks, image_size
from protofuse.settings import ModelSettings, TrainingSettings
from protofuse.training import DiscriminativeTrainer, n_batches
from protofuse.triples import assemble

EXPERTS = 5
LABELS = 10


def random_triples(n: int, d: int, seed: int):
    """n random inputs of width d answered by five experts over overlapping 4-label sets."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, d), dtype=np.float32)
    labels = [tuple(str((2 * e + j) % LABELS) for j in range(4)) for e in range(EXPERTS)]
    outputs = [rng.dirichlet(np.ones(4), n).astype(np.float32) for _ in labels]
    return assemble(
        [f"e{e}" for e in range(EXPERTS)], labels, [x] * EXPERTS, outputs, shared=[0] * EXPERTS
    )


def time_epoch(shape: tuple[int, ...], n: int, repeats: int, seed: int = 0) -> dict:
    """Median seconds of one epoch over ``repeats`` epochs (after one warm-up epoch)."""
    triples = random_triples(n, image_size(shape), seed)
    training = TrainingSettings()
    model = DiscriminativePrototypes(
        config_for(triples.x.shape[1], LABELS, EXPERTS, ModelSettings(), shape)
    )
    trainer = DiscriminativeTrainer(
        model, training.lr, total_steps=(repeats + 1) * n_batches(n, training.batch_size)
    )
    gen = torch.Generator().manual_seed(seed)
    aug = training.resolved_augmentation(shape)
    trainer.epoch(triples, training.batch_size, gen, aug)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.epoch(triples, training.batch_size, gen, aug)
        times.append(time.perf_counter() - t0)
    return {
        "shape": list(shape),
        "side": shape[0],
        "channels": shape[2] if len(shape) == 3 else 1,
        "blocks": conv_blocks(shape),
        "parameters": sum(p.numel() for p in model.parameters()),
        "queries": n,
        "epoch_s": float(np.median(times)),
        "epoch_s_all": times,
        "ms_per_query": 1000 * float(np.median(times)) / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.epoch_time", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--sides", type=int, nargs="+", default=[8, 16, 28, 32, 48, 64, 96, 128])
    p.add_argument("--channels", type=int, nargs="+", default=[1, 3])
    p.add_argument(
        "--queries",
        type=int,
        default=500,
        help=(
            "query pool size (time per epoch is linear in it: MNIST-5k's pool of 2,000 takes "
            "four times as long)"
        ),
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed epochs per shape (the median is reported)"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results/epoch-time"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for c in args.channels:
        for side in args.sides:
            shape = (side, side) if c == 1 else (side, side, c)
            rows.append(time_epoch(shape, args.queries, args.repeats))
            r = rows[-1]
            print(
                f"{side}x{side}x{c}: {r['epoch_s']:.2f} s per epoch ({r['blocks']} conv blocks, "
                f"{r['parameters']:,} parameters)",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
    )
    lines = [
        f"### One training epoch against image size ({args.queries} queries, 5 experts, batch "
        f"{TrainingSettings().batch_size}, default augmentation, 1 torch thread; median of "
        f"{args.repeats})",
        "",
        "| image | conv blocks | parameters | s per epoch | ms per query |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['side']} x {r['side']} x {r['channels']} | {r['blocks']} | {r['parameters']:,} | "
        f"{r['epoch_s']:.2f} | {r['ms_per_query']:.2f} |"
        for r in rows
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
