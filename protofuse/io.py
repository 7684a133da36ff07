"""Durable writes, once: every file protofuse writes that a crash must not leave half-written.

- :func:`atomic_write_bytes`: one file; a reader (or a restart after a crash, power loss
  included) finds the old content or the new, never a mix;
- :func:`replace_folder`: a folder of files (an artifact) replaced as a whole;
- :func:`fsync_dir`: make a folder's entries (a rename, a new file, a deletion) durable;
- :func:`npz_bytes`: an ``.npz`` whose bytes depend only on its arrays (no timestamps, no
  pickle), so equal arrays give equal bytes, hence equal checksums and content-addressed names.

The ordering they keep: data is flushed and fsynced *before* the rename that publishes it, and
the folder holding the rename is fsynced *before* the call returns, so whatever a caller does
after (a SQL commit referring to the file, a manifest naming it) never points at a file a crash
could lose. Temporary names start with :data:`TEMP_PREFIX` in the destination's own folder (a
rename is atomic only within one file system); callers that sweep leftovers of interrupted writes
look for that prefix.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import struct
import zipfile
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

TEMP_PREFIX = ".tmp-"
# Zip members get a fixed timestamp so that the bytes depend on the arrays only.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` of the arrays, in the mapping's order, that depends on nothing else.

    Members are ``<name>.npy`` with a fixed timestamp and mode; arrays are written C-contiguous and
    never pickled (an object array raises ValueError). Sort the mapping first where order should
    not matter.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            _write_member(zf, name, array)
    return buffer.getvalue()


def npz_append(npz: bytes, arrays: Mapping[str, np.ndarray]) -> bytes:
    """``npz`` (from :func:`npz_bytes`) with the arrays added after its own, written as
    :func:`npz_bytes` writes them, without writing its own again (zipfile's append mode: the new
    members replace the central directory, which is written anew after them)."""
    buffer = io.BytesIO(npz)
    with zipfile.ZipFile(buffer, "a", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            _write_member(zf, name, array)
    return buffer.getvalue()


def npz_tail(
    npz: bytes, start: int, arrays: Mapping[str, np.ndarray], added: bytes | None = None
) -> bytes:
    """What follows ``npz[:start]`` in ``npz_append(npz, arrays)``, where ``start`` is where the
    central directory of ``npz`` begins: the new members and the new central directory, written
    without copying the ``start`` bytes before them (megabytes of a bank's arrays). ``added``:
    ``npz_bytes(arrays)``, where the caller has it already."""
    added = npz_bytes(arrays) if added is None else added
    spliced = _spliced_tail(npz, start, added)
    if spliced is not None:
        return spliced
    file = _TailFile(npz, start)  # zip64 records: zipfile's append mode writes them
    with zipfile.ZipFile(file, "a", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            _write_member(zf, name, array)
    return file.tail()


# The end of central directory record without zip64 records or a comment (APPNOTE 4.3.16), and
# where a central directory entry names its member's local header (4.3.12).
_END = struct.Struct("<4s4H2LH")
_END_MAGIC = b"PK\x05\x06"
_ENTRY_MAGIC = b"PK\x01\x02"
_ENTRY_SIZE = 46
_ENTRY_OFFSET_AT = 42
_ZIP32_LIMIT = zipfile.ZIP64_LIMIT  # past this zipfile writes zip64 fields


def _spliced_tail(npz: bytes, start: int, added: bytes) -> bytes | None:
    """:func:`npz_tail` from the two files' bytes: a member's local entry names no offset, so
    ``added``'s members are the appended file's as they are; its central directory follows
    ``npz``'s own, each entry's offset moved by ``start``, then a new end record. None where
    either file is not the plain kind :func:`npz_bytes` writes below zip64's limits (zipfile
    then writes the tail itself)."""
    old, new = _end_record(npz), _end_record(added)
    if old is None or new is None:
        return None
    (old_count, old_size, old_at), (new_count, new_size, new_at) = old, new
    if old_at != start or old_at + old_size + _END.size != len(npz):
        return None
    if new_at + new_size + _END.size != len(added):
        return None
    count = old_count + new_count
    at = start + new_at  # where the new central directory begins
    size = old_size + new_size
    if count >= 0xFFFF or at + size > _ZIP32_LIMIT:
        return None
    directory = bytearray(added[new_at : new_at + new_size])
    pos = 0
    for _ in range(new_count):
        if directory[pos : pos + 4] != _ENTRY_MAGIC or pos + _ENTRY_SIZE > len(directory):
            return None
        name, extra, comment = struct.unpack_from("<3H", directory, pos + 28)
        if extra:  # zip64 fields: offsets are not where this looks for them
            return None
        (offset,) = struct.unpack_from("<L", directory, pos + _ENTRY_OFFSET_AT)
        struct.pack_into("<L", directory, pos + _ENTRY_OFFSET_AT, offset + start)
        pos += _ENTRY_SIZE + name + extra + comment
    if pos != len(directory):
        return None
    end = _END.pack(_END_MAGIC, 0, 0, count, count, size, at, 0)
    return b"".join((added[:new_at], npz[start : start + old_size], directory, end))


def _end_record(npz: bytes) -> tuple[int, int, int] | None:
    """(entries, central directory size, its offset) of a zip ending in a plain end record."""
    if len(npz) < _END.size:
        return None
    magic, disk, disk_start, here, count, size, at, comment = _END.unpack_from(
        npz, len(npz) - _END.size
    )
    if magic != _END_MAGIC or disk or disk_start or here != count or comment:
        return None
    if count == 0xFFFF or size == 0xFFFFFFFF or at == 0xFFFFFFFF:  # zip64 stand-ins
        return None
    return count, size, at


class _TailFile(io.RawIOBase):
    """A file of ``data[:start]``, read-only and never copied, followed by a writable buffer
    that begins as ``data[start:]``: what zipfile's append mode reads (the end record and
    central directory) and writes (from the central directory's start on)."""

    def __init__(self, data: bytes, start: int) -> None:
        super().__init__()
        self._head = memoryview(data)[:start]
        self._start = start
        self._tail = io.BytesIO(data[start:])
        self._pos = 0

    def tail(self) -> bytes:
        return self._tail.getvalue()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        size = self._start + self._tail.seek(0, io.SEEK_END)
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the file")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = 0
        if self._pos < self._start:
            n = len(self._head[self._pos : self._pos + len(out)])
            out[:n] = self._head[self._pos : self._pos + n]
        if n < len(out):
            self._tail.seek(max(self._pos + n - self._start, 0))
            n += self._tail.readinto(out[n:])
        self._pos += n
        return n

    def write(self, data: Any) -> int:
        if self._pos < self._start:
            raise OSError("the leading bytes are read-only")
        self._tail.seek(self._pos - self._start)
        n = self._tail.write(data)
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if size < self._start:
            raise OSError("the leading bytes are read-only")
        self._tail.truncate(size - self._start)
        return size


def _write_member(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    entry = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
    entry.external_attr = 0o644 << 16  # rw-r--r-- when unzipped, not the unzipper's default
    a = np.asarray(array)
    # C order always (a Fortran-ordered copy of the same numbers gives the same bytes), and not
    # through ascontiguousarray alone, which would turn a 0-d array into shape (1,).
    a = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    with zf.open(entry, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, a, allow_pickle=False)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the folder's entries durable (a rename into it, a file created or deleted in it)."""
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals renames itself
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, *, before_replace: Callable[[], None] | None = None
) -> None:
    """Write ``data`` to ``path`` so that a crash at any instant leaves the old file or the new one.

    A temporary file beside ``path`` is written, flushed and fsynced, renamed over ``path`` with
    ``os.replace``, and the folder is fsynced: when this returns, the new content survives power
    loss. The parent folder must exist. ``before_replace`` runs between the fsync and the rename
    (the crash tests of the bank store stop there). The new file gets the permissions any new file
    gets (0o666 less the umask), not a temporary file's private ones.
    """
    target = Path(path)
    temp = _create_temp(target)
    try:
        fd = os.open(temp, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temp, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(target.parent)  # the rename itself must be durable before anyone refers to the file


def replace_folder(path: str | os.PathLike, files: Mapping[str, bytes]) -> None:
    """Replace the folder ``path`` by one holding exactly ``files`` (name -> bytes), durably.

    The new folder is staged beside ``path`` (every file fsynced, then the folder), the old one is
    moved aside, the new one renamed into place, the parent fsynced, the old one deleted. A reader
    sees the old folder complete, the new one complete, or (in the instant between the two
    renames) none; a crash in that instant leaves ``path`` absent and the old folder intact under a
    ``TEMP_PREFIX`` name beside it. A failed swap puts the old folder back. The parent folder is
    created if needed.
    """
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _create_temp(folder, directory=True)
    old: Path | None = None
    try:
        for name, data in files.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"file name {name!r} is not a plain name inside the folder")
            fd = os.open(
                staging / name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                0o666,
            )
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        fsync_dir(staging)
        if folder.exists():
            old = _create_temp(folder, directory=True)
            os.replace(folder, old / folder.name)
        try:
            os.replace(staging, folder)
        except BaseException:
            if old is not None:  # put the old folder back rather than leave none
                os.replace(old / folder.name, folder)
                old.rmdir()
                old = None
            raise
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # renamed away already unless something failed
    if old is not None:  # only once the new folder is in place
        shutil.rmtree(old, ignore_errors=True)


def _create_temp(target: Path, *, directory: bool = False) -> Path:
    """A new, empty file (or folder) beside ``target`` named ``TEMP_PREFIX<name>-<random>``.

    Created with the ordinary mode (0o666 / 0o777 less the umask, applied by the OS) rather than
    with ``tempfile``'s private 0o600 / 0o700, so the renamed result is shared like any file.
    """
    for _ in range(100):
        candidate = target.parent / f"{TEMP_PREFIX}{target.name}-{secrets.token_hex(6)}"
        try:
            if directory:
                os.mkdir(candidate, 0o777)
            else:
                os.close(
                    os.open(
                        candidate,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                        0o666,
                    )
                )
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")
