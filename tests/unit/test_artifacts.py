"""The artifact folder format: canonical checksum, plain arrays only, atomic writes."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from protofuse import artifacts
from protofuse.artifacts import ArtifactError


def test_checksum_is_the_sha256_of_the_weights_and_the_canonical_meta():
    """Anyone can verify an artifact without protofuse: SHA-256 over the bytes of weights.npz
    followed by the meta fields (all but sha256) as compact JSON with sorted keys."""
    weights = b"\x00\x01weights"
    meta = {"kind": "k", "b": [1, 2], "a": {"y": 1, "x": "é"}, "sha256": "ignored"}
    canonical = b'{"a":{"x":"\\u00e9","y":1},"b":[1,2],"kind":"k"}'
    assert artifacts.checksum(weights, meta) == hashlib.sha256(weights + canonical).hexdigest()
    reordered = {"sha256": "other", "a": {"x": "é", "y": 1}, "kind": "k", "b": [1, 2]}
    assert artifacts.checksum(weights, reordered) == artifacts.checksum(weights, meta)


def test_save_and_load_round_trip_into_a_new_nested_folder(tmp_path):
    arrays = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, 2], dtype=np.int64),
    }
    digest = artifacts.save(tmp_path / "a" / "b" / "thing", "kind-x", arrays, {"note": (1, 2)})
    loaded, meta = artifacts.load(tmp_path / "a" / "b" / "thing", "kind-x")
    assert (
        meta["sha256"] == digest
        and meta["note"] == [1, 2]
        and meta["format_version"] == artifacts.FORMAT_VERSION
    )
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k], v)
        assert loaded[k].dtype == v.dtype
    on_disk = json.loads((tmp_path / "a" / "b" / "thing" / artifacts.META).read_text())
    assert on_disk == meta


def test_pickled_objects_inside_the_weights_are_refused_even_with_a_valid_checksum(tmp_path):
    folder = tmp_path / "evil"
    artifacts.save(folder, "kind-x", {"w": np.zeros(2)}, {})
    buffer = io.BytesIO()
    np.savez(buffer, w=np.array([{"payload": 1}], dtype=object))  # an object array: pickle inside
    data = buffer.getvalue()
    meta = json.loads((folder / artifacts.META).read_text())
    meta["sha256"] = artifacts.checksum(data, meta)
    (folder / artifacts.WEIGHTS).write_bytes(data)
    (folder / artifacts.META).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="other than plain arrays"):
        artifacts.load(folder, "kind-x")


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        artifacts.save(tmp_path / "taken", "kind-x", {}, {})
    with pytest.raises(ArtifactError, match="no such kind-x folder"):
        artifacts.load(tmp_path / "taken", "kind-x")


def test_missing_or_garbled_parts_are_named(tmp_path):
    folder = tmp_path / "art"
    artifacts.save(folder, "kind-x", {"w": np.zeros(2)}, {})
    (folder / artifacts.WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match=r"missing weights\.npz"):
        artifacts.load(folder, "kind-x")
    (folder / artifacts.META).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifacts.load(folder, "kind-x")
    (folder / artifacts.META).unlink()
    with pytest.raises(ArtifactError, match=r"missing meta\.json"):
        artifacts.load(folder, "kind-x")


def _rewrite(folder, *, weights: bytes | None = None, edit=None) -> None:
    """Rewrite an artifact's files in place, keeping its checksum valid."""
    meta = json.loads((folder / artifacts.META).read_text())
    data = weights if weights is not None else (folder / artifacts.WEIGHTS).read_bytes()
    if edit is not None:
        edit(meta)
    meta["sha256"] = artifacts.checksum(data, meta)
    (folder / artifacts.WEIGHTS).write_bytes(data)
    (folder / artifacts.META).write_text(json.dumps(meta))


def _object_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, w=np.array([{"payload": 1}], dtype=object))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "corrupt, says",
    [
        (lambda f: (f / artifacts.META).write_text("[1, 2]"), "holds a None artifact"),
        (lambda f: _rewrite(f, edit=lambda m: m.update(kind="other")), "holds a 'other' artifact"),
        (lambda f: (f / artifacts.WEIGHTS).write_bytes(b"PK\x03\x04junk"), "checksum mismatch"),
        (lambda f: _rewrite(f, weights=_object_npz()), "weights.npz: holds something other"),
        (lambda f: _rewrite(f, weights=b"PK\x03\x04junk"), "weights.npz: not a readable .npz"),
    ],
)
def test_every_refusal_names_the_folder_it_read(tmp_path, corrupt, says):
    """The user must learn which of their folders is damaged, whatever the damage."""
    folder = tmp_path / "named-folder"
    artifacts.save(folder, "kind-x", {"w": np.zeros(2)}, {})
    corrupt(folder)
    with pytest.raises(ArtifactError) as err:
        artifacts.load(folder, "kind-x")
    assert str(err.value).startswith(f"{folder}: ") and says in str(err.value), str(err.value)


def test_a_bad_signature_names_the_folder(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protofuse import signing

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    folder = tmp_path / "signed"
    artifacts.save(folder, "kind-x", {"w": np.zeros(2)}, {}, signing_key=key)
    with pytest.raises(signing.SignatureError) as err:
        artifacts.load(folder, "kind-x", other.public_key())
    assert str(err.value).startswith(f"{folder}: ")


def test_unexpected_files_are_named_when_writing(tmp_path):
    with pytest.raises(ArtifactError, match=r"unexpected artifact files \['evil\.sh', 'x'\]"):
        artifacts.write(tmp_path / "a", {artifacts.META: b"{}", "x": b"", "evil.sh": b""})
    assert not (tmp_path / "a").exists()
