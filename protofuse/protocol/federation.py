"""The wire format: plain frozen dataclasses and their protobuf codecs.

This is the only module (with its companion ``protofuse.protocol.service``) that touches the
generated classes in protofuse/v1 (schemas in protos/protofuse/v1/). The rest of protofuse works
with the dataclasses below, so a schema change stays contained here. The whole federation speaks
these messages: a node describes itself (``NodeDescription``), the server plans each round
(``RoundPlan``), a client reports its expert (``ExpertDistribution``, ``ImitatorStats``), the server
publishes its bank (``BankManifest``, whose experts are ``protofuse.records.ExpertRecord``).

Every decoder validates every field and raises WireError naming the field by its wire path
(``MessageName.field.path``) and saying how to fix it. Every encoder runs the same checks first,
so nothing a decoder would refuse is ever sent. The checks live in one place (the ``_check_*``
functions, which work on dataclasses); decoding first converts the protobuf into a dataclass,
refusing only what cannot be converted (a missing sub-message, a covariance of the wrong length),
and then runs them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from protofuse.records import NOT_MEASURED, ExpertRecord, Fidelity
from protofuse.v1 import bank_pb2, federation_pb2

if TYPE_CHECKING:  # imported where used: the settings import torch, the codecs need not
    from protofuse.settings import FederationSettings, TrainingSettings

# Readers refuse any other version: bump it when a field changes meaning (protos/README.md).
# Still 1 after NodeDescription and RoundPlan joined: they are new messages (an older build never
# decodes them; it is refused by the absence of their bytes, see protofuse_server.fusion.membership
# and client_sdk.clientapp.app), and the meaning of every existing field is unchanged, so the
# distributions already kept in a server's store and published manifests stay readable.
FORMAT_VERSION = 1

MAX_PSEUDONYM_LENGTH = 128
# exp(20) ~ 5e8: beyond that a temperature flattens or sharpens the head into a constant, which
# only a broken or hostile client sends.
MAX_ABS_LOG_TEMPERATURE = 20.0
# Bounds of what enters a federation (NodeDescription, RoundPlan). Every label costs a prototype
# row on every client; ImageNet-21k has about 21,000 classes, so 100,000 labels is past any
# classification vocabulary and only a bug or a hostile node sends more.
MAX_LABELS = 100_000
MAX_LABEL_LENGTH = 256  # a class name, not a document
# 2**24 features: a flattened 2048 x 2048 RGB image has 12.6M; the adaptation service refuses
# wider support rows with the same constant.
MAX_X_DIM = 1 << 24
# A client loads its queries whole (and asks its expert about each once): a billion rows is far
# past what one node holds; beyond that the count is a bug, and it weighs the node's updates.
MAX_QUERIES = 1_000_000_000
MAX_PHASE_ROUNDS = 100_000  # FederationSettings.rounds' own upper bound

# Where the messages travel in Flower's records (both sides read these names from here): the
# server's query record ASK_RECORD holds {"what": DESCRIBE, FORMAT_VERSION_KEY: FORMAT_VERSION}; the
# node replies with the record DESCRIBE holding {NODE_DESCRIPTION_KEY: encoded NodeDescription};
# each train message's "config" record holds {ROUND_PLAN_KEY: encoded RoundPlan}.
ASK_RECORD = "ask"
DESCRIBE = "describe"
FORMAT_VERSION_KEY = "format-version"
NODE_DESCRIPTION_KEY = "node-description"
ROUND_PLAN_KEY = "round-plan"

# The kinds of round, in schedule order; protos' Phase enum, PHASE_<NAME>.
PHASES = ("consensus", "agreement", "weighted")
_PHASE_CODES = {name: federation_pb2.Phase.Value(f"PHASE_{name.upper()}") for name in PHASES}

_PSEUDONYM = re.compile(r"[A-Za-z0-9_.\-]+")
# The form of a family's name (protofuse.families registers them); the registry, not the codec,
# says which names exist.
_FAMILY_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_UINT64_MAX = 2**64 - 1
# Covariances computed in floating point (A @ A.T, averages) can be asymmetric in the last bits;
# anything beyond this, relative to the matrix's largest entry, is a real asymmetry.
_SYMMETRY_RTOL = 1e-9


class WireError(ValueError):
    """A message that may not be sent or accepted; the text names the field and the fix."""


# ---------------------------------------------------------------------------------------------
# Dataclasses
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscriminativeHead:
    """An expert's imitation head over discriminative prototypes."""

    log_temperature: float
    label_bias: tuple[float, ...]  # one per label, in the expert's label order

    def __post_init__(self) -> None:
        _freeze_sequence(self, "label_bias")


