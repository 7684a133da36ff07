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

Nothing an artifact holds can exhaust the process that loads it (issue 17):

- :func:`read` opens each file without following symlinks and reads only regular files (a
  symlink to ``/dev/zero``, a named pipe, a device or a folder is refused by name), each checked
  against its size limit before it is read and never read past it. The folder itself may be a
  symlink (``runs/latest -> runs/2024-...``): its path is the caller's choice; the files inside
  are what whoever delivered the artifact controls. All three files are read through one handle
  on the folder, so a folder replaced meanwhile cannot mix old and new files.
- :func:`decode` bounds every file's size, verifies the envelope of ``meta.json`` (a schema;
  JSON nesting bounded), the checksum and, when a key is given, the signature, all before any
  array is built; then :func:`npz_arrays` checks every member's ``.npy`` header (name, dtype,
  shape x itemsize against the limit, the member's size, compression ratio) before allocating.
- Arrays holding NaN or infinite values are never written (:func:`encode`) nor loaded
  (:func:`decode`): a bank that cannot be served must not exist.

The limits are module constants, read at each call (raise them here, or pass
``max_weights_bytes=`` to :func:`read`, :func:`decode`, :func:`load` and :func:`npz_arrays`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import stat
import struct
import tokenize
import types
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import signing
from .io import npz_bytes, npz_tail, replace_folder
from .settings import format_errors

FORMAT_VERSION = 1
WEIGHTS = "weights.npz"
META = "meta.json"

# -- limits (module constants, read at each call: monkeypatch or assign to change them) ----------
# weights.npz on disk, and the arrays decoded from it in total. Real banks and adapted models are
# a few MB to a few hundred MB; 2 GiB leaves room for large image encoders while keeping one
# hostile file from taking more than a bounded, stated amount of memory.
MAX_WEIGHTS_BYTES = 2 << 30
MAX_META_BYTES = 1 << 20  # meta.json: a bank's is a few KB (settings, experts' records)
MAX_SIGNATURE_BYTES = 64 << 10  # signature.json: about 300 bytes
# rounds.json / training.json beside a run (read by `protofuse report`): ~1 KB per round
MAX_HISTORY_BYTES = 64 << 20
MAX_JSON_DEPTH = 64  # protofuse writes at most ~6 levels; a deep nest only costs recursion
MAX_DIMENSIONS = 32  # of one array (numpy's own limit is 64); protofuse writes at most 4
# Members of weights.npz: a bank has tens (one per tensor, four per expert in the generative
# family). zipfile parses the whole central directory before anything can be checked, ~500 bytes
# of Python objects per entry, so the count is bounded before the zip is opened.
MAX_NPZ_MEMBERS = 10_000
# A deflated member may expand at most this much (deflate reaches ~1000x on zeros: a 2 MB file
# would become 2 GB). protofuse writes stored members; members up to SMALL_MEMBER_BYTES are not
# held to the ratio (an all-zero bias compresses well and costs nothing).
MAX_COMPRESSION_RATIO = 100
SMALL_MEMBER_BYTES = 1 << 20
_READ_CHUNK = 16 << 20  # bytes per read into an array: the reader's own memory stays bounded

_LIMIT_NAMES = {
    WEIGHTS: "MAX_WEIGHTS_BYTES",
    META: "MAX_META_BYTES",
    signing.SIGNATURE: "MAX_SIGNATURE_BYTES",
}
# What a malformed zip or .npy header raises inside zipfile and numpy's header parser (which
# literal_evals the header, and tokenizes headers written by Python 2).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
    struct.error,
    NotImplementedError,  # zipfile's answer to features it lacks (strong encryption, ...)
    UnicodeDecodeError,  # a member name flagged UTF-8 that is not
)
_HEADER_ERRORS = (
    ValueError,
    TypeError,
    SyntaxError,
    RecursionError,
    MemoryError,  # the parser's own stack on a deeply nested header, not an allocation
    OverflowError,
    tokenize.TokenError,
    *_ZIP_ERRORS,
)
# A zip's central directory entries each begin with this signature; zipfile reads one per entry.
_CENTRAL_DIRECTORY = b"PK\x01\x02"


