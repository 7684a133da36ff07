"""Training loops for both prototype families on pooled triples, and imitation fidelity.

Centrally (``protofuse fit``) these run on all experts' triples; in a federation each client
runs the same loop on its own triples for a few local epochs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from .model.discriminative import DiscriminativePrototypes
from .model.generative import GenerativePrototypes
from .model.networks import (
    Augmentation,
    FeatureAugmentation,
    augment_features,
    augment_images,
    feature_statistics,
)
from .records import Fidelity  # re-exported: protofuse.training.Fidelity is the one Fidelity
from .triples import Triples

Progress = Callable[[int, int, float], None]  # (epoch done, epochs, mean loss)


def train_discriminative(
    model: DiscriminativePrototypes,
    triples: Triples,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    augmentation: Augmentation | FeatureAugmentation | None = None,
    expert_weight: np.ndarray | None = None,
    teacher: np.ndarray | None = None,
    teacher_weight: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> None:
    """Fit encoder, prototypes and imitation heads by soft cross-entropy against the experts.

    ``augmentation`` transforms image batches, or perturbs the features of tabular ones (the
    targets stay the experts' answers for the original inputs); ``teacher`` (N, C), if given, adds
    ``teacher_weight`` times the consensus term of ``DiscriminativePrototypes.consensus_loss``.
    """
    gen = torch.Generator().manual_seed(seed)
    trainer = DiscriminativeTrainer(
        model, lr, total_steps=epochs * n_batches(len(triples.x), batch_size)
    )
    for epoch in range(epochs):
        loss = trainer.epoch(
            triples, batch_size, gen, augmentation, expert_weight, teacher, teacher_weight
        )
        if progress:
            progress(epoch + 1, epochs, loss)
    model.eval()


class DiscriminativeTrainer:
    """AdamW with a one-cycle schedule over ``total_steps``, run an epoch at a time.

    Centrally one trainer runs a whole phase; in a federation a client keeps its trainer's state
    between rounds (``state_arrays``), so its schedule and moments continue instead of restarting.
    """

    def __init__(self, model: DiscriminativePrototypes, lr: float, total_steps: int) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=lr, total_steps=max(1, total_steps)
        )
        self.total_steps = max(1, total_steps)

    @property
    def steps_done(self) -> int:
        return int(self.sched.last_epoch)

    def epoch(
        self,
        triples: Triples,
        batch_size: int,
        gen: torch.Generator,
        augmentation: Augmentation | FeatureAugmentation | None = None,
        expert_weight: np.ndarray | None = None,
        teacher: np.ndarray | None = None,
        teacher_weight: float = 0.0,
    ) -> float:
        """One pass over the triples in a random order drawn from ``gen``; returns the mean loss."""
        model = self.model
        x, eta, mask = (torch.from_numpy(a) for a in (triples.x, triples.eta, triples.mask))
        tau = torch.from_numpy(triples.tau)
        weight = (
            torch.ones(len(triples.expert_names))
            if expert_weight is None
            else torch.as_tensor(expert_weight, dtype=torch.float32)
        )
        target = (
            None
            if teacher is None or teacher_weight <= 0
            else torch.as_tensor(teacher, dtype=torch.float32)
        )
        image_shape = model.cfg.image_shape
        if isinstance(augmentation, FeatureAugmentation):
            # Each feature's mean and spread over these queries (a federated client: its own).
            centre, spread = feature_statistics(x)
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            if len(idx) < 2:  # batch norm needs two examples
                continue
            if (
                self.steps_done >= self.total_steps
            ):  # the schedule is spent (a client may get extra rounds)
                break
            xb = x[idx]
            if isinstance(augmentation, FeatureAugmentation):
                xb = augment_features(xb, augmentation, centre, spread, gen)
            elif augmentation is not None and image_shape is not None:
                xb = augment_images(xb, image_shape, augmentation, gen)
            z = model.encoder(xb)
            loss = model.imitation_loss(z, eta[idx], mask[idx], tau, weight)
            if target is not None:
                loss = loss + teacher_weight * model.consensus_loss(z, target[idx])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.sched.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        model.eval()
        return total / max(count, 1)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The optimizer's moments and the schedule's position as plain arrays."""
        out = {"steps_done": np.asarray([self.steps_done], dtype=np.int64)}
        for i, state in self.opt.state_dict()["state"].items():
            for key, value in state.items():
                out[f"{i}.{key}"] = torch.as_tensor(value).numpy()
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> bool:
        """Restore ``state_arrays``; False (and nothing changed) if they do not fit this model."""
        params = list(self.model.parameters())
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in arrays.items():
            if key == "steps_done":
                continue
            index, _, name = key.partition(".")
            state.setdefault(int(index), {})[name] = torch.from_numpy(np.array(value))
        if "steps_done" not in arrays or not all(0 <= i < len(params) for i in state):
            return False
        for i, s in state.items():
            for k, v in s.items():
                if k == "step" or v.shape == params[i].shape:
                    continue
                differ = (
                    [d for d in range(v.ndim) if v.shape[d] != params[i].shape[d]]
                    if v.ndim == params[i].ndim
                    else []
                )
                if len(differ) != 1 or v.shape[differ[0]] > params[i].shape[differ[0]]:
                    return False
                # Labels appended to the vocabulary since (rows of prototypes and biases, columns
                # of the imitation head's biases): their moments start at zero.
                d = differ[0]
                pad = list(v.shape)
                pad[d] = params[i].shape[d] - v.shape[d]
                s[k] = torch.cat([v, v.new_zeros(pad)], dim=d)
        full = self.opt.state_dict()
        full["state"] = state
        self.opt.load_state_dict(full)
        with warnings.catch_warnings():  # stepping the schedule alone is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(
                min(int(np.ravel(arrays["steps_done"])[0]), self.total_steps)
            ):  # replay the schedule to its position
                self.sched.step()
        return True