@dataclass(frozen=True, eq=False)
class Gaussian:
    """A Gaussian over the generative prototypes' latent w; arrays are read-only float64 copies."""

    mean: np.ndarray  # (w,)
    cov: np.ndarray  # (w, w)

    def __post_init__(self) -> None:
        # Copies, made read-only, so the frozen dataclass really cannot change under its owner.
        for name in ("mean", "cov"):
            array = np.array(getattr(self, name), dtype=np.float64)
            array.flags.writeable = False
            object.__setattr__(self, name, array)

    # Arrays make the generated __eq__ ambiguous ("truth value of an array"); compare by value.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Gaussian):
            return NotImplemented
        return _same_array(self.mean, other.mean) and _same_array(self.cov, other.cov)

    __hash__ = None  # type: ignore[assignment]  # equal by value but holds arrays: unhashable


@dataclass(frozen=True)
class GenerativeMoments:
    """An expert's distribution over w in the generative family, before and after fitting."""

    prior: Gaussian
    posterior: Gaussian


@dataclass(frozen=True)
class ExpertDistribution:
    """The prototype-distribution message a client sends each round for its expert."""

    pseudonym: str
    label_names: tuple[str, ...]  # the expert's labels in its output-column order
    round: int
    head: DiscriminativeHead | GenerativeMoments

    def __post_init__(self) -> None:
        _freeze_sequence(self, "label_names")


@dataclass(frozen=True)
class ImitatorStats:
    """A client's report on its local imitation work for one expert in one round."""

    pseudonym: str
    round: int
    n_examples: int  # examples trained on this round
    n_queries: int  # black-box queries made to the expert, cumulative
    fidelity: Fidelity
    consensus_agreement: float | None = None  # None: not measured
    loss: float | None = None  # None: no local training this round


@dataclass(frozen=True)
class BankManifest:
    """One version of the shared bank: its labels, its weights file and its experts.

    Each expert is the one record type of protofuse (``ExpertRecord``); the manifest carries its
    name, labels, trust (``weight``), fidelity, consensus, counts and last round, not its
    distribution (``ExpertRecord.distribution`` is left empty when decoding)."""

    version: str
    round: int
    vocabulary: tuple[str, ...]  # global, append-only
    weights_digest: str  # sha256 of the weights file, lowercase hex
    family: str  # a name protofuse.families registers ("discriminative", "generative")
    experts: tuple[ExpertRecord, ...]

    def __post_init__(self) -> None:
        _freeze_sequence(self, "vocabulary")
        _freeze_sequence(self, "experts")


@dataclass(frozen=True)
class NodeDescription:
    """A node's description of its expert, sent once before it is admitted to the federation."""

    pseudonym: str
    label_names: tuple[str, ...]  # the expert's labels in its output-column order
    x_dim: int  # width of one input row
    n_queries: int  # query inputs the client holds
    x_range: tuple[float, float]  # (min, max) over every feature of the queries

    def __post_init__(self) -> None:
        _freeze_sequence(self, "label_names")
        _freeze_sequence(self, "x_range")


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of every client in one round."""

    round: int  # 1-based, over the whole run
    phase: str  # one of PHASES
    phase_round: int  # 0-based index of this round within its phase
    phase_rounds: int  # rounds in the phase
    vocabulary: tuple[str, ...]  # global, append-only
    model: dict[
        str, Any
    ]  # the family's network config (JSON object) without n_labels and n_experts
    training: TrainingSettings
    federation: FederationSettings

    def __post_init__(self) -> None:
        _freeze_sequence(self, "vocabulary")


def _freeze_sequence(obj: object, name: str) -> None:
    """Store a list given for a tuple field as a tuple, so equality and hashing behave."""
    value = getattr(obj, name)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, tuple)):
        object.__setattr__(obj, name, tuple(value))
    elif isinstance(value, np.ndarray):
        object.__setattr__(obj, name, tuple(value.tolist()))


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


# ---------------------------------------------------------------------------------------------
# Public codecs
# ---------------------------------------------------------------------------------------------


def encode_distribution(d: ExpertDistribution) -> bytes:
    """Validate and serialise a prototype-distribution message."""
    _expect_type(d, ExpertDistribution, "ExpertDistribution")
    _check_distribution(d, w_dim=None)
    msg = federation_pb2.ExpertDistribution(
        format_version=FORMAT_VERSION,
        pseudonym=d.pseudonym,
        label_names=d.label_names,
        round=int(d.round),
    )
    if isinstance(d.head, DiscriminativeHead):
        msg.discriminative.log_temperature = float(d.head.log_temperature)
        msg.discriminative.label_bias.extend(float(b) for b in d.head.label_bias)
    else:
        _gaussian_to_proto(d.head.prior, msg.generative.prior)
        _gaussian_to_proto(d.head.posterior, msg.generative.posterior)
    return _serialize(msg)


def decode_distribution(data: bytes, *, w_dim: int | None = None) -> ExpertDistribution:
    """Parse and validate a prototype-distribution message.

    w_dim: the bank's prototype dimension; when given, generative moments must be over exactly
    that many dimensions (it does not apply to the discriminative family).
    """
    if w_dim is not None and (
        isinstance(w_dim, bool) or not isinstance(w_dim, Integral) or w_dim < 1
    ):
        raise ValueError(f"w_dim must be a positive integer or None, got {w_dim!r}")
    msg = _parse(federation_pb2.ExpertDistribution, data, "ExpertDistribution")
    d = ExpertDistribution(
        pseudonym=msg.pseudonym,
        label_names=tuple(msg.label_names),
        round=msg.round,
        head=_head_from_proto(msg),
    )
    _check_distribution(d, w_dim=w_dim)
    return d


def encode_stats(s: ImitatorStats) -> bytes:
    """Validate and serialise an imitator's statistics."""
    _expect_type(s, ImitatorStats, "ImitatorStats")
    _check_stats(s)
    msg = federation_pb2.ImitatorStats(
        format_version=FORMAT_VERSION,
        pseudonym=s.pseudonym,
        round=int(s.round),
        n_examples=int(s.n_examples),
        n_queries=int(s.n_queries),
    )
    _fidelity_to_proto(s.fidelity, msg.fidelity)
    if s.consensus_agreement is not None:
        msg.consensus_agreement = float(s.consensus_agreement)
    if s.loss is not None:
        msg.loss = float(s.loss)
    return _serialize(msg)