class ArtifactError(ValueError):
    """An artifact on disk is missing, of the wrong kind or version, or fails its checksum."""


class Envelope(BaseModel):
    """The fields every artifact's ``meta.json`` carries beside its kind's own (allowed extra)."""

    model_config = ConfigDict(extra="allow", strict=True)

    kind: str
    format_version: int
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class HashedPrefix:
    """The leading bytes many ``weights.npz`` files share and the SHA-256 state after them: the
    bank's arrays come first in every adapted model of one bank version, so a checksum over such
    a file hashes only what follows them (the service and its SDK hold one per bank version), and
    only what follows them is written (``rest`` finds the arrays after the prefix's own, ``tail``
    writes them; ``npz_with`` and ``followed_by`` give the whole file)."""

    data: bytes
    state: Any  # hashlib's sha256 object, fed ``data`` and nothing else
    whole_sha256: str  # of ``npz_bytes(arrays)`` itself: the digest the service names them by
    whole: bytes = b""  # ``npz_bytes(arrays)``
    # Read-only copies of the arrays ``whole`` was written from: ``rest`` treats given arrays as
    # the prefix's only where they equal these, byte for byte.
    arrays: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    appends: bool = False  # appending (npz_tail) gave npz_bytes' own bytes here (checked once)
    finite: bool = False  # no NaN or infinity in ``arrays`` (checked once)

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> HashedPrefix:
        """The local entries of ``npz_bytes(arrays)``: the start of the .npz of these arrays
        followed by any others (the central directory, which lists them all, comes last)."""
        own = {k: np.array(v, copy=True, order="C") for k, v in arrays.items()}
        for a in own.values():  # the bytes ``whole`` holds: nobody changes them after
            a.setflags(write=False)
        whole = npz_bytes(own)
        with zipfile.ZipFile(io.BytesIO(whole)) as zf:
            data = whole[: zf.start_dir]
        probe = {"probe": np.arange(3, dtype=np.float32)}
        appends = data + npz_tail(whole, len(data), probe) == npz_bytes({**own, **probe})
        finite = not any(_non_finite(a) for a in own.values())
        frozen = types.MappingProxyType(own)
        return cls(data, hashlib.sha256(data), sha256(whole), whole, frozen, appends, finite)

    def npz_with(self, arrays: Mapping[str, np.ndarray]) -> bytes:
        """``npz_bytes(arrays)``; where ``arrays`` begin with this prefix's arrays (the same
        names, dtypes, shapes and bytes), only the others are written."""
        rest = self.rest(arrays)
        return npz_bytes(arrays) if rest is None else self.followed_by(rest)

    def rest(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The arrays after this prefix's own where ``arrays`` begin with them (the same names,
        dtypes, shapes and bytes); else None."""
        items = list(arrays.items())
        n = len(self.arrays)
        if not (len(items) >= n and self._holds(items[:n])):
            return None
        return dict(items[n:])

    def followed_by(self, arrays: Mapping[str, np.ndarray]) -> bytes:
        """``npz_bytes`` of this prefix's own arrays followed by ``arrays`` (other names): the
        prefix's bytes are not written again where appending gives the same file."""
        if not self.appends:
            self._check_names(arrays)
            return npz_bytes({**self.arrays, **arrays})
        return self.data + self.tail(arrays)

    def tail(self, arrays: Mapping[str, np.ndarray], written: bytes | None = None) -> bytes:
        """What follows ``data`` in ``followed_by(arrays)``: the arrays' members and the central
        directory, written without copying ``data`` (only where ``appends``). ``written``:
        ``npz_bytes(arrays)``, where the caller has it."""
        self._check_names(arrays)
        if not self.appends:
            raise ValueError("appending to this prefix does not give npz_bytes' file")
        return npz_tail(self.whole, len(self.data), arrays, written)

    def checksum(self, tail: bytes, meta: dict[str, Any]) -> str:
        """:func:`checksum` of the weights ``data + tail`` and ``meta``, only ``tail`` hashed."""
        digest = self.state.copy()
        digest.update(tail)
        digest.update(_canonical(meta))
        return digest.hexdigest()

    def _check_names(self, arrays: Mapping[str, np.ndarray]) -> None:
        if any(name in self.arrays for name in arrays):
            raise ValueError("arrays named like the prefix's own would be written twice")

    def _holds(self, items: list[tuple[str, np.ndarray]]) -> bool:
        for (name, given), (own_name, own) in zip(items, self.arrays.items(), strict=True):
            a = np.asarray(given)
            if name != own_name or a.dtype != own.dtype or a.shape != own.shape:
                return False
            # the bytes npz_bytes would write (C order), compared as bytes (-0.0 is not 0.0), a
            # word of the array's own size at a time
            word = _WORDS.get(own.dtype.itemsize, np.uint8)
            if not np.array_equal(
                np.ascontiguousarray(a).reshape(-1).view(np.uint8).view(word),
                own.reshape(-1).view(np.uint8).view(word),
            ):
                return False
        return True


