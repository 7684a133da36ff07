"""Ed25519 signatures over artifacts: who made an adapted model, and that nobody changed it since.

The signature covers the artifact's SHA-256 (which itself covers the weights and every metadata
field) and its kind, behind a fixed context string, so a signature can never be replayed onto a
different artifact or a different kind of file. It travels as ``signature.json`` beside
``meta.json``: ``{"algorithm": "ed25519", "key_id": ..., "sha256": ..., "signature": base64}``.
``key_id`` is the first 16 hex digits of the SHA-256 of the raw public key: it names the key in
error messages; trust comes only from the key the verifier was given.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE = "signature.json"
ALGORITHM = "ed25519"
_CONTEXT = b"protofuse artifact signature v1\n"


class SignatureError(ValueError):
    """An artifact is unsigned, signed by another key, or was changed after signing."""


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    key = _load(path, serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"{path}: not an Ed25519 private key (use the signing.key made by `protofuse certs "
            "init`)"
        )
    return key


def load_public_key(key: str | os.PathLike | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """A public key object from itself, PEM bytes, or a PEM file path."""
    if isinstance(key, Ed25519PublicKey):
        return key
    loaded = (
        _load(key, serialization.load_pem_public_key)
        if not isinstance(key, bytes)
        else _parse(key, serialization.load_pem_public_key, "public key")
    )
    if not isinstance(loaded, Ed25519PublicKey):
        raise SignatureError(
            f"{key if not isinstance(key, bytes) else 'the public key'}: not an Ed25519 public key "
            "(use the signing.pub made by `protofuse certs init`)"
        )
    return loaded


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(kind: str, sha256: str, key: Ed25519PrivateKey) -> bytes:
    """The ``signature.json`` bytes for an artifact of this kind and checksum."""
    record = {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "sha256": sha256,
        "signature": base64.b64encode(key.sign(_message(kind, sha256))).decode(),
    }
    return json.dumps(record, indent=2, sort_keys=True).encode()


def verify(
    kind: str, sha256: str, signature_json: bytes | None, public_key: Ed25519PublicKey, source: Any
) -> dict[str, Any]:
    """Check ``signature.json`` against the artifact's checksum and the trusted key; returns the
    record."""
    if signature_json is None:
        raise SignatureError(
            f"{source}: unsigned ({SIGNATURE} missing); get the model from the adaptation service, "
            "or load it with unsigned_ok=True if you made it yourself"
        )
    try:
        record = json.loads(signature_json)
        signature = base64.b64decode(record["signature"], validate=True)
        algorithm, signed_sha = record["algorithm"], record["sha256"]
    except (
        ValueError,  # bad JSON or UTF-8, 5,000-digit integers, bad or non-ASCII base64
        RecursionError,
        KeyError,
        TypeError,
    ) as err:
        raise SignatureError(f"{source}: {SIGNATURE} is malformed ({err!r}); refused") from None
    if algorithm != ALGORITHM:
        raise SignatureError(
            f"{source}: signed with {algorithm!r}, expected {ALGORITHM!r}; refused"
        )
    if signed_sha != sha256:
        raise SignatureError(
            f"{source}: the signature is for another artifact (checksum {str(signed_sha)[:16]}..., "
            f"this one is {sha256[:16]}...); refused"
        )
    try:
        public_key.verify(signature, _message(kind, sha256))
    except InvalidSignature:
        raise SignatureError(
            f"{source}: signature does not verify with key {key_id(public_key)} (signed by key "
            f"{record.get('key_id')!r}); the artifact was altered or comes from another server: "
            "refused"
        ) from None
    return record


def _message(kind: str, sha256: str) -> bytes:
    return _CONTEXT + kind.encode() + b"\n" + sha256.encode()


def _load(path: str | os.PathLike, parse, **kwargs: Any):
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SignatureError(f"{path}: cannot read the key ({err.strerror})") from None
    return _parse(data, parse, str(path), **kwargs)


def _parse(data: bytes, parse, source: str, **kwargs: Any):
    try:
        return parse(data, **kwargs)
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{source}: not a PEM key ({err})") from None