def decode_stats(data: bytes) -> ImitatorStats:
    """Parse and validate an imitator's statistics."""
    msg = _parse(federation_pb2.ImitatorStats, data, "ImitatorStats")
    s = ImitatorStats(
        pseudonym=msg.pseudonym,
        round=msg.round,
        n_examples=msg.n_examples,
        n_queries=msg.n_queries,
        fidelity=_fidelity_from_proto(msg, "ImitatorStats.fidelity"),
        consensus_agreement=msg.consensus_agreement
        if msg.HasField("consensus_agreement")
        else None,
        loss=msg.loss if msg.HasField("loss") else None,
    )
    _check_stats(s)
    return s


def encode_manifest(m: BankManifest) -> bytes:
    """Validate and serialise a bank manifest."""
    _expect_type(m, BankManifest, "BankManifest")
    _check_manifest(m)
    msg = bank_pb2.BankManifest(
        format_version=FORMAT_VERSION,
        version=m.version,
        round=int(m.round),
        vocabulary=m.vocabulary,
        weights_digest=m.weights_digest,
        family=m.family,
    )
    for e in m.experts:
        _manifest_expert_to_proto(e, msg.experts.add())
    return _serialize(msg)


def decode_manifest(data: bytes, *, families: Collection[str] | None = None) -> BankManifest:
    """Parse and validate a bank manifest.

    families: the family names the reader knows (``protofuse.families.FAMILIES``); when given, a
    manifest of another family is refused naming ``BankManifest.family``. Without it only the
    name's form is checked: the registry, not the codec, says which families exist."""
    msg = _parse(bank_pb2.BankManifest, data, "BankManifest")
    m = BankManifest(
        version=msg.version,
        round=msg.round,
        vocabulary=tuple(msg.vocabulary),
        weights_digest=msg.weights_digest,
        family=msg.family,
        experts=tuple(
            _manifest_expert_from_proto(e, f"BankManifest.experts[{i}]")
            for i, e in enumerate(msg.experts)
        ),
    )
    _check_manifest(m)
    if families is not None and m.family not in families:
        raise WireError(
            f"BankManifest.family: {m.family!r} is not a family this reader knows "
            f"({', '.join(sorted(families))}); read the bank with the protofuse that wrote it"
        )
    return m


def encode_node_description(d: NodeDescription) -> bytes:
    """Validate and serialise a node's description of its expert."""
    _expect_type(d, NodeDescription, "NodeDescription")
    _check_node_description(d)
    msg = federation_pb2.NodeDescription(
        format_version=FORMAT_VERSION,
        pseudonym=d.pseudonym,
        label_names=d.label_names,
        x_dim=int(d.x_dim),
        n_queries=int(d.n_queries),
    )
    msg.x_range.lo, msg.x_range.hi = (float(v) for v in d.x_range)
    return _serialize(msg)


