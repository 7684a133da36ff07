"""The adaptation service's messages (protos/protofuse/v1/fusion.proto): dataclasses and codecs.

The companion of :mod:`protofuse.protocol.federation` (federation and bank messages), with the same
rules: the only other module that touches generated classes; every decoder checks every field and
raises
WireError naming it by its wire path (``AdaptRequest.x.shape``); every encoder runs the same
checks first. Checks that need the bank being served (input width, option names) take it as
arguments, so a request is refused before any work starts.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protofuse.protocol import federation as wire
from protofuse.protocol.federation import FORMAT_VERSION, WireError, _check_text, _parse, _serialize
from protofuse.records import ExpertRecord
from protofuse.v1 import fusion_pb2

SERVICE = fusion_pb2.DESCRIPTOR.services_by_name["Fusion"].full_name  # "protofuse.v1.Fusion"
METHODS = ("Adapt", "GetBank", "ListExperts")

_DTYPES: dict[int, np.dtype[Any]] = {
    fusion_pb2.Tensor.FLOAT32: np.dtype("<f4"),
    fusion_pb2.Tensor.FLOAT64: np.dtype("<f8"),
}
_DTYPE_CODES = {
    np.dtype(np.float32): fusion_pb2.Tensor.FLOAT32,
    np.dtype(np.float64): fusion_pb2.Tensor.FLOAT64,
}
MAX_OPTION_LENGTH = 256
# Classes of one task: an adapted model holds at most this many (protofuse.adapted.MAX_CLASSES);
# a service sets its own, lower limit (ServiceSettings.max_classes).
MAX_CLASSES = 10_000
# Inputs go through float32 networks: a float64 value beyond float32's range becomes infinite.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_WIDTH = (
    wire.MAX_X_DIM
)  # no bank has wider inputs (a federation admits none); refused before any array is shaped


# An exported model's name in a repository: a folder name every inference server accepts.
ONNX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_ONNX_VERSION = 2**31 - 1
# An ONNX export's small files: labels.txt holds at most MAX_CLASSES names of at most
# MAX_LABEL_LENGTH characters (4 bytes each in UTF-8) and a line break; config.pbtxt and
# signature.json are a few hundred bytes.
MAX_ONNX_TEXT_BYTES = MAX_CLASSES * (4 * wire.MAX_LABEL_LENGTH + 1)
MAX_ONNX_SIGNATURE_BYTES = 64 << 10


@dataclass(frozen=True, eq=False)
class AdaptRequest:
    x: np.ndarray  # (n, d) float32 or float64
    labels: tuple[str, ...]  # n label names
    options: dict[str, str] = field(default_factory=dict)
    known_bank_weights_digest: str = ""  # bank weights the caller holds; "" for none
    onnx: tuple[str, int] | None = None  # (name, version): also export the model as ONNX


@dataclass(frozen=True)
class OnnxExport:
    """An adapted model as ONNX, one version of a model repository held as bytes
    (``protofuse.export`` makes, signs and writes it)."""

    name: str  # the model's folder in the repository
    version: int  # its version folder, from 1
    model: bytes  # NAME/VERSION/model.onnx
    labels: bytes  # NAME/labels.txt
    config: bytes  # NAME/config.pbtxt
    signature: bytes = b""  # NAME/VERSION/signature.json; empty when unsigned
    parity: float = float("nan")  # the largest gap to predict_proba its maker measured


@dataclass(frozen=True)
class FitMetrics:
    classes: tuple[str, ...]
    n_support: int
    support_accuracy: float
    seconds: float
    method: str
    uncovered_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdaptResponse:
    bank_version: str
    files: dict[str, bytes]  # weights.npz, meta.json, signature.json: the model folder's files
    metrics: FitMetrics
    bank_weights_digest: str = ""  # sha256 of the .npz of the bank's arrays alone
    bank_weights_omitted: bool = False  # weights.npz holds only the task's arrays
    onnx: OnnxExport | None = None  # the model as ONNX, when the request asked for it


@dataclass(frozen=True)
class BankInfo:
    manifest: wire.BankManifest
    input_width: int


@dataclass(frozen=True)
class ExpertSummary:
    expert: ExpertRecord  # as the manifest carries it (no distribution: that is the next field)
    distribution: wire.ExpertDistribution


@dataclass(frozen=True)
class ExpertList:
    bank_version: str
    experts: tuple[ExpertSummary, ...]


# -- AdaptRequest -------------------------------------------------------------------------------


def encode_adapt_request(r: AdaptRequest) -> bytes:
    x = np.asarray(r.x)
    if x.dtype not in _DTYPE_CODES:
        raise WireError(
            f"AdaptRequest.x.dtype: {x.dtype} is not sent; convert inputs to float32 or float64"
        )
    _check_request(
        x, tuple(r.labels), dict(r.options), max_support=None, input_width=None, option_names=None
    )
    _check_digest(r.known_bank_weights_digest, "AdaptRequest.known_bank_weights_digest")
    msg = fusion_pb2.AdaptRequest(
        format_version=FORMAT_VERSION,
        labels=list(r.labels),
        options=dict(r.options),
        known_bank_weights_digest=r.known_bank_weights_digest,
    )
    if r.onnx is not None:
        check_onnx_name(*r.onnx, path="AdaptRequest.onnx")
        msg.onnx.name, msg.onnx.version = r.onnx
    msg.x.dtype = _DTYPE_CODES[x.dtype]
    msg.x.shape.extend(x.shape)
    msg.x.data = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
    return _serialize(msg)


def decode_adapt_request(
    data: bytes,
    *,
    max_support: int | None = None,
    input_width: int | None = None,
    option_names: frozenset[str] | None = None,
    max_classes: int | None = None,
    max_work: int | None = None,
) -> AdaptRequest:
    """Parse and check a request against the service's limits and the bank being served.

    ``max_classes`` bounds the task's distinct labels; ``max_work`` the product of support
    examples and classes (what an adaptation's cost grows with)."""
    msg = _parse(fusion_pb2.AdaptRequest, data, "AdaptRequest")
    if not msg.HasField("x"):
        raise WireError(
            "AdaptRequest.x: missing; send the support inputs as a Tensor of shape (n, d)"
        )
    x = _tensor_from_proto(msg.x, "AdaptRequest.x", max_rows=max_support)
    # Counted before the labels become Python strings (a request may hold millions of them).
    if len(x) and len(msg.labels) != len(x):
        raise WireError(
            f"AdaptRequest.labels: {len(msg.labels)} labels for {len(x)} rows of x; send one "
            "label name per example"
        )
    labels = tuple(msg.labels) if len(x) else ()  # no rows: refused next, as an empty set
    onnx = None
    if msg.HasField("onnx"):
        check_onnx_name(msg.onnx.name, msg.onnx.version, path="AdaptRequest.onnx")
        onnx = (msg.onnx.name, int(msg.onnx.version))
    request = AdaptRequest(x, labels, dict(msg.options), msg.known_bank_weights_digest, onnx)
    _check_request(
        x,
        request.labels,
        request.options,
        max_support=max_support,
        input_width=input_width,
        option_names=option_names,
        max_classes=max_classes,
        max_work=max_work,
    )
    _check_digest(request.known_bank_weights_digest, "AdaptRequest.known_bank_weights_digest")
    return request


def check_onnx_name(name: str, version: int, *, path: str) -> None:
    """WireError unless ``name`` is a folder name every inference server accepts and ``version``
    a whole number from 1."""
    _check_text(name, f"{path}.name")
    if not ONNX_NAME.fullmatch(name):
        raise WireError(
            f"{path}.name: {name[:80]!r}; use letters, digits, '_', '.' and '-' (at most 128, "
            "starting with a letter or digit): it becomes a folder and the name servers know the "
            "model by"
        )
    if isinstance(version, bool) or not isinstance(version, int):
        raise WireError(f"{path}.version: {version!r}; give a whole number from 1")
    if not 1 <= version <= MAX_ONNX_VERSION:
        raise WireError(
            f"{path}.version: {version}; give a whole number from 1 to {MAX_ONNX_VERSION}"
        )


def _check_digest(value: str, path: str) -> None:
    if _check_text(value, path) and not wire._SHA256_HEX.fullmatch(value):
        raise WireError(
            f"{path}: {value[:80]!r} is not a sha256 digest (64 lowercase hex characters); send "
            "one from an earlier reply, or leave it empty"
        )


def _tensor_from_proto(t: fusion_pb2.Tensor, path: str, max_rows: int | None) -> np.ndarray:
    if t.dtype not in _DTYPES:
        shown = (
            fusion_pb2.Tensor.DType.Name(t.dtype)
            if t.dtype in fusion_pb2.Tensor.DType.values()
            else t.dtype
        )
        raise WireError(f"{path}.dtype: {shown} is not accepted; send FLOAT32 or FLOAT64")
    shape = tuple(t.shape)
    if len(shape) != 2:
        raise WireError(
            f"{path}.shape: {list(shape)} has {len(shape)} dimensions; send (n, d): one row of d "
            "features per example"
        )
    if max_rows is not None and shape[0] > max_rows:
        raise WireError(
            f"{path}.shape: {shape[0]} support examples, more than this service's limit of "
            f"{max_rows}; send fewer (a few per class is what adaptation needs)"
        )
    if not 1 <= shape[1] <= MAX_WIDTH:
        raise WireError(
            f"{path}.shape: width {shape[1]} is outside [1, {MAX_WIDTH}]; send rows of the bank's "
            "input width"
        )
    dtype = _DTYPES[t.dtype]
    expected = shape[0] * shape[1] * dtype.itemsize
    if len(t.data) != expected:
        raise WireError(
            f"{path}.data: {len(t.data)} bytes for shape {list(shape)} of {dtype.name}; send "
            f"exactly {expected} bytes, row-major little-endian"
        )
    return np.frombuffer(t.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _check_request(
    x: np.ndarray,
    labels: tuple[str, ...],
    options: dict[str, str],
    *,
    max_support: int | None,
    input_width: int | None,
    option_names: frozenset[str] | None,
    max_classes: int | None = None,
    max_work: int | None = None,
) -> None:
    if x.ndim != 2:
        raise WireError(
            f"AdaptRequest.x.shape: {list(x.shape)} has {x.ndim} dimensions; send (n, d): one row "
            "of d features per example"
        )
    n, d = x.shape
    if n == 0:
        raise WireError(
            "AdaptRequest.x.shape: the support set is empty; send at least one example of each of "
            "two classes"
        )
    if max_support is not None and n > max_support:
        raise WireError(
            f"AdaptRequest.x.shape: {n} support examples, more than this service's limit of "
            f"{max_support}; send fewer"
        )
    if input_width is not None and d != input_width:
        raise WireError(
            f"AdaptRequest.x.shape: rows of width {d}, but the bank's inputs have width "
            f"{input_width}; send inputs preprocessed like the experts' queries"
        )
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise WireError(
            f"AdaptRequest.x.data: row {int(bad[0])} holds NaN or infinite values; clean or impute "
            "the inputs first"
        )
    big = np.flatnonzero((np.abs(x) > _FLOAT32_MAX).any(axis=1))
    if big.size:
        raise WireError(
            f"AdaptRequest.x.data: row {int(big[0])} holds values beyond float32's range "
            f"(+-{_FLOAT32_MAX:.3g}), which the bank's networks cannot represent; send inputs "
            "preprocessed like the experts' queries"
        )
    if len(labels) != n:
        raise WireError(
            f"AdaptRequest.labels: {len(labels)} labels for {n} rows of x; send one label name per "
            "example"
        )
    for i, label in enumerate(labels):
        _check_text(label, f"AdaptRequest.labels[{i}]")
        if not label:
            raise WireError(
                f"AdaptRequest.labels[{i}]: empty label name; every example needs a non-empty label"
            )
        if len(label) > wire.MAX_LABEL_LENGTH:
            raise WireError(
                f"AdaptRequest.labels[{i}]: {len(label)} characters; use label names of at most "
                f"{wire.MAX_LABEL_LENGTH}"
            )
        if any(unicodedata.category(ch) == "Cc" for ch in label):
            raise WireError(
                f"AdaptRequest.labels[{i}]: {label[:40]!r} holds control characters; use "
                "printable label names"
            )
    classes = len(set(labels))
    if classes < 2:
        raise WireError(
            f"AdaptRequest.labels: only {sorted(set(labels))} present; a task needs at least two "
            "classes"
        )
    limit = MAX_CLASSES if max_classes is None else min(max_classes, MAX_CLASSES)
    if classes > limit:
        raise WireError(
            f"AdaptRequest.labels: {classes} classes, more than this service's limit of {limit}; "
            "split the task, or ask the operator to raise --max-classes"
        )
    if max_work is not None and n * classes > max_work:
        raise WireError(
            f"AdaptRequest.labels: {n} examples x {classes} classes = {n * classes}, more work "
            f"than this service's limit of {max_work} per request; send fewer examples or "
            "classes, or ask the operator to raise --max-work"
        )
    for key, value in options.items():
        _check_text(key, "AdaptRequest.options")
        if option_names is not None and key not in option_names:
            raise WireError(
                f"AdaptRequest.options[{key!r}]: unknown option; known options are "
                f"{sorted(option_names)}"
            )
        _check_text(value, f"AdaptRequest.options[{key!r}]")
        if len(value) > MAX_OPTION_LENGTH:
            raise WireError(
                f"AdaptRequest.options[{key!r}]: {len(value)} characters; at most "
                f"{MAX_OPTION_LENGTH}"
            )


# -- AdaptResponse ------------------------------------------------------------------------------

_FILES = {
    "weights.npz": "weights_npz",
    "meta.json": "meta_json",
    "signature.json": "signature_json",
}


def encode_adapt_response(r: AdaptResponse) -> bytes:
    _check_adapt_response(r)
    msg = fusion_pb2.AdaptResponse(format_version=FORMAT_VERSION, bank_version=r.bank_version)
    for name, attr in _FILES.items():
        if name in r.files:
            setattr(msg.artifact, attr, r.files[name])
    msg.artifact.bank_weights_digest = r.bank_weights_digest
    msg.artifact.bank_weights_omitted = r.bank_weights_omitted
    m = r.metrics
    msg.metrics.classes.extend(m.classes)
    msg.metrics.n_support = int(m.n_support)
    msg.metrics.support_accuracy = float(m.support_accuracy)
    msg.metrics.seconds = float(m.seconds)
    msg.metrics.method = m.method
    msg.metrics.uncovered_labels.extend(m.uncovered_labels)
    if r.onnx is not None:
        o = r.onnx
        msg.onnx.name, msg.onnx.version = o.name, o.version
        msg.onnx.model_onnx, msg.onnx.labels_txt, msg.onnx.config_pbtxt = (
            o.model,
            o.labels,
            o.config,
        )
        msg.onnx.signature_json, msg.onnx.parity = o.signature, o.parity
    return _serialize(msg)


def decode_adapt_response(data: bytes) -> AdaptResponse:
    msg = _parse(fusion_pb2.AdaptResponse, data, "AdaptResponse")
    files = {
        name: getattr(msg.artifact, attr)
        for name, attr in _FILES.items()
        if getattr(msg.artifact, attr)
    }
    m = msg.metrics
    metrics = FitMetrics(
        tuple(m.classes),
        m.n_support,
        m.support_accuracy,
        m.seconds,
        m.method,
        tuple(m.uncovered_labels),
    )
    onnx = None
    if msg.HasField("onnx"):
        o = msg.onnx
        onnx = OnnxExport(
            o.name,
            int(o.version),
            o.model_onnx,
            o.labels_txt,
            o.config_pbtxt,
            o.signature_json,
            o.parity,
        )
    r = AdaptResponse(
        msg.bank_version,
        files,
        metrics,
        msg.artifact.bank_weights_digest,
        msg.artifact.bank_weights_omitted,
        onnx,
    )
    _check_adapt_response(r)
    return r


def _check_adapt_response(r: AdaptResponse) -> None:
    if not _check_text(r.bank_version, "AdaptResponse.bank_version"):
        raise WireError(
            "AdaptResponse.bank_version: empty; name the bank version the model came from"
        )
    for name in ("weights.npz", "meta.json"):
        if not r.files.get(name):
            raise WireError(
                f"AdaptResponse.artifact.{_FILES[name]}: missing; send the adapted model's {name}"
            )
    _check_digest(r.bank_weights_digest, "AdaptResponse.artifact.bank_weights_digest")
    if r.bank_weights_omitted and not r.bank_weights_digest:
        raise WireError(
            "AdaptResponse.artifact.bank_weights_omitted: set without bank_weights_digest; name "
            "the weights left out"
        )
    wire._check_labels(
        tuple(r.metrics.classes), "AdaptResponse.metrics.classes", what="the model's classes"
    )
    wire._check_unit_interval(r.metrics.support_accuracy, "AdaptResponse.metrics.support_accuracy")
    wire._check_finite(r.metrics.seconds, "AdaptResponse.metrics.seconds")
    wire._check_uint(r.metrics.n_support, "AdaptResponse.metrics.n_support")
    if r.onnx is not None:
        _check_onnx_export(r.onnx, "AdaptResponse.onnx")


def _check_onnx_export(o: OnnxExport, path: str) -> None:
    check_onnx_name(o.name, o.version, path=path)
    for attr, field_name in (
        ("model", "model_onnx"),
        ("labels", "labels_txt"),
        ("config", "config_pbtxt"),
    ):
        if not getattr(o, attr):
            raise WireError(f"{path}.{field_name}: empty; send the exported file")
    for attr, field_name, limit in (
        ("labels", "labels_txt", MAX_ONNX_TEXT_BYTES),
        ("config", "config_pbtxt", MAX_ONNX_TEXT_BYTES),
        ("signature", "signature_json", MAX_ONNX_SIGNATURE_BYTES),
    ):
        size = len(getattr(o, attr))
        if size > limit:
            raise WireError(
                f"{path}.{field_name}: {size} bytes, more than the {limit} such a file takes"
            )
    wire._check_finite(o.parity, f"{path}.parity")
    if o.parity < 0:
        raise WireError(f"{path}.parity: {o.parity} is negative; send the largest absolute gap")


# -- GetBank / ListExperts ----------------------------------------------------------------------


def encode_empty_request(kind: str) -> bytes:
    return _serialize(getattr(fusion_pb2, kind)(format_version=FORMAT_VERSION))


def decode_empty_request(kind: str, data: bytes) -> None:
    _parse(getattr(fusion_pb2, kind), data, kind)


def encode_bank_info(b: BankInfo) -> bytes:
    manifest = fusion_pb2.GetBankResponse().manifest
    manifest.ParseFromString(
        wire.encode_manifest(b.manifest)
    )  # validated by the manifest's own encoder
    msg = fusion_pb2.GetBankResponse(
        format_version=FORMAT_VERSION,
        manifest=manifest,
        input_width=wire._check_uint(b.input_width, "GetBankResponse.input_width"),
    )
    return _serialize(msg)


def decode_bank_info(data: bytes) -> BankInfo:
    msg = _parse(fusion_pb2.GetBankResponse, data, "GetBankResponse")
    if not msg.HasField("manifest"):
        raise WireError("GetBankResponse.manifest: missing")
    if msg.input_width < 1:
        raise WireError(
            "GetBankResponse.input_width: missing; the bank's input width is at least 1"
        )
    return BankInfo(wire.decode_manifest(_serialize(msg.manifest)), msg.input_width)


def encode_expert_list(e: ExpertList) -> bytes:
    msg = fusion_pb2.ListExpertsResponse(
        format_version=FORMAT_VERSION,
        bank_version=_check_text(e.bank_version, "ListExpertsResponse.bank_version"),
    )
    for summary in e.experts:
        if summary.expert.pseudonym != summary.distribution.pseudonym:
            raise WireError(
                f"ListExpertsResponse.experts: record {summary.expert.pseudonym!r} paired with the "
                f"distribution of {summary.distribution.pseudonym!r}"
            )
        out = msg.experts.add()
        wire._check_manifest_expert(
            summary.expert, set(summary.expert.label_names), "ListExpertsResponse.experts.expert"
        )
        wire._manifest_expert_to_proto(summary.expert, out.expert)
        out.distribution.ParseFromString(wire.encode_distribution(summary.distribution))
    return _serialize(msg)


def decode_expert_list(data: bytes) -> ExpertList:
    msg = _parse(fusion_pb2.ListExpertsResponse, data, "ListExpertsResponse")
    experts = []
    for i, s in enumerate(msg.experts):
        path = f"ListExpertsResponse.experts[{i}]"
        expert = wire._manifest_expert_from_proto(s.expert, f"{path}.expert")
        wire._check_manifest_expert(expert, set(expert.label_names), f"{path}.expert")
        experts.append(ExpertSummary(expert, wire.decode_distribution(_serialize(s.distribution))))
    return ExpertList(msg.bank_version, tuple(experts))
