"""The discriminative family: a shared encoder, one prototype and bias per label, each expert an
imitation head over its own labels; a new task is the MAP estimate of its labels' rows
(docs/method.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..model.discriminative import (
    DiscriminativeConfig,
    DiscriminativePrototypes,
    TaskHead,
    adapt_map,
    imprint,
)
from ..model.networks import ImageShape
from ..protocol import federation as wire
from ..schedule import TwoPhases
from ..settings import AdaptSettings, ModelSettings, TrainingSettings
from ..training import (
    Progress,
    consensus,
    consensus_agreement,
    reliability_weights,
    train_discriminative,
)
from ..triples import Triples
from .base import BankView, Family, Fitted, Task, config_from_json

# Encoder outputs ``probe_log_proba`` keeps per set of networks.
PROBES_KEPT = 4


@dataclass(frozen=True)
class DiscriminativeTask:
    """Encoder of the bank plus the task's fitted prototype rows."""

    model: DiscriminativePrototypes
    head: TaskHead

    @property
    def n_classes(self) -> int:
        return int(self.head.prototypes.shape[0])

    def log_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.log_proba(self.model.embed(x))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "prototypes": self.head.prototypes.numpy(),
            "bias": self.head.bias.numpy(),
            "log_temp": self.head.log_temp.numpy(),
        }

    def meta(self) -> dict[str, Any]:
        return {}


def config_for(
    x_dim: int,
    n_labels: int,
    n_experts: int,
    model: ModelSettings,
    image_shape: ImageShape | None,
    federated: bool = False,
) -> DiscriminativeConfig:
    """The networks' config from the settings; the encoder is a conv net for images unless set,
    and ``federated`` (the weights leave the clients) picks the normalization ``auto`` means."""
    encoder = model.encoder if model.encoder != "auto" else ("conv" if image_shape else "mlp")
    norm = model.resolved_normalization(federated)
    return DiscriminativeConfig(
        x_dim, n_labels, n_experts, model.feat_dim, encoder, image_shape, norm
    )