def decode_node_description(data: bytes) -> NodeDescription:
    """Parse and validate a node's description (the server reads it; the sender is a client)."""
    msg = _parse(federation_pb2.NodeDescription, data, "NodeDescription", sender="client")
    if not msg.HasField("x_range"):
        raise WireError(
            "NodeDescription.x_range: missing; send the queries' overall [min, max] "
            "(protofuse.input_checks.input_range)"
        )
    d = NodeDescription(
        pseudonym=msg.pseudonym,
        label_names=tuple(msg.label_names),
        x_dim=msg.x_dim,
        n_queries=msg.n_queries,
        x_range=(msg.x_range.lo, msg.x_range.hi),
    )
    _check_node_description(d)
    return d


def encode_round_plan(p: RoundPlan) -> bytes:
    """Validate and serialise the server's plan of one round."""
    _expect_type(p, RoundPlan, "RoundPlan")
    _check_round_plan(p)
    msg = federation_pb2.RoundPlan(
        format_version=FORMAT_VERSION,
        round=int(p.round),
        phase=_PHASE_CODES[p.phase],
        phase_round=int(p.phase_round),
        phase_rounds=int(p.phase_rounds),
        vocabulary=p.vocabulary,
        # sort_keys: the same plan always gives the same bytes
        model_json=json.dumps(p.model, sort_keys=True, allow_nan=False),
        training_json=p.training.model_dump_json(),
        federation_json=p.federation.model_dump_json(),
    )
    return _serialize(msg)


def decode_round_plan(data: bytes) -> RoundPlan:
    """Parse and validate a round plan (a client reads it; the sender is the server). The settings
    are validated as a spec's tables are, so the client trains on nothing the server could not."""
    msg = _parse(federation_pb2.RoundPlan, data, "RoundPlan", sender="server")
    phases = {code: name for name, code in _PHASE_CODES.items()}
    if msg.phase not in phases:
        shown = (
            federation_pb2.Phase.Name(msg.phase)
            if msg.phase in federation_pb2.Phase.values()
            else msg.phase
        )
        raise WireError(
            f"RoundPlan.phase: {shown} is not a kind of round; send one of "
            f"{', '.join(f'PHASE_{p.upper()}' for p in PHASES)}"
        )
    p = RoundPlan(
        round=msg.round,
        phase=phases[msg.phase],
        phase_round=msg.phase_round,
        phase_rounds=msg.phase_rounds,
        vocabulary=tuple(msg.vocabulary),
        model=_json_object(msg.model_json, "RoundPlan.model_json"),
        training=_settings_from_json(
            "TrainingSettings", msg.training_json, "RoundPlan.training_json"
        ),
        federation=_settings_from_json(
            "FederationSettings", msg.federation_json, "RoundPlan.federation_json"
        ),
    )
    _check_round_plan(p)
    return p


# ---------------------------------------------------------------------------------------------
# Protobuf <-> dataclass conversion (only structure here; values are checked by _check_*)
# ---------------------------------------------------------------------------------------------

_M = TypeVar("_M", bound=Message)