_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def checksum(weights: bytes, meta: dict[str, Any], prefix: HashedPrefix | None = None) -> str:
    """SHA-256 of the weights' bytes followed by the canonical JSON of the other meta fields
    (the weights, megabytes, are never copied; where they begin with ``prefix``'s bytes, hashing
    goes on from its state)."""
    if prefix is not None and weights.startswith(prefix.data):
        digest = prefix.state.copy()
        digest.update(memoryview(weights)[len(prefix.data) :])
    else:
        digest = hashlib.sha256(weights)
    digest.update(_canonical(meta))
    return digest.hexdigest()


def _canonical(meta: dict[str, Any]) -> bytes:
    """The metadata a checksum covers: every field but the checksum, as canonical JSON."""
    fields = {k: v for k, v in meta.items() if k != "sha256"}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


# -- weights.npz: every header checked before any array is allocated ----------------------------


@dataclass(frozen=True)
class _Member:
    """One ``.npy`` member of a zip, its header read and checked; its data not yet read."""

    info: zipfile.ZipInfo
    name: str  # the array's name: the member's without ".npy"
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    offset: int  # where the data starts, after the header
    count: int  # elements

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def npz_arrays(
    data: bytes, source: Any = "weights.npz", *, max_weights_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """The arrays of ``.npz`` bytes, in file order; never runs pickle.

    Every member's header is read and checked first (a ``NAME.npy`` name, a plain dtype, shape x
    itemsize within ``max_weights_bytes`` in total (default :data:`MAX_WEIGHTS_BYTES`), a size that
    agrees with the header, a sane compression ratio); only then is any array allocated.
    """
    limit = MAX_WEIGHTS_BYTES if max_weights_bytes is None else max_weights_bytes
    _check_size(len(data), limit, source, "MAX_WEIGHTS_BYTES")
    if data.count(_CENTRAL_DIRECTORY) > MAX_NPZ_MEMBERS:
        raise ArtifactError(
            f"{source}: more than {MAX_NPZ_MEMBERS} zip entries (protofuse.artifacts."
            "MAX_NPZ_MEMBERS); refused before reading them, re-create it with protofuse"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = _checked_members(zf, source, limit, len(data))
            return {m.name: _read_member(zf, m, source) for m in members}
    except ArtifactError:
        raise
    except _ZIP_ERRORS as err:
        raise ArtifactError(f"{source}: not a readable .npz ({err})") from None
    except MemoryError:  # within the limit, and still more than this machine has
        raise ArtifactError(
            f"{source}: its arrays ({_size(limit)} at most) do not fit in this process's memory"
        ) from None
    except ValueError as err:  # numpy refusing a shape the checks let through
        raise ArtifactError(f"{source}: not a readable .npz ({_first_line(err)})") from None


def _checked_members(zf: zipfile.ZipFile, source: Any, limit: int, size: int) -> list[_Member]:
    """Every member's zip entry and ``.npy`` header, checked; the arrays' total within ``limit``;
    no entry claims more compressed bytes than the ``size`` bytes of the file holds."""
    entries = zf.infolist()
    if len(entries) > MAX_NPZ_MEMBERS:
        raise ArtifactError(f"{source}: {len(entries)} members, more than {MAX_NPZ_MEMBERS}")
    inflated = sum(info.file_size for info in entries)
    if inflated > MAX_COMPRESSION_RATIO * size + SMALL_MEMBER_BYTES:
        raise ArtifactError(
            f"{source}: its members would inflate to {_size(inflated)} from {_size(size)}, more "
            f"than {MAX_COMPRESSION_RATIO}x (protofuse.artifacts.MAX_COMPRESSION_RATIO); a "
            "deflate bomb? refused before inflating it"
        )
    members: list[_Member] = []
    seen: set[str] = set()
    left = limit
    for info in entries:
        if info.header_offset + info.compress_size > size:
            raise ArtifactError(
                f"{source}: member {info.filename!r} claims {info.compress_size} bytes past the "
                f"end of the {size}-byte file; truncated or forged, re-create it"
            )
        _check_entry(info, source, left)
        member = _read_header(zf, info, source)
        if member.name in seen:
            raise ArtifactError(
                f"{source}: member {info.filename!r} appears twice; re-create it with protofuse"
            )
        seen.add(member.name)
        if member.count * max(member.dtype.itemsize, 1) > left:
            raise ArtifactError(
                f"{source}: member {info.filename!r} declares shape {member.shape} of "
                f"{member.dtype} ({_size(member.nbytes)}), more than the {_size(left)} left of "
                f"the {_size(limit)} limit on arrays (protofuse.artifacts.MAX_WEIGHTS_BYTES); "
                "refused before allocating. If this is a genuine artifact, raise the limit"
            )
        if member.offset + member.nbytes != info.file_size:
            raise ArtifactError(
                f"{source}: member {info.filename!r} declares {member.nbytes} bytes of data but "
                f"holds {info.file_size - member.offset}; truncated or forged, re-create it"
            )
        left -= member.nbytes
        members.append(member)
    return members


def _check_entry(info: zipfile.ZipInfo, source: Any, left: int) -> None:
    """A zip entry protofuse can read: ``NAME.npy``, stored or deflated at a sane ratio, not
    encrypted, declaring no more than the limit leaves (checked before any byte is inflated)."""
    name = info.filename
    if not name.endswith(".npy") or name == ".npy":
        raise ArtifactError(
            f"{source}: member {name!r} is not an array (NAME.npy); an artifact's weights.npz "
            "holds arrays only: re-create it with protofuse"
        )
    if info.flag_bits & 0x41:  # bit 0: encrypted; bit 6: strong encryption
        raise ArtifactError(f"{source}: member {name!r} is encrypted; re-create it unencrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ArtifactError(
            f"{source}: member {name!r} uses zip compression method {info.compress_type}; only "
            "stored or deflated members are read: re-create it with protofuse"
        )
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise ArtifactError(
            f"{source}: member {name!r} is stored but its sizes disagree ({info.compress_size} "
            f"and {info.file_size} bytes); truncated or forged, re-create it"
        )
    # The .npy header is at most a few KB: more than the arrays' budget plus that cannot fit.
    if info.file_size > left + (64 << 10):
        raise ArtifactError(
            f"{source}: member {name!r} declares {_size(info.file_size)} uncompressed, more than "
            f"the {_size(left)} left of the limit on arrays (protofuse.artifacts."
            "MAX_WEIGHTS_BYTES); refused before inflating it"
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > SMALL_MEMBER_BYTES and ratio > MAX_COMPRESSION_RATIO:
        raise ArtifactError(
            f"{source}: member {name!r} would inflate {ratio:.0f}x ({_size(info.compress_size)} "
            f"to {_size(info.file_size)}), more than {MAX_COMPRESSION_RATIO}x (protofuse."
            "artifacts.MAX_COMPRESSION_RATIO); a deflate bomb? refused before inflating it"
        )


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: Any) -> _Member:
    """The member's ``.npy`` header (format 1.0 or 2.0), read with numpy's own parser; refuses
    object dtypes (only pickle can read them) and shapes that are not sizes."""
    name = info.filename
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # 3.0 only adds UTF-8 names of structured fields, which protofuse never writes
                raise ArtifactError(
                    f"{source}: member {name!r} is a .npy of format {version}; protofuse reads "
                    "formats 1.0 and 2.0: re-create it with protofuse"
                )
            offset = f.tell()
    except ArtifactError:
        raise
    except _HEADER_ERRORS as err:
        raise ArtifactError(
            f"{source}: member {name!r} has no readable .npy header ({_first_line(err)}); "
            "re-create it with protofuse"
        ) from None
    if dtype.hasobject:
        raise ArtifactError(
            f"{source}: holds something other than plain arrays: member {name!r} has dtype "
            f"{dtype}, which only pickle can read (never run on loaded data); refused"
        )
    if not _plain_dtype(dtype):
        raise ArtifactError(
            f"{source}: member {name!r} has dtype {dtype}; protofuse reads arrays of native-order "
            "floats (2, 4 or 8 bytes), integers and booleans only: re-create it with protofuse"
        )
    if len(shape) > MAX_DIMENSIONS or any(not 0 <= n <= MAX_WEIGHTS_BYTES for n in shape):
        raise ArtifactError(f"{source}: member {name!r} declares the shape {shape}; refused")
    return _Member(
        info, name[: -len(".npy")], dtype, shape, fortran_order, offset, math.prod(shape)
    )


def _plain_dtype(dtype: np.dtype) -> bool:
    """What a model's weights are: no strings (numpy allocates ``<U0`` as ``<U1``: zero bytes
    declared, real bytes taken), records, sub-arrays, dates or long doubles, and native byte
    order (torch reads nothing else)."""
    sizes = {"f": (2, 4, 8), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "b": (1,)}
    return (
        dtype.kind in sizes
        and dtype.itemsize in sizes[dtype.kind]
        and dtype.isnative
        and dtype.names is None
        and dtype.subdtype is None
    )


def _read_member(zf: zipfile.ZipFile, m: _Member, source: Any) -> np.ndarray:
    """The member's array, read straight into its own memory in bounded chunks."""
    flat = np.empty(m.count, dtype=m.dtype)
    with zf.open(m.info) as f:
        f.read(m.offset)  # the header, checked already
        if m.nbytes:
            view = flat.view(np.uint8).data  # a writable memoryview of the array's bytes
            reader = cast(io.BufferedIOBase, f)  # zipfile's ZipExtFile is one
            done = 0
            while done < m.nbytes:
                n = reader.readinto(view[done : done + _READ_CHUNK])
                if not n:
                    raise ArtifactError(
                        f"{source}: member {m.info.filename!r} ends after {done} of "
                        f"{m.nbytes} bytes; truncated, re-create it"
                    )
                done += n
        f.read(1)  # at the end: zipfile checks the member's CRC
    if m.fortran_order:  # as numpy's own reader does
        return flat.reshape(m.shape[::-1]).transpose()
    return flat.reshape(m.shape)


def _non_finite(array: np.ndarray) -> int:
    """How many of a float or complex array's values are NaN or infinite, in bounded chunks."""
    if array.dtype.kind not in "fc":
        return 0
    flat = np.ravel(array, order="K")
    step = 1 << 22
    return sum(
        int(np.count_nonzero(~np.isfinite(flat[i : i + step]))) for i in range(0, flat.size, step)
    )


def _check_finite(arrays: Mapping[str, np.ndarray], where: str, fix: str) -> None:
    for name, array in arrays.items():
        bad = _non_finite(np.asarray(array))
        if bad:
            raise ArtifactError(
                f"{where}{name}: {bad} of {np.size(array)} values are NaN or infinite; {fix}"
            )


# -- meta.json and the other small files -------------------------------------------------------


def _json(data: bytes, name: str, source: Any) -> Any:
    """JSON of bounded nesting. The parser itself stops at Python's recursion limit (a
    RecursionError, refused here too); the depth is then checked on the parsed value."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, 5,000-digit ints
        raise ArtifactError(f"{source}: {name} is not valid JSON ({_first_line(err)})") from None
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise ArtifactError(
            f"{source}: {name} nests deeper than {MAX_JSON_DEPTH} levels; refused (protofuse "
            "writes a few), re-create it"
        )
    return value


def _json_depth(value: Any) -> int:
    """The deepest nesting of lists and objects in a parsed JSON value, without recursion; stops
    counting past MAX_JSON_DEPTH."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _envelope(meta: Any, kind: str, source: Any) -> dict[str, Any]:
    """The parsed meta.json, its kind, version and checksum field checked."""
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
    try:
        Envelope.model_validate(meta)
    except ValidationError as err:
        raise ArtifactError(
            f"{source}: {META} is malformed:\n{format_errors(err)}\nre-create the {kind}"
        ) from None
    return meta


def _check_size(size: int, limit: int, source: Any, constant: str) -> None:
    if size > limit:
        raise ArtifactError(
            f"{source}: {_size(size)}, more than the {_size(limit)} limit (protofuse.artifacts."
            f"{constant}); refused before reading it. If this is a genuine artifact, raise the "
            "limit"
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _limits(max_weights_bytes: int | None) -> dict[str, int]:
    """Each file's size limit, as the module constants say now."""
    return {
        WEIGHTS: MAX_WEIGHTS_BYTES if max_weights_bytes is None else max_weights_bytes,
        META: MAX_META_BYTES,
        signing.SIGNATURE: MAX_SIGNATURE_BYTES,
    }


# -- encode / decode ---------------------------------------------------------------------------


def encode(
    kind: str,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    signing_key: Ed25519PrivateKey | None = None,
    prefix: HashedPrefix | None = None,
    *,
    whole_weights: bool = True,
    after_prefix: bool = False,
) -> dict[str, bytes]:
    """An artifact as its files' bytes: ``weights.npz``, ``meta.json`` and, when signed,
    ``signature.json``. Arrays holding NaN or infinite values are refused (by name): such an
    artifact could not be loaded, nor served. ``prefix``: see :func:`checksum`.
    ``whole_weights=False``: ``weights.npz`` holds only the arrays after ``prefix``'s own (the
    arrays must begin with them), for a holder of the prefix to complete; the checksum and
    signature are the whole file's all the same. ``after_prefix=True``: ``arrays`` are only
    those after the prefix's own, which the caller knows come first (not compared here)."""
    diverged = "the fit diverged? lower the learning rate or check the inputs; nothing written"
    record = {"kind": kind, "format_version": FORMAT_VERSION, **meta}
    record = json.loads(json.dumps(record))  # what load will read back (tuples become lists)
    if after_prefix:
        if prefix is None:
            raise ValueError("after_prefix without a prefix")
        prefix._check_names(arrays)
        rest: dict[str, np.ndarray] | None = dict(arrays)
        arrays = {**prefix.arrays, **arrays}
    else:
        rest = None if prefix is None else prefix.rest(arrays)
    if not whole_weights and (prefix is None or rest is None):
        raise ValueError("weights without the prefix's arrays, of arrays that do not begin so")
    if prefix is not None and rest is not None and prefix.appends:
        # Arrays that are the prefix's own bytes were checked once, when it was made.
        _check_finite(rest if prefix.finite else arrays, "", diverged)
        written = npz_bytes(rest)
        tail = prefix.tail(rest, written)
        data = prefix.data + tail if whole_weights else written
        record["sha256"] = prefix.checksum(tail, record)
    else:
        _check_finite(arrays, "", diverged)
        data = npz_bytes(arrays)
        record["sha256"] = checksum(data, record)
        if rest is not None and not whole_weights:
            data = npz_bytes(rest)
    files = {WEIGHTS: data, META: json.dumps(record, indent=2, sort_keys=True).encode()}
    if signing_key is not None:
        files[signing.SIGNATURE] = signing.sign(kind, record["sha256"], signing_key)
    return files


def decode(
    files: dict[str, bytes],
    kind: str,
    source: Any,
    public_key: Ed25519PublicKey | None = None,
    *,
    max_weights_bytes: int | None = None,
    prefix: HashedPrefix | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Verify an artifact's files (:func:`verify`), all before any array is built; then parse
    the arrays, each header checked before it is allocated, and refuse NaN or infinite values."""
    meta = verify(
        files, kind, source, public_key, max_weights_bytes=max_weights_bytes, prefix=prefix
    )
    arrays = npz_arrays(
        files[WEIGHTS],
        f"{source}: {WEIGHTS}",
        max_weights_bytes=_limits(max_weights_bytes)[WEIGHTS],
    )
    check_finite(arrays, source, kind)
    return arrays, meta


def check_finite(arrays: dict[str, np.ndarray], source: Any, kind: str) -> None:
    """ArtifactError naming the arrays of an artifact's weights that hold NaN or infinity."""
    _check_finite(
        arrays,
        f"{source}: {WEIGHTS}: ",
        f"refused: a {kind} that cannot be served must not load; re-create it",
    )


def verify(
    files: dict[str, bytes],
    kind: str,
    source: Any,
    public_key: Ed25519PublicKey | None = None,
    *,
    max_weights_bytes: int | None = None,
    prefix: HashedPrefix | None = None,
    tail: bytes | None = None,
) -> dict[str, Any]:
    """An artifact's metadata once its files are verified: sizes; kind, version and envelope;
    the checksum over weights and metadata (``prefix``: see :func:`checksum`); the signature when
    a key is given. No array is parsed. With ``tail`` (and ``prefix``), ``files`` hold no
    weights.npz: its bytes are ``prefix.data + tail``, and only ``tail`` is hashed."""
    if tail is not None and (prefix is None or WEIGHTS in files):
        raise ValueError(f"tail: give the prefix it follows, and files without {WEIGHTS}")
    limits = _limits(max_weights_bytes)
    sizes = {name: len(data) for name, data in files.items()}
    if tail is not None and prefix is not None:
        sizes[WEIGHTS] = len(prefix.data) + len(tail)
    for name, size in sizes.items():
        if name in limits:
            _check_size(size, limits[name], f"{source}: {name}", _LIMIT_NAMES[name])
    if META not in files:
        raise ArtifactError(f"{source}: missing {META}; is this a protofuse {kind}?")
    meta = _envelope(_json(files[META], META, source), kind, source)
    if tail is not None and prefix is not None:
        found = prefix.checksum(tail, meta)
    elif WEIGHTS not in files:
        raise ArtifactError(f"{source}: missing {WEIGHTS}")
    else:
        found = checksum(files[WEIGHTS], meta, prefix)
    if found != meta["sha256"]:
        raise ArtifactError(
            f"{source}: checksum mismatch between {WEIGHTS} and {META}; a file was modified or "
            f"truncated, re-create the {kind}"
        )
    if public_key is not None:
        signing.verify(kind, meta["sha256"], files.get(signing.SIGNATURE), public_key, source)
    return meta


# -- folders -----------------------------------------------------------------------------------


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


def read(
    path: str | os.PathLike, kind: str, *, max_weights_bytes: int | None = None
) -> dict[str, bytes]:
    """An artifact folder's files (those present of weights, meta and signature), each a regular
    file opened without following symlinks and within its size limit (:data:`MAX_WEIGHTS_BYTES`,
    :data:`MAX_META_BYTES`, :data:`MAX_SIGNATURE_BYTES`). Other files in the folder are
    ignored."""
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(
            f"{folder}: no such {kind} folder (expected {META} and {WEIGHTS} inside)"
        )
    files = {}
    with _folder_handle(folder, kind) as dir_fd:
        for name, limit in _limits(max_weights_bytes).items():
            data = _read_regular_file(folder, name, dir_fd, limit)
            if data is not None:
                files[name] = data
    return files


def load(
    path: str | os.PathLike,
    kind: str,
    public_key: Ed25519PublicKey | None = None,
    *,
    max_weights_bytes: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify an artifact folder written by :func:`save` for the given kind."""
    files = read(path, kind, max_weights_bytes=max_weights_bytes)
    return decode(files, kind, Path(path), public_key, max_weights_bytes=max_weights_bytes)


# Open flags: never follow a symlink (O_NOFOLLOW: ELOOP instead), never block on a named pipe
# (O_NONBLOCK: opening a FIFO returns at once; fstat then refuses it). Where the platform lacks
# them (Windows) the lstat/fstat checks below still refuse what they can see.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_DIR_FD = os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd


@contextmanager
def _folder_handle(folder: Path, kind: str) -> Iterator[int | None]:
    """A handle on the folder, so that its files are all read from the same folder even if the
    path is replaced meanwhile (None where the platform cannot open files relative to one)."""
    if not _DIR_FD:
        yield None
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except OSError as err:
        raise ArtifactError(f"{folder}: cannot open the {kind} folder ({err.strerror})") from None
    try:
        yield fd
    finally:
        os.close(fd)


def read_plain_file(path: str | os.PathLike, limit: int, constant: str) -> bytes | None:
    """A file beside an artifact (a run's ``rounds.json``), read as the artifact's own files are:
    only a regular file, never through a link, a pipe or a device, refused above ``limit`` bytes
    before it is read (``constant`` names the limit in the error); None if it is absent."""
    path = Path(path)
    return _read_regular_file(path.parent, path.name, None, limit, constant)


def _read_regular_file(
    folder: Path, name: str, dir_fd: int | None, limit: int, constant: str | None = None
) -> bytes | None:
    """The file's bytes, None if absent; refuses anything but a regular file within ``limit``."""
    constant = constant or _LIMIT_NAMES[name]
    where = f"{folder}: {name}"
    path: str = name if dir_fd is not None else str(folder / name)
    try:
        # lstat first: a device or pipe is refused before it is even opened (opening some devices
        # has effects); fstat after opening is what decides (the entry may change in between).
        _check_regular(os.stat(path, dir_fd=dir_fd, follow_symlinks=False), where)
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a symlink
            raise ArtifactError(_not_regular(where, "a symbolic link")) from None
        raise ArtifactError(f"{where}: cannot open it ({err.strerror})") from None
    with os.fdopen(fd, "rb", buffering=0) as file:
        st = os.fstat(file.fileno())
        _check_regular(st, where)
        _check_size(st.st_size, limit, where, constant)
        return _read_at_most(file, limit, st.st_size, where, constant)


def _check_regular(st: os.stat_result, where: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    what = (
        "a symbolic link"
        if stat.S_ISLNK(st.st_mode)
        else "a folder"
        if stat.S_ISDIR(st.st_mode)
        else "a named pipe"
        if stat.S_ISFIFO(st.st_mode)
        else "a device"
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else "not a regular file"
    )
    raise ArtifactError(_not_regular(where, what))


def _not_regular(where: str, what: str) -> str:
    return (
        f"{where}: is {what}, not a regular file; refused (an artifact's files are read only "
        "as plain files, never through links, pipes or devices): copy the real file in its place"
    )


def _read_at_most(
    file: io.RawIOBase, limit: int, expected: int, where: str, constant: str
) -> bytes:
    """The file's bytes, never more than ``limit + 1`` read (a file growing past its fstat size,
    or past the limit, is refused)."""
    parts: list[bytes] = []
    total = 0
    want = min(expected, limit) + 1  # one read for the whole file, one byte more to see its end
    while total <= limit:
        chunk = file.read(want)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        want = min(_READ_CHUNK, limit + 1 - total)
    _check_size(total, limit, where, constant)
    return parts[0] if len(parts) == 1 else b"".join(parts)
