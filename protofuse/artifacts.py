"""On-disk artifacts: a folder with ``weights.npz`` (plain arrays, no pickle) and ``meta.json``.

``meta.json`` carries the artifact kind, a format version and a SHA-256 over ``weights.npz`` and
every other field of ``meta.json`` (label names and configuration included); loading checks all
three, so a corrupted, truncated or mismatched artifact fails with a clear error instead of
becoming a wrong model. The checksum detects accidents, not an attacker: whoever can rewrite the
files can rewrite the checksum too. A signed artifact adds ``signature.json`` (Ed25519 over the
checksum, see :mod:`protofuse.signing`): that is what stops an attacker. Writes are atomic per
folder (:func:`protofuse.io.replace_folder`): a crash leaves the old artifact or the new. The same
files travel over the wire. ``npz_bytes`` (from :mod:`protofuse.io`) stays importable from here:
the adaptation service and its client rebuild the same bytes to leave out weights a caller holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import signing
from .io import npz_bytes, replace_folder

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


def npz_arrays(data: bytes, source: Any = "weights.npz") -> dict[str, np.ndarray]:
    """The arrays of ``.npz`` bytes, in file order; never runs pickle."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as err:  # object arrays need pickle, which is never run on loaded data
        raise ArtifactError(
            f"{source}: holds something other than plain arrays ({err}); refused"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ArtifactError(f"{source}: not a readable .npz ({err})") from None


def encode(
    kind: str,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    signing_key: Ed25519PrivateKey | None = None,
) -> dict[str, bytes]:
    """An artifact as its files' bytes: ``weights.npz``, ``meta.json`` and, when signed,
    ``signature.json``."""
    data = npz_bytes(arrays)
    record = {"kind": kind, "format_version": FORMAT_VERSION, **meta}
    record = json.loads(json.dumps(record))  # what load will read back (tuples become lists)
    record["sha256"] = checksum(data, record)
    files = {WEIGHTS: data, META: json.dumps(record, indent=2, sort_keys=True).encode()}
    if signing_key is not None:
        files[signing.SIGNATURE] = signing.sign(kind, record["sha256"], signing_key)
    return files


def decode(
    files: dict[str, bytes], kind: str, source: Any, public_key: Ed25519PublicKey | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Verify an artifact's files (kind, version, checksum; the signature when a key is given) and
    parse them."""
    if META not in files:
        raise ArtifactError(f"{source}: missing {META}; is this a protofuse {kind}?")
    try:
        meta = json.loads(files[META])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ArtifactError(f"{source}: {META} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise ArtifactError(
            f"{source}: holds a {meta.get('kind') if isinstance(meta, dict) else None!r} artifact, "
            f"expected a {kind!r}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{source}: format version {meta.get('format_version')!r}, this protofuse reads "
            f"version {FORMAT_VERSION}; re-create it with this version"
        )
    if WEIGHTS not in files:
        raise ArtifactError(f"{source}: missing {WEIGHTS}")
    data = files[WEIGHTS]
    if checksum(data, meta) != meta.get("sha256"):
        raise ArtifactError(
            f"{source}: checksum mismatch between {WEIGHTS} and {META}; a file was modified or "
            f"truncated, re-create the {kind}"
        )
    if public_key is not None:
        signing.verify(kind, meta["sha256"], files.get(signing.SIGNATURE), public_key, source)
    return npz_arrays(data, f"{source}: {WEIGHTS}"), meta


def save(
    path: str | os.PathLike,
    kind: str,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    signing_key: Ed25519PrivateKey | None = None,
) -> str:
    """Write an artifact folder atomically (signed when a key is given); returns its SHA-256."""
    files = encode(kind, arrays, meta, signing_key)
    write(path, files, kind)
    return json.loads(files[META])["sha256"]


def write(path: str | os.PathLike, files: dict[str, bytes], kind: str = "artifact") -> None:
    """Write an artifact's files as one folder, atomically: a crash leaves the old folder or the
    new."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{folder} is a file; give a folder path for the {kind}")
    unknown = set(files) - {WEIGHTS, META, signing.SIGNATURE}
    if unknown:
        raise ArtifactError(f"unexpected artifact files {sorted(unknown)}")
    replace_folder(folder, files)


def read(path: str | os.PathLike, kind: str) -> dict[str, bytes]:
    """An artifact folder's files (those present of weights, meta and signature)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(
            f"{folder}: no such {kind} folder (expected {META} and {WEIGHTS} inside)"
        )
    return {
        name: (folder / name).read_bytes()
        for name in (WEIGHTS, META, signing.SIGNATURE)
        if (folder / name).exists()
    }


def load(
    path: str | os.PathLike, kind: str, public_key: Ed25519PublicKey | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify an artifact folder written by :func:`save` for the given kind."""
    return decode(read(path, kind), kind, Path(path), public_key)
