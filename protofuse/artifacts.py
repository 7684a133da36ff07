"""On-disk artifacts: a folder with ``weights.npz`` (plain arrays, no pickle) and ``meta.json``.

``meta.json`` carries the artifact kind, a format version and a SHA-256 over ``weights.npz`` and
every other field of ``meta.json`` (label names and configuration included); loading checks all
three, so a corrupted, truncated or mismatched artifact fails with a clear error instead of
becoming a wrong model. The checksum detects accidents, not an attacker: whoever can rewrite the
files can rewrite the checksum too (signed artifacts are what stops that). Writes are atomic per
folder: a crash leaves the old artifact or the new.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
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


def checksum(weights: bytes, meta: dict[str, Any]) -> str:
    """SHA-256 of the weights' bytes followed by the canonical JSON of the other meta fields."""
    fields = {k: v for k, v in meta.items() if k != "sha256"}
    return sha256(weights + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())


def save(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """Write an artifact folder atomically; returns its SHA-256 (weights and meta together)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{folder} is a file; give a folder path for the {kind}")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    data = buffer.getvalue()
    record = {"kind": kind, "format_version": FORMAT_VERSION, **meta}
    record = json.loads(json.dumps(record))  # what load will read back (tuples become lists)
    record["sha256"] = checksum(data, record)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.new-"))
    try:
        (staging / WEIGHTS).write_bytes(data)
        (staging / META).write_text(json.dumps(record, indent=2, sort_keys=True))
        _fsync_folder(staging)
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an artifact is shared like any folder
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record["sha256"]


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
    if checksum(data, meta) != meta.get("sha256"):
        raise ArtifactError(f"{folder}: checksum mismatch between {WEIGHTS} and {META}; a file was modified or truncated, re-create the {kind}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as err:  # object arrays need pickle, which is never run on loaded data
        raise ArtifactError(f"{folder / WEIGHTS}: holds something other than plain arrays ({err}); refused, re-create the {kind}") from None
    return arrays, meta


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace ``folder`` by ``staging``; the old one is moved aside first, then removed."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
        os.replace(folder, old / folder.name)
    os.replace(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb+") as f:
            os.fsync(f.fileno())


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
