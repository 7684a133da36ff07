"""The artifact folder format: canonical checksum, plain arrays only, atomic writes."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# -- hostile files (issue 17): refused before they are read into memory -----------------------


def _saved(tmp_path, arrays=None, **kwargs):
    folder = tmp_path / "art"
    artifacts.save(folder, "kind-x", arrays or {"w": np.arange(4, dtype=np.float32)}, {}, **kwargs)
    return folder


def _npz_with_header(shape, dtype="<f4", data=b"", compress=False) -> bytes:
    """A one-member .npz whose .npy header declares ``shape`` and holds only ``data``."""
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, dtype=dtype))
    header["shape"] = shape
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, header)
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", method) as zf:
        zf.writestr("w.npy", npy.getvalue() + data)
    return buffer.getvalue()


def test_a_symlink_to_dev_zero_is_refused_without_reading_it(tmp_path):
    """The red team's file: weights.npz -> /dev/zero ran the loader out of memory."""
    folder = _saved(tmp_path)
    (folder / artifacts.WEIGHTS).unlink()
    (folder / artifacts.WEIGHTS).symlink_to("/dev/zero")
    with pytest.raises(ArtifactError, match=r"weights\.npz: is a symbolic link, not a regular"):
        artifacts.load(folder, "kind-x")


def test_a_symlink_to_a_genuine_file_is_refused_too_but_a_linked_folder_loads(tmp_path):
    folder = _saved(tmp_path)
    real = tmp_path / "elsewhere.json"
    (folder / artifacts.META).rename(real)
    (folder / artifacts.META).symlink_to(real)
    with pytest.raises(ArtifactError, match=r"meta\.json: is a symbolic link"):
        artifacts.load(folder, "kind-x")
    (folder / artifacts.META).unlink()
    real.rename(folder / artifacts.META)
    (tmp_path / "latest").symlink_to(folder, target_is_directory=True)  # runs/latest -> runs/...
    arrays, _ = artifacts.load(tmp_path / "latest", "kind-x")
    np.testing.assert_array_equal(arrays["w"], np.arange(4, dtype=np.float32))


def test_a_named_pipe_is_refused_at_once_instead_of_hanging_the_loader(tmp_path):
    import os
    import signal

    from protofuse import signing

    def hung(*_):
        raise AssertionError("the loader blocked on the pipe")

    folder = _saved(tmp_path)
    os.mkfifo(folder / signing.SIGNATURE)  # nobody ever writes to it
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(ArtifactError, match=r"signature\.json: is a named pipe"):
            artifacts.load(folder, "kind-x")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_folder_where_a_file_should_be_is_refused_by_name(tmp_path):
    folder = _saved(tmp_path)
    (folder / artifacts.WEIGHTS).unlink()
    (folder / artifacts.WEIGHTS).mkdir()
    with pytest.raises(ArtifactError, match=r"weights\.npz: is a folder"):
        artifacts.load(folder, "kind-x")


def test_files_over_their_size_limit_are_refused_before_they_are_read(tmp_path, monkeypatch):
    folder = _saved(tmp_path, {"w": np.zeros(1000, dtype=np.float32)})
    monkeypatch.setattr(artifacts, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(ArtifactError, match=r"weights\.npz: .*more than the 1000 bytes limit"):
        artifacts.load(folder, "kind-x")
    # the caller's own limit wins over the module's
    arrays, _ = artifacts.load(folder, "kind-x", max_weights_bytes=10_000)
    assert arrays["w"].shape == (1000,)
    monkeypatch.setattr(artifacts, "MAX_META_BYTES", 10)
    with pytest.raises(ArtifactError, match=r"meta\.json: .*MAX_META_BYTES"):
        artifacts.load(folder, "kind-x", max_weights_bytes=10_000)


def test_a_tiny_npz_declaring_a_huge_array_is_refused_before_allocating(tmp_path):
    """236 bytes declaring terabytes raised MemoryError; now the header is checked first, and a
    valid checksum does not help."""
    folder = _saved(tmp_path)
    forged = _npz_with_header((1 << 20, 1 << 20))
    assert len(forged) < 400
    _rewrite(folder, weights=forged)
    with pytest.raises(ArtifactError, match="refused before allocating"):
        artifacts.load(folder, "kind-x")


def test_a_header_that_disagrees_with_its_data_is_refused(tmp_path):
    folder = _saved(tmp_path)
    _rewrite(folder, weights=_npz_with_header((10,), data=b"\x00" * 12))  # 10 floats need 40
    with pytest.raises(ArtifactError, match="declares 40 bytes of data but holds 12"):
        artifacts.load(folder, "kind-x")


def test_a_deflate_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "SMALL_MEMBER_BYTES", 1 << 10)
    bomb = _npz_with_header((1 << 20,), dtype="|u1", data=b"\x00" * (1 << 20), compress=True)
    assert len(bomb) < 10_000  # a megabyte of zeros in a few KB
    folder = _saved(tmp_path)
    _rewrite(folder, weights=bomb)
    with pytest.raises(ArtifactError, match="a deflate bomb"):
        artifacts.load(folder, "kind-x")


