"""The prototype bank: shared weights plus one record per expert, and adaptation to new tasks.

Both families live behind this one interface:

    bank = fit_bank(triples, ...)          # or load_bank(run_dir)
    model = bank.adapt(x, y)               # a new task from a few labeled examples
    model.predict_proba(x_new)

An expert's record is its distribution over the shared prototypes: in the discriminative family
its label set and imitation head (temperature and biases, inside the weights); in the generative
family the moments of its distribution over ``w`` (prior network and aggregated posterior).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from . import artifacts
from .adapted import AdaptedModel, _as_inputs, build_model
from .bank_meta import BankMeta, BankMetaError, BankSettings, FederationRecord
from .families import Family, family
from .input_checks import input_range, warn_if_out_of_range
from .model.networks import ImageShape
from .records import ExpertRecord  # the one expert record (bank, fusion server, manifest)
from .settings import AdaptSettings, ModelSettings, TrainingSettings
from .training import Fidelity, Progress, fidelity
from .triples import Triples

KIND = "protofuse-bank"
RUN_BANK = "bank"  # a federation's run folder keeps its bank here, beside the store
RUN_MANIFEST = "manifest.pb"  # ... and the bank manifest (protos/protofuse/v1/bank.proto) beside it


class Bank:
    """Shared prototype weights and the experts' records; ``adapt`` builds new-task models."""

    def __init__(
        self,
        model: torch.nn.Module,
        meta: BankMeta,
        experts: list[ExpertRecord],
        distributions: dict[str, np.ndarray] | None = None,
    ) -> None:
        if not isinstance(meta, BankMeta):  # a dict, as before BankMeta: say how to build one
            raise TypeError(
                "meta must be a BankMeta (protofuse.bank.bank_meta(...) or "
                f"BankMeta.from_json(...)), got {type(meta).__name__}"
            )
        self.model = model.eval()
        # family, config, vocabulary, settings; saving replaces it by a copy with the version
        self.meta = meta
        self.experts = experts
        # generative only: per expert "prior.mean", "prior.cov", "posterior.mean", "posterior.cov"
        self.distributions = distributions or {}

    @property
    def version(self) -> str:
        """The first 16 hex digits of the saved bank's checksum, or "unsaved"."""
        return self.meta.version

    @property
    def family(self) -> str:
        return self.meta.family

    @property
    def family_impl(self) -> Family[Any]:
        return family(self.family)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.meta.label_names

    @property
    def adapt_settings(self) -> AdaptSettings:
        return self.meta.settings.adapt

    # -- adaptation ----------------------------------------------------------------------
    def adapt(self, x: np.ndarray, y: np.ndarray, *, seed: int = 0, **options: Any) -> AdaptedModel:
        """Fit a new task from a support set: x (n, d), y (n,) label names.

        Options override the bank's ``[adapt]`` settings (e.g. ``recompose="gaussian"``).
        Labels no expert covers are allowed where the family supports them (discriminative):
        their prototypes are imprinted from the support set and fitted with a weak prior.
        """
        settings = self._settings(options)
        xt = _as_inputs(x, self.meta.x_dim)
        warn_if_out_of_range(
            xt.numpy(),
            list(self.meta.input_range) if self.meta.input_range else None,
            "support inputs",
        )
        classes, yt = _support_labels(y, len(xt))
        impl = self.family_impl
        try:
            task, support_log_proba = impl.adapt_scored(self, xt, yt, classes, settings, seed)
        except RuntimeError as err:  # torch's overflow checks, inside L-BFGS on huge features
            raise ValueError(_diverged(self, f"({str(err).splitlines()[0]})")) from None
        if not (
            bool(torch.isfinite(support_log_proba).all())
            and all(np.isfinite(a).all() for a in task.arrays().values())
        ):
            raise ValueError(_diverged(self, "(NaN or infinite weights)"))
        uncovered = [c for c in classes if c not in self.label_names]
        accuracy = float((support_log_proba.argmax(1) == yt).float().mean())
        info = {
            "method": impl.adapt_method(settings),
            "n_support": len(xt),
            "support_accuracy": accuracy,
            "uncovered_labels": uncovered,
            "options": settings.model_dump(),
        }
        return AdaptedModel(task, classes, self.identity(), info)

    def zero_shot(self, labels: list[str], **options: Any) -> AdaptedModel:
        """A model for a task from its label names alone (no examples): the bank's own
        prediction."""
        settings = self._settings(options)
        classes = sorted(set(map(str, labels)))
        task = self.family_impl.zero_shot(self, classes, settings)
        return AdaptedModel(task, classes, self.identity(), {"method": "zero-shot", "n_support": 0})

    def _settings(self, options: dict[str, Any]) -> AdaptSettings:
        """The bank's adaptation settings with per-call overrides, validated like the spec's."""
        try:
            return AdaptSettings.model_validate(
                {**self.meta.settings.adapt.model_dump(), **options}
            )
        except ValidationError as err:
            from .settings import format_errors

            raise ValueError(f"invalid adaptation options\n{format_errors(err)}") from None

    def covered_indices(self, classes: list[str]) -> torch.Tensor:
        """Vocabulary indices of the classes; every class must be covered by some expert."""
        vocab = {c: i for i, c in enumerate(self.label_names)}
        missing = [c for c in classes if c not in vocab]
        if missing:
            hint = (
                "give examples with bank.adapt"
                if self.family_impl.adapts_uncovered_labels
                else "use the discriminative family, which fits uncovered labels from examples"
            )
            raise ValueError(
                f"labels {missing} are covered by no expert in this bank (it knows "
                f"{list(self.label_names)}); {hint}"
            )
        return torch.tensor([vocab[c] for c in classes])

    # -- persistence ---------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What an adapted model keeps of its bank: enough to rebuild the networks and trace it."""
        return self.meta.identity()

    def save(self, path: str | os.PathLike) -> str:
        arrays = {f"model.{k}": v.numpy() for k, v in self.model.state_dict().items()}
        arrays.update({f"dist.{k}": v for k, v in self.distributions.items()})
        meta = {
            **self.meta.to_json(),
            "experts": [
                {
                    "name": e.name,
                    "labels": list(e.labels),
                    "fidelity": asdict(e.fidelity),
                    "n_queries": e.n_queries,
                    "consensus": e.consensus,
                    "weight": e.weight,
                }
                for e in self.experts
            ],
        }
        sha = artifacts.save(path, KIND, arrays, meta)
        self.meta = self.meta.model_copy(update={"sha256": sha, "version": sha[:16]})
        return self.version

    def __repr__(self) -> str:
        return (
            f"Bank(family={self.family!r}, labels={list(self.label_names)}, "
            f"experts={[e.name for e in self.experts]}, version={self.version!r})"
        )


