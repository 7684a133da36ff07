"""Discriminative prototypes: the paper's idea without a decoder (docs/method.md).

A shared, task-agnostic encoder ``z = f(x)`` and one prototype vector ``p_c`` and bias ``b_c`` per
label of the vocabulary. Expert ``i`` is the softmax over the prototypes of its own labels ``Y_i``,
through its own small imitation head (a temperature and a bias per label):

    log q_i(c | x) = log softmax_{c in Y_i} ( t_i * (p_c . f(x) + b_c) + a_ic )

Trained with soft cross-entropy against the expert's outputs; overlapping label sets tie all
labels into one consistent labeller. In the second half of training a consensus term distils that
labeller into itself over the whole vocabulary (``consensus_loss``):

    loss = sum_i w_i CE(eta_i, q_i(. | aug(x)))
           + beta * CE(consensus(x), softmax_C(P f(aug(x)) + b))

A new task is a new distribution over the same prototypes: the MAP estimate of its labels' rows,
biases and a temperature under a Gaussian prior centred on the bank (``adapt_map``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .generative import restricted_log_softmax
from .networks import ImageShape, make_encoder


@dataclass(frozen=True)
class DiscriminativeConfig:
    x_dim: int
    n_labels: int
    n_experts: int
    feat_dim: int = 64
    encoder: str = "conv"  # "conv" for images, "mlp" otherwise
    image_shape: ImageShape | None = None  # (H, W) or (H, W, C)
    # The encoder's normalization (networks.norm_layer). Banks saved before the setting existed
    # have no such key in their config: they used batch norm, so that stays the dataclass default.
    norm: str = "batch"


class DiscriminativePrototypes(nn.Module):
    """Encoder, prototype bank and the experts' imitation heads."""

    def __init__(self, cfg: DiscriminativeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg.encoder, cfg.x_dim, cfg.feat_dim, cfg.image_shape, cfg.norm)
        self.prototypes = nn.Parameter(
            torch.randn(cfg.n_labels, cfg.feat_dim) / cfg.feat_dim**0.5
        )  # (C, F)
        self.bias = nn.Parameter(torch.zeros(cfg.n_labels))  # (C,)
        self.expert_log_temp = nn.Parameter(torch.zeros(cfg.n_experts))  # (E,)
        self.expert_bias = nn.Parameter(torch.zeros(cfg.n_experts, cfg.n_labels))  # (E, C)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Bank logits over the whole vocabulary: (n, F) -> (n, C)."""
        return z @ self.prototypes.T + self.bias

    def expert_log_proba(self, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Every expert's imitated log-probabilities: z (n, F), tau (E, C) -> (n, E, C)."""
        t = self.expert_log_temp.exp()[None, :, None]
        scores = t * self.logits(z)[:, None, :] + self.expert_bias[None]
        return restricted_log_softmax(scores, tau[None] > 0)

    def imitation_loss(
        self,
        z: torch.Tensor,
        eta: torch.Tensor,
        mask: torch.Tensor,
        tau: torch.Tensor,
        expert_weight: torch.Tensor,
    ) -> torch.Tensor:
        """Soft cross-entropy of each expert's imitation, over the triples present.

        z (n, F) features; eta (n, E, C) expert outputs embedded in the vocabulary; mask (n, E)
        which expert answered for which input; tau (E, C); expert_weight (E,) trust in each expert.
        """
        log_q = self.expert_log_proba(z, tau)  # (n, E, C)
        ce = -(eta * log_q).sum(-1)  # (n, E)
        weight = mask.float() * expert_weight[None]
        return (ce * weight).sum() / weight.sum().clamp_min(1e-8)

    def consensus_loss(self, z: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Soft cross-entropy of the bank's labeller over the whole vocabulary against a teacher
        distribution (n, C): the consensus of an earlier stage of the bank on the clean input.

        Each expert only ranks its own labels; this term compares every pair of labels directly
        on every query, which is what a new task mixing labels of different experts needs.
        """
        return -(teacher * torch.log_softmax(self.logits(z), dim=-1)).sum(-1).mean()

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, self.cfg.feat_dim)
        return torch.cat([self.encoder(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


@dataclass(frozen=True)
class TaskHead:
    """A new task's distribution over prototypes: its rows, biases and temperature."""

    prototypes: torch.Tensor  # (K, F)
    bias: torch.Tensor  # (K,)
    log_temp: torch.Tensor  # ()

    def log_proba(self, z: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.log_temp.exp() * (z @ self.prototypes.T + self.bias), dim=-1)


def imprint(z: torch.Tensor, y: torch.Tensor, k: int, reference: torch.Tensor) -> torch.Tensor:
    """Prototype rows for labels no expert covers: the support class means in z-space, scaled to
    the norm of the bank's prototypes so their logits are on the same scale."""
    means = torch.stack([z[y == c].mean(0) for c in range(k)])
    return means / means.norm(dim=-1, keepdim=True).clamp_min(1e-8) * reference.norm(dim=-1).mean()


def adapt_map(
    z: torch.Tensor,
    y: torch.Tensor,
    prior: TaskHead,
    prior_scale: torch.Tensor,
    strength: float = 1.0,
    max_iter: int = 100,
) -> TaskHead:
    """MAP estimate of a task head from support features z (n, F) and labels y (n,) in 0..K-1.

    The prior is a Gaussian centred on ``prior`` (the bank's rows for the task's labels). Its
    per-row precision is ``strength / prior_scale**2``: ``prior_scale`` (K,) is each row's
    typical size, so rows imprinted from the support (large scale) move freely and rows the
    experts agree on stay near the bank. L-BFGS over a few hundred parameters; where its line
    search breaks down (it extrapolates the step past float32's range when the features are
    small and the support separable), plain gradient descent from the prior instead.
    """
    protos = prior.prototypes.clone().requires_grad_(True)
    bias = prior.bias.clone().requires_grad_(True)
    log_temp = prior.log_temp.clone().requires_grad_(True)
    params = [protos, bias, log_temp]
    precision = strength / prior_scale.clamp_min(1e-6) ** 2  # (K,)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        head = TaskHead(protos, bias, log_temp)
        nll = -head.log_proba(z).gather(1, y[:, None]).sum()
        penalty = 0.5 * (precision[:, None] * (protos - prior.prototypes) ** 2).sum()
        penalty = (
            penalty
            + 0.5 * (precision * (bias - prior.bias) ** 2).sum()
            + 0.5 * (log_temp - prior.log_temp) ** 2
        )
        loss = nll + penalty
        loss.backward()
        return loss

    try:
        opt.step(closure)
        converged = all(bool(torch.isfinite(p).all()) for p in params)
    except RuntimeError:  # "value cannot be converted to type float without overflow"
        converged = False
    if not converged:
        with torch.no_grad():
            for p, start in zip(
                params, (prior.prototypes, prior.bias, prior.log_temp), strict=True
            ):
                p.copy_(start)
        descent = torch.optim.Adam(params, lr=FALLBACK_LR)
        for _ in range(FALLBACK_STEPS):
            descent.zero_grad()
            closure()  # the loss's gradients
            descent.step()
    return TaskHead(protos.detach(), bias.detach(), log_temp.detach())


FALLBACK_LR, FALLBACK_STEPS = 0.05, 300  # adapt_map's descent where L-BFGS broke down


VIEW_STRENGTH = 1e-2  # fit_view's pull towards the bank's rows (the value of the dev-seed probe)


def fit_view(
    z: torch.Tensor,
    eta: torch.Tensor,
    prior_prototypes: torch.Tensor,
    prior_bias: torch.Tensor,
    strength: float = VIEW_STRENGTH,
    max_iter: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's own view of its labels' rows on frozen features: the rows (K, F) and biases
    (K,) of a softmax over its K labels fitted to its answers ``eta`` (n, K) on features ``z``
    (n, F), by soft cross-entropy plus ``strength`` times the squared distance from the bank's
    rows (where it starts):

        min_{P, b}  mean_n CE(eta_n, softmax(P z_n + b)) + strength * |P - P0|^2

    Unlike the bank's rows, averaged over every client covering a label, this is what the
    expert alone says the labels look like, so its peers can score it (peer review). Answers
    that are all zero (labels declared with nothing behind them) pull their rows away from every
    input. A fit that does not stay finite returns the bank's rows."""
    total = eta.sum(1, keepdim=True)
    target = eta / total.clamp_min(1e-12)  # (n, K)
    protos = prior_prototypes.clone().requires_grad_(True)
    bias = prior_bias.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([protos, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ce = -(target * torch.log_softmax(z @ protos.T + bias, dim=-1)).sum(1).mean()
        loss = ce + strength * ((protos - prior_prototypes) ** 2).sum()
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except RuntimeError:  # L-BFGS's line search past float32's range
        return prior_prototypes.clone(), prior_bias.clone()
    if not (torch.isfinite(protos).all() and torch.isfinite(bias).all()):
        return prior_prototypes.clone(), prior_bias.clone()
    return protos.detach(), bias.detach()