def _parse(cls: type[_M], data: bytes, name: str, sender: str | None = None) -> _M:
    """Parse bytes as message cls, turning protobuf's errors into a WireError; check the version.

    sender: who sends this message ("client", "server") when only one side does, so that a
    version skew is reported as the two sides' formats."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: expected bytes to decode, got {type(data).__name__}")
    msg = cls()
    try:
        msg.ParseFromString(bytes(data))
    except (DecodeError, ValueError, UnicodeDecodeError) as exc:
        raise WireError(
            f"{name}: the bytes do not parse as a protofuse.v1.{name} message ({exc}); send the "
            "output of the matching encode function"
        ) from None
    _check_format_version(msg.format_version, f"{name}.format_version", sender)
    return msg


def _check_format_version(version: int, path: str, sender: str | None = None) -> None:
    if version == 0:
        raise WireError(
            f"{path}: missing (0); set it to {FORMAT_VERSION}, the format this build reads"
        )
    if version != FORMAT_VERSION and sender is not None:
        reader = "server" if sender == "client" else "client"
        raise WireError(
            f"{path}: the {sender} speaks federation format {version}, this {reader} format "
            f"{FORMAT_VERSION}; run matching protofuse versions on both sides"
        )
    if version != FORMAT_VERSION:
        raise WireError(
            f"{path}: format {version} is not supported; this build reads format {FORMAT_VERSION}, "
            "so sender and receiver must run matching protofuse versions"
        )


def _serialize(msg: Message) -> bytes:
    # deterministic=True: the same dataclass always gives the same bytes (digests, caching, tests).
    return msg.SerializeToString(deterministic=True)


def _head_from_proto(
    msg: federation_pb2.ExpertDistribution,
) -> DiscriminativeHead | GenerativeMoments:
    which = msg.WhichOneof("family")
    if which == "discriminative":
        head = msg.discriminative
        return DiscriminativeHead(
            log_temperature=head.log_temperature, label_bias=tuple(head.label_bias)
        )
    if which == "generative":
        moments = msg.generative
        return GenerativeMoments(
            prior=_gaussian_from_proto(moments, "prior", "ExpertDistribution.generative.prior"),
            posterior=_gaussian_from_proto(
                moments, "posterior", "ExpertDistribution.generative.posterior"
            ),
        )
    raise WireError(
        "ExpertDistribution.family: neither discriminative nor generative is set; set exactly one, "
        "matching the bank's family"
    )


def _gaussian_from_proto(parent: Message, field: str, path: str) -> Gaussian:
    if not parent.HasField(field):
        raise WireError(f"{path}: missing; send both prior and posterior moments")
    g = getattr(parent, field)
    mean = np.array(g.mean, dtype=np.float64)
    w = mean.size
    if len(g.covariance) != w * w:
        raise WireError(
            f"{path}.covariance: {len(g.covariance)} values for a {w}-dimensional mean; send w*w = "
            f"{w * w} values, row-major"
        )
    return Gaussian(mean=mean, cov=np.array(g.covariance, dtype=np.float64).reshape(w, w))


def _gaussian_to_proto(g: Gaussian, out: federation_pb2.Gaussian) -> None:
    out.mean.extend(g.mean.tolist())
    out.covariance.extend(g.cov.reshape(-1).tolist())  # row-major, as the schema says


def _fidelity_from_proto(parent: Message, path: str) -> Fidelity:
    if not parent.HasField("fidelity"):
        raise WireError(
            f"{path}: missing; measure the imitator on held-out queries and send the result"
        )
    f = parent.fidelity
    return Fidelity(agreement=f.agreement, kl=f.kl, n=f.n)


def _fidelity_to_proto(f: Fidelity, out: federation_pb2.Fidelity) -> None:
    out.agreement = float(f.agreement)
    out.kl = float(f.kl)
    out.n = int(f.n)


def _manifest_expert_from_proto(e: bank_pb2.ManifestExpert, path: str) -> ExpertRecord:
    """A ManifestExpert message as the one expert record (its distribution does not travel here)."""
    return ExpertRecord(
        name=e.pseudonym,
        labels=tuple(e.label_names),
        fidelity=_fidelity_from_proto(e, f"{path}.fidelity"),
        n_queries=e.n_queries,
        consensus=e.consensus_agreement
        if e.HasField("consensus_agreement")
        else NOT_MEASURED,  # absent: not measured (NaN)
        weight=e.trust,
        n_examples=e.n_examples,
        last_round=e.last_round,
    )


def _manifest_expert_to_proto(e: ExpertRecord, out: bank_pb2.ManifestExpert) -> None:
    out.pseudonym = e.name
    out.label_names.extend(e.labels)
    out.trust = float(e.weight)
    _fidelity_to_proto(e.fidelity, out.fidelity)
    if e.consensus_measured:
        out.consensus_agreement = float(e.consensus)
    out.n_examples = int(e.n_examples)
    out.n_queries = int(e.n_queries)
    out.last_round = int(e.last_round)


# ---------------------------------------------------------------------------------------------
# Validation of dataclasses: shared by encoders and decoders
# ---------------------------------------------------------------------------------------------


def _check_distribution(d: ExpertDistribution, *, w_dim: int | None) -> None:
    name = "ExpertDistribution"
    _check_pseudonym(d.pseudonym, f"{name}.pseudonym")
    _check_labels(d.label_names, f"{name}.label_names", what="the expert's labels")
    _check_uint(d.round, f"{name}.round")
    if isinstance(d.head, DiscriminativeHead):
        _check_discriminative(d.head, len(d.label_names), f"{name}.discriminative")
    elif isinstance(d.head, GenerativeMoments):
        _check_generative(d.head, w_dim, f"{name}.generative")
    else:
        raise WireError(
            f"{name}.family: expected a DiscriminativeHead or GenerativeMoments, got "
            f"{type(d.head).__name__}; set exactly one family"
        )


def _check_discriminative(head: DiscriminativeHead, n_labels: int, path: str) -> None:
    t = _check_finite(head.log_temperature, f"{path}.log_temperature")
    if abs(t) > MAX_ABS_LOG_TEMPERATURE:
        raise WireError(
            f"{path}.log_temperature: {t!r} is outside [-{MAX_ABS_LOG_TEMPERATURE:g}, "
            f"{MAX_ABS_LOG_TEMPERATURE:g}]; clamp the temperature or refit the head"
        )
    biases = _check_tuple(head.label_bias, f"{path}.label_bias")
    if len(biases) != n_labels:
        raise WireError(
            f"{path}.label_bias: {len(biases)} values for {n_labels} labels; send one bias per "
            "label"
        )
    for i, b in enumerate(biases):
        _check_finite(b, f"{path}.label_bias[{i}]")


def _check_generative(moments: GenerativeMoments, w_dim: int | None, path: str) -> None:
    for field in ("prior", "posterior"):
        g = getattr(moments, field)
        if not isinstance(g, Gaussian):
            raise WireError(
                f"{path}.{field}: expected a Gaussian, got {type(g).__name__}; send both prior and "
                "posterior moments"
            )
    w = _check_gaussian(moments.prior, w_dim, f"{path}.prior")
    # The posterior must live in the prior's space, whether or not the caller knows w_dim.
    _check_gaussian(moments.posterior, w, f"{path}.posterior")


def _check_gaussian(g: Gaussian, w_dim: int | None, path: str) -> int:
    """Check one Gaussian's shapes and values; return its dimension."""
    if g.mean.ndim != 1 or g.mean.size == 0:
        raise WireError(f"{path}.mean: shape {g.mean.shape}; send a non-empty vector of w values")
    w = g.mean.size
    if w_dim is not None and w != w_dim:
        raise WireError(
            f"{path}.mean: {w} values but the prototypes' w has {w_dim} dimensions; send moments "
            "over the bank's w"
        )
    if g.cov.shape != (w, w):
        raise WireError(
            f"{path}.covariance: shape {g.cov.shape} for a {w}-dimensional mean; send a {w} x {w} "
            f"matrix (w*w = {w * w} values, row-major)"
        )
    _check_all_finite(g.mean, f"{path}.mean")
    _check_all_finite(g.cov, f"{path}.covariance")
    scale = max(1.0, float(np.max(np.abs(g.cov))))
    asymmetry = float(np.max(np.abs(g.cov - g.cov.T)))
    if asymmetry > _SYMMETRY_RTOL * scale:
        raise WireError(
            f"{path}.covariance: not symmetric (largest |C - C^T| = {asymmetry:.3g}); send (C + "
            "C^T) / 2"
        )
    diagonal = np.diag(g.cov)
    if np.any(diagonal < 0):
        i = int(np.argmin(diagonal))
        raise WireError(
            f"{path}.covariance: negative variance {float(diagonal[i])!r} on the diagonal at [{i}, "
            f"{i}]; a covariance's diagonal must be >= 0"
        )
    return w


