"""Adapted models: a new task's distribution over the bank's prototypes, runnable locally.

An adapted model is self-contained (the bank's weights it needs, the task's ``q*``, the label
map and the bank version it came from) and predicts with no server round-trip.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from . import artifacts, signing
from .families import DiscriminativeTask, Family, GenerativeTask, Task, family
from .input_checks import warn_if_out_of_range
from .protocol.federation import MAX_LABEL_LENGTH
from .protocol.service import MAX_CLASSES as MAX_SERVICE_CLASSES
from .settings import format_errors

KIND = "protofuse-adapted-model"
BANK_PREFIX = "bank."
PublicKeyLike = str | os.PathLike | bytes | Ed25519PublicKey
# Classes of one adapted model and the length of a class name: the service's wire bounds, so that
# every model the service can build also loads.
MAX_CLASSES = MAX_SERVICE_CLASSES
MAX_CLASS_NAME_LENGTH = MAX_LABEL_LENGTH
FIX = "re-create it with `protofuse adapt`"

__all__ = [
    "KIND",
    "AdaptedModel",
    "DiscriminativeTask",
    "GenerativeTask",
    "Task",
    "build_model",
    "from_files",
    "load_adapted",
]


def build_model(
    family_name: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor] | None = None,
    source: Any = "bank",
) -> torch.nn.Module:
    """Rebuild a bank's networks from its family's name and JSON config, loading ``state`` if
    given. With ``state`` the config is first built on torch's meta device (no memory) and its
    tensors' names and shapes compared with the state's: a config that does not describe the
    weights (say an ``x_dim`` of 10**9 in a forged meta.json) is refused before anything is
    allocated, so the networks never take more memory than the weights already loaded."""
    try:
        impl = family(family_name)
        if state is None:
            model = impl.build(config)
        else:
            model = _check_state_shapes(impl, config, state)
            # The skeleton takes the weights as they are (copies: the caller's arrays stay its
            # own): no random initialisation to overwrite, about half the time of a load.
            model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    except (
        TypeError,
        RuntimeError,
        KeyError,
        ValueError,
        OverflowError,
        NotImplementedError,
    ) as err:
        raise artifacts.ArtifactError(
            f"{source}: weights do not match the recorded {family_name} configuration "
            f"({(str(err).splitlines() or [type(err).__name__])[0]})"
        ) from None
    return model.eval()


def _check_state_shapes(
    impl: Family[Any], config: dict[str, Any], state: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """The config's networks on torch's meta device (no memory), after a ValueError naming the
    first tensor the config and the weights disagree on."""
    with torch.device("meta"):
        skeleton = impl.build(config)
    expected = skeleton.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"{name} has shape {list(got.shape)}, the configuration {list(want.shape)}"
            )
        if got.dtype != want.dtype:  # a float64 1e300 would load as float32 infinity
            raise ValueError(f"{name} has dtype {got.dtype}, the configuration {want.dtype}")
    if any(t.is_meta for t in skeleton.buffers()) and any(
        name not in expected for name, _ in skeleton.named_buffers()
    ):  # a buffer the weights do not hold would stay on the meta device
        raise ValueError("the networks hold buffers their weights do not carry")
    return skeleton


def bank_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The bank networks' weights as an adapted model stores them: read-only views (they share
    the networks' memory, which nothing should change behind torch's back)."""
    arrays = {f"{BANK_PREFIX}{k}": v.numpy() for k, v in model.state_dict().items()}
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


ClassName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CLASS_NAME_LENGTH)]