def test_a_signature_is_checked_before_any_array_is_built(tmp_path):
    """With a key, a forged weights file fails on the signature, never on what it declares."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protofuse import signing

    key = Ed25519PrivateKey.generate()
    folder = _saved(tmp_path, signing_key=key)
    _rewrite(folder, weights=_npz_with_header((1 << 20, 1 << 20)))  # checksum fine, signature not
    with pytest.raises(signing.SignatureError):
        artifacts.load(folder, "kind-x", key.public_key())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays_are_never_written_nor_loaded(tmp_path, bad):
    arrays = {"ok": np.zeros(3, dtype=np.float32), "w": np.array([1.0, bad, 2.0])}
    with pytest.raises(ArtifactError, match=r"w: 1 of 3 values are NaN or infinite; .*nothing"):
        artifacts.save(tmp_path / "never", "kind-x", arrays, {})
    assert not (tmp_path / "never").exists()
    folder = _saved(tmp_path)
    _rewrite(folder, weights=artifacts.npz_bytes(arrays))  # written by hand, checksum valid
    with pytest.raises(ArtifactError, match=r"weights\.npz: w: 1 of 3 values are NaN"):
        artifacts.load(folder, "kind-x")


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda m: m.update(sha256="not-hex"), "sha256"),
        (lambda m: m.update(format_version="1"), "format version '1'"),
        (lambda m: m.update(deep=json.loads("[" * 100 + "]" * 100)), "nests deeper than 64"),
    ],
)
def test_meta_json_is_held_to_its_schema(tmp_path, edit, says):
    folder = _saved(tmp_path)
    meta = json.loads((folder / artifacts.META).read_text())
    edit(meta)
    (folder / artifacts.META).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=says):
        artifacts.load(folder, "kind-x")


def test_too_many_zip_entries_are_refused_before_zipfile_parses_them(tmp_path):
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(artifacts.MAX_NPZ_MEMBERS + 1):
            zf.writestr(f"a{i}.npy", b"")
    with pytest.raises(ArtifactError, match="more than 10000 zip entries"):
        artifacts.npz_arrays(buffer.getvalue())


def _valid_npz() -> bytes:
    return artifacts.npz_bytes(
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, dtype=np.int64)}
    )


@given(data=st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_any_bytes_as_weights_give_arrays_or_an_artifact_error(data):
    try:
        arrays = artifacts.npz_arrays(data)
    except ArtifactError:
        return
    assert all(isinstance(a, np.ndarray) for a in arrays.values())


@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(_valid_npz()) - 1), st.integers(0, 255)), max_size=8
    ),
    cut=st.integers(0, len(_valid_npz())),
)
@settings(max_examples=500, deadline=None)
def test_a_mutated_npz_gives_its_arrays_or_an_artifact_error(flips, cut):
    """Byte flips and truncations of a real file: the header fields, sizes and CRCs all get hit."""
    data = bytearray(_valid_npz())
    for at, value in flips:
        data[at] = value
    try:
        arrays = artifacts.npz_arrays(bytes(data[:cut] if cut else data))
    except ArtifactError:
        return
    assert sum(a.nbytes for a in arrays.values()) <= artifacts.MAX_WEIGHTS_BYTES


def _patch_zip(data: bytes, *, flags: int = 0, name: bytes | None = None) -> bytes:
    """A one-member zip with extra general-purpose flag bits and, optionally, another name of the
    same length, in both its local header and its central directory entry."""
    import struct

    out = bytearray(data)
    for signature, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        at = out.index(signature)
        (old,) = struct.unpack_from("<H", out, at + flag_at)
        struct.pack_into("<H", out, at + flag_at, old | flags)
        if name is not None:
            out[at + name_at : at + name_at + len(name)] = name
    return bytes(out)


@pytest.mark.parametrize(
    "flags, name, says",
    [
        (0x40, None, "is encrypted"),  # zipfile raises NotImplementedError for strong encryption
        (0x800, b"\xa8.npy", "not a readable .npz"),  # a name flagged UTF-8 that is not
    ],
)
def test_zip_features_zipfile_lacks_are_refused_as_artifact_errors(flags, name, says):
    """Both found by `make fuzz` (atheris): they escaped as NotImplementedError and
    UnicodeDecodeError."""
    data = _patch_zip(artifacts.npz_bytes({"w": np.zeros(2)}), flags=flags, name=name)
    with pytest.raises(ArtifactError, match=says):
        artifacts.npz_arrays(data)


def _raw_npy(descr: str, shape: tuple[int, ...], data: bytes = b"") -> bytes:
    """A .npy member whose header says exactly ``descr`` and ``shape`` (numpy's writer would
    refuse some of these)."""
    import struct

    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def _zip(members: list[tuple[str, bytes]], deflate: bool = False) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "descr, shape",
    [
        ("<U0", (1 << 27,)),  # zero bytes declared, numpy allocates <U1: 2 GiB from 1 KB
        (">f4", (2,)),  # big-endian: torch cannot read it
        ([("w", "<f4")], (2,)),  # a record
        (("<f4", (2,)), (2,)),  # a sub-array
        ("<M8[s]", (2,)),  # dates
        ("<f16", (2,)),  # long double
        ("<c8", (2,)),  # complex
    ],
)
def test_only_the_dtypes_a_model_uses_are_read(descr, shape):
    """Found by an attacker's review: dtypes numpy reads and torch does not, or that take memory
    the size check never counted."""
    with pytest.raises(ArtifactError, match="dtype"):
        artifacts.npz_arrays(_zip([("w.npy", _raw_npy(descr, shape))]))


@pytest.mark.parametrize("shape", [(2**64, 0), (2**63 - 1, 0), (0,) * 70])
def test_absurd_shapes_holding_no_element_are_refused_as_artifact_errors(shape):
    with pytest.raises(ArtifactError, match="shape"):
        artifacts.npz_arrays(_zip([("w.npy", _raw_npy("<f4", shape))]))


def test_many_small_deflated_members_cannot_add_up_to_a_bomb():
    """Each member under SMALL_MEMBER_BYTES escaped the ratio check; their total did not."""
    member = _raw_npy("|u1", (1 << 19,), b"\x00" * (1 << 19))  # each under the threshold
    assert len(member) < artifacts.SMALL_MEMBER_BYTES
    bomb = _zip([(f"a{i}.npy", member) for i in range(240)], deflate=True)
    assert len(bomb) < 200_000  # 120 MiB of arrays
    with pytest.raises(ArtifactError, match=r"members would inflate to 120\.0 MiB"):
        artifacts.npz_arrays(bomb)


def test_a_member_declaring_more_than_the_limit_is_refused_even_when_deflated_small():
    """1,000 float32 zeros deflate to a few bytes: the declared size (count x itemsize), not
    the file's, is held to the limit."""
    data = _zip([("w.npy", _raw_npy("<f4", (1000,), b"\x00" * 4000))], deflate=True)
    assert len(data) < 1000
    with pytest.raises(ArtifactError, match="refused before allocating"):
        artifacts.npz_arrays(data, max_weights_bytes=1000)
    assert artifacts.npz_arrays(data, max_weights_bytes=4000)["w"].shape == (1000,)


