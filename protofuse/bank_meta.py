"""A bank's metadata, typed: what ``meta.json`` records besides the weights and the expert records.

``BankMeta`` is read back from (and written as) the same JSON every bank has always carried::

    {"family": ..., "config": {...}, "x_dim": ..., "label_names": [...],
     "image_shape": [H, W] | null, "likelihood": ...,
     "settings": {"model": {...}, "training": {...}, "adapt": {...}},
     "input_range": [min, max],                                  # banks since input checks
     "federation": {"rounds": ..., "weights_digest": ..., "settings": {...}}}   # federated banks

beside the artifact's own fields (``kind``, ``format_version``, ``sha256``) and ``experts`` (the
bank's records). So every bank written before this model existed still loads, and a malformed
field is refused by name (:meth:`BankMeta.from_json` raises :class:`BankMetaError`) instead of
failing later as a ``KeyError`` deep inside adaptation.

Old code may still index the metadata like the dict it used to be (``bank.meta["x_dim"]``): that
works, with a DeprecationWarning naming the attribute to use.
"""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .settings import (
    AdaptSettings,
    FederationSettings,
    ModelSettings,
    PrivacySettings,
    TrainingSettings,
    format_errors,
)

# The fields an artifact's meta.json holds that are not the bank's metadata: the artifact's
# envelope (protofuse.artifacts) and the expert records (protofuse.bank).
ENVELOPE = ("kind", "format_version", "sha256")
EXPERTS = "experts"
UNSAVED = "unsaved"


class BankMetaError(ValueError):
    """``meta.json`` lacks or garbles a field of the bank's metadata; the message names it."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BankSettings(_Frozen):
    """The ``[model]``, ``[training]`` and ``[adapt]`` settings the bank was made with."""

    model: ModelSettings
    training: TrainingSettings
    adapt: AdaptSettings


class FederationRecord(_Frozen):
    """How a federated bank was made: rounds run, the store's weight file, the ``[federation]``
    table."""

    rounds: int = Field(ge=0)
    weights_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    settings: FederationSettings
    # [privacy]; banks from before the setting were plain. Under DP, the run's noise multiplier
    # and the epsilon the accountant gave for privacy.delta.
    privacy: PrivacySettings = PrivacySettings()
    noise_multiplier: float | None = Field(None, gt=0)
    epsilon: float | None = Field(None, ge=0)


class BankMeta(_Frozen):
    """Family, networks' configuration, vocabulary and settings of a bank (frozen; copy to
    change)."""

    family: str = Field(
        min_length=1
    )  # a name in protofuse.families.FAMILIES (checked when the networks are built)
    config: dict[str, Any]  # JSON: the family rebuilds its networks from it (Family.build)
    x_dim: int = Field(ge=1)  # features per input row
    label_names: tuple[str, ...]  # the vocabulary, in the order of the weights' label rows
    image_shape: tuple[int, ...] | None  # [H, W] or [H, W, C] for flattened images, else None
    likelihood: str  # of inputs given concepts (generative family): "gaussian" or "bernoulli"
    settings: BankSettings
    input_range: tuple[float, float] | None = (
        None  # [min, max] of the queries; None in banks before input checks
    )
    federation: FederationRecord | None = None  # federated banks only
    # Not fields of meta.json's bank metadata: the artifact's checksum, once saved or loaded.
    sha256: str | None = None
    version: str = UNSAVED  # the checksum's first 16 hex digits, or "unsaved"

    # Field validators, not one model validator, so that an error names its field.
    @field_validator("x_dim")
    @classmethod
    def _x_dim_as_configured(cls, x_dim: int, info: ValidationInfo) -> int:
        config = info.data.get("config") or {}
        if "x_dim" in config and config["x_dim"] != x_dim:
            raise ValueError(
                f"{x_dim} differs from config.x_dim {config['x_dim']}; the two must agree"
            )
        return x_dim

    @field_validator("label_names")
    @classmethod
    def _labels_once(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"lists {twice[:3]} more than once; each label appears once")
        return names

    @field_validator("image_shape")
    @classmethod
    def _image_shape(cls, shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if shape is not None and (len(shape) not in (2, 3) or min(shape) < 1):
            raise ValueError(f"{list(shape)} is not [H, W] or [H, W, C] of positive sizes")
        return shape

    @property
    def federated_rounds(self) -> int:
        """Federation rounds run to make the bank; 0 for a bank fitted centrally."""
        return self.federation.rounds if self.federation is not None else 0

    # -- JSON ------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, record: dict[str, Any]) -> BankMeta:
        """The metadata of a loaded ``meta.json`` (its envelope and ``experts`` are skipped).

        Raises :class:`BankMetaError` naming every missing or malformed field.
        """
        if not isinstance(record, dict):
            raise BankMetaError(
                f"bank metadata is malformed: meta.json holds a {type(record).__name__}, not a "
                "JSON object"
            )
        fields = {k: v for k, v in record.items() if k not in (*ENVELOPE, EXPERTS)}
        sha = record.get("sha256")
        if isinstance(sha, str):
            fields.update(sha256=sha, version=sha[:16])
        try:
            return cls.model_validate(fields)
        except ValidationError as err:
            errors = format_errors(err, unknown="unknown field (written by a newer protofuse?)")
            raise BankMetaError(
                f"bank metadata is incomplete or malformed in meta.json:\n{errors}"
            ) from None

    def to_json(self) -> dict[str, Any]:
        """The JSON fields meta.json records for the bank (without the artifact's envelope): the
        shape banks have always had, so that older protofuse versions read newer banks too."""
        out = self.model_dump(mode="json", exclude={"sha256", "version"})
        for optional in (
            "input_range",
            "federation",
        ):  # absent rather than null, as before they existed
            if out[optional] is None:
                del out[optional]
        return out

    def identity(self) -> dict[str, Any]:
        """What an adapted model keeps of its bank (JSON): enough to rebuild the networks, check
        inputs and trace it to the bank version."""
        keys = (
            "family",
            "config",
            "x_dim",
            "label_names",
            "image_shape",
            "likelihood",
            "input_range",
        )
        out = {
            k: v
            for k, v in self.model_dump(mode="json", include=set(keys)).items()
            if k != "input_range" or v is not None
        }
        return {**out, "version": self.version}

    # -- the dict it used to be ------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        warnings.warn(
            f"bank.meta[{key!r}] is deprecated: bank.meta is a BankMeta now; read bank.meta.{key} "
            "(typed) or bank.meta.to_json() (the JSON)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._json_view()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated dict access, as ``__getitem__``."""
        warnings.warn(
            f"bank.meta.get({key!r}) is deprecated: bank.meta is a BankMeta now; read "
            f"bank.meta.{key}",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._json_view().get(key, default)

    def _json_view(self) -> dict[str, Any]:
        view = self.to_json()
        view["version"] = self.version
        if self.sha256 is not None:
            view["sha256"] = self.sha256
        return view
