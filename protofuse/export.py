"""Adapted models as ONNX, in the model-repository layout Triton and KServe read, so that any
inference server (Triton, KServe, MLServer, onnxruntime) serves them.

    REPO/NAME/config.pbtxt         Triton's model configuration (onnxruntime backend)
    REPO/NAME/labels.txt           the class names, one per line, in output-column order
    REPO/NAME/VERSION/model.onnx   input "input" (n, d) float32 -> output "proba" (n, K) float32
    REPO/NAME/VERSION/signature.json   Ed25519 over the three files (when a signing key is given)

The graph is the adapted model's own computation, the bank's encoder and the task's prototype
rows: ``softmax(t * (f(x) P^T + b))``. The class names and the bank's version travel in the ONNX
file's metadata too. Before anything is written, onnxruntime runs the exported graph on inputs
drawn in the bank's input range and its output must equal ``predict_proba`` to ``TOLERANCE``.
Needs the ``onnx`` extra (onnx, onnxscript: torch's exporter; onnxruntime: that check).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn

from . import artifacts, signing
from .adapted import AdaptedModel
from .families.discriminative import DiscriminativeTask
from .io import atomic_write_bytes
from .protocol.service import ONNX_NAME, OnnxExport

KIND = "protofuse-onnx-export"  # what the signature names: never valid for another kind of file
MODEL_FILE, CONFIG_FILE, LABELS_FILE = "model.onnx", "config.pbtxt", "labels.txt"
INPUT, OUTPUT = "input", "proba"
EMBEDDING = "embedding"  # the encoder's output, the head's input
TOLERANCE = 1e-5  # onnxruntime against predict_proba, per probability
OPSET = 18


class ExportError(ValueError):
    """The model cannot be exported as asked (its family, a name, a check that failed)."""


class EncoderGraph(nn.Module):
    """The bank's encoder as one network: x (n, d) -> embedding (n, F). Every model adapted from
    one bank version shares it, so it is exported once per version (``encoder_onnx``). It holds a
    copy: torch's exporter swaps the parameters of the network it traces for fake tensors
    meanwhile, and the served bank's encoder is in use by other adaptations at that time."""

    def __init__(self, task: DiscriminativeTask) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(task.model.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (n, F)


def _discriminative(model: AdaptedModel) -> DiscriminativeTask:
    if not isinstance(model.task, DiscriminativeTask):
        raise ExportError(
            f"the {model.bank_meta.get('family')} family predicts by sampling its latent "
            "distribution; ONNX export covers the discriminative family (adapt a bank of that "
            'family: [model] family = "discriminative")'
        )
    return model.task


def encoder_onnx(model: AdaptedModel) -> bytes:
    """The ONNX graph of the model's encoder, x (n, d) -> EMBEDDING (n, F), by torch's exporter
    (about a second: the part of an export worth keeping per bank version)."""
    graph = EncoderGraph(_discriminative(model)).eval()
    example = torch.zeros(2, int(model.bank_meta["x_dim"]))
    # torch's exporter reports each stage on stdout and warns about optional libraries: quiet.
    with (
        torch.no_grad(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        _quiet("torch.onnx"),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=[INPUT],
            output_names=[EMBEDDING],
            dynamic_shapes=({0: torch.export.Dim("n", min=1)},),
            opset_version=OPSET,
            dynamo=True,
        )
    if program is None:  # only without dynamo=True
        raise ExportError("torch's ONNX exporter returned no program")
    return bytes(program.model_proto.SerializeToString())


def onnx_bytes(model: AdaptedModel, encoder: bytes | None = None) -> bytes:
    """The model's ONNX file: the encoder's graph (``encoder``, from ``encoder_onnx`` of a model
    of the same bank version, or exported now) followed by the task's head,
    ``softmax(t * (z P^T + b))``; its metadata holds the class names and the bank's version."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    head = _discriminative(model).head
    proto = onnx.load_model_from_string(encoder if encoder is not None else encoder_onnx(model))
    graph = proto.graph
    if [o.name for o in graph.output] != [EMBEDDING]:
        raise ExportError(f"the encoder's graph has outputs {[o.name for o in graph.output]}")
    prototypes = head.prototypes.detach().numpy().astype(np.float32)  # (K, F)
    k = prototypes.shape[0]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(prototypes.T), "head.prototypes_t"),
            numpy_helper.from_array(head.bias.detach().numpy().astype(np.float32), "head.bias"),
            numpy_helper.from_array(
                head.log_temp.detach().exp().numpy().astype(np.float32).reshape(()),
                "head.temperature",
            ),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("MatMul", [EMBEDDING, "head.prototypes_t"], ["head.scores"]),
            helper.make_node("Add", ["head.scores", "head.bias"], ["head.shifted"]),
            helper.make_node("Mul", ["head.shifted", "head.temperature"], ["head.logits"]),
            helper.make_node("Softmax", ["head.logits"], [OUTPUT], axis=-1),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["n", k]))
    for key, value in _metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return bytes(proto.SerializeToString())


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """The logger (and its children) says nothing below ERROR meanwhile."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _metadata(model: AdaptedModel) -> dict[str, str]:
    return {
        "classes": json.dumps(model.classes_.tolist()),
        "protofuse.bank_version": str(model.bank_meta.get("version", "")),
        "protofuse.family": str(model.bank_meta.get("family", "")),
    }


def check_parity(model: AdaptedModel, data: bytes, n: int = 64, seed: int = 0) -> float:
    """The largest difference between onnxruntime's output and ``predict_proba`` on ``n`` inputs
    drawn uniformly in the bank's input range ([0, 1] where it records none); ExportError above
    ``TOLERANCE``."""
    import onnxruntime as ort

    low, high = model.bank_meta.get("input_range") or (0.0, 1.0)
    x = np.random.default_rng(seed).uniform(low, high, (n, int(model.bank_meta["x_dim"])))
    x = x.astype(np.float32)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: x})[0]
    # Inputs inside the bank's range: no range warning (and no process-wide warnings filter, which
    # would race with the service's other threads).
    want = model.predict_proba(x)
    gap = float(np.max(np.abs(got.astype(np.float64) - want)))
    if not gap <= TOLERANCE:
        raise ExportError(
            f"the exported graph differs from predict_proba by {gap:.2e} (more than {TOLERANCE}); "
            "nothing was written"
        )
    return gap