def test_small_members_that_compress_well_load():
    """An all-zero bias deflates far beyond the ratio limit: small members are exempt."""
    data = _zip([("b.npy", _raw_npy("<f4", (10_000,), b"\x00" * 40_000))], deflate=True)
    assert 40_000 / len(data) > artifacts.MAX_COMPRESSION_RATIO
    np.testing.assert_array_equal(artifacts.npz_arrays(data)["b"], np.zeros(10_000, np.float32))


def test_npy_format_2_and_fortran_order_members_load_as_numpy_wrote_them():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    for version, a in (((2, 0), array), ((1, 0), np.asfortranarray(array))):
        npy = io.BytesIO()
        np.lib.format.write_array(npy, a, version=version)
        got = artifacts.npz_arrays(_zip([("w.npy", npy.getvalue())]))["w"]
        np.testing.assert_array_equal(got, array)


def test_a_nan_in_the_first_value_is_found():
    for at in (0, -1):
        arrays = {"w": np.ones(10)}
        arrays["w"][at] = np.nan
        with pytest.raises(ArtifactError, match="1 of 10 values"):
            artifacts.encode("kind-x", arrays, {})


def test_meta_json_nesting_is_refused_only_past_its_limit(tmp_path):
    """meta.json itself is one level: a field nested 63 more levels deep is the most allowed."""
    for extra, refused in ((artifacts.MAX_JSON_DEPTH - 1, False), (artifacts.MAX_JSON_DEPTH, True)):
        folder = _saved(tmp_path / str(extra))
        meta = json.loads((folder / artifacts.META).read_text())
        meta["deep"] = json.loads("[" * extra + "]" * extra)
        (folder / artifacts.META).write_text(json.dumps(meta))
        _rewrite(folder)  # a valid checksum over the nested field
        if refused:
            with pytest.raises(ArtifactError, match="nests deeper"):
                artifacts.load(folder, "kind-x")
        else:
            assert artifacts.load(folder, "kind-x")[1]["deep"] is not None


