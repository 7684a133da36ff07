"""Adaptation variants of the discriminative bank, on the development seeds only (paired episodes).

    python -m bench.adapt_dev --banks /tmp/banks              # MNIST-5k 5-way, seeds 0 1 2
    python -m bench.adapt_dev --banks /tmp/banks --ways 2     # 2-way tasks
    python -m bench.adapt_dev --banks /tmp/banks --dataset digits --seeds 0 1 --ways 2 5
    python -m bench.adapt_dev --banks /tmp/banks --pool       # the frozen features' data limit

The question (issue: "the examples matter more"): can the k = 10 adaptation remove at least half of
the bank's zero-shot errors on MNIST-5k 5-way without losing accuracy at k = 1? Each seed's bank is
fitted once as ``bench.run`` fits it and cached under ``--banks``; the tasks and episodes are
``bench.run``'s (``episode_tasks``, ``draw_episode``), so every variant is scored on the same test
rows and the same nested support (paired gaps against today's MAP adaptation). Variants:

- ``map``: today's adaptation (``adapt_map``, prior strength 1); ``map s=0.1``: a weaker prior.
- ``aug M``: the support plus M copies of each example under the bank's own training augmentation,
  embedded with the frozen encoder, each original and its copies sharing one example's weight.
- ``shift k0``: each row's prior centre moves toward the support's imprinted class mean,
  by ``k / (k + k0)``.
- ``ncm k0``: the MAP head's log-probabilities mixed with a cosine nearest-class-mean term
  (temperature 10, features centred on the support mean), weight ``k / (k + k0)``.
- ``l2sp rho``: the encoder's last linear layer fitted too, with a Gaussian prior at the bank's
  weights of standard deviation ``rho`` times their RMS (L2-SP).
- ``finetune``: the whole encoder fine-tuned from the MAP solution (Adam, 30 steps, lr 1e-3, a fresh
  augmentation of the support each step, L2-SP with rho 0.3).
- ``norm``: features scaled to a common norm before the MAP fit and at prediction.
- ``tta 8``: today's head, predictions averaged over the test image and 8 augmented copies.

``--pool`` fits today's MAP head (and one with a weak prior) on every example of the task's classes
in the support split (about 50 per class, five times k = 10): an upper bound, in practice, on what a
head over the frozen features can do with the examples of one episode.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.datasets import load_dataset, make_splits, task_subset
from bench.federations import DEFAULT_RECIPES
from bench.run import DEV_SEEDS, SHOTS, build_world, draw_episode, episode_tasks
from protofuse.bank import Bank, load_bank
from protofuse.model.discriminative import TaskHead, imprint
from protofuse.model.networks import Augmentation, augment_images


def cached_bank(dataset: str, seed: int, cache: Path) -> Bank:
    """The default bank of ``bench.run`` for (dataset, seed), fitted once and kept under
    ``cache``."""
    path = cache / f"{dataset}-{seed}"
    if not (path / "meta.json").exists():
        world = build_world(
            dataset, seed, DEFAULT_RECIPES, {"protofuse": ({}, {})}, None, [], ceiling=False
        )
        world.banks["protofuse"].save(path)
    return load_bank(path)


def task_prior(bank: Bank, classes: list[str]) -> tuple[TaskHead, torch.Tensor]:
    """The prior of ``Discriminative.adapt_scored`` for covered labels: bank rows, biases,
    scales."""
    idx = bank.covered_indices(classes)
    protos, bias = (
        bank.model.prototypes.detach()[idx].clone(),
        bank.model.bias.detach()[idx].clone(),
    )
    return TaskHead(protos, bias, torch.zeros(())), 0.5 * protos.norm(dim=-1)


def map_fit(
    z: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    prior: TaskHead,
    scale: torch.Tensor,
    strength: float = 1.0,
    layer: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[TaskHead, tuple[torch.Tensor, torch.Tensor] | None]:
    """``adapt_map`` with per-example weights w (n,); with ``layer = (W0, c0, h, sigma)`` the last
    linear layer z = h W^T + c is fitted too, under a Gaussian prior at (W0, c0) of std sigma."""
    protos, bias, log_temp = (
        t.clone().requires_grad_(True) for t in (prior.prototypes, prior.bias, prior.log_temp)
    )
    precision = strength / scale.clamp_min(1e-6) ** 2
    params = [protos, bias, log_temp]
    if layer is not None:
        w0, c0, h, sigma = layer
        weight, offset = w0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
        params += [weight, offset]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        feats = z if layer is None else h @ weight.T + offset
        nll = -(
            w * TaskHead(protos, bias, log_temp).log_proba(feats).gather(1, y[:, None])[:, 0]
        ).sum()
        penalty = (
            0.5 * (precision[:, None] * (protos - prior.prototypes) ** 2).sum()
            + 0.5 * (precision * (bias - prior.bias) ** 2).sum()
            + 0.5 * (log_temp - prior.log_temp) ** 2
        )
        if layer is not None:
            penalty = (
                penalty + 0.5 * (((weight - w0) ** 2).sum() + ((offset - c0) ** 2).sum()) / sigma**2
            )
        loss = nll + penalty
        loss.backward()
        return loss

    opt.step(closure)
    head = TaskHead(protos.detach(), bias.detach(), log_temp.detach())
    return head, None if layer is None else (weight.detach(), offset.detach())


class Episode:
    """One episode's support (k shots) and test rows, with the bank's features of both cached."""

    def __init__(
        self,
        bank: Bank,
        aug: Augmentation | None,
        x: torch.Tensor,
        y: torch.Tensor,
        test_x: torch.Tensor,
        k: int,
        prior: TaskHead,
        scale: torch.Tensor,
    ) -> None:
        self.bank, self.aug, self.x, self.y, self.test_x, self.k, self.prior, self.scale = (
            bank,
            aug,
            x,
            y,
            test_x,
            k,
            prior,
            scale,
        )
        enc = bank.model.encoder
        self.last = enc.head[3]  # the conv encoder's last linear layer, h (128) -> z (F)
        self.test_h = self.hidden(test_x)
        self.test_z = self.last(self.test_h).detach()
        self._support: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.bank.model.encoder
        return enc.head[:3](enc.conv(x.view(-1, 1, *enc.image_shape)))

    def support(
        self, copies: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, z, y, w) of the support and ``copies`` augmented copies of each example (seed 0);
        an example and its copies share one example's weight."""
        if copies not in self._support:
            x, y = self.x, self.y
            if copies:
                extra = augment_images(
                    self.x.repeat(copies, 1),
                    self.bank.model.cfg.image_shape,
                    self.aug,
                    torch.Generator().manual_seed(0),
                )
                x, y = torch.cat([self.x, extra]), self.y.repeat(copies + 1)
            h = self.hidden(x)
            self._support[copies] = (
                h,
                self.last(h).detach(),
                y,
                torch.full((len(y),), 1.0 / (copies + 1)),
            )
        return self._support[copies]