def triton_config(name: str, x_dim: int, n_classes: int) -> bytes:
    """config.pbtxt: the onnxruntime backend, a dynamic batch, the class names for Triton's
    classification extension."""
    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        "max_batch_size: 0\n"
        f'input [ {{ name: "{INPUT}", data_type: TYPE_FP32, dims: [ -1, {x_dim} ] }} ]\n'
        f'output [ {{ name: "{OUTPUT}", data_type: TYPE_FP32, dims: [ -1, {n_classes} ], '
        f'label_filename: "{LABELS_FILE}" }} ]\n'
    ).encode()


@dataclass(frozen=True)
class Exported:
    folder: Path  # the version folder: REPO/NAME/VERSION
    parity: float  # the largest gap between onnxruntime and predict_proba measured before writing


def missing_libraries() -> list[str]:
    """The libraries of the onnx extra that are not installed (an export needs all three)."""
    return [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def check_name(name: str, version: int) -> None:
    """ExportError unless ``name`` is a folder name every server accepts and ``version`` a whole
    number from 1 (checked before any work)."""
    if not isinstance(name, str) or not ONNX_NAME.fullmatch(name):
        raise ExportError(
            f"--name {name!r}: use letters, digits, '_', '.' and '-' (at most 128, starting with "
            "a letter or digit): it becomes a folder and the name servers know the model by"
        )
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 2**31 - 1:
        raise ExportError(f"--model-version {version!r}: give a whole number from 1")


def export_files(
    model: AdaptedModel,
    name: str,
    version: int = 1,
    signing_key: Ed25519PrivateKey | None = None,
    encoder: bytes | None = None,
) -> OnnxExport:
    """``model`` as an exported version, checked against ``predict_proba`` (``check_parity``)
    and signed with ``signing_key`` if given. ``encoder``: ``encoder_onnx`` of the bank version
    the model was adapted from, if the caller keeps it."""
    check_name(name, version)
    bad = [c for c in model.classes_.tolist() if "\n" in c or "\r" in c]
    if bad:
        raise ExportError(
            f"class names {bad[:3]} hold a line break, which labels.txt cannot keep; adapt the "
            "model with class names of one line"
        )
    data = onnx_bytes(model, encoder)
    parity = check_parity(model, data)
    labels = "".join(f"{c}\n" for c in model.classes_.tolist()).encode()
    config = triton_config(name, int(model.bank_meta["x_dim"]), len(model.classes_))
    files = OnnxExport(name, int(version), data, labels, config, parity=parity)
    if signing_key is None:
        return files
    signature = signing.sign(KIND, files_digest(files), signing_key)
    return dataclasses.replace(files, signature=signature)


def export_onnx(
    model: AdaptedModel,
    repository: str | os.PathLike,
    name: str,
    version: int = 1,
    signing_key: Ed25519PrivateKey | None = None,
) -> Exported:
    """Write ``model`` into the model repository as ``name``, version ``version``. The graph
    is checked against ``predict_proba`` first (``check_parity``). A model of that name with other
    classes or another input size is refused (one labels.txt and config.pbtxt serve all its
    versions); an existing version is replaced."""
    check_name(name, version)
    files = export_files(model, name, int(version), signing_key)
    return Exported(write_export(repository, files), files.parity)


def write_export(repository: str | os.PathLike, files: OnnxExport) -> Path:
    """Write an exported version into the repository; returns its version folder. A model of
    that name with other labels or configuration is refused (one labels.txt and config.pbtxt serve
    all its versions); an existing version is replaced."""
    check_name(files.name, files.version)
    folder = Path(repository) / files.name
    for file, content in ((LABELS_FILE, files.labels), (CONFIG_FILE, files.config)):
        existing = artifacts.read_plain_file(
            folder / file, artifacts.MAX_META_BYTES, "MAX_META_BYTES"
        )
        if existing is not None and existing != content:
            raise ExportError(
                f"{folder / file} describes another model (other classes or input size); export "
                "this one under another --name"
            )
    target = folder / str(files.version)
    for path in (folder, target):
        if path.is_symlink():
            raise ExportError(f"{path}: a link; export into plain folders only")
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / LABELS_FILE, files.labels)
    atomic_write_bytes(folder / CONFIG_FILE, files.config)
    atomic_write_bytes(target / MODEL_FILE, files.model)
    signature = target / signing.SIGNATURE
    if files.signature:
        atomic_write_bytes(signature, files.signature)
    elif signature.exists():  # an older version's signature would not cover this file
        signature.unlink()
    return target