def test_a_member_over_a_mebibyte_loads():
    """Members above SMALL_MEMBER_BYTES go through the compression-ratio check: a stored one
    (ratio 1) passes it."""
    big = np.arange(1 << 19, dtype=np.float32)  # 2 MiB
    np.testing.assert_array_equal(artifacts.npz_arrays(artifacts.npz_bytes({"w": big}))["w"], big)


def test_integer_arrays_of_every_width_load():
    arrays = {
        f"{t}": np.arange(5).astype(t)
        for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")
    }
    got = artifacts.npz_arrays(artifacts.npz_bytes(arrays))
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v)


def test_a_member_twice_is_refused():
    import warnings

    npy = io.BytesIO()
    np.lib.format.write_array(npy, np.zeros(2, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name: the point here
        data = _zip([("w.npy", npy.getvalue()), ("w.npy", npy.getvalue())])
    with pytest.raises(ArtifactError, match="appears twice"):
        artifacts.npz_arrays(data)


def test_a_block_device_is_refused_by_name(tmp_path):
    import os
    import stat

    folder = _saved(tmp_path)
    (folder / artifacts.WEIGHTS).unlink()
    try:
        os.mknod(folder / artifacts.WEIGHTS, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    except (PermissionError, AttributeError):
        pytest.skip("making a device node needs privileges this run lacks")
    with pytest.raises(ArtifactError, match=r"weights\.npz: is a device"):
        artifacts.load(folder, "kind-x")


def test_a_garbled_meta_json_names_what_the_parser_says(tmp_path):
    folder = _saved(tmp_path)
    (folder / artifacts.META).write_text('{"kind": ')
    with pytest.raises(ArtifactError, match=r"not valid JSON \(Expecting value: line 1"):
        artifacts.load(folder, "kind-x")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=4),
    st.lists(st.integers(0, 40), min_size=0, max_size=3),
    st.booleans(),
)
def test_a_hashed_prefix_gives_the_checksum_and_the_bytes_of_the_whole_file(
    first, then, other_first
):
    """The bank's arrays hashed once: the checksum of any file that begins with them equals the
    plain one; a file that does not begin with them is hashed whole (never a wrong digest)."""
    rng = np.random.default_rng(len(first) * 7 + len(then))
    bank = {f"bank.{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(first)}
    task = {f"task.{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(then)}
    prefix = artifacts.HashedPrefix.of(bank)
    if other_first:  # the bank's arrays altered: the prefix does not apply
        bank = {k: v + 1 for k, v in bank.items()}
    data = artifacts.npz_bytes({**bank, **task})
    # built by appending to the prefix's file only where the arrays are the ones it hashed;
    # byte for byte the plain file either way
    assert prefix.appends and prefix.npz_with({**bank, **task}) == data
    # the prefix's own arrays followed by others: the file of the arrays it hashed
    own = artifacts.npz_bytes({**prefix.arrays, **task})
    assert prefix.followed_by(task) == prefix.data + prefix.tail(task) == own
    meta = {"kind": "k", "format_version": 1, "classes": ["a"]}
    assert artifacts.checksum(data, meta, prefix) == artifacts.checksum(data, meta)
    assert prefix.checksum(prefix.tail(task), meta) == artifacts.checksum(own, meta)
    assert data.startswith(prefix.data) == (
        not other_first or not any(len(v) for v in bank.values())
    )


def test_a_hashed_prefix_appends_only_to_the_arrays_it_hashed():
    """Arrays of other bytes under the prefix's names and shapes (the hashed ones changed in
    place since, another dtype of the same size, -0.0 for 0.0) are written out, never taken for
    the prefix's bytes; equal ones in other memory or order are appended to it."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    bank = {"bank.w": w}
    task = {"task.b": np.ones(2, np.float32)}
    prefix = artifacts.HashedPrefix.of(bank)
    w[0, 0] = 7.0  # the hashed array, changed in place after hashing
    negative_zero = np.arange(12, dtype=np.float32).reshape(3, 4)
    negative_zero[0, 0] = -0.0
    for arrays in (
        bank,
        {"bank.w": w.view(np.int32)},
        {"bank.w": negative_zero},
        {"bank.v": np.arange(12, dtype=np.float32).reshape(3, 4)},
        {"bank.w": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))},
    ):
        assert prefix.npz_with({**arrays, **task}) == artifacts.npz_bytes({**arrays, **task})
    assert prefix.npz_with(task) == artifacts.npz_bytes(task)  # fewer arrays than the prefix
    with pytest.raises(ValueError, match="written twice"):
        prefix.followed_by({"bank.w": w})


def test_encoding_on_a_prefix_still_refuses_non_finite_arrays_wherever_they_are():
    """Arrays that are a prefix's own bytes skip the finite check only when the prefix itself was
    found finite: a NaN in the prefix's arrays, or in the task's, is refused by name."""
    bank = {"bank.w": np.ones(4, np.float32)}
    task = {"task.b": np.ones(2, np.float32)}
    meta = {"classes": ["a"]}
    assert artifacts.HashedPrefix.of(bank).finite
    files = artifacts.encode("k", {**bank, **task}, meta, prefix=artifacts.HashedPrefix.of(bank))
    assert files == artifacts.encode("k", {**bank, **task}, meta)
    with pytest.raises(artifacts.ArtifactError, match=r"task\.b"):
        artifacts.encode(
            "k",
            {**bank, "task.b": np.full(2, np.nan, np.float32)},
            meta,
            prefix=artifacts.HashedPrefix.of(bank),
        )
    poisoned = {"bank.w": np.array([1.0, np.inf, 0.0, 0.0], np.float32)}
    prefix = artifacts.HashedPrefix.of(poisoned)
    assert not prefix.finite
    with pytest.raises(artifacts.ArtifactError, match=r"bank\.w"):
        artifacts.encode("k", {**poisoned, **task}, meta, prefix=prefix)
