"""The interface every prototype family implements, so that the bank, adapted models, the CLI,
the federation and the benchmark never branch on a family's name.

A family knows how to build its networks from a JSON config, train them on pooled triples,
imitate the experts on held-out queries, fit a new task from a support set (or from label names
alone) and rebuild a saved task. The bank owns everything that is the same for every family:
splitting the triples, fidelity, expert records, settings, persistence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from ..bank_meta import BankMeta
from ..model.networks import ImageShape
from ..protocol import federation as wire
from ..settings import AdaptSettings, ModelSettings, TrainingSettings
from ..training import Progress
from ..triples import Triples

# A family's own networks (e.g. ``DiscriminativePrototypes``): ``Family[M]`` builds and reads them.
M = TypeVar("M", bound=nn.Module)
M_co = TypeVar("M_co", bound=nn.Module, covariant=True)


class ExpertView(Protocol):
    """What a family reads of one expert's record (``protofuse.records.ExpertRecord`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def labels(self) -> tuple[str, ...]: ...


class BankView(Protocol[M_co]):
    """What a family reads of the bank it adapts or describes: ``protofuse.bank.Bank`` satisfies it.

    The bank calls its family; the family only reads this much of the bank, so families depend on
    neither ``protofuse.bank`` nor ``protofuse.adapted`` (no import cycle, even for the type
    checker), and a test can hand a family a stand-in.
    """

    @property
    def model(self) -> M_co: ...  # the bank's networks (the family's own kind), in eval mode

    @property
    def label_names(
        self,
    ) -> tuple[str, ...]: ...  # the vocabulary, in the order of the weights' label rows

    @property
    def meta(self) -> BankMeta: ...

    @property
    def experts(self) -> Sequence[ExpertView]: ...  # in the order of the weights' expert rows

    @property
    def distributions(
        self,
    ) -> Mapping[str, np.ndarray]: ...  # generative: "<expert>.prior.mean" and the like

    def covered_indices(self, classes: list[str]) -> torch.Tensor:
        """Vocabulary indices of ``classes``; a ValueError naming any label no expert covers."""
        ...


class Task(Protocol):
    """A new task fitted over the bank's prototypes: what an adapted model runs."""

    @property
    def model(self) -> nn.Module: ...  # the bank's networks the task runs on

    @property
    def n_classes(self) -> int: ...

    def log_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) inputs -> (n, K) log-probabilities over the task's classes."""
        ...

    def arrays(self) -> dict[str, np.ndarray]:
        """The task's fitted parameters as plain arrays (saved beside the bank's weights)."""
        ...

    def meta(self) -> dict[str, Any]:
        """The task's JSON settings (saved in meta.json)."""
        ...


@dataclass
class Fitted:
    """What a family's training returns to the bank."""

    model: nn.Module
    config: dict[str, Any]  # JSON: rebuilds the networks with ``Family.build``
    agreement: np.ndarray  # (E,) agreement with the bank's consensus; NaN where not measured
    weights: np.ndarray  # (E,) trust given to each expert in training
    distributions: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # per-expert arrays kept in the bank


def config_from_json(config: dict[str, Any]) -> dict[str, Any]:
    """A networks' config as read back from JSON: ``image_shape`` becomes a tuple again."""
    cfg = dict(config)
    if cfg.get("image_shape") is not None:
        cfg["image_shape"] = tuple(cfg["image_shape"])
    return cfg


class Family(ABC, Generic[M]):
    """One prototype family, over its networks ``M``. Instances are stateless; ``FAMILIES`` holds
    one of each."""

    name: str
    adapts_uncovered_labels: bool  # can a new task include labels no expert covers?
    federates: bool  # does the Flower strategy train this family?

    @abstractmethod
    def build(self, config: dict[str, Any]) -> M:
        """The family's networks from their JSON config (untrained)."""

    @abstractmethod
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
        """Train on pooled triples."""

    @abstractmethod
    def imitate(self, model: M, held: Triples) -> torch.Tensor:
        """The bank's imitation of every expert on held-out inputs: (N, E, C) log-probabilities."""

    @abstractmethod
    def adapt(
        self,
        bank: BankView[M],
        x: torch.Tensor,
        y: torch.Tensor,
        classes: list[str],
        settings: AdaptSettings,
        seed: int,
    ) -> Task:
        """A new task from support inputs x (n, d) and labels y (n,) indexing ``classes``."""

    def adapt_scored(
        self,
        bank: BankView[M],
        x: torch.Tensor,
        y: torch.Tensor,
        classes: list[str],
        settings: AdaptSettings,
        seed: int,
    ) -> tuple[Task, torch.Tensor]:
        """``adapt``, plus the fitted task's (n, K) log-probabilities on its own support set."""
        task = self.adapt(bank, x, y, classes, settings, seed)
        with torch.no_grad():
            return task, task.log_proba(x)

    @abstractmethod
    def zero_shot(self, bank: BankView[M], classes: list[str], settings: AdaptSettings) -> Task:
        """A new task from its label names alone (every label covered by some expert)."""

    @abstractmethod
    def load_task(self, model: M, arrays: dict[str, torch.Tensor], meta: dict[str, Any]) -> Task:
        """Rebuild a task saved with its ``arrays()`` and ``meta()``."""

    def probe_log_proba(
        self, task: Task, x: torch.Tensor, memo: dict[Any, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``task.log_proba(x)``, run once on a task just loaded to show that it predicts.
        ``memo``: kept by a caller that loads many tasks on copies of the same networks (one
        bank version), for a family to keep what of the answer depends on those networks alone."""
        return task.log_proba(x)

    @abstractmethod
    def describe_expert(self, bank: BankView[M], index: int) -> wire.ExpertDistribution:
        """Expert ``index``'s distribution over the bank's prototypes, as the wire carries it."""

    def adapt_method(self, settings: AdaptSettings) -> str:
        """How ``adapt`` fits a task with these settings, recorded in the adapted model."""
        return self.name