class BankIdentity(BaseModel):
    """What an adapted model records of its bank (``meta.json``'s ``bank``): the fields it uses
    are typed; the others (``version``, ``label_names`` ...) are kept as written."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    family: str = Field(min_length=1, max_length=64)
    config: dict[str, Any]  # the family checks it when it rebuilds the networks
    x_dim: int = Field(ge=1)
    input_range: list[float] | None = Field(None, min_length=2, max_length=2)


class AdaptedMeta(BaseModel):
    """The fields of an adapted model's ``meta.json`` besides the artifact's envelope."""

    model_config = ConfigDict(extra="allow", strict=True)

    classes: list[ClassName] = Field(min_length=1, max_length=MAX_CLASSES)
    bank: BankIdentity
    task: dict[str, Any]  # the family's own settings (Task.meta)
    info: dict[str, Any] | None = None  # how it was fitted: kept, never interpreted

    @field_validator("classes")
    @classmethod
    def _once_each(cls, classes: list[str]) -> list[str]:
        twice = sorted(c for c, n in Counter(classes).items() if n > 1)
        if twice:
            raise ValueError(f"lists {twice[:3]} more than once; each class appears once")
        return classes


def check_meta(meta: dict[str, Any], source: Any) -> None:
    """ArtifactError naming every missing or malformed field of an adapted model's meta.json."""
    try:
        AdaptedMeta.model_validate(meta)
    except ValidationError as err:
        fields = ", ".join(dict.fromkeys(repr(str(e["loc"][0])) for e in err.errors() if e["loc"]))
        raise artifacts.ArtifactError(
            f"{source}: adapted model lacks or garbles {fields or 'its fields'} in "
            f"{artifacts.META}:\n{format_errors(err)}\n{FIX}"
        ) from None


