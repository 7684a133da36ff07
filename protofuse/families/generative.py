"""The paper's generative family: each expert a distribution over the task pattern ``w``; a new
task recomposes ``q*(w)`` from the bank's distributions (docs/method.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..model.generative import GenerativeConfig, GenerativePrototypes, restricted_log_softmax
from ..model.networks import ImageShape
from ..model.recompose import (
    WDistribution,
    WeightedPrototypes,
    aggregated_posterior,
    fit_gaussian,
    fit_mixture,
    predict_log_proba,
    prior_distribution,
)
from ..protocol import federation as wire
from ..settings import AdaptSettings, ModelSettings, TrainingSettings
from ..training import Progress, train_generative
from ..triples import Triples
from .base import BankView, Family, Fitted, config_from_json


@dataclass(frozen=True)
class GenerativeTask:
    """The generative networks, the task's classes and q*(w) as weighted prototypes."""

    model: GenerativePrototypes
    classes: torch.Tensor  # (K,) indices into the bank's vocabulary
    q: WeightedPrototypes
    form: str  # "conditional" or "joint"
    n_z: int = 32
    seed: int = 0

    @property
    def n_classes(self) -> int:
        return int(self.classes.shape[0])

    @torch.no_grad()
    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x, c | w) at q's samples (n, K, M); the same input always gets the same draws."""
        return self.model.log_joint(
            x,
            self.classes,
            self.q.w,
            n_z=self.n_z,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def log_proba(self, x: torch.Tensor) -> torch.Tensor:
        return predict_log_proba(self.log_joint(x), self.q, self.form)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "classes": self.classes.numpy(),
            "w": self.q.w.numpy(),
            "log_weights": self.q.log_weights.numpy(),
        }

    def meta(self) -> dict[str, Any]:
        return {"form": self.form, "n_z": self.n_z, "seed": self.seed}


class Generative(Family[GenerativePrototypes]):
    name = "generative"
    adapts_uncovered_labels = False
    # Its decomposition already runs per expert, but the decoder models the inputs themselves
    # (more to leak in every update) and it is measured weaker: it is not federated.
    federates = False

    def build(self, config: dict[str, Any]) -> GenerativePrototypes:
        return GenerativePrototypes(GenerativeConfig(**config_from_json(config)))

    def fit(
        self,
        train: Triples,
        model: ModelSettings,
        training: TrainingSettings,
        epochs: int,
        image_shape: ImageShape | None,
        likelihood: str,
        progress: Progress | None,
    ) -> Fitted:
        s = model
        config = GenerativeConfig(
            train.x.shape[1],
            len(train.label_names),
            s.z_dim,
            s.w_dim,
            s.hidden,
            likelihood,
            image_shape,
            s.conv,
            s.lam,
            s.hide_eta,
            s.resolved_normalization(federated=False),  # the generative family is fit centrally
        )
        net = GenerativePrototypes(config)
        train_generative(
            net, train, epochs, training.lr, training.batch_size, training.seed, progress
        )
        n = len(train.expert_names)
        return Fitted(net, asdict(config), np.full(n, np.nan), np.ones(n), decompose(net, train))

    @torch.no_grad()
    def imitate(self, model: GenerativePrototypes, held: Triples) -> torch.Tensor:
        """The label head on q(z | x, eta hidden), restricted to each expert's labels."""
        x = torch.from_numpy(held.x)
        mu_z, _ = model.encode_z(model.features(x), torch.zeros(len(x), len(held.label_names)))
        logits = model.label_head(mu_z)  # (N, C)
        tau = torch.from_numpy(held.tau) > 0  # (E, C)
        return restricted_log_softmax(logits[:, None, :].expand(-1, tau.shape[0], -1), tau[None])

    def adapt(
        self,
        bank: BankView[GenerativePrototypes],
        x: torch.Tensor,
        y: torch.Tensor,
        classes: list[str],
        settings: AdaptSettings,
        seed: int,
    ) -> GenerativeTask:
        idx = bank.covered_indices(classes)
        experts = [expert_distribution(bank, e.name) for e in bank.experts]
        prior = task_prior(bank, idx)
        if settings.recompose == "gaussian":
            _, q = fit_gaussian(bank.model, x, y, idx, prior, experts, seed=seed)
        else:
            _, q = fit_mixture(bank.model, x, y, idx, [*experts, prior], seed=seed)
        return GenerativeTask(bank.model, idx, q, settings.form, settings.n_z, seed)

    def zero_shot(
        self, bank: BankView[GenerativePrototypes], classes: list[str], settings: AdaptSettings
    ) -> GenerativeTask:
        idx = bank.covered_indices(classes)
        w = task_prior(bank, idx).sample(32, torch.Generator().manual_seed(0))
        return GenerativeTask(
            bank.model,
            idx,
            WeightedPrototypes(w, torch.full((32,), -float(np.log(32)))),
            settings.form,
            settings.n_z,
        )

    def load_task(
        self, model: GenerativePrototypes, arrays: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> GenerativeTask:
        q = WeightedPrototypes(arrays["w"], arrays["log_weights"])
        return GenerativeTask(model, arrays["classes"], q, meta["form"], meta["n_z"], meta["seed"])

    def describe_expert(
        self, bank: BankView[GenerativePrototypes], index: int
    ) -> wire.ExpertDistribution:
        expert = bank.experts[index]
        moments = {
            source: expert_distribution(bank, expert.name, source)
            for source in ("prior", "posterior")
        }
        gaussians = {
            k: wire.Gaussian(d.mean.double().numpy(), d.cov.double().numpy())
            for k, d in moments.items()
        }
        return wire.ExpertDistribution(
            expert.name,
            expert.labels,
            bank.meta.federated_rounds,
            wire.GenerativeMoments(gaussians["prior"], gaussians["posterior"]),
        )

    def adapt_method(self, settings: AdaptSettings) -> str:
        return settings.recompose


def expert_distribution(
    bank: BankView[GenerativePrototypes], name: str, source: str = "posterior"
) -> WDistribution:
    """An expert's distribution over prototypes ('prior' network or aggregated 'posterior')."""
    d = bank.distributions
    return WDistribution(
        torch.from_numpy(d[f"{name}.{source}.mean"]), torch.from_numpy(d[f"{name}.{source}.cov"])
    )


def task_prior(bank: BankView[GenerativePrototypes], idx: torch.Tensor) -> WDistribution:
    """p_gamma(w | tau*) for the task whose labels are ``idx``."""
    tau = torch.zeros(len(bank.label_names))
    tau[idx] = 1.0
    return prior_distribution(bank.model, tau)


def decompose(model: GenerativePrototypes, triples: Triples) -> dict[str, np.ndarray]:
    """Each expert's distribution over w: prior network p(w | tau_i) and aggregated posterior."""
    out: dict[str, np.ndarray] = {}
    tau = torch.from_numpy(triples.tau)
    for e, name in enumerate(triples.expert_names):
        x = torch.from_numpy(triples.x[triples.mask[:, e]])
        prior = prior_distribution(model, tau[e])
        posterior = (
            aggregated_posterior(model, x, tau[e]) if len(x) else prior
        )  # no queries left: the prior is all we know
        for source, dist in (("prior", prior), ("posterior", posterior)):
            out[f"{name}.{source}.mean"] = dist.mean.numpy()
            out[f"{name}.{source}.cov"] = dist.cov.numpy()
    return out