def _check_stats(s: ImitatorStats) -> None:
    name = "ImitatorStats"
    _check_pseudonym(s.pseudonym, f"{name}.pseudonym")
    _check_uint(s.round, f"{name}.round")
    _check_uint(s.n_examples, f"{name}.n_examples")
    _check_uint(s.n_queries, f"{name}.n_queries")
    _check_fidelity(s.fidelity, f"{name}.fidelity")
    if s.consensus_agreement is not None:
        _check_unit_interval(s.consensus_agreement, f"{name}.consensus_agreement")
    if s.loss is not None:
        # Finite only: a generative family's loss is a negative log-density and may be negative.
        _check_finite(s.loss, f"{name}.loss")


def _check_manifest(m: BankManifest) -> None:
    name = "BankManifest"
    _check_text(m.version, f"{name}.version")
    if not m.version:
        raise WireError(f"{name}.version: empty; set the bank's content version")
    _check_uint(m.round, f"{name}.round")
    _check_labels(m.vocabulary, f"{name}.vocabulary", what="the global label vocabulary")
    _check_text(m.weights_digest, f"{name}.weights_digest")
    if not _SHA256_HEX.fullmatch(m.weights_digest):
        raise WireError(
            f"{name}.weights_digest: {m.weights_digest!r} is not a sha256 digest; send "
            "hashlib.sha256(weights).hexdigest() (64 lowercase hex characters)"
        )
    _check_family_name(m.family, f"{name}.family")
    experts = _check_tuple(m.experts, f"{name}.experts")
    vocabulary = set(m.vocabulary)
    seen: set[str] = set()
    for i, e in enumerate(experts):
        path = f"{name}.experts[{i}]"
        _check_manifest_expert(e, vocabulary, path)
        if e.pseudonym in seen:
            raise WireError(
                f"{path}.pseudonym: {e.pseudonym!r} appears twice; list each expert once"
            )
        seen.add(e.pseudonym)