class Discriminative(Family[DiscriminativePrototypes]):
    name = "discriminative"
    adapts_uncovered_labels = True
    federates = True

    def build(self, config: dict[str, Any]) -> DiscriminativePrototypes:
        return DiscriminativePrototypes(DiscriminativeConfig(**config_from_json(config)))

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
        config = config_for(
            train.x.shape[1], len(train.label_names), len(train.expert_names), model, image_shape
        )
        net = DiscriminativePrototypes(config)
        agreement, weights = _two_phases(net, train, epochs, training, image_shape, progress)
        return Fitted(net, asdict(config), agreement, weights)

    def imitate(self, model: DiscriminativePrototypes, held: Triples) -> torch.Tensor:
        return model.expert_log_proba(
            model.embed(torch.from_numpy(held.x)), torch.from_numpy(held.tau)
        ).detach()

    def adapt(
        self,
        bank: BankView[DiscriminativePrototypes],
        x: torch.Tensor,
        y: torch.Tensor,
        classes: list[str],
        settings: AdaptSettings,
        seed: int,
    ) -> DiscriminativeTask:
        return self.adapt_scored(bank, x, y, classes, settings, seed)[0]

    def adapt_scored(
        self,
        bank: BankView[DiscriminativePrototypes],
        x: torch.Tensor,
        y: torch.Tensor,
        classes: list[str],
        settings: AdaptSettings,
        seed: int,
    ) -> tuple[DiscriminativeTask, torch.Tensor]:
        # The support set's embeddings are at hand: scoring the fit on it costs one matrix product.
        m = bank.model
        z = m.embed(x)
        bank_p, bank_b = m.prototypes.detach(), m.bias.detach()
        vocab = {c: i for i, c in enumerate(bank.label_names)}
        covered = torch.tensor([c in vocab for c in classes])
        idx = torch.tensor([vocab.get(c, 0) for c in classes])
        protos, bias = bank_p[idx].clone(), bank_b[idx].clone()
        # A covered row may move by about half its length; an imprinted one, freely.
        scale = 0.5 * protos.norm(dim=-1)
        if not covered.all():
            new = ~covered
            protos[new] = imprint(z, y, len(classes), bank_p)[new]
            bias[new] = bank_b.mean()
            scale[new] = 10.0 * bank_p.norm(dim=-1).mean()
        prior = TaskHead(protos, bias, torch.zeros(()))
        head = adapt_map(z, y, prior, scale, settings.prior_strength)
        with torch.no_grad():
            return DiscriminativeTask(m, head), head.log_proba(z)

    def zero_shot(
        self, bank: BankView[DiscriminativePrototypes], classes: list[str], settings: AdaptSettings
    ) -> DiscriminativeTask:
        m, idx = bank.model, bank.covered_indices(classes)
        return DiscriminativeTask(
            m,
            TaskHead(
                m.prototypes.detach()[idx].clone(), m.bias.detach()[idx].clone(), torch.zeros(())
            ),
        )

    def load_task(
        self, model: DiscriminativePrototypes, arrays: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> DiscriminativeTask:
        return DiscriminativeTask(
            model, TaskHead(arrays["prototypes"], arrays["bias"], arrays["log_temp"])
        )

    def probe_log_proba(
        self,
        task: Task,
        x: torch.Tensor,
        memo: dict[Any, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # The encoder's output is the networks' alone: tasks on copies of the same networks share
        # it, and only their heads run again. A few inputs at most are kept.
        if memo is None or not isinstance(task, DiscriminativeTask):
            return task.log_proba(x)
        key = (tuple(x.shape), x.numpy().tobytes())
        z = memo.get(key)
        if z is None:
            if len(memo) >= PROBES_KEPT:
                memo.clear()
            z = memo[key] = task.model.embed(x)
        return task.head.log_proba(z)

    def describe_expert(
        self, bank: BankView[DiscriminativePrototypes], index: int
    ) -> wire.ExpertDistribution:
        expert = bank.experts[index]
        vocab = {c: i for i, c in enumerate(bank.label_names)}
        bias = bank.model.expert_bias.detach()[index, [vocab[c] for c in expert.labels]]
        head = wire.DiscriminativeHead(
            float(bank.model.expert_log_temp.detach()[index]), tuple(float(b) for b in bias)
        )
        return wire.ExpertDistribution(expert.name, expert.labels, bank.meta.federated_rounds, head)

    def adapt_method(self, settings: AdaptSettings) -> str:
        return "map"


def _two_phases(
    model: DiscriminativePrototypes,
    train: Triples,
    epochs: int,
    training: TrainingSettings,
    image_shape: ImageShape | None,
    progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Two phases: learn a consensus from everyone; then weight each expert by how well it agrees
    with that consensus (so a poor participant cannot drag its labels' prototypes) and distil the
    consensus over the whole vocabulary into the bank. Returns (agreement, weights), each (E,)."""
    n_experts = len(train.expert_names)
    aug = training.resolved_augmentation(image_shape, train.x.shape[1])
    reweight = training.reweight and n_experts > 1
    args = (training.lr, training.batch_size, aug)
    phases = TwoPhases.split(epochs, training, n_experts)
    if not phases.weighted:
        train_discriminative(model, train, epochs, *args, seed=training.seed, progress=progress)
        return consensus_agreement(consensus(model, train.x), train), np.ones(n_experts)
    first = phases.consensus
    # Both phases report against the whole run's epochs, so a progress bar fills once.
    earlier = None if progress is None else (lambda e, n, loss: progress(e, epochs, loss))
    train_discriminative(model, train, first, *args, seed=training.seed, progress=earlier)
    pooled = consensus(model, train.x)  # (N, C), the first phase's consensus
    agreement = consensus_agreement(pooled, train)
    weights = reliability_weights(agreement, train.tau.sum(1)) if reweight else np.ones(n_experts)
    teacher = pooled if training.distill > 0 else None
    later = None if progress is None else (lambda e, n, loss: progress(first + e, epochs, loss))
    train_discriminative(
        model,
        train,
        epochs - first,
        *args,
        expert_weight=weights,
        teacher=teacher,
        teacher_weight=training.distill,
        seed=training.seed + 1,
        progress=later,
    )
    return agreement, weights


# Each expert's imitation head (temperature and per-label biases) is private to its client: it
# travels only inside the expert's prototype-distribution message. Everything else is shared.
PRIVATE_PARAMETERS = ("expert_log_temp", "expert_bias")
# Shared arrays with one row per label of the vocabulary: a federation averages a row over the
# clients whose expert covers its label.
ROW_KEYS = ("prototypes", "bias")


def shared_arrays(model: DiscriminativePrototypes) -> dict[str, np.ndarray]:
    """The shared part of the model (encoder, prototype rows, biases) as plain arrays."""
    return {
        k: v.detach().numpy().copy()
        for k, v in model.state_dict().items()
        if k not in PRIVATE_PARAMETERS
    }


def load_shared(model: DiscriminativePrototypes, arrays: dict[str, np.ndarray]) -> None:
    """Load the shared part; the private heads keep their values."""
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    missing = set(shared_arrays(model)) - set(state)
    unknown = set(state) - set(shared_arrays(model))
    if missing or unknown:
        raise ValueError(
            f"shared weights do not fit the model: missing {sorted(missing)}, unknown "
            f"{sorted(unknown)}"
        )
    model.load_state_dict(state, strict=False)
