"""On-disk artifacts: a folder with ``weights.npz`` (plain arrays, no pickle) and ``meta.json``.

``meta.json`` carries the artifact kind, a format version and the SHA-256 of ``weights.npz``;
loading checks all three, so a tampered, truncated or mismatched artifact fails with a clear
error instead of a wrong model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
WEIGHTS = "weights.npz"
META = "meta.json"


class ArtifactError(ValueError):
    """An artifact on disk is missing, of the wrong kind or version, or fails its checksum."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """Write an artifact folder atomically (temporary files, then rename); returns the weights' SHA-256."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    data = buffer.getvalue()
    digest = sha256(data)
    record = {"kind": kind, "format_version": FORMAT_VERSION, "weights_sha256": digest, **meta}
    _atomic_write(folder / WEIGHTS, data)
    _atomic_write(folder / META, json.dumps(record, indent=2, sort_keys=True).encode())
    return digest


def load(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify an artifact folder written by :func:`save` for the given kind."""
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such {kind} folder (expected {META} and {WEIGHTS} inside)")
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{folder}: missing {META}; is this a protofuse {kind}?") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{folder / META}: not valid JSON ({err})") from None
    if meta.get("kind") != kind:
        raise ArtifactError(f"{folder}: holds a {meta.get('kind')!r} artifact, expected a {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder}: format version {meta.get('format_version')!r}, this protofuse reads version {FORMAT_VERSION}; re-create it with this version")
    try:
        data = (folder / WEIGHTS).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{folder}: missing {WEIGHTS}") from None
    if sha256(data) != meta.get("weights_sha256"):
        raise ArtifactError(f"{folder / WEIGHTS}: checksum mismatch with {META}; the file was modified or truncated")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, meta


def _atomic_write(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
