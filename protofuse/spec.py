"""The federation spec: one TOML file naming the experts, their labels and query data.

[data]                       # optional
image_shape = [8, 8]         # inputs are flattened images: [H, W] greyscale or [H, W, C] colour
                             # (else: tabular)

[[experts]]
name = "logreg_a"
predict = "experts:logreg_a" # module:attribute, resolved with the spec's folder on the path
labels = ["0", "1", "2", "3"]# in the order of the expert's output columns
queries = "queries.npy"      # unlabeled inputs (n, d), relative to the spec

[model] / [training] / [adapt] / [federation] / [privacy]   # optional, see protofuse.settings
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .input_checks import MIN_IMAGE_SIDE
from .model.networks import ImageShape
from .settings import (
    AdaptSettings,
    FederationSettings,
    ModelSettings,
    PrivacySettings,
    TrainingSettings,
    format_errors,
)

MAX_CHANNELS = 64  # RGB(A) and multispectral stacks; more is more likely a mistaken shape


class SpecError(ValueError):
    """A federation spec that cannot be used; the message names the field and the fix."""


class Endpoint(BaseModel):
    """A black box served over HTTP, as organizations usually serve their models already."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    protocol: Literal["open-inference", "mlflow"] = Field(
        description=(
            "open-inference: POST /v2/models/MODEL/infer (KServe, Triton, MLServer); mlflow: "
            "POST /invocations"
        )
    )
    url: str = Field(
        pattern=r"^https?://",
        description="base URL of the model server, e.g. http://127.0.0.1:8080",
    )
    model: str | None = Field(
        None, min_length=1, description="open-inference: the model's name on the server"
    )
    version: str | None = Field(
        None, description="open-inference: the model's version (default: the server's)"
    )
    output: str | None = Field(
        None,
        description=(
            "open-inference: name of the output holding probabilities (MLServer's scikit-learn "
            "runtime: predict_proba)"
        ),
    )
    timeout: float = Field(30.0, gt=0, le=3600, description="seconds per request")
    retries: int = Field(
        3, ge=0, le=20, description="retries on connection errors, timeouts, 429 and 5xx"
    )
    batch_size: int = Field(256, ge=1, le=1_000_000, description="rows per request")

    @model_validator(mode="after")
    def _model_named(self) -> Endpoint:
        if self.protocol == "open-inference" and not self.model:
            raise ValueError(
                "protocol 'open-inference' needs model = the model's name on the server"
            )
        return self


class ExpertEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description=(
            "unique name (letters, digits, _ . -); also the expert's pseudonym in a federation"
        ),
    )
    predict: str | None = Field(
        None,
        description="import path module:attribute of a callable, fitted estimator or torch module",
    )
    endpoint: Endpoint | None = Field(None, description="or: a model server over HTTP")
    labels: list[str] = Field(
        min_length=1, description="label names, in the order of the expert's output columns"
    )
    queries: str = Field(description=".npy file of unlabeled inputs (n, d), relative to the spec")

    @model_validator(mode="after")
    def _one_black_box(self) -> ExpertEntry:
        if (self.predict is None) == (self.endpoint is None):
            raise ValueError(
                "give exactly one of predict = 'module:attribute' or an [experts.endpoint] table "
                "(a model server)"
            )
        return self

    @field_validator("predict")
    @classmethod
    def _import_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        module, sep, attr = v.partition(":")
        if not sep or not module or not attr:
            raise ValueError(
                f"{v!r} is not an import path; write it as 'module:attribute', e.g. "
                "'experts:logreg_a'"
            )
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        # Integer class ids are common (0, 1, ...); they name labels as their decimal text.
        if isinstance(v, list):
            return [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in v]
        return v

    @field_validator("labels")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({c for c in v if v.count(c) > 1})
        if dup:
            raise ValueError(
                f"labels {dup} appear more than once; list each output column's label once"
            )
        if any(not c for c in v):
            raise ValueError("a label name is empty")
        return v


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    image_shape: ImageShape | None = Field(
        None,
        description=(
            "[height, width] (greyscale) or [height, width, channels] when inputs are images, "
            "each row flattened channels-last (numpy's images.reshape(n, -1))"
        ),
    )
    likelihood: Literal["auto", "bernoulli", "gaussian"] = Field(
        "auto", description="generative decoder; auto: bernoulli for images in [0,1]"
    )

    @field_validator("image_shape", mode="before")
    @classmethod
    def _two_or_three(cls, v: object) -> object:
        if isinstance(v, (list, tuple)) and len(v) not in (2, 3):
            raise ValueError(
                f"image_shape {list(v)} has {len(v)} numbers; write [height, width] for greyscale "
                "or [height, width, channels] for colour, e.g. [32, 32, 3]"
            )
        return v

    @field_validator("image_shape")
    @classmethod
    def _positive(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return v
        if min(v[:2]) < MIN_IMAGE_SIDE:
            raise ValueError(
                f"image_shape {list(v)} is too small; each side must be at least {MIN_IMAGE_SIDE} "
                "pixels"
            )
        if len(v) == 3 and not 1 <= v[2] <= MAX_CHANNELS:
            raise ValueError(
                f"image_shape {list(v)} has {v[2]} channels; use 1 to {MAX_CHANNELS} (3 for RGB), "
                "channels last"
            )
        return v


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    experts: list[ExpertEntry] = Field(default_factory=list)
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    adapt: AdaptSettings = AdaptSettings()
    federation: FederationSettings = FederationSettings()
    privacy: PrivacySettings = PrivacySettings()
    folder: Path = Field(
        Path("."), exclude=True, description="the spec's folder; relative paths start here"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Spec:
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"expert names {dup} appear more than once; give each [[experts]] entry a unique "
                "name"
            )
        return self

    @model_validator(mode="after")
    def _dp_combines_by_sum(self) -> Spec:
        # DP-FedAvg's noise is calibrated to a sum of clipped updates: a median, a trimmed mean or
        # Krum's choice is not bounded by one client's clip, so those rules are refused, not
        # silently replaced.
        if self.privacy.mode == "dp" and self.federation.combine != "mean":
            raise ValueError(
                f"federation.combine: {self.federation.combine!r} cannot be used with privacy.mode "
                "= 'dp', whose noise covers a sum of clipped updates; remove it (the default "
                "'mean') or set privacy.mode = 'plain'"
            )
        # Under secure aggregation the server holds only the sum: a median, a trimmed mean or
        # Krum's choice needs each update.
        if self.privacy.mode == "secagg" and self.federation.combine != "mean":
            raise ValueError(
                f"federation.combine: {self.federation.combine!r} cannot be used with privacy.mode "
                "= 'secagg', where the server sees only the sum of the updates; remove it (the "
                "default 'mean') or set privacy.mode = 'plain'"
            )
        return self

    def expert(self, name: str) -> ExpertEntry:
        """The entry called ``name``; a SpecError lists the names there are."""
        for entry in self.experts:
            if entry.name == name:
                return entry
        raise SpecError(
            f"no expert named {name!r} in the spec (it lists {[e.name for e in self.experts]})"
        )

    def queries_path(self, entry: ExpertEntry) -> Path:
        return (self.folder / entry.queries).resolve()


MAX_SPEC_BYTES = 1 << 20  # a spec names files; it never holds data


def _read_spec_text(file: Path) -> str:
    """The spec's text: a regular file of at most MAX_SPEC_BYTES of UTF-8, checked before it is
    read (a FIFO or a device named as a spec is refused, not waited on)."""
    try:
        st = file.stat()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise SpecError(f"{file}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(f"{file}: not a regular file; give the path of a spec.toml")
    if st.st_size > MAX_SPEC_BYTES:
        raise SpecError(
            f"{file}: {st.st_size} bytes, more than a spec can be ({MAX_SPEC_BYTES}); is this the "
            "spec.toml?"
        )
    try:
        with file.open("rb") as f:
            return f.read(MAX_SPEC_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{file}: not UTF-8 text (byte {err.start}); save the spec as UTF-8"
        ) from None
    except OSError as err:
        raise SpecError(f"{file}: cannot be read ({err.strerror})") from None


def load_spec(path: str | os.PathLike, *, experts_required: bool = True) -> Spec:
    """Read and validate a spec; every problem is reported with its field, e.g.
    ``experts[1].labels``.

    The fusion server reads the same file for its settings (``[data]``, ``[model]``,
    ``[training]``, ``[adapt]``, ``[federation]``): there the experts are the clients' business
    and may be absent (``experts_required=False``)."""
    file = Path(path)
    try:
        raw = tomllib.loads(_read_spec_text(file))
    except FileNotFoundError:
        raise SpecError(f"{file}: no such spec file") from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{file}: not valid TOML ({err})") from None
    except RecursionError:
        raise SpecError(f"{file}: not valid TOML (nested too deeply)") from None
    if "folder" in raw:
        raise SpecError(
            f"{file}: 'folder' is not a spec field; paths are relative to the spec's own folder"
        )
    try:
        spec = Spec(**raw, folder=file.resolve().parent)
    except ValidationError as err:
        raise SpecError(f"{file}: invalid spec\n{format_errors(err)}") from None
    if experts_required and not spec.experts:
        raise SpecError(
            f"{file}: invalid spec\n  experts: no [[experts]] table; describe at least one expert "
            "(name, predict or endpoint, labels, queries)"
        )
    return spec