class AdaptedModel:
    """A classifier for a new task, in scikit-learn's conventions."""

    def __init__(
        self,
        task: Task,
        classes: list[str],
        bank_meta: dict[str, Any],
        info: dict[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.classes_ = np.asarray(classes, dtype=str)
        self.bank_meta = bank_meta  # family, config and version of the bank it came from
        self.info = info or {}  # how it was fitted (method, shots, fitted parameters)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, d) inputs -> (n, len(classes_)) probabilities, columns in the order of
        ``classes_``."""
        xt = _as_inputs(x, self.bank_meta["x_dim"])
        warn_if_out_of_range(xt.numpy(), self.bank_meta.get("input_range"), "inputs")
        with torch.no_grad():
            return self.task.log_proba(xt).exp().numpy().astype(np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(1)]

    def save(self, path: str | os.PathLike, signing_key: Ed25519PrivateKey | None = None) -> str:
        """Write the model folder (signed when a key is given); returns its SHA-256."""
        return artifacts.save(path, KIND, self.arrays(), self._meta(), signing_key)

    def to_files(
        self,
        signing_key: Ed25519PrivateKey | None = None,
        prefix: artifacts.HashedPrefix | BankPrefix | None = None,
        *,
        bank_weights: bool = True,
    ) -> dict[str, bytes]:
        """The model folder's files as bytes: what :meth:`save` writes and the service sends.
        ``prefix``: the bank's arrays hashed once (``artifacts.HashedPrefix.of(bank_arrays(...))``,
        or :class:`BankPrefix` with the networks they came from) for the many models of one bank
        version. ``bank_weights=False`` (with the ``prefix`` of this model's bank):
        ``weights.npz`` holds the task's arrays alone, for a caller holding the bank's to
        complete (:func:`from_task_files`); checksum and signature are the whole file's."""
        meta = self._meta()
        if isinstance(prefix, BankPrefix):
            if prefix.holds(self.task.model):  # the prefix's own bytes, not compared again
                return artifacts.encode(
                    KIND,
                    self.task_arrays(),
                    meta,
                    signing_key,
                    prefix.prefix,
                    whole_weights=bank_weights,
                    after_prefix=True,
                )
            prefix = prefix.prefix
        return artifacts.encode(
            KIND, self.arrays(), meta, signing_key, prefix, whole_weights=bank_weights
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """``weights.npz``'s arrays: the bank's (``bank.*``, the same for every model of one bank
        version) first, then the task's."""
        return {**bank_arrays(self.task.model), **self.task_arrays()}

    def task_arrays(self) -> dict[str, np.ndarray]:
        """The task's own arrays (``task.*``): all a caller holding the bank's needs."""
        return {f"task.{k}": v for k, v in self.task.arrays().items()}

    def _meta(self) -> dict[str, Any]:
        """meta.json's fields, checked as loading checks them: what is saved always loads."""
        meta = {
            "classes": self.classes_.tolist(),
            "bank": self.bank_meta,
            "task": self.task.meta(),
            "info": self.info,
        }
        check_meta(json.loads(json.dumps(meta)), "adapted model (not saved)")
        return meta

    def __repr__(self) -> str:
        return (
            f"AdaptedModel(family={self.bank_meta['family']!r}, classes={self.classes_.tolist()})"
        )


def load_adapted(
    path: str | os.PathLike, public_key: PublicKeyLike | None = None, *, unsigned_ok: bool = False
) -> AdaptedModel:
    """Load a model saved by :meth:`AdaptedModel.save` or fetched from the adaptation service.

    With ``public_key`` (the server's ``signing.pub``, as a path, PEM bytes or key object) the
    model must carry a valid signature by that key: an unsigned, re-signed or altered model is
    refused. ``unsigned_ok=True`` says explicitly that you trust the folder (a model you adapted
    yourself); the checksum is still verified either way.
    """
    return from_files(artifacts.read(path, KIND), public_key, unsigned_ok=unsigned_ok, source=path)


def from_files(
    files: dict[str, bytes],
    public_key: PublicKeyLike | None = None,
    *,
    unsigned_ok: bool = False,
    source: Any = "adapted model",
    prefix: artifacts.HashedPrefix | None = None,
) -> AdaptedModel:
    """An adapted model from its files' bytes, verified as :func:`load_adapted` says (``prefix``:
    the bank's arrays as :meth:`AdaptedModel.to_files` takes them)."""
    key = signing.load_public_key(public_key) if public_key is not None else None
    if key is None and not unsigned_ok:
        warnings.warn(
            f"{source}: loaded without verifying who made it (only its checksum); pass public_key= "
            "(the server's signing.pub) "
            "to verify its signature, or unsigned_ok=True for a model you adapted yourself. A "
            "future release will refuse to load without one of them.",
            FutureWarning,
            stacklevel=3,
        )
    arrays, meta = artifacts.decode(files, KIND, source, key, prefix=prefix)
    check_meta(meta, source)
    bank_meta = meta["bank"]
    state = {
        k[len(BANK_PREFIX) :]: torch.from_numpy(v)
        for k, v in arrays.items()
        if k.startswith(BANK_PREFIX)
    }
    model = build_model(bank_meta["family"], bank_meta["config"], state, source)
    return _assemble(meta, model, arrays, source)


@dataclass(frozen=True)
class BankPrefix:
    """A bank's arrays hashed once (``prefix``) with the tensors they were read from, each
    one's in-place version and layout then: a model adapted on those very networks, none of them
    changed in place since, begins with the prefix's bytes without comparing megabytes (the
    service's many models of one bank version). Any other model is compared byte for byte.

    Torch counts the in-place changes made through a tensor (optimizer steps, running
    statistics, ``load_state_dict``, ``copy_``), not writes that go around it (through ``.data``,
    a numpy view or the storage): nothing may change the served networks that way (nothing in
    protofuse does; ``bank_arrays`` gives read-only views)."""

    prefix: artifacts.HashedPrefix
    networks: torch.nn.Module = field(repr=False, compare=False)
    _stamps: tuple[Stamp, ...] = field(repr=False, compare=False)

    @classmethod
    def of(cls, networks: torch.nn.Module) -> BankPrefix:
        return cls(artifacts.HashedPrefix.of(bank_arrays(networks)), networks, _stamps(networks))

    def holds(self, networks: torch.nn.Module) -> bool:
        """Whether ``networks`` are the prefix's networks, every tensor unchanged in place."""
        return networks is self.networks and _unchanged(networks, self._stamps)


# A state tensor as it was: its name, the tensor itself, its in-place version, and its data's
# place and layout (a tensor given other data through ``.data`` keeps its version).
Stamp = tuple[str, torch.Tensor, int, int, torch.dtype, tuple[int, ...], tuple[int, ...], int]


def _stamps(networks: torch.nn.Module) -> tuple[Stamp, ...]:
    """Each state tensor of ``networks`` (the arrays ``bank_arrays`` reads), stamped."""
    return tuple(
        (name, t, t._version, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
        for name, t in networks.state_dict(keep_vars=True).items()
    )


def _unchanged(networks: torch.nn.Module, stamps: tuple[Stamp, ...]) -> bool:
    """Whether ``networks`` hold the very tensors ``stamps`` were taken of, as they were."""
    now = _stamps(networks)
    return len(now) == len(stamps) and all(
        a[0] == b[0] and a[1] is b[1] and a[2:] == b[2:] for a, b in zip(now, stamps, strict=True)
    )


@dataclass(frozen=True)
class HeldBank:
    """One bank version's weights as adapted models carry them, verified once and their bytes
    hashed: for the models adapted on that version, whose files then need the bank's part
    neither parsed nor hashed again (what ``FusionClient`` keeps)."""

    prefix: artifacts.HashedPrefix  # the bank's arrays' .npz, first in every such model's file
    family: str
    config: dict[str, Any]
    _networks: list[torch.nn.Module] = field(default_factory=list, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # What the probe prediction of a model on these networks shares with every other's, and
    # the copies ``networks`` gave out, as they were: a model on one of them, unchanged, uses it.
    _probes: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _issued: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Stamp, ...]] = field(
        default_factory=weakref.WeakKeyDictionary, repr=False, compare=False
    )

    @classmethod
    def of(cls, model: AdaptedModel) -> HeldBank:
        """The bank part of a verified model (copied: the model stays its caller's)."""
        return cls(
            artifacts.HashedPrefix.of(bank_arrays(model.task.model)),
            str(model.bank_meta["family"]),
            copy.deepcopy(model.bank_meta["config"]),  # the model's dict stays its caller's
        )

    def networks(self, source: Any) -> torch.nn.Module:
        """The bank's networks for one model: a copy of its own (each model keeps its own, as
        from ``from_files``), of networks built once from the held bytes themselves, the bytes
        every model's checksum covers."""
        with self._lock:
            if not self._networks:
                arrays = artifacts.npz_arrays(self.prefix.whole, f"{source}: held bank weights")
                state = {k[len(BANK_PREFIX) :]: torch.from_numpy(v) for k, v in arrays.items()}
                self._networks.append(build_model(self.family, self.config, state, source))
            template = self._networks[0]
        networks = copy.deepcopy(template)
        stamps = _stamps(networks)
        with self._lock:  # callers on several threads: one client's concurrent calls
            self._issued[networks] = stamps
        return networks

    def gave(self, networks: torch.nn.Module) -> bool:
        """Whether ``networks`` are a copy :meth:`networks` gave out, unchanged since."""
        with self._lock:
            stamps = self._issued.get(networks)
        return stamps is not None and _unchanged(networks, stamps)


def from_task_files(
    files: dict[str, bytes],
    task_arrays: dict[str, np.ndarray],
    held: HeldBank,
    public_key: PublicKeyLike | None = None,
    *,
    unsigned_ok: bool = False,
    source: Any = "adapted model",
    networks: torch.nn.Module | None = None,
) -> tuple[AdaptedModel, dict[str, bytes]]:
    """A model whose files came without the bank's weights (``task_arrays``: the ``task.*``
    arrays of its weights), on the bank ``held`` holds: its complete weights.npz is the .npz of
    the held arrays and the task's, verified as :func:`from_files` verifies a model (checksum
    over the complete file, signature, metadata; the held part hashed once), and the model gets
    networks of its own, copied from the held bank's (``networks``: such a copy, from
    ``held.networks()``, made beforehand by a caller with time to spare). Returns the model and
    its complete files."""
    if any(not k.startswith("task.") for k in task_arrays):
        raise artifacts.ArtifactError(f"{source}: the task's weights hold more than task arrays")
    key = signing.load_public_key(public_key) if public_key is not None else None
    if key is None and not unsigned_ok:
        raise signing.SignatureError(f"{source}: no key to verify it with and unsigned_ok not set")
    own = {k: v.copy() for k, v in task_arrays.items()}  # the bytes verified are the model's
    others = {k: v for k, v in files.items() if k != artifacts.WEIGHTS}
    if held.prefix.appends:  # the bank's part neither written nor hashed again
        tail = held.prefix.tail(own)
        meta = artifacts.verify(others, KIND, source, key, prefix=held.prefix, tail=tail)
        full = {**others, artifacts.WEIGHTS: held.prefix.data + tail}
    else:
        full = {**others, artifacts.WEIGHTS: held.prefix.followed_by(own)}
        meta = artifacts.verify(full, KIND, source, key, prefix=held.prefix)
    check_meta(meta, source)
    if (meta["bank"]["family"], meta["bank"]["config"]) != (held.family, held.config):
        raise artifacts.ArtifactError(
            f"{source}: the model names another bank configuration than the weights held"
        )
    artifacts.check_finite(own, source, KIND)
    own_networks = held.networks(source) if networks is None else networks
    # The probe's encoder output is shared only by copies of the held networks, as made.
    probes = held._probes if held.gave(own_networks) else None
    return _assemble(meta, own_networks, own, source, probes), full


def _assemble(
    meta: dict[str, Any],
    model: torch.nn.Module,
    arrays: dict[str, np.ndarray],
    source: Any,
    probes: dict[Any, torch.Tensor] | None = None,
) -> AdaptedModel:
    """The model from its verified metadata, its bank's networks and its ``task.*`` arrays; one
    prediction checked finite (``probes``: kept across models whose networks are copies of the
    same ones, see ``Family.probe_log_proba``)."""
    bank_meta = meta["bank"]
    t = {k[len("task.") :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("task.")}
    wide = sorted(k for k, v in t.items() if v.is_floating_point() and v.dtype != torch.float32)
    if wide:
        raise artifacts.ArtifactError(
            f"{source}: task weights {wide[:3]} are not float32 (the networks' own type); {FIX}"
        )
    try:
        impl = family(bank_meta["family"])
        task = impl.load_task(model, t, meta["task"])
        # One prediction on a typical row (the middle of the inputs' range): weights that load
        # but cannot predict (shapes a task does not check, values that overflow) are refused
        # here, not at the user's first call.
        lo, hi = bank_meta.get("input_range") or (0.0, 0.0)
        with torch.no_grad():
            typical = torch.full((1, int(bank_meta["x_dim"])), (lo + hi) / 2)
            probe = impl.probe_log_proba(task, typical, probes)
        if not bool(torch.isfinite(probe).all()):
            raise ValueError("its prediction on a typical input is NaN or infinite")
    except (KeyError, TypeError) as err:
        raise artifacts.ArtifactError(
            f"{source}: adapted model lacks or garbles {err}; {FIX}"
        ) from None
    except (ValueError, RuntimeError) as err:
        raise artifacts.ArtifactError(
            f"{source}: the task's weights do not fit its bank "
            f"({(str(err).splitlines() or [type(err).__name__])[0]}); {FIX}"
        ) from None
    if task.n_classes != len(meta["classes"]):
        raise artifacts.ArtifactError(
            f"{source}: {len(meta['classes'])} class names for a task of {task.n_classes} "
            f"classes; {FIX}"
        )
    return AdaptedModel(task, meta["classes"], bank_meta, meta.get("info"))


def _as_inputs(x: np.ndarray, x_dim: int) -> torch.Tensor:
    """Validate an input array against the bank: 2-D, the bank's width, finite numbers."""
    arr = np.asarray(x)
    if arr.ndim == 1 and arr.shape[0] == x_dim:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != x_dim:
        raise ValueError(
            f"inputs have shape {arr.shape}, expected (n, {x_dim}): one row of {x_dim} features "
            "per example, as in the experts' queries"
        )
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"inputs have dtype {arr.dtype}, expected real numbers")
    if not np.isfinite(arr).all():
        raise ValueError("inputs contain NaN or infinite values; clean or impute them first")
    return torch.from_numpy(arr.astype(np.float32))
