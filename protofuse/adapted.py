"""Adapted models: a new task's distribution over the bank's prototypes, runnable locally.

An adapted model is self-contained (the bank's weights it needs, the task's ``q*``, the label
map and the bank version it came from) and predicts with no server round-trip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import artifacts
from .model.discriminative import DiscriminativePrototypes, TaskHead
from .model.generative import GenerativePrototypes
from .model.recompose import WeightedPrototypes, predict_log_proba

KIND = "protofuse-adapted-model"


@dataclass(frozen=True)
class DiscriminativeTask:
    """Encoder of the bank plus the task's fitted prototype rows."""

    model: DiscriminativePrototypes
    head: TaskHead

    def log_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.log_proba(self.model.embed(x))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"prototypes": self.head.prototypes.numpy(), "bias": self.head.bias.numpy(), "log_temp": self.head.log_temp.numpy()}


@dataclass(frozen=True)
class GenerativeTask:
    """The generative networks, the task's classes and q*(w) as weighted prototypes."""

    model: GenerativePrototypes
    classes: torch.Tensor  # (K,) indices into the bank's vocabulary
    q: WeightedPrototypes
    form: str  # "conditional" or "joint"
    n_z: int = 32
    seed: int = 0

    @torch.no_grad()
    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x, c | w) at q's samples (n, K, M); the same input always gets the same draws."""
        return self.model.log_joint(x, self.classes, self.q.w, n_z=self.n_z, generator=torch.Generator().manual_seed(self.seed))

    def log_proba(self, x: torch.Tensor) -> torch.Tensor:
        return predict_log_proba(self.log_joint(x), self.q, self.form)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"classes": self.classes.numpy(), "w": self.q.w.numpy(), "log_weights": self.q.log_weights.numpy()}


Task = DiscriminativeTask | GenerativeTask


class AdaptedModel:
    """A classifier for a new task, in scikit-learn's conventions."""

    def __init__(self, task: Task, classes: list[str], bank_meta: dict[str, Any], info: dict[str, Any] | None = None) -> None:
        self.task = task
        self.classes_ = np.asarray(classes, dtype=str)
        self.bank_meta = bank_meta  # family, config and version of the bank it came from
        self.info = info or {}  # how it was fitted (method, shots, fitted parameters)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, d) inputs -> (n, len(classes_)) probabilities, columns in the order of ``classes_``."""
        xt = _as_inputs(x, self.bank_meta["x_dim"])
        with torch.no_grad():
            return self.task.log_proba(xt).exp().numpy().astype(np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(1)]

    def save(self, path: str | os.PathLike) -> str:
        """Write the model folder; returns the SHA-256 of its weights."""
        arrays = {f"bank.{k}": v.numpy() for k, v in self.task.model.state_dict().items()}
        arrays.update({f"task.{k}": v for k, v in self.task.arrays().items()})
        extra = {"form": self.task.form, "n_z": self.task.n_z, "seed": self.task.seed} if isinstance(self.task, GenerativeTask) else {}
        meta = {"classes": self.classes_.tolist(), "bank": self.bank_meta, "task": extra, "info": self.info}
        return artifacts.save(path, KIND, arrays, meta)

    def __repr__(self) -> str:
        return f"AdaptedModel(family={self.bank_meta['family']!r}, classes={self.classes_.tolist()})"


def load_adapted(path: str | os.PathLike) -> AdaptedModel:
    """Load a model saved by :meth:`AdaptedModel.save` (checksum and format verified)."""
    from .bank import build_model  # the bank knows how to rebuild its networks

    arrays, meta = artifacts.load(path, KIND)
    try:
        bank_meta = meta["bank"]
        state = {k[len("bank.") :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("bank.")}
        model = build_model(bank_meta, state, path)
        t = {k[len("task.") :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("task.")}
        if bank_meta["family"] == "discriminative":
            task: Task = DiscriminativeTask(model, TaskHead(t["prototypes"], t["bias"], t["log_temp"]))
        else:
            q = WeightedPrototypes(t["w"], t["log_weights"])
            task = GenerativeTask(model, t["classes"], q, meta["task"]["form"], meta["task"]["n_z"], meta["task"]["seed"])
        rows = task.head.prototypes.shape[0] if isinstance(task, DiscriminativeTask) else task.classes.shape[0]
        if rows != len(meta["classes"]):
            raise artifacts.ArtifactError(f"{path}: {len(meta['classes'])} class names for a task of {rows} classes; re-create it with `protofuse adapt`")
    except (KeyError, TypeError) as err:
        raise artifacts.ArtifactError(f"{path}: adapted model lacks or garbles {err}; re-create it with `protofuse adapt`") from None
    return AdaptedModel(task, meta["classes"], bank_meta, meta.get("info"))


def _as_inputs(x: np.ndarray, x_dim: int) -> torch.Tensor:
    """Validate an input array against the bank: 2-D, the bank's width, finite numbers."""
    arr = np.asarray(x)
    if arr.ndim == 1 and arr.shape[0] == x_dim:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != x_dim:
        raise ValueError(f"inputs have shape {arr.shape}, expected (n, {x_dim}): one row of {x_dim} features per example, as in the experts' queries")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"inputs have dtype {arr.dtype}, expected real numbers")
    if not np.isfinite(arr).all():
        raise ValueError("inputs contain NaN or infinite values; clean or impute them first")
    return torch.from_numpy(arr.astype(np.float32))