def train_generative(
    model: GenerativePrototypes,
    triples: Triples,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
) -> None:
    """Maximize the ELBO plus regularizer over every (input, expert) pair."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the model's own reparameterization draws
    pairs = torch.from_numpy(np.argwhere(triples.mask))  # (P, 2): input index, expert index
    x = torch.from_numpy(triples.x)
    eta = torch.from_numpy(triples.eta)
    tau = torch.from_numpy(triples.tau)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for idx in torch.randperm(len(pairs), generator=gen).split(batch_size):
            if len(idx) < 2:
                continue
            n, e = pairs[idx, 0], pairs[idx, 1]
            out = model.loss(x[n], eta[n, e], tau[e])
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            total, count = total + out["loss"].item() * len(idx), count + len(idx)
        if progress:
            progress(epoch + 1, epochs, total / max(count, 1))
    model.eval()


def fidelity(imitated_log_proba: torch.Tensor, triples: Triples) -> list[Fidelity]:
    """Per expert: agreement of top classes and KL(expert || imitation) over its answered inputs.

    imitated_log_proba (N, E, C): the bank's imitation of each expert on ``triples.x``.
    """
    eta = torch.from_numpy(triples.eta)
    tau = torch.from_numpy(triples.tau > 0)  # a property that builds the array: compute it once
    out = []
    for e in range(len(triples.expert_names)):
        rows = torch.from_numpy(triples.mask[:, e])
        p, log_q = eta[rows, e], imitated_log_proba[rows, e]
        if len(p) == 0:
            out.append(Fidelity(float("nan"), float("nan"), 0))
            continue
        cols = tau[e]
        agree = (p[:, cols].argmax(-1) == log_q[:, cols].argmax(-1)).float().mean().item()
        kl = (p * (p.clamp_min(1e-12).log() - log_q)).masked_fill(p == 0, 0.0).sum(-1).mean().item()
        out.append(Fidelity(agree, kl, len(p)))
    return out


@torch.no_grad()
def consensus(model: DiscriminativePrototypes, x: np.ndarray) -> np.ndarray:
    """The bank's own labeller over the whole vocabulary, which pools every expert: (N, C)."""
    return torch.softmax(model.logits(model.embed(torch.from_numpy(x))), dim=-1).numpy()


# Fewest inputs an agreement rate is measured on: below it the rate is noise (its standard error
# is up to 0.5 / sqrt(n)), and one undertrained consensus that places 4 queries in an expert's
# labels (measured: a 2-round federation on digits) would otherwise give an honest expert a rate
# of 0 and no trust. Fewer inputs: not measured (NaN), which sets no weight of its own.
MIN_AGREEMENT_ROWS = 30


def consensus_agreement(
    pooled: np.ndarray, triples: Triples, min_rows: int = MIN_AGREEMENT_ROWS
) -> np.ndarray:
    """Label-free reliability of each expert: how often its top class matches the bank's consensus.

    ``pooled`` (N, C) is the consensus on ``triples.x`` (``consensus``). Only inputs that the
    consensus places inside the expert's label set count (elsewhere an expert's answer is arbitrary
    by construction); with fewer than ``min_rows`` of them the expert is not measured (NaN).
    Returns (E,) agreement rates in [0, 1].
    """
    tau = triples.tau > 0
    out = np.full(len(triples.expert_names), np.nan)
    for e in range(len(out)):
        rows = triples.mask[:, e] & (pooled[:, tau[e]].sum(1) > 0.5)
        if rows.sum() >= max(min_rows, 1):
            out[e] = float(
                (
                    pooled[rows][:, tau[e]].argmax(1) == triples.eta[rows, e][:, tau[e]].argmax(1)
                ).mean()
            )
    return out


def reliability_weights(
    agreement: np.ndarray, n_labels: np.ndarray, relative_to: Literal["best", "median"] = "best"
) -> np.ndarray:
    """Training weights from consensus agreement: chance-corrected, relative to the best expert
    (or, where agreement is reported by the experts themselves, to the median one, so that one
    overstated score cannot lower everyone else's), at most 1, squared so that a clearly worse
    expert counts for much less than its peers.

    An expert with one label agrees with any consensus by construction (chance is 1): like an
    unmeasured one (NaN) it gets the weight of a perfect score rather than 0 / 0. Neither sets the
    reference the others are scored against: that comes from the measured experts alone (a
    client that reports no agreement cannot raise the bar for the rest)."""
    n = np.asarray(n_labels, dtype=np.float64)
    measured = np.isfinite(agreement) & (n > 1)
    chance = 1.0 / np.maximum(n, 1.0)
    score = np.where(measured, agreement, 1.0)
    kappa = np.clip((score - chance) / np.where(measured, 1.0 - chance, 1.0), 0.0, 1.0)
    kappa = np.where(measured, kappa, 1.0)
    judged = kappa[measured] if measured.any() else np.ones(1)
    reference = float(judged.max() if relative_to == "best" else np.median(judged))
    return np.minimum(kappa / max(reference, 1e-8), 1.0) ** 2


def n_batches(n: int, batch_size: int) -> int:
    return max(1, (n + batch_size - 1) // batch_size)