def _check_manifest_expert(e: Any, vocabulary: set[str], path: str) -> None:
    """An expert record as the manifest carries it; paths are the wire's (ManifestExpert) names."""
    if not isinstance(e, ExpertRecord):
        raise WireError(
            f"{path}: expected a protofuse.records.ExpertRecord, got {type(e).__name__}"
        )
    _check_pseudonym(e.name, f"{path}.pseudonym")
    _check_labels(e.labels, f"{path}.label_names", what="the expert's labels")
    unknown = [label for label in e.labels if label not in vocabulary]
    if unknown:
        raise WireError(
            f"{path}.label_names: {unknown!r} not in BankManifest.vocabulary; add them to the "
            "vocabulary (it is append-only)"
        )
    _check_unit_interval(e.weight, f"{path}.trust")
    _check_fidelity(e.fidelity, f"{path}.fidelity")
    if e.consensus_measured:
        _check_unit_interval(e.consensus, f"{path}.consensus_agreement")
    _check_uint(e.n_examples, f"{path}.n_examples")
    _check_uint(e.n_queries, f"{path}.n_queries")
    _check_uint(e.last_round, f"{path}.last_round")


def _check_node_description(d: NodeDescription) -> None:
    name = "NodeDescription"
    _check_pseudonym(d.pseudonym, f"{name}.pseudonym")
    _check_labels(d.label_names, f"{name}.label_names", what="the expert's labels", bounded=True)
    _check_count(d.x_dim, f"{name}.x_dim", MAX_X_DIM, what="features per input row")
    _check_count(d.n_queries, f"{name}.n_queries", MAX_QUERIES, what="query inputs")
    x_range = _check_tuple(d.x_range, f"{name}.x_range")
    if len(x_range) != 2:
        raise WireError(f"{name}.x_range: {len(x_range)} values; send (min, max) of the queries")
    lo, hi = (
        _check_finite(x_range[0], f"{name}.x_range.lo"),
        _check_finite(x_range[1], f"{name}.x_range.hi"),
    )
    if lo > hi:
        raise WireError(
            f"{name}.x_range: lo {lo!r} > hi {hi!r}; send the queries' minimum first, then their "
            "maximum"
        )


