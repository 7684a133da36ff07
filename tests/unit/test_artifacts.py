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
