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
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from . import artifacts
from .adapted import AdaptedModel, DiscriminativeTask, GenerativeTask, _as_inputs
from .model.discriminative import DiscriminativeConfig, DiscriminativePrototypes, TaskHead, adapt_map, imprint
from .model.generative import GenerativeConfig, GenerativePrototypes
from .model.recompose import WDistribution, WeightedPrototypes, aggregated_posterior, fit_gaussian, fit_mixture, prior_distribution
from .settings import AdaptSettings, ModelSettings, TrainingSettings
from .training import Fidelity, Progress, consensus, consensus_agreement, fidelity, reliability_weights, train_discriminative, train_generative
from .triples import Triples

KIND = "protofuse-bank"


@dataclass(frozen=True)
class ExpertRecord:
    name: str
    labels: tuple[str, ...]
    fidelity: Fidelity
    n_queries: int
    consensus: float = float("nan")  # agreement with the bank's consensus on its own labels
    weight: float = 1.0  # trust given to its answers in training


class Bank:
    """Shared prototype weights and the experts' records; ``adapt`` builds new-task models."""

    def __init__(self, model: DiscriminativePrototypes | GenerativePrototypes, meta: dict[str, Any], experts: list[ExpertRecord], distributions: dict[str, np.ndarray] | None = None) -> None:
        self.model = model.eval()
        self.meta = meta  # family, config, vocabulary, settings: all JSON
        self.experts = experts
        # generative only: per expert "prior.mean", "prior.cov", "posterior.mean", "posterior.cov"
        self.distributions = distributions or {}
        self.version = meta.get("version", "unsaved")

    @property
    def family(self) -> str:
        return self.meta["family"]

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.meta["label_names"])

    @property
    def adapt_settings(self) -> AdaptSettings:
        return AdaptSettings(**self.meta["settings"]["adapt"])

    def expert_distribution(self, name: str, source: str = "posterior") -> WDistribution:
        """Generative family: an expert's distribution over prototypes ('prior' or 'posterior')."""
        d = self.distributions
        return WDistribution(torch.from_numpy(d[f"{name}.{source}.mean"]), torch.from_numpy(d[f"{name}.{source}.cov"]))

    # -- adaptation ----------------------------------------------------------------------
    def adapt(self, x: np.ndarray, y: np.ndarray, *, seed: int = 0, **options: Any) -> AdaptedModel:
        """Fit a new task from a support set: x (n, d), y (n,) label names.

        Options override the bank's ``[adapt]`` settings (e.g. ``recompose="gaussian"``).
        Labels no expert covers are allowed in the discriminative family: their prototypes are
        imprinted from the support set and fitted with a weak prior.
        """
        settings = self._settings(options)
        xt = _as_inputs(x, self.meta["x_dim"])
        classes, yt = _support_labels(y, len(xt))
        if self.family == "discriminative":
            task = self._adapt_discriminative(xt, yt, classes, settings)
        else:
            task = self._adapt_generative(xt, yt, classes, settings, seed)
        uncovered = [c for c in classes if c not in self.label_names]
        info = {"method": "map" if self.family == "discriminative" else settings.recompose, "n_support": int(len(xt)), "uncovered_labels": uncovered, "options": settings.model_dump()}
        return AdaptedModel(task, classes, self.identity(), info)

    def zero_shot(self, labels: list[str], **options: Any) -> AdaptedModel:
        """A model for a task from its label names alone (no examples): the bank's own prediction."""
        settings = self._settings(options)
        classes = sorted(set(map(str, labels)))
        idx = self._covered_indices(classes)
        if self.family == "discriminative":
            m = self.model
            task: DiscriminativeTask | GenerativeTask = DiscriminativeTask(m, TaskHead(m.prototypes.detach()[idx].clone(), m.bias.detach()[idx].clone(), torch.zeros(())))
        else:
            w = self._task_prior(idx).sample(32, torch.Generator().manual_seed(0))
            task = GenerativeTask(self.model, idx, WeightedPrototypes(w, torch.full((32,), -float(np.log(32)))), settings.form, settings.n_z)
        return AdaptedModel(task, classes, self.identity(), {"method": "zero-shot", "n_support": 0})

    def _settings(self, options: dict[str, Any]) -> AdaptSettings:
        """The bank's adaptation settings with per-call overrides, validated like the spec's."""
        try:
            return AdaptSettings.model_validate({**self.meta["settings"]["adapt"], **options})
        except ValidationError as err:
            from .spec import format_errors

            raise ValueError(f"invalid adaptation options\n{format_errors(err)}") from None

    def _adapt_discriminative(self, x: torch.Tensor, y: torch.Tensor, classes: list[str], s: AdaptSettings) -> DiscriminativeTask:
        m = self.model
        z = m.embed(x)
        bank_p, bank_b = m.prototypes.detach(), m.bias.detach()
        vocab = {c: i for i, c in enumerate(self.label_names)}
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
        return DiscriminativeTask(m, adapt_map(z, y, prior, scale, s.prior_strength))

    def _adapt_generative(self, x: torch.Tensor, y: torch.Tensor, classes: list[str], s: AdaptSettings, seed: int) -> GenerativeTask:
        idx = self._covered_indices(classes)
        bank = [self.expert_distribution(e.name) for e in self.experts]
        prior = self._task_prior(idx)
        if s.recompose == "gaussian":
            _, q = fit_gaussian(self.model, x, y, idx, prior, bank, seed=seed)
        else:
            _, q = fit_mixture(self.model, x, y, idx, bank + [prior], seed=seed)
        return GenerativeTask(self.model, idx, q, s.form, s.n_z, seed)

    def _task_prior(self, idx: torch.Tensor) -> WDistribution:
        """Generative family: p_gamma(w | tau*) for the task whose labels are ``idx``."""
        tau = torch.zeros(len(self.label_names))
        tau[idx] = 1.0
        return prior_distribution(self.model, tau)

    def _covered_indices(self, classes: list[str]) -> torch.Tensor:
        """Vocabulary indices of the classes; every class must be covered by some expert."""
        vocab = {c: i for i, c in enumerate(self.label_names)}
        missing = [c for c in classes if c not in vocab]
        if missing:
            hint = "give examples with bank.adapt (discriminative family)" if self.family == "discriminative" else "use the discriminative family, which fits uncovered labels from examples"
            raise ValueError(f"labels {missing} are covered by no expert in this bank (it knows {list(self.label_names)}); {hint}")
        return torch.tensor([vocab[c] for c in classes])

    # -- persistence ---------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What an adapted model keeps of its bank: enough to rebuild the networks and trace it."""
        keys = ("family", "config", "x_dim", "label_names", "image_shape", "likelihood")
        return {**{k: self.meta[k] for k in keys}, "version": self.version}

    def save(self, path: str | os.PathLike) -> str:
        arrays = {f"model.{k}": v.numpy() for k, v in self.model.state_dict().items()}
        arrays.update({f"dist.{k}": v for k, v in self.distributions.items()})
        meta = {**self.meta, "experts": [{"name": e.name, "labels": list(e.labels), "fidelity": asdict(e.fidelity), "n_queries": e.n_queries, "consensus": e.consensus, "weight": e.weight} for e in self.experts]}
        meta.pop("version", None)
        self.version = artifacts.save(path, KIND, arrays, meta)[:16]
        self.meta["version"] = self.version
        return self.version

    def __repr__(self) -> str:
        return f"Bank(family={self.family!r}, labels={list(self.label_names)}, experts={[e.name for e in self.experts]}, version={self.version!r})"