def _check_round_plan(p: RoundPlan) -> None:
    from protofuse.settings import FederationSettings, TrainingSettings  # see TYPE_CHECKING above

    name = "RoundPlan"
    if _check_uint(p.round, f"{name}.round") < 1:
        raise WireError(f"{name}.round: 0; rounds count from 1")
    if p.phase not in PHASES:
        raise WireError(
            f"{name}.phase: {p.phase!r} is not a kind of round; send one of {', '.join(PHASES)}"
        )
    rounds = _check_count(
        p.phase_rounds, f"{name}.phase_rounds", MAX_PHASE_ROUNDS, what="rounds in a phase"
    )
    if _check_uint(p.phase_round, f"{name}.phase_round") >= rounds:
        raise WireError(
            f"{name}.phase_round: {p.phase_round} is outside 0..{rounds - 1}, the phase's {rounds} "
            "rounds; send the round's 0-based index within its phase"
        )
    _check_labels(
        p.vocabulary, f"{name}.vocabulary", what="the global label vocabulary", bounded=True
    )
    if not isinstance(p.model, dict) or not all(isinstance(k, str) for k in p.model):
        raise WireError(
            f"{name}.model_json: expected a JSON object (a dict with string keys), got "
            f"{type(p.model).__name__}; send the family's network config"
        )
    try:
        json.dumps(p.model, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise WireError(
            f"{name}.model_json: not JSON-able ({err}); keep plain numbers, strings, lists and "
            "dicts in it"
        ) from None
    if not isinstance(p.training, TrainingSettings):
        raise WireError(
            f"{name}.training_json: expected a protofuse.settings.TrainingSettings, got "
            f"{type(p.training).__name__}"
        )
    if not isinstance(p.federation, FederationSettings):
        raise WireError(
            f"{name}.federation_json: expected a protofuse.settings.FederationSettings, got "
            f"{type(p.federation).__name__}"
        )


def _json_object(text: str, path: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise WireError(f"{path}: not JSON ({err}); send a JSON object") from None
    if not isinstance(value, dict):
        raise WireError(f"{path}: a JSON {type(value).__name__}, not an object; send a JSON object")
    return value


def _settings_from_json(cls_name: str, text: str, path: str) -> Any:
    """The settings in a plan, validated by their pydantic model as a spec's table is."""
    from pydantic import ValidationError

    from protofuse import settings  # see TYPE_CHECKING above

    cls = getattr(settings, cls_name)
    try:
        return cls.model_validate_json(text)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(whole)'}: {e['msg']}"
            for e in err.errors()[:5]
        )
        raise WireError(
            f"{path}: not valid {cls_name} ({problems}); server and client must run matching "
            "protofuse versions"
        ) from None


def _check_family_name(value: object, path: str) -> None:
    text = _check_text(value, path)
    if not text:
        raise WireError(f"{path}: empty; set the prototype family's name (e.g. 'discriminative')")
    if not _FAMILY_NAME.fullmatch(text):
        raise WireError(
            f"{path}: {text!r} is not a family name; use lowercase letters, digits and '_', as "
            "protofuse.families names them"
        )


def _check_fidelity(f: Any, path: str) -> None:
    if not isinstance(f, Fidelity):
        raise WireError(
            f"{path}: expected a Fidelity, got {type(f).__name__}; measure the imitator on "
            "held-out queries and send the result"
        )
    _check_unit_interval(f.agreement, f"{path}.agreement")
    kl = _check_finite(f.kl, f"{path}.kl")
    if kl < 0:
        raise WireError(
            f"{path}.kl: {kl!r} is negative; a KL divergence is >= 0 (check the direction and the "
            "normalisation of both distributions)"
        )
    _check_uint(f.n, f"{path}.n")


# ---------------------------------------------------------------------------------------------
# Field-level checks
# ---------------------------------------------------------------------------------------------


def _expect_type(value: object, cls: type, name: str) -> None:
    if not isinstance(value, cls):
        raise WireError(
            f"{name}: expected a protofuse.protocol.federation.{cls.__name__}, got "
            f"{type(value).__name__}"
        )


def _check_text(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{path}: expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")  # protobuf strings must be valid UTF-8 (no lone surrogates)
    except UnicodeEncodeError:
        raise WireError(f"{path}: {value!r} is not valid UTF-8; send valid Unicode text") from None
    return value


def _check_pseudonym(value: object, path: str) -> None:
    text = _check_text(value, path)
    if not text:
        raise WireError(f"{path}: empty; set the expert's pseudonym")
    if len(text) > MAX_PSEUDONYM_LENGTH:
        raise WireError(f"{path}: {len(text)} characters; use at most {MAX_PSEUDONYM_LENGTH}")
    if not _PSEUDONYM.fullmatch(text):
        raise WireError(
            f"{path}: {text!r} has characters outside [A-Za-z0-9_.-]; use only letters, digits, "
            "'_', '.' and '-'"
        )


def _check_labels(names: object, path: str, *, what: str, bounded: bool = False) -> None:
    """Non-empty, unique, non-empty names. ``bounded``: also at most MAX_LABELS names of at most
    MAX_LABEL_LENGTH characters (the messages that bring labels into a federation; the older
    messages keep their format 1 rules)."""
    names = _check_tuple(names, path)
    if not names:
        raise WireError(f"{path}: empty; send {what} (at least one)")
    if bounded and len(names) > MAX_LABELS:
        raise WireError(f"{path}: {len(names)} labels; send at most {MAX_LABELS}")
    seen: set[str] = set()
    for i, label in enumerate(names):
        _check_text(label, f"{path}[{i}]")
        if not label:
            raise WireError(f"{path}[{i}]: empty label name; every label needs a non-empty name")
        if bounded and len(label) > MAX_LABEL_LENGTH:
            raise WireError(
                f"{path}[{i}]: {len(label)} characters; use label names of at most "
                f"{MAX_LABEL_LENGTH}"
            )
        if label in seen:
            raise WireError(f"{path}[{i}]: {label!r} appears twice; label names must be unique")
        seen.add(label)


def _check_tuple(value: object, path: str) -> tuple:
    if not isinstance(value, tuple):
        raise WireError(f"{path}: expected a tuple, got {type(value).__name__}")
    return value


def _check_uint(value: object, path: str) -> int:
    # bool is an int subclass; a True here is always a bug in the caller.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise WireError(f"{path}: expected an integer, got {type(value).__name__}")
    if not 0 <= int(value) <= _UINT64_MAX:
        raise WireError(
            f"{path}: {int(value)} is outside [0, 2**64 - 1]; counts and rounds are unsigned 64-bit"
        )
    return int(value)


def _check_count(value: object, path: str, maximum: int, *, what: str) -> int:
    """A positive count of at most ``maximum``."""
    number = _check_uint(value, path)
    if not 1 <= number <= maximum:
        raise WireError(
            f"{path}: {number} is outside [1, {maximum}]; send the number of {what} (at least one)"
        )
    return number


def _check_finite(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise WireError(f"{path}: expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise WireError(
            f"{path}: {number!r} is not finite; send a finite number (check for a diverged fit)"
        )
    return number


def _check_unit_interval(value: object, path: str) -> float:
    number = _check_finite(value, path)
    if not 0.0 <= number <= 1.0:
        raise WireError(f"{path}: {number!r} is outside [0, 1]; send a fraction")
    return number


def _check_all_finite(array: np.ndarray, path: str) -> None:
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        index = np.unravel_index(int(bad[0]), array.shape)
        where = ", ".join(str(int(i)) for i in index)
        raise WireError(
            f"{path}: {float(array[index])!r} at [{where}] is not finite; send finite moments "
            "(check for a diverged fit)"
        )
