"""protofuse.io: durable writes leave the old content or the new, never a mix; npz bytes are
stable."""

from __future__ import annotations

import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protofuse import io as durable
from protofuse.io import (
    TEMP_PREFIX,
    _spliced_tail,
    _TailFile,  # the file npz_tail writes through
    atomic_write_bytes,
    fsync_dir,
    npz_append,
    npz_bytes,
    npz_tail,
    replace_folder,
)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# -- atomic_write_bytes ---------------------------------------------------------------------------


def test_atomic_write_creates_then_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "rounds.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["rounds.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # shared like any new file, not 0o600


@pytest.mark.parametrize("where", ["before_replace", "fsync"])
def test_a_write_that_fails_midway_leaves_the_old_content_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    target = tmp_path / "manifest.pb"
    atomic_write_bytes(target, b"old content")

    def fail(*_: object) -> None:
        raise OSError("disk full")

    kwargs = {}
    if where == "before_replace":
        kwargs["before_replace"] = fail
    else:
        monkeypatch.setattr(durable.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new content that never lands", **kwargs)
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["manifest.pb"]


def test_a_reader_racing_the_writer_sees_the_old_or_the_new_content_never_a_mix(
    tmp_path: Path,
) -> None:
    target = tmp_path / "weights.npz"
    contents = (b"a" * 1_000_000, b"b" * 1_500_000)  # sizes differ: a torn read shows in either
    atomic_write_bytes(target, contents[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            data = target.read_bytes()
            seen.add(data[:1] + len(data).to_bytes(4, "big") if data in contents else b"torn")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            atomic_write_bytes(target, contents[i % 2])
    finally:
        done.set()
        reader.join()
    assert b"torn" not in seen and seen
    assert [p.name for p in tmp_path.iterdir()] == ["weights.npz"]


def test_the_before_replace_seam_runs_with_the_data_durable_under_a_temporary_name(
    tmp_path: Path,
) -> None:
    target = tmp_path / "x.bin"
    temps: list[bytes] = []
    atomic_write_bytes(
        target,
        b"data",
        before_replace=lambda: temps.extend(
            p.read_bytes() for p in tmp_path.glob(f"{TEMP_PREFIX}x.bin-*")
        ),
    )
    assert temps == [b"data"] and target.read_bytes() == b"data"


def test_fsync_dir_accepts_a_folder(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    fsync_dir(str(tmp_path))


# -- replace_folder -------------------------------------------------------------------------------


def test_replace_folder_swaps_the_whole_folder(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "bank"
    replace_folder(folder, {"weights.npz": b"w1", "signature.json": b"s1"})
    replace_folder(folder, {"weights.npz": b"w2", "meta.json": b"m2"})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        "weights.npz": b"w2",
        "meta.json": b"m2",
    }  # the old signature is gone
    assert os.listdir(folder.parent) == ["bank"]  # no staging or old folder left
    assert folder.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_replace_folder_that_fails_at_the_swap_keeps_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "bank"
    replace_folder(folder, {"meta.json": b"old"})
    real_replace = os.replace
    calls = []

    def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        calls.append(dst)
        if (
            len(calls) == 2
        ):  # the first moves the old folder aside, the second would put the new one in
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "replace", replace)
    with pytest.raises(OSError, match="interrupted"):
        replace_folder(folder, {"meta.json": b"new"})
    monkeypatch.undo()
    assert (folder / "meta.json").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["bank"]


@pytest.mark.parametrize("name", ["../escape", "", ".", "..", "sub/file"])
def test_replace_folder_refuses_a_name_that_is_not_a_plain_file_name(
    tmp_path: Path, name: str
) -> None:
    replace_folder(tmp_path / "a", {"meta.json": b"old"})
    with pytest.raises(ValueError, match="not a plain name"):
        replace_folder(tmp_path / "a", {"weights.npz": b"new", name: b"x"})
    assert (tmp_path / "a" / "meta.json").read_bytes() == b"old" and sorted(
        os.listdir(tmp_path)
    ) == ["a"]


# -- npz_bytes ------------------------------------------------------------------------------------


def test_npz_bytes_are_identical_twice_and_load_back_in_order() -> None:
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "scale": np.float32(2).reshape(()),
        "names": np.array(["a", "bc"]),
    }
    first, second = npz_bytes(arrays), npz_bytes({k: v.copy() for k, v in arrays.items()})
    assert first == second
    with np.load(io.BytesIO(first), allow_pickle=False) as npz:
        assert npz.files == ["w", "scale", "names"]
        for name, array in arrays.items():
            assert (
                npz[name].dtype == array.dtype and npz[name].shape == array.shape
            )  # a 0-d array stays 0-d
            np.testing.assert_array_equal(npz[name], array)
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        assert {info.date_time for info in zf.infolist()} == {
            (1980, 1, 1, 0, 0, 0)
        }  # no clock in the bytes


def test_npz_bytes_depend_on_the_numbers_not_their_memory_layout() -> None:
    w = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert (
        npz_bytes({"w": np.asfortranarray(w)})
        == npz_bytes({"w": w})
        == npz_bytes({"w": w.T.copy().T})
    )
    assert npz_bytes({"w": w}) != npz_bytes({"w": w + 1})


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["<f4", "<f8", "<i8", "|u1", "?"]),
            st.lists(st.integers(0, 5), max_size=3),
        ),
        max_size=4,
    ),
    st.integers(0, 4),
)
def test_appending_to_an_npz_gives_the_npz_of_all_the_arrays(specs, split) -> None:
    """What the service and its SDK build on a bank's file: the same bytes as writing it whole."""
    rng = np.random.default_rng(len(specs))
    arrays = {
        f"a{i}": rng.integers(0, 9, size=tuple(shape)).astype(dtype)
        for i, (dtype, shape) in enumerate(specs)
    }
    names = list(arrays)
    first = {k: arrays[k] for k in names[:split]}
    then = {k: arrays[k] for k in names[split:]}
    assert npz_append(npz_bytes(first), then) == npz_bytes(arrays)
    # the same, written after the first file's members without copying them
    head = npz_bytes(first)
    with zipfile.ZipFile(io.BytesIO(head)) as zf:
        start = zf.start_dir
    assert head[:start] + npz_tail(head, start, then) == npz_bytes(arrays)