Variant = Callable[[Episode], torch.Tensor]  # an episode -> test log-probabilities (m, K)


def v_map(copies: int = 0, strength: float = 1.0) -> Variant:
    def run(ep: Episode) -> torch.Tensor:
        _, z, y, w = ep.support(copies)
        return map_fit(z, y, w, ep.prior, ep.scale, strength)[0].log_proba(ep.test_z)

    return run


def v_shift(k0: float) -> Variant:
    def run(ep: Episode) -> torch.Tensor:
        _, z, y, w = ep.support()
        a = ep.k / (ep.k + k0)
        centre = (1 - a) * ep.prior.prototypes + a * imprint(
            z, y, len(ep.prior.bias), ep.prior.prototypes
        )
        return map_fit(z, y, w, TaskHead(centre, ep.prior.bias, ep.prior.log_temp), ep.scale)[
            0
        ].log_proba(ep.test_z)

    return run


def v_ncm(k0: float, temperature: float = 10.0) -> Variant:
    def unit(f: torch.Tensor) -> torch.Tensor:
        return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def run(ep: Episode) -> torch.Tensor:
        _, z, y, w = ep.support()
        head = map_fit(z, y, w, ep.prior, ep.scale)[0]
        centre = z.mean(0)
        means = unit(
            torch.stack([unit(z[y == c] - centre).mean(0) for c in range(len(ep.prior.bias))])
        )
        a = ep.k / (ep.k + k0)
        mixed = (1 - a) * head.log_proba(ep.test_z) + a * torch.log_softmax(
            temperature * unit(ep.test_z - centre) @ means.T, -1
        )
        return torch.log_softmax(mixed, -1)

    return run


def v_l2sp(rho: float) -> Variant:
    def run(ep: Episode) -> torch.Tensor:
        h, z, y, w = ep.support()
        w0, c0 = ep.last.weight.detach(), ep.last.bias.detach()
        head, (weight, offset) = map_fit(
            z, y, w, ep.prior, ep.scale, layer=(w0, c0, h, rho * float(w0.pow(2).mean().sqrt()))
        )
        return head.log_proba(ep.test_h @ weight.T + offset)

    return run