def verify_export_files(
    files: OnnxExport, public_key: str | os.PathLike | Ed25519PublicKey, source: str
) -> dict[str, Any]:
    """Check the signature of an exported version held as bytes (SignatureError if unsigned,
    signed by another key, or made for other files, name or version)."""
    record = files.signature or None
    return signing.verify(
        KIND, files_digest(files), record, signing.load_public_key(public_key), source
    )


def digest(version_folder: str | os.PathLike) -> str:
    """The SHA-256 a signature covers (``digest_of``), of an exported version's folder. The
    folders must be folders, not links."""
    folder = Path(version_folder)
    for path in (folder, folder.parent):
        if path.is_symlink() or not path.is_dir():
            raise ExportError(f"{path}: not a folder (a link, or missing); refused")
    return digest_of(
        folder.parent.name,
        folder.name,
        _read(folder / MODEL_FILE),
        _read(folder.parent / LABELS_FILE),
        _read(folder.parent / CONFIG_FILE),
    )


def files_digest(files: OnnxExport) -> str:
    """``digest_of`` an exported version held as bytes."""
    return digest_of(files.name, files.version, files.model, files.labels, files.config)


def digest_of(name: str, version: int | str, model: bytes, labels: bytes, config: bytes) -> str:
    """The SHA-256 a signature covers: the model's name and version (its folders' names: a signed
    version copied under another number, or under another name, no longer verifies) and the
    model file, the labels and the configuration."""
    signed: dict[str, str] = {
        MODEL_FILE: hashlib.sha256(model).hexdigest(),
        LABELS_FILE: hashlib.sha256(labels).hexdigest(),
        CONFIG_FILE: hashlib.sha256(config).hexdigest(),
        "name": name,
        "version": str(version),
    }
    return hashlib.sha256(json.dumps(signed, sort_keys=True).encode()).hexdigest()


def _read(path: Path) -> bytes:
    """A file of the export, read as an artifact's are (a plain file within the weights' limit,
    never through a link or a pipe); a missing one is an ExportError naming it."""
    data = artifacts.read_plain_file(path, artifacts.MAX_WEIGHTS_BYTES, "MAX_WEIGHTS_BYTES")
    if data is None:
        raise ExportError(f"{path}: missing; export the model again")
    return data


def verify_export(
    version_folder: str | os.PathLike, public_key: str | os.PathLike | Ed25519PublicKey
) -> dict[str, Any]:
    """Check an exported version's signature.json against the trusted key (SignatureError if
    unsigned, signed by another key, changed since, or moved to another name or version);
    returns the signature record. It vouches for the files as they were read here: a server
    that loads them later must not let anyone change them in between."""
    folder = Path(version_folder)
    record = artifacts.read_plain_file(
        folder / signing.SIGNATURE, artifacts.MAX_SIGNATURE_BYTES, "MAX_SIGNATURE_BYTES"
    )
    return signing.verify(KIND, digest(folder), record, signing.load_public_key(public_key), folder)