def test_an_npz_tail_is_spliced_from_the_arrays_own_npz_and_zipfile_writes_the_rest() -> None:
    """The tail of a plain file is spliced from the two files' bytes (the new members as written
    alone, the central directories joined); where a file is not plain (a comment here, zip64
    records at scale) zipfile's append mode writes it. Both give npz_append's bytes."""
    first = {"w": np.arange(6.0).reshape(2, 3), "b": np.zeros(3, np.float32)}
    then = {"task.p": np.ones((4, 2), np.float32), "task.t": np.float32(2.0)}
    head = npz_bytes(first)
    with zipfile.ZipFile(io.BytesIO(head)) as zf:
        start = zf.start_dir
    added = npz_bytes(then)
    assert _spliced_tail(head, start, added) is not None
    assert npz_tail(head, start, then, added) == npz_append(head, then)[start:]
    buffer = io.BytesIO(head)
    with zipfile.ZipFile(buffer, "a") as zf:
        zf.comment = b"not plain"
    commented = buffer.getvalue()
    assert _spliced_tail(commented, start, added) is None
    assert commented[:start] + npz_tail(commented, start, then) == npz_append(commented, then)
    # a file that does not end where its end record says is never spliced
    assert _spliced_tail(head + b"x", start, added) is None
    assert _spliced_tail(head, start + 1, added) is None


def test_the_leading_bytes_of_an_appended_npz_are_never_written() -> None:
    """npz_tail's file refuses writes before the central directory's start: the bank's bytes
    it shares with every model are read-only."""
    head = npz_bytes({"w": np.arange(4.0)})
    with zipfile.ZipFile(io.BytesIO(head)) as zf:
        start = zf.start_dir
    file = _TailFile(head, start)
    file.seek(0)
    assert file.read(start) == head[:start]
    file.seek(start - 1)
    with pytest.raises(OSError, match="read-only"):
        file.write(b"x")
    with pytest.raises(OSError, match="read-only"):
        file.truncate(start - 1)
    file.seek(0, io.SEEK_END)
    assert file.tell() == len(head) and file.write(b"ab") == 2
    assert file.tail() == head[start:] + b"ab"


def test_npz_bytes_never_pickle() -> None:
    with pytest.raises(ValueError):
        npz_bytes({"bad": np.array([{"a": 1}], dtype=object)})


def test_a_temporary_name_already_taken_is_never_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another writer's temporary file holds the first name drawn: it must be left alone and a
    # fresh name drawn, not opened and overwritten.
    taken = tmp_path / f"{TEMP_PREFIX}f-aaaa"
    taken.write_bytes(b"someone else's")
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(durable.secrets, "token_hex", lambda _n: next(names))
    atomic_write_bytes(tmp_path / "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"new"
    assert taken.read_bytes() == b"someone else's"


def test_replace_folder_writes_files_with_the_ordinary_mode_never_executable(
    tmp_path: Path,
) -> None:
    replace_folder(tmp_path / "a", {"meta.json": b"{}"})
    mode = (tmp_path / "a" / "meta.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()