def v_finetune(rho: float = 0.3, steps: int = 30, lr: float = 1e-3) -> Variant:
    def run(ep: Episode) -> torch.Tensor:
        _, z, y, w = ep.support()
        start = map_fit(z, y, w, ep.prior, ep.scale)[0]
        enc = copy.deepcopy(ep.bank.model.encoder).eval()  # batch norm keeps the bank's statistics
        params = list(enc.parameters())
        ref = [p.detach().clone() for p in params]
        sigma = [rho * float(r.pow(2).mean().sqrt().clamp_min(1e-3)) for r in ref]
        protos, bias, log_temp = (
            t.clone().requires_grad_(True) for t in (start.prototypes, start.bias, start.log_temp)
        )
        precision = 1.0 / ep.scale.clamp_min(1e-6) ** 2
        opt = torch.optim.Adam([*params, protos, bias, log_temp], lr=lr)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            xb = augment_images(ep.x, enc.image_shape, ep.aug, gen)
            nll = -TaskHead(protos, bias, log_temp).log_proba(enc(xb)).gather(1, y[:, None]).sum()
            penalty = (
                0.5 * (precision[:, None] * (protos - ep.prior.prototypes) ** 2).sum()
                + 0.5 * (precision * (bias - ep.prior.bias) ** 2).sum()
                + 0.5 * log_temp**2
            )
            penalty = penalty + sum(
                0.5 * ((p - r) ** 2).sum() / s**2
                for p, r, s in zip(params, ref, sigma, strict=True)
            )
            opt.zero_grad()
            (nll + penalty).backward()
            opt.step()
        with torch.no_grad():
            return TaskHead(protos, bias, log_temp).log_proba(enc(ep.test_x))

    return run


def v_norm() -> Variant:
    def run(ep: Episode) -> torch.Tensor:
        _, z, y, w = ep.support()
        radius = z.norm(dim=-1).mean()

        def scaled(f: torch.Tensor) -> torch.Tensor:
            return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-8) * radius

        return map_fit(scaled(z), y, w, ep.prior, ep.scale)[0].log_proba(scaled(ep.test_z))

    return run


def v_tta(copies: int) -> Variant:
    def run(ep: Episode) -> torch.Tensor:
        _, z, y, w = ep.support()
        head = map_fit(z, y, w, ep.prior, ep.scale)[0]
        gen = torch.Generator().manual_seed(1)
        m = ep.bank.model
        views = [ep.test_x] + [
            augment_images(ep.test_x, m.cfg.image_shape, ep.aug, gen) for _ in range(copies)
        ]
        return torch.log_softmax(
            torch.stack([head.log_proba(m.embed(v)) for v in views]).mean(0), -1
        )

    return run


VARIANTS: dict[str, Variant] = {
    "map": v_map(),
    "map s=0.1": v_map(strength=0.1),
    "aug 8": v_map(copies=8),
    "aug 16": v_map(copies=16),
    "shift 10": v_shift(10),
    "ncm 10": v_ncm(10),
    "l2sp 1": v_l2sp(1.0),
    "l2sp 10": v_l2sp(10.0),
    "finetune": v_finetune(),
    "norm": v_norm(),
    "tta 8": v_tta(8),
}


def run(
    dataset: str, seeds: list[int], ways: list[int], n_tasks: int, cache: Path, names: list[str]
) -> list[dict]:
    ds = load_dataset(dataset)
    rows = []
    for seed in seeds:
        bank = cached_bank(dataset, seed, cache)
        aug = bank.meta.settings.training.resolved_augmentation(ds.image_shape)
        world = SimpleNamespace(dataset=ds, splits=make_splits(ds, seed))  # all draw_episode reads
        for ti, task in enumerate(
            episode_tasks(DEFAULT_RECIPES, ds.label_names, ways, n_tasks, seed)
        ):
            drawn = draw_episode(world, task, np.random.default_rng([seed, ti]), 300)
            test_x, test_y = torch.from_numpy(drawn.test_x), torch.from_numpy(drawn.test_y)
            prior, scale = task_prior(bank, list(task))
            for k in SHOTS:
                sx, sy = drawn.support(k)
                ep = Episode(
                    bank, aug, torch.from_numpy(sx), torch.from_numpy(sy), test_x, k, prior, scale
                )
                row = {
                    "seed": seed,
                    "task": " ".join(task),
                    "ways": len(task),
                    "k": k,
                    "zero-shot": float(
                        (prior.log_proba(ep.test_z).argmax(1) == test_y).float().mean()
                    ),
                }
                for name in names:
                    t0 = time.perf_counter()
                    log_proba = VARIANTS[name](ep)
                    row[f"seconds {name}"] = time.perf_counter() - t0
                    row[name] = float((log_proba.argmax(1) == test_y).float().mean())
                rows.append(row)
            print(
                f"{dataset} seed {seed} {' '.join(task)}: "
                + ", ".join(f"{n} {100 * row[n]:.1f}" for n in ["zero-shot", *names])
                + " (k = 10)",
                flush=True,
            )
    return rows


