"""Decomposition and recomposition for the generative family (docs/method.md).

An expert is a distribution over prototypes ``w``; a new task is a new distribution ``q*(w)``
fitted to a support set by maximizing

    sum_j log E_{q*(w)} G_w(y_j | x_j)  -  KL(q*(w) || mixture of the experts' distributions)

Every fitted ``q*`` is handed to prediction as weighted samples ``(W (M, wd), log_weights (M,))``,
so both predictive forms work the same way for a Gaussian and for a mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .generative import GenerativePrototypes, gaussian_log_prob, reparameterize


@dataclass(frozen=True)
class WDistribution:
    """A Gaussian over prototypes with full covariance: one expert's, or a task's."""

    mean: torch.Tensor  # (wd,)
    cov: torch.Tensor  # (wd, wd)

    def sample(self, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
        chol = torch.linalg.cholesky(self.cov + 1e-6 * torch.eye(self.cov.shape[0]))
        return self.mean + torch.randn(m, self.mean.shape[0], generator=generator) @ chol.T


@dataclass(frozen=True)
class WeightedPrototypes:
    """q*(w) as weighted samples: what prediction consumes."""

    w: torch.Tensor  # (M, wd)
    log_weights: torch.Tensor  # (M,), logsumexp = 0


def aggregated_posterior(
    model: GenerativePrototypes, x: torch.Tensor, tau: torch.Tensor
) -> WDistribution:
    """Moments of mean_x q(w | x, tau): the data-driven estimate of an expert's distribution."""
    mu, logvar = model.posterior_w(x, tau)
    mean = mu.mean(0)
    centred = mu - mean
    cov = (
        torch.diag(logvar.exp().mean(0)) + centred.T @ centred / mu.shape[0]
    )  # law of total variance
    return WDistribution(mean, cov)


@torch.no_grad()
def prior_distribution(model: GenerativePrototypes, tau: torch.Tensor) -> WDistribution:
    """p_gamma(w | tau): the prior network's distribution for a task descriptor (C,)."""
    mu, logvar = model.prior_w(tau[None])
    return WDistribution(mu[0], torch.diag(logvar[0].exp()))


def mixture_log_prob(w: torch.Tensor, components: list[WDistribution]) -> torch.Tensor:
    """log of the uniform mixture of Gaussians at w (M, wd) -> (M,)."""
    logps = torch.stack(
        [
            torch.distributions.MultivariateNormal(
                c.mean, c.cov + 1e-6 * torch.eye(c.cov.shape[0])
            ).log_prob(w)
            for c in components
        ],
        dim=-1,
    )
    return torch.logsumexp(logps, dim=-1) - math.log(len(components))


def log_conditional(log_joint: torch.Tensor) -> torch.Tensor:
    """log G_w(c | x): log p(x, c | w) normalized over the task's classes (dim 1 of (n, K, M))."""
    return log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)


def predict_log_proba(log_joint: torch.Tensor, q: WeightedPrototypes, form: str) -> torch.Tensor:
    """log p(y | x) over the task's classes from log p(x, c | w) (n, K, M) at q's samples.

    ``conditional``: E_q G_w(y | x), each prototype votes with its normalized prediction.
    ``joint``: E_q p(x, y | w) normalized over y; the prototype that explains x best dominates.
    """
    lw = q.log_weights.view(1, 1, -1)
    if form == "conditional":
        out = torch.logsumexp(log_conditional(log_joint) + lw, dim=-1)
    elif form == "joint":
        out = torch.logsumexp(log_joint + lw, dim=-1)
    else:
        raise ValueError(f"unknown prediction form {form!r}: use 'conditional' or 'joint'")
    return torch.log_softmax(out, dim=-1)


def support_log_likelihood(log_g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_j log E_{q*(w)} G_w(y_j | x_j), with q* given by equally weighted samples.

    log_g (n, K, M): log G_w(c | x) for each support example, task class and sample of w;
    y (n,) the support labels in 0..K-1.
    """
    m = log_g.shape[-1]
    at_label = log_g.gather(1, y.view(-1, 1, 1).expand(-1, 1, m)).squeeze(1)  # (n, M)
    return (torch.logsumexp(at_label, dim=-1) - math.log(m)).sum()


def fit_gaussian(
    model: GenerativePrototypes,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: torch.Tensor,
    init: WDistribution,
    bank: list[WDistribution],
    steps: int = 40,
    n_w: int = 6,
    n_z: int = 8,
    lr: float = 0.08,
    n_out: int = 32,
    seed: int = 0,
) -> tuple[WDistribution, WeightedPrototypes]:
    """Fit a diagonal Gaussian q*(w) (mean, log-variance) to the support set (x, y in 0..K-1)."""
    mean = init.mean.clone().requires_grad_(True)
    logvar = torch.diagonal(init.cov).log().clone().requires_grad_(True)
    opt = torch.optim.Adam([mean, logvar], lr=lr)
    for _ in range(steps):
        # Common random numbers: the same draws every step make the objective a smooth function.
        gen = torch.Generator().manual_seed(seed)
        w = reparameterize(mean.expand(n_w, -1), logvar.expand(n_w, -1), gen)  # (n_w, wd)
        log_g = log_conditional(model.log_joint(x, classes, w, n_z=n_z, generator=gen))  # (n, K, M)
        log_lik = support_log_likelihood(log_g, y)
        kl = (gaussian_log_prob(w, mean, logvar.expand_as(w)) - mixture_log_prob(w, bank)).mean()
        loss = -(log_lik - kl)
        # Gradients for q*'s parameters only: the bank's networks stay frozen and untouched.
        mean.grad, logvar.grad = torch.autograd.grad(loss, [mean, logvar])
        opt.step()
    fitted = WDistribution(mean.detach(), torch.diag(logvar.detach().exp()))
    samples = fitted.sample(n_out, torch.Generator().manual_seed(seed + 1))
    return fitted, WeightedPrototypes(samples, torch.full((n_out,), -math.log(n_out)))


def fit_mixture(
    model: GenerativePrototypes,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: torch.Tensor,
    components: list[WDistribution],
    per_component: int = 8,
    n_z: int = 16,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, WeightedPrototypes]:
    """Fit mixture weights pi over the bank's components; returns (pi, weighted samples)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.cat([c.sample(per_component, gen) for c in components])  # (E*M, wd)
    with torch.no_grad():
        log_g = log_conditional(model.log_joint(x, classes, w, n_z=n_z, generator=gen))
    e = len(components)
    log_g_y = log_g.gather(1, y.view(-1, 1, 1).expand(-1, 1, w.shape[0])).squeeze(1)  # (n, E*M)
    per_comp = torch.logsumexp(log_g_y.view(-1, e, per_component), dim=-1) - math.log(
        per_component
    )  # (n, E)
    logits = torch.zeros(e, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        log_pi = torch.log_softmax(logits, dim=0)
        # KL(pi || uniform) stands in for KL(q* || prior mixture): both mix the same components.
        kl = (log_pi.exp() * (log_pi + math.log(e))).sum()
        loss = -(torch.logsumexp(per_comp + log_pi, dim=-1).sum() - kl)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log_pi = torch.log_softmax(logits.detach(), dim=0)
    log_weights = (log_pi[:, None] - math.log(per_component)).expand(e, per_component).reshape(-1)
    return log_pi.exp(), WeightedPrototypes(w, log_weights)
