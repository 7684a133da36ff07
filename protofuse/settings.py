"""Model, training and adaptation settings: the optional tables of a federation spec.

Defaults are the measured choices (README, "Defaults and why"); every field can be set in the
spec's ``[model]``, ``[training]`` and ``[adapt]`` tables.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .model.networks import Augmentation, FeatureAugmentation, ImageShape, image_dims


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSettings(_Strict):
    family: Literal["discriminative", "generative"] = Field(
        "discriminative", description="prototype family; discriminative measured stronger"
    )
    encoder: Literal["auto", "conv", "mlp"] = Field(
        "auto", description="discriminative encoder; auto: conv for images, mlp otherwise"
    )
    normalization: Literal["auto", "batch", "layer"] = Field(
        "auto",
        description=(
            "normalization after hidden layers: 'layer' keeps no statistic of the training "
            "data; 'batch' keeps running averages of the activations, which in a federation are "
            "part of each client's update and describe its queries; 'auto': layer in a "
            "federation (simulate, deployment), batch in central fit, where no weights leave"
        ),
    )
    feat_dim: int = Field(64, ge=2, le=4096, description="discriminative feature size |z|")
    z_dim: int = Field(5, ge=1, le=256, description="generative concept size |z| (paper: 5)")
    w_dim: int = Field(2, ge=1, le=64, description="generative task-pattern size |w| (paper: 2)")
    hidden: int = Field(
        100, ge=8, le=4096, description="hidden units of the generative MLPs (paper: 100)"
    )
    lam: float = Field(1.0, ge=0, le=1e4, description="weight of the regularizer q_psi(eta | w)")
    hide_eta: float = Field(
        0.5, ge=0, le=1, description="fraction of triples whose eta is hidden from q(z | x, eta)"
    )
    conv: bool = Field(
        False, description="generative: conv encoders and transposed-conv decoder (images only)"
    )

    def resolved_normalization(self, federated: bool) -> Literal["batch", "layer"]:
        """The normalization the networks are built with. ``auto`` is layer norm wherever the
        weights leave a client (a federation), so no statistic of its queries travels with them,
        and batch norm in central ``fit``, where nothing leaves and batch norm measured better
        (README, "Defaults and why")."""
        if self.normalization != "auto":
            return self.normalization
        return "layer" if federated else "batch"


# Table augmentation by default (README, "Defaults and why"; development seeds 0-2). Wide inputs,
# where each feature carries a small share of the evidence (pixels given as vectors: 64 and 784
# features), gained most from a fifth of the features dropped; a real table of 18 features, where
# one feature may decide the class, lost accuracy at every rate of dropout and noise tried.
TABLE_DROPOUT = 0.2
TABLE_WIDE = (
    64  # fewest features for which the default drops any (narrower tables train on clean inputs)
)


class TrainingSettings(_Strict):
    epochs: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description=(
            "passes over the queries; default: 40 (generative), or for the discriminative "
            "family 30 or enough for 600 optimizer steps, whichever is more (small query pools "
            "need more passes)"
        ),
    )
    lr: float = Field(2e-3, gt=0, le=1, description="peak learning rate")
    batch_size: int = Field(128, ge=2, le=65_536)
    max_shift: float | None = Field(
        None,
        ge=0,
        le=16,
        description="images: random shift in pixels; default: about 1/14 of the image side",
    )
    max_rotation: float | None = Field(
        None, ge=0, le=90, description="images: random rotation in degrees; default: 12"
    )
    max_scale: float | None = Field(
        None, ge=0, lt=1, description="images: random zoom, relative; default: 0.1"
    )
    feature_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description=(
            "tables (inputs without an image shape), discriminative: probability that each "
            "feature of a training input is replaced by its mean over the queries; default: "
            "0.2 with 64 features or more, else 0"
        ),
    )
    feature_noise: float | None = Field(
        None,
        ge=0,
        le=10,
        description=(
            "tables, discriminative: Gaussian noise added to each feature of a training input, "
            "in units of its spread over the queries; default: 0"
        ),
    )
    holdout: float = Field(
        0.1, ge=0, lt=1, description="fraction of queries held out to measure imitation fidelity"
    )
    reweight: bool = Field(
        True,
        description=(
            "discriminative: weight experts by agreement with the bank's consensus (robust to "
            "poor participants)"
        ),
    )
    distill: float = Field(
        1.0,
        ge=0,
        le=100,
        description=(
            "discriminative: weight of the consensus term in the second half of training (0: off)"
        ),
    )
    seed: int = Field(0, description="seed of every random draw in training")
    threads: int = Field(
        1, ge=1, le=256, description="torch threads (one per process is fastest on small machines)"
    )

    def resolved_epochs(self, family: str, n_inputs: int = 0) -> int:
        if self.epochs is not None:
            return self.epochs
        if family == "generative":
            return 40
        batches = max(1, -(-n_inputs // self.batch_size))
        return max(30, -(-600 // batches))

    def resolved_augmentation(
        self, image_shape: ImageShape | None, n_features: int = 0
    ) -> Augmentation | FeatureAugmentation | None:
        """The augmentation to train with: image transforms for images, feature dropout and noise
        for tables of ``n_features`` (the other kind's settings are ignored); None when all are
        0."""
        if image_shape is None:
            return self.table_augmentation(n_features)
        side = min(image_dims(image_shape)[:2])
        shift = self.max_shift if self.max_shift is not None else max(1, round(side / 14))
        aug = Augmentation(
            shift,
            12.0 if self.max_rotation is None else self.max_rotation,
            0.1 if self.max_scale is None else self.max_scale,
        )
        return aug if aug.active else None

    def table_augmentation(self, n_features: int) -> FeatureAugmentation | None:
        """Feature dropout and noise for tabular inputs of ``n_features``; None when both are 0."""
        dropout = (
            (TABLE_DROPOUT if n_features >= TABLE_WIDE else 0.0)
            if self.feature_dropout is None
            else self.feature_dropout
        )
        aug = FeatureAugmentation(
            dropout, 0.0 if self.feature_noise is None else self.feature_noise
        )
        return aug if aug.active else None


class AdaptSettings(_Strict):
    prior_strength: float = Field(
        1.0,
        gt=0,
        le=1e6,  # the prior's precision reaches strength x 1e12: float32 stays finite
        description="discriminative: how strongly the task's prototypes stay near the bank's",
    )
    recompose: Literal["gaussian", "mixture"] = Field(
        "mixture", description="generative: form of q*(w)"
    )
    form: Literal["conditional", "joint"] = Field(
        "joint", description="generative: prediction form"
    )
    n_z: int = Field(
        32, ge=1, le=4096, description="generative: importance samples of z per prediction"
    )


class FederationSettings(_Strict):
    """How the fusion server schedules rounds (``protofuse simulate`` and the deployed server).

    Training rounds follow the two phases of central training: consensus rounds, then one
    agreement round (each client scores its expert against the bank's consensus; the server sets
    trust), then weighted rounds with consensus distillation.
    """

    rounds: int = Field(
        40,
        ge=1,
        le=100_000,
        description=(
            "training rounds, split evenly between the two phases (plus one agreement round "
            "between them)"
        ),
    )
    local_epochs: int = Field(
        1,
        ge=1,
        le=1000,
        description=(
            "local passes over a client's queries per round (more drift apart: measured worse)"
        ),
    )
    aggregation: Literal["rowwise", "fedavg"] = Field(
        "rowwise",
        description=(
            "prototype rows averaged over the clients whose expert covers the label (rowwise) "
            "or over all clients (fedavg)"
        ),
    )
    batch_size: int | None = Field(
        None,
        ge=2,
        le=65_536,
        description=(
            "client batch size; default: whatever gives each client the optimizer steps "
            "central training would take on its queries (at most [training] batch_size)"
        ),
    )
    min_clients: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description=(
            "clients to wait for before the first round; default: every expert of the spec "
            "(simulation) or 2"
        ),
    )
    min_replies: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description=(
            "usable replies a later round needs to be merged (default: half of min_clients, "
            "rounded up); with fewer clients online for round_timeout, or fewer replies, the "
            "federation stops with a message and resumes when run again"
        ),
    )
    round_timeout: float = Field(
        3600.0,
        gt=0,
        le=7 * 24 * 3600.0,
        description="seconds to wait for a round's replies (at most a week)",
    )
    keep_checkpoints: int = Field(
        2,
        ge=1,
        le=100_000,
        description=(
            "checkpoints whose weights the store keeps (the history of every round is kept "
            "regardless)"
        ),
    )
    # -- what one client can do to a round (server/fusion/defences.py) ------------------------
    combine: Literal["mean", "median", "trimmed_mean", "krum"] = Field(
        "mean",
        description=(
            "how the clients' updates are combined (row-wise as [federation] aggregation says): "
            "the weighted mean (FedAvg), or the coordinate-wise median (FedMedian), trimmed "
            "mean (FedTrimmedAvg) or the mean of the updates Multi-Krum keeps (Krum), which "
            "resist a minority of hostile updates at some cost"
        ),
    )
    trim: float = Field(
        0.2, ge=0.0, lt=0.5, description="trimmed_mean: the fraction cut at each end"
    )
    assumed_hostile: int = Field(
        1,
        ge=0,
        le=10_000,
        description="krum: hostile clients assumed per round (f; the n - f closest are kept)",
    )
    clip_factor: float | None = Field(
        2.0,
        gt=0,
        le=1e6,
        description=(
            "each client's update is cut to at most this times the round's median update norm "
            "(none: no clipping)"
        ),
    )
    max_weight_ratio: float | None = Field(
        2.0,
        ge=1.0,
        le=1e6,
        description=(
            "no client weighs more than this times the median client's reported examples "
            "(none: no cap; counts are always capped by the queries a client declared)"
        ),
    )
    evidence: bool = Field(
        True,
        description=(
            "trust also from evidence: how well each client's updates point where the others' "
            "point (a client's own report of its agreement can then only lower its trust)"
        ),
    )
    peer_review: bool = Field(
        True,
        description=(
            "trust also from peer review: each client sends its expert's own view of its labels' "
            "prototype rows, and the clients sharing two or more of those labels score it on "
            "their own queries (the view travels without its owner's name; off under secure "
            "aggregation and DP, where no client's own update is seen)"
        ),
    )
    max_strikes: int = Field(
        3,
        ge=1,
        le=1_000_000,
        description=(
            "invalid replies (malformed, impersonating, non-finite) after which a client is "
            "expelled from the run; an expelled expert is not re-admitted, also after a resume"
        ),
    )
    max_labels_per_client: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="labels one client may bring; a node declaring more is refused",
    )
    max_vocabulary: int = Field(
        10_000,
        ge=1,
        le=100_000,
        description=(
            "labels in the whole federation (each is a prototype row sent to every client each "
            "round); a node that would grow it beyond is refused"
        ),
    )

    def client_batch_size(self, n_train: int, training: TrainingSettings) -> int:
        """Rounds x local epochs x batches per epoch = the steps central training takes on the same
        queries."""
        if self.batch_size is not None:
            return self.batch_size
        central_steps = training.resolved_epochs("discriminative", n_train) * -(
            -n_train // training.batch_size
        )
        epochs = self.rounds * self.local_epochs
        return int(min(training.batch_size, max(8, -(-n_train * epochs // central_steps))))


class PrivacySettings(_Strict):
    """Client-level differential privacy of what a federation releases (``[privacy]``).

    With ``mode = "dp"`` each round's update of the shared weights is DP-FedAvg's: every client's
    change clipped to the L2 norm ``clip``, the clipped changes summed (a prototype row over the
    clients whose labels cover it), Gaussian noise of standard deviation ``noise_multiplier *
    clip`` added to every sum, divided by public counts (the clients admitted; per row, those
    declaring its label). What each client reports about itself (agreement, fidelity, counts, its
    imitation head, its queries' value range) sets no weight and is left out of the bank. The
    accountant (``protofuse.privacy``) gives the run's epsilon for ``delta``. The server still
    sees each update: this protects against whoever receives the bank, not against the server
    (docs/threat-model.md).

    With ``mode = "secagg"`` each round's update goes through Flower's SecAgg+ (its workflow on
    the server, its client mod on each client): the server learns only the sum of the clients'
    changes (a prototype row's, over its coverers), never one client's. Every client then weighs
    the same and trust sets nothing: the defences that score each update cannot run."""

    mode: Literal["plain", "dp", "secagg"] = Field(
        "plain",
        description=(
            "plain: no noise; dp: client-level differential privacy; secagg: secure aggregation "
            "(Flower's SecAgg+), the server sees only sums of updates"
        ),
    )
    epsilon: float | None = Field(
        None,
        gt=0,
        le=1000,
        description=(
            "dp: the run's privacy budget; without noise_multiplier the noise is calibrated to "
            "spend it, with one a run that would spend more is refused"
        ),
    )
    delta: float = Field(1e-5, gt=0, lt=0.1, description="dp: the delta of (epsilon, delta)-DP")
    clip: float = Field(
        0.3,
        gt=0,
        le=1e6,
        description=(
            "dp: L2 bound on one client's change in one round (default: about the median "
            "change measured on MNIST-5k, development seed 0: 0.24-0.48 per round)"
        ),
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        le=1e4,
        description="dp: noise standard deviation over clip (default: calibrated to epsilon)",
    )

    secagg_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "secagg: share of a client's key holders needed to rebuild its mask (Flower's "
            "reconstruction_threshold): higher resists more colluding clients, lower more "
            "dropouts"
        ),
    )

    @model_validator(mode="after")
    def _dp_needs_a_budget_or_noise(self) -> PrivacySettings:
        if self.mode == "dp" and self.epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                "mode 'dp' needs epsilon (the run's budget; the noise is calibrated to it) or "
                "noise_multiplier"
            )
        return self


def format_errors(
    err: ValidationError,
    unknown: str = "unknown field; check its spelling against the documented fields",
) -> str:
    """pydantic's errors as '  field.path: message' lines, each path written as in the file read
    (a spec's TOML, a bank's meta.json); ``unknown`` replaces pydantic's text for an extra field."""
    lines = []
    for e in err.errors():
        loc = (
            "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
            or "(top level)"
        )
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = unknown
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