def pool_limit(dataset: str, seeds: list[int], n_tasks: int, cache: Path) -> None:
    """Today's MAP head fitted on every support-split example of the task's classes."""
    ds = load_dataset(dataset)
    for seed in seeds:
        bank = cached_bank(dataset, seed, cache)
        splits = make_splits(ds, seed)
        acc = []
        for ti, task in enumerate(
            episode_tasks(DEFAULT_RECIPES, ds.label_names, [5], n_tasks, seed)
        ):
            drawn = draw_episode(
                SimpleNamespace(dataset=ds, splits=splits),
                task,
                np.random.default_rng([seed, ti]),
                300,
            )
            test_z, test_y = (
                bank.model.embed(torch.from_numpy(drawn.test_x)),
                torch.from_numpy(drawn.test_y),
            )
            px, py = task_subset(splits.support, [ds.label_names.index(c) for c in task])
            z, y = bank.model.embed(torch.from_numpy(px)), torch.from_numpy(py)
            prior, scale = task_prior(bank, list(task))
            fits = [prior] + [
                map_fit(z, y, torch.ones(len(y)), prior, scale, s)[0] for s in (1.0, 0.01)
            ]
            acc.append(
                [float((f.log_proba(test_z).argmax(1) == test_y).float().mean()) for f in fits]
            )
        zs, s1, s001 = np.mean(acc, 0)
        print(
            f"{dataset} seed {seed}: zero-shot {100 * zs:.2f}, pooled support "
            f"(~{len(y) // 5}/class) MAP {100 * s1:.2f}, with prior strength 0.01 {100 * s001:.2f}"
        )


def summarize(rows: list[dict], names: list[str]) -> None:
    """Mean accuracy, share of zero-shot errors removed, and paired gaps to ``map`` (± s.e. over
    episodes)."""
    for ways in sorted({r["ways"] for r in rows}):
        part = [r for r in rows if r["ways"] == ways]
        print(f"\n{ways}-way, {len(part) // len(SHOTS)} episodes")
        print(
            "| variant | "
            + " | ".join(f"k = {k}: acc, errors removed, gap to map" for k in SHOTS)
            + " | ms per adapt (k = 5) |"
        )
        print("|---|" + "---|" * (len(SHOTS) + 1))
        for name in ["zero-shot", *names]:
            cells = []
            for k in SHOTS:
                at = [r for r in part if r["k"] == k]
                a, zs, base = (np.array([r[n] for r in at]) for n in (name, "zero-shot", "map"))
                gap = a - base
                cells.append(
                    f"{100 * a.mean():.2f}, {100 * (1 - (1 - a.mean()) / (1 - zs.mean())):.0f}%, "
                    f"{100 * gap.mean():+.2f} ± {100 * gap.std(ddof=1) / np.sqrt(len(gap)):.2f}"
                )
            ms = (
                np.mean([r[f"seconds {name}"] for r in part if r["k"] == 5]) * 1000
                if name != "zero-shot"
                else 0.0
            )
            print(f"| {name} | " + " | ".join(cells) + f" | {ms:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.adapt_dev", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--dataset", default="mnist5k", choices=["digits", "mnist5k"])
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEV_SEEDS))
    p.add_argument("--ways", type=int, nargs="+", default=[5])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--banks",
        type=Path,
        required=True,
        help="folder where each seed's bank is saved once and reloaded",
    )
    p.add_argument(
        "--pool",
        action="store_true",
        help="only the frozen features' data limit (MAP head on the whole support split)",
    )
    p.add_argument("--out", type=Path, help="also write the per-episode rows as JSON")
    args = p.parse_args(argv)
    if any(s >= 100 for s in args.seeds):
        p.error("development seeds only (< 100): the reported seeds choose nothing")
    torch.set_num_threads(1)
    if args.pool:
        pool_limit(args.dataset, args.seeds, args.tasks, args.banks)
        return 0
    names = ["map", *[n for n in args.variants if n != "map"]]
    rows = run(args.dataset, args.seeds, args.ways, args.tasks, args.banks, names)
    if args.out:
        args.out.write_text(json.dumps(rows))
    summarize(rows, names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