def load_bank(path: str | os.PathLike) -> Bank:
    """Load a bank written by ``protofuse fit`` (checksum and format verified)."""
    arrays, meta = artifacts.load(path, KIND)
    try:
        return _bank_from(arrays, meta, path)
    except (KeyError, TypeError, ValueError) as err:
        raise artifacts.ArtifactError(f"{path}: bank metadata is incomplete or malformed ({err!r}); re-create it with `protofuse fit`") from None


def _bank_from(arrays: dict[str, np.ndarray], meta: dict[str, Any], path: Any) -> Bank:
    meta["version"] = meta["sha256"][:16]
    state = {k[len("model.") :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model.")}
    model = build_model(meta, state, path)
    dists = {k[len("dist.") :]: v for k, v in arrays.items() if k.startswith("dist.")}
    experts = [ExpertRecord(e["name"], tuple(e["labels"]), Fidelity(**e["fidelity"]), e["n_queries"], e["consensus"], e["weight"]) for e in meta.pop("experts")]
    return Bank(model, meta, experts, dists)


def build_model(meta: dict[str, Any], state: dict[str, torch.Tensor] | None = None, source: Any = "bank") -> DiscriminativePrototypes | GenerativePrototypes:
    """Rebuild a family's networks from its JSON config, loading ``state`` if given."""
    cfg = dict(meta["config"])
    if cfg.get("image_shape") is not None:
        cfg["image_shape"] = tuple(cfg["image_shape"])
    try:
        model = DiscriminativePrototypes(DiscriminativeConfig(**cfg)) if meta["family"] == "discriminative" else GenerativePrototypes(GenerativeConfig(**cfg))
        if state is not None:
            model.load_state_dict(state)
    except (TypeError, RuntimeError, KeyError) as err:
        raise artifacts.ArtifactError(f"{source}: weights do not match the recorded {meta.get('family')} configuration ({str(err).splitlines()[0]})") from None
    return model.eval()


def fit_bank(triples: Triples, model_settings: ModelSettings, training: TrainingSettings, adapt: AdaptSettings, image_shape: tuple[int, int] | None, likelihood: str, progress: Progress | None = None) -> Bank:
    """Train a bank centrally on pooled triples and decompose it into expert records."""
    torch.manual_seed(training.seed)
    train, held = triples.split(training.holdout, training.seed)
    family = model_settings.family
    x_dim, n_labels, n_experts = triples.x.shape[1], len(triples.label_names), len(triples.expert_names)
    epochs = training.resolved_epochs(family, len(train.x))
    if family == "discriminative":
        encoder = model_settings.encoder if model_settings.encoder != "auto" else ("conv" if image_shape else "mlp")
        config: Any = DiscriminativeConfig(x_dim, n_labels, n_experts, model_settings.feat_dim, encoder, image_shape)
        model: Any = DiscriminativePrototypes(config)
        agreement, weights = _train_discriminative_bank(model, train, epochs, training, image_shape, progress)
        imitated = model.expert_log_proba(model.embed(torch.from_numpy(held.x)), torch.from_numpy(held.tau)).detach() if len(held.x) else None
        dists: dict[str, np.ndarray] = {}
    else:
        s = model_settings
        config = GenerativeConfig(x_dim, n_labels, s.z_dim, s.w_dim, s.hidden, likelihood, image_shape, s.conv, s.lam, s.hide_eta)
        model = GenerativePrototypes(config)
        train_generative(model, train, epochs, training.lr, training.batch_size, training.seed, progress)
        imitated = _generative_imitation(model, held) if len(held.x) else None
        dists = _decompose(model, train)
        agreement, weights = np.full(n_experts, np.nan), np.ones(n_experts)
    fid = fidelity(imitated, held) if imitated is not None else [Fidelity(float("nan"), float("nan"), 0)] * n_experts
    experts = [
        ExpertRecord(name, labels, f, int(triples.mask[:, e].sum()), float(agreement[e]), float(weights[e]))
        for e, (name, labels, f) in enumerate(zip(triples.expert_names, triples.expert_labels, fid))
    ]
    cfg_json = asdict(config)
    meta = {
        "family": family, "config": cfg_json, "x_dim": x_dim, "label_names": list(triples.label_names),
        "image_shape": list(image_shape) if image_shape else None, "likelihood": likelihood,
        "settings": {"model": model_settings.model_dump(), "training": training.model_dump(), "adapt": adapt.model_dump()},
    }
    return Bank(model, meta, experts, dists)


def _train_discriminative_bank(model: DiscriminativePrototypes, train: Triples, epochs: int, training: TrainingSettings, image_shape: tuple[int, int] | None, progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    """Two phases: learn a consensus from everyone; then weight each expert by how well it agrees
    with that consensus (so a poor participant cannot drag its labels' prototypes) and distil the
    consensus over the whole vocabulary into the bank. Returns (agreement, weights), each (E,)."""
    n_experts = len(train.expert_names)
    aug = training.resolved_augmentation(image_shape)
    reweight = training.reweight and n_experts > 1
    args = (training.lr, training.batch_size, aug)
    if epochs < 2 or not (reweight or training.distill > 0):
        train_discriminative(model, train, epochs, *args, seed=training.seed, progress=progress)
        return consensus_agreement(consensus(model, train.x), train), np.ones(n_experts)
    first = epochs // 2
    # Both phases report against the whole run's epochs, so a progress bar fills once.
    earlier = None if progress is None else (lambda e, n, loss: progress(e, epochs, loss))
    train_discriminative(model, train, first, *args, seed=training.seed, progress=earlier)
    pooled = consensus(model, train.x)  # (N, C), the first phase's consensus
    agreement = consensus_agreement(pooled, train)
    weights = reliability_weights(agreement, train.tau.sum(1)) if reweight else np.ones(n_experts)
    teacher = pooled if training.distill > 0 else None
    later = None if progress is None else (lambda e, n, loss: progress(first + e, epochs, loss))
    train_discriminative(model, train, epochs - first, *args, expert_weight=weights, teacher=teacher, teacher_weight=training.distill, seed=training.seed + 1, progress=later)
    return agreement, weights


@torch.no_grad()
def _generative_imitation(model: GenerativePrototypes, held: Triples) -> torch.Tensor:
    """The generative bank's imitation of each expert: label head on q(z | x, eta hidden)."""
    from .model.generative import restricted_log_softmax

    x = torch.from_numpy(held.x)
    mu_z, _ = model.encode_z(model.features(x), torch.zeros(len(x), len(held.label_names)))
    logits = model.label_head(mu_z)  # (N, C)
    tau = torch.from_numpy(held.tau) > 0  # (E, C)
    return restricted_log_softmax(logits[:, None, :].expand(-1, tau.shape[0], -1), tau[None])


def _decompose(model: GenerativePrototypes, triples: Triples) -> dict[str, np.ndarray]:
    """Each expert's distribution over w: prior network p(w | tau_i) and aggregated posterior."""
    out: dict[str, np.ndarray] = {}
    tau = torch.from_numpy(triples.tau)
    for e, name in enumerate(triples.expert_names):
        x = torch.from_numpy(triples.x[triples.mask[:, e]])
        prior = prior_distribution(model, tau[e])
        posterior = aggregated_posterior(model, x, tau[e]) if len(x) else prior  # no queries left: the prior is all we know
        for source, dist in (("prior", prior), ("posterior", posterior)):
            out[f"{name}.{source}.mean"] = dist.mean.numpy()
            out[f"{name}.{source}.cov"] = dist.cov.numpy()
    return out


def _support_labels(y: np.ndarray, n: int) -> tuple[list[str], torch.Tensor]:
    """Support labels as names -> (sorted class names, indices into them), with clear errors."""
    arr = np.asarray(y)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"support labels have shape {arr.shape}, expected ({n},): one label name per support example")
    if not (np.issubdtype(arr.dtype, np.str_) or np.issubdtype(arr.dtype, np.integer) or (arr.dtype == object and all(isinstance(v, str) for v in arr))):
        raise ValueError(f"support labels have dtype {arr.dtype}; give label names as strings (floats such as 4.0 would become a new label '4.0')")
    names = arr.astype(str)
    classes = sorted(set(names.tolist()))
    if len(classes) < 2:
        raise ValueError(f"the support set has {len(classes)} class ({classes}); a task needs at least 2 classes")
    index = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([index[c] for c in names])