def _diverged(bank: Bank, what: str) -> str:
    """The error for support inputs the bank's networks cannot compute with: nothing non-finite
    is ever returned."""
    where = (
        f"the bank's inputs lie in {list(bank.meta.input_range)}"
        if bank.meta.input_range
        else "the bank records no input range"
    )
    fed = bank.meta.federation
    if fed is not None and fed.privacy.mode == "dp":  # its weights carry the run's noise
        budget = f"epsilon {fed.epsilon:.3g}, " if fed.epsilon is not None else ""
        return (
            f"x: adaptation on these inputs diverged {what}; this bank was trained under "
            f"differential privacy ({budget}noise multiplier {fed.noise_multiplier}) and its "
            f"noisy weights, not the inputs, may be what diverged: send inputs preprocessed "
            f"like the experts' queries, or build the bank with a larger [privacy] epsilon"
        )
    return (
        f"x: adaptation on these inputs diverged {what}; they are far outside what the bank was "
        f"fitted on ({where}): send inputs preprocessed like the experts' queries"
    )


def load_bank(path: str | os.PathLike) -> Bank:
    """Load a bank written by ``protofuse fit``, or the run folder of a federation (``simulate``
    or the deployed server), whose bank sits in its ``bank/`` folder (checksum and format
    verified)."""
    if (
        not (Path(path) / artifacts.META).exists()
        and (Path(path) / RUN_BANK / artifacts.META).exists()
    ):
        path = Path(path) / RUN_BANK
    arrays, record = artifacts.load(path, KIND)
    fix = "re-create it with `protofuse fit` (or the federation that made it)"
    try:
        meta = BankMeta.from_json(record)
    except BankMetaError as err:  # names every field; no traceback for a damaged file
        raise artifacts.ArtifactError(f"{path}: {err}\n{fix}") from None
    experts = _expert_records(
        record.get("experts"),
        f"{path}: bank metadata is incomplete or malformed in {artifacts.META}",
        fix,
    )
    state = {
        k[len("model.") :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model.")
    }
    model = build_model(meta.family, meta.config, state, path)
    dists = {k[len("dist.") :]: v for k, v in arrays.items() if k.startswith("dist.")}
    return Bank(model, meta, experts, dists)


def _expert_records(entries: Any, where: str, fix: str) -> list[ExpertRecord]:
    """The ``experts`` of a loaded meta.json, each as saved by :meth:`Bank.save`; errors name the
    entry."""
    if not isinstance(entries, list):
        raise artifacts.ArtifactError(
            f"{where}:\n  experts: {'missing' if entries is None else 'not a list'}\n{fix}"
        )
    records = []
    for i, e in enumerate(entries):
        try:
            records.append(
                ExpertRecord(
                    e["name"],
                    tuple(e["labels"]),
                    Fidelity(**e["fidelity"]),
                    e["n_queries"],
                    e["consensus"],
                    e["weight"],
                )
            )
        except KeyError as err:
            raise artifacts.ArtifactError(
                f"{where}:\n  experts[{i}].{err.args[0]}: missing\n{fix}"
            ) from None
        except (TypeError, ValueError) as err:
            raise artifacts.ArtifactError(f"{where}:\n  experts[{i}]: {err}\n{fix}") from None
    return records


def fit_bank(
    triples: Triples,
    model_settings: ModelSettings,
    training: TrainingSettings,
    adapt: AdaptSettings,
    image_shape: ImageShape | None,
    likelihood: str,
    progress: Progress | None = None,
) -> Bank:
    """Train a bank centrally on pooled triples and decompose it into expert records."""
    torch.manual_seed(training.seed)
    train, held = triples.split(training.holdout, training.seed)
    impl = family(model_settings.family)
    epochs = training.resolved_epochs(impl.name, len(train.x))
    fitted = impl.fit(train, model_settings, training, epochs, image_shape, likelihood, progress)
    n_experts = len(triples.expert_names)
    fid = (
        fidelity(impl.imitate(fitted.model, held), held)
        if len(held.x)
        else [Fidelity(float("nan"), float("nan"), 0)] * n_experts
    )
    experts = [
        ExpertRecord(
            name,
            labels,
            f,
            int(triples.mask[:, e].sum()),
            float(fitted.agreement[e]),
            float(fitted.weights[e]),
        )
        for e, (name, labels, f) in enumerate(
            zip(triples.expert_names, triples.expert_labels, fid, strict=True)
        )
    ]
    meta = bank_meta(
        impl.name,
        fitted.config,
        triples.label_names,
        image_shape,
        likelihood,
        model_settings,
        training,
        adapt,
        input_range=input_range(triples.x),
    )
    return Bank(fitted.model, meta, experts, fitted.distributions)


def bank_meta(
    family_name: str,
    config: dict[str, Any],
    label_names: Sequence[str],
    image_shape: Sequence[int] | None,
    likelihood: str,
    model: ModelSettings,
    training: TrainingSettings,
    adapt: AdaptSettings,
    *,
    input_range: Sequence[float] | None = None,
    federation: FederationRecord | None = None,
) -> BankMeta:
    """A new bank's metadata: family, networks' config, vocabulary, the settings used and, for a
    federated bank, how it was federated."""
    return BankMeta(
        family=family_name,
        config=config,
        x_dim=config["x_dim"],
        label_names=tuple(label_names),
        image_shape=tuple(image_shape) if image_shape else None,
        likelihood=likelihood,
        settings=BankSettings(model=model, training=training, adapt=adapt),
        input_range=_pair(input_range),
        federation=federation,
    )


def _pair(values: Sequence[float] | None) -> tuple[float, float] | None:
    if values is None:
        return None
    lo, hi = values  # a ValueError unless exactly [min, max]
    return float(lo), float(hi)


def _support_labels(y: np.ndarray, n: int) -> tuple[list[str], torch.Tensor]:
    """Support labels as names -> (sorted class names, indices into them), with clear errors."""
    arr = np.asarray(y)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(
            f"support labels have shape {arr.shape}, expected ({n},): one label name per support "
            "example"
        )
    if not (
        np.issubdtype(arr.dtype, np.str_)
        or np.issubdtype(arr.dtype, np.integer)
        or (arr.dtype == object and all(isinstance(v, str) for v in arr))
    ):
        raise ValueError(
            f"support labels have dtype {arr.dtype}; give label names as strings (floats such as "
            "4.0 would become a new label '4.0')"
        )
    names = arr.astype(str)
    classes = sorted(set(names.tolist()))
    if len(classes) < 2:
        raise ValueError(
            f"the support set has {len(classes)} class ({classes}); a task needs at least 2 classes"
        )
    index = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([index[c] for c in names])
