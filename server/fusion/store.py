"""The fusion server's durable bank store: one SQLite file plus content-addressed weight files.

Layout of a store folder::

    <folder>/bank.sqlite            run key, vocabulary, expert records, checkpoints, round history
    <folder>/weights/<sha256>.npz   the bank's shared arrays of a checkpoint, named by their digest

The server checkpoints after every federated round. A run killed at any instant (SIGKILL included,
even in the middle of a checkpoint) and restarted resumes from the last complete checkpoint with
every expert record it held. That rests on two orderings:

* a weight file is written to a temporary file in ``weights/``, flushed and fsynced, renamed into
  place with ``os.replace`` and the folder fsynced, *before* the SQL transaction that references
  it commits; so a committed checkpoint never points at a missing or half-written file;
* the SQL transaction (WAL journal, ``synchronous=FULL``) records the round, the vocabulary, the
  upserted experts and the state together; a crash before ``COMMIT`` leaves the previous
  checkpoint as it was, a crash after leaves the new one complete. Weight files nobody references
  (an interrupted write, checkpoints older than the last ``keep``) are deleted only after a
  commit, under SQLite's write lock, so a file is never removed while a checkpoint could need it.

Why the standard library's ``sqlite3`` and no ORM: the store is six small tables written by one
process, and its correctness hangs on exactly when ``BEGIN IMMEDIATE`` and ``COMMIT`` happen
relative to the fsync of a weight file. Plain SQL keeps that ordering visible in a few lines; an
ORM's unit of work, autoflush and session lifetime would hide it, and would add a dependency to a
server that otherwise needs none for storage.

Integrity: foreign keys tie every expert label to the vocabulary, and checks keep trust in [0, 1];
the vocabulary is append-only because label indices in the shared weights refer to its positions.
The SHA-256 of a weight file detects accidents (disk errors, truncation, a stray edit), not an
attacker who can rewrite files. Arrays are stored as ``.npy`` members of an uncompressed zip with
fixed timestamps, never pickled, so equal arrays give equal bytes and share one file.

One server process writes a store; other processes may read it (WAL lets them), but a reader that
races a writer's garbage collection across ``keep`` checkpoints can find its weight file gone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import operator
import os
import re
import sqlite3
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

SCHEMA_VERSION = 1
DATABASE = "bank.sqlite"
WEIGHTS = "weights"
BUSY_TIMEOUT_S = 10.0
_TEMP_PREFIX = ".tmp-"
_WEIGHT_NAME = re.compile(r"[0-9a-f]{64}\.npz")
# Zip members get a fixed timestamp so the file's bytes, hence its name, depend on content only.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_key TEXT NOT NULL CHECK (run_key <> ''),
    created REAL NOT NULL
);
-- Append-only: a label's position never changes once a checkpoint recorded it.
CREATE TABLE vocabulary (
    position INTEGER PRIMARY KEY CHECK (position >= 0),
    name TEXT NOT NULL UNIQUE
);
-- Every round ever checkpointed, kept after its weight file is garbage-collected.
CREATE TABLE history (
    round INTEGER PRIMARY KEY CHECK (round >= 0),
    weights_digest TEXT NOT NULL CHECK (length(weights_digest) = 64),
    created REAL NOT NULL,
    vocabulary_size INTEGER NOT NULL CHECK (vocabulary_size >= 0),
    n_experts INTEGER NOT NULL CHECK (n_experts >= 0),
    n_known INTEGER NOT NULL CHECK (n_known >= 0)
);
-- The last `keep` checkpoints: these, and only these, keep their weight files.
CREATE TABLE checkpoints (
    round INTEGER PRIMARY KEY REFERENCES history (round),
    state TEXT NOT NULL
);
CREATE TABLE experts (
    pseudonym TEXT PRIMARY KEY CHECK (pseudonym <> ''),
    distribution BLOB NOT NULL,
    n_examples INTEGER NOT NULL CHECK (n_examples >= 0),
    n_queries INTEGER NOT NULL CHECK (n_queries >= 0),
    fidelity_agreement REAL NOT NULL,
    fidelity_kl REAL NOT NULL,
    fidelity_n INTEGER NOT NULL CHECK (fidelity_n >= 0),
    consensus REAL,
    trust REAL NOT NULL CHECK (trust >= 0 AND trust <= 1),
    last_round INTEGER NOT NULL CHECK (last_round >= 0)
);
CREATE TABLE expert_labels (
    pseudonym TEXT NOT NULL REFERENCES experts (pseudonym) ON DELETE CASCADE,
    position INTEGER NOT NULL CHECK (position >= 0),
    label TEXT NOT NULL REFERENCES vocabulary (name),
    PRIMARY KEY (pseudonym, position),
    UNIQUE (pseudonym, label)
);
"""

_EXPERT_COLUMNS = (
    "pseudonym, distribution, n_examples, n_queries, fidelity_agreement, fidelity_kl, fidelity_n, consensus, trust, last_round"
)


class StoreError(RuntimeError):
    """The bank store refuses an operation or finds its files damaged; the message names the fix."""


@dataclass(frozen=True)
class ExpertState:
    """What the server remembers about one expert; one record per pseudonym, upserted each round."""

    pseudonym: str
    label_names: tuple[str, ...]
    distribution: bytes  # the encoded prototype-distribution protobuf message (opaque here)
    n_examples: int
    n_queries: int
    fidelity_agreement: float
    fidelity_kl: float
    fidelity_n: int
    consensus: float | None  # agreement with the bank's consensus, None until measured
    trust: float  # in [0, 1]
    last_round: int

    def __post_init__(self) -> None:
        # Lists and bytearrays would compare unequal to what the store reads back.
        if isinstance(self.label_names, str):
            raise TypeError(f"label_names must be a sequence of names, got the string {self.label_names!r}")
        object.__setattr__(self, "label_names", tuple(self.label_names))
        object.__setattr__(self, "distribution", bytes(memoryview(self.distribution)))  # an int is no message


@dataclass(frozen=True)
class Checkpoint:
    """The last complete checkpoint: shared weights, vocabulary, every expert ever seen, state."""

    round: int
    weights_digest: str
    arrays: dict[str, np.ndarray]
    vocabulary: tuple[str, ...]
    experts: tuple[ExpertState, ...]  # every expert ever seen, sorted by pseudonym
    state: dict[str, Any]  # as JSON reads it back: tuples become lists, keys become strings


@dataclass(frozen=True)
class RoundRecord:
    """One line of a run's history; outlives the round's weight file."""

    round: int
    weights_digest: str
    created: float  # Unix time at which the round was recorded
    vocabulary_size: int
    n_experts: int  # experts reported in this round
    n_known: int  # expert records held after this round's upsert


def _no_hook(stage: str) -> None:
    """Default crash-test hook: does nothing."""


# Called with "weights_temp", "weights_durable", "before_commit" and "after_commit" while a
# checkpoint runs. Only the crash-safety tests replace it (in a child process they SIGKILL).
_checkpoint_hook: Callable[[str], None] = _no_hook


class BankStore:
    """A folder holding one federated run's bank: ``bank.sqlite`` and ``weights/``."""

    def __init__(self, folder: str | os.PathLike, run_key: str, *, keep: int = 2) -> None:
        if not isinstance(run_key, str) or not run_key:
            raise StoreError(f"run_key must be a non-empty string, got {run_key!r}")
        if operator.index(keep) < 1:
            raise StoreError(f"keep must be at least 1 (the last checkpoint), got {keep}")
        self._folder = Path(folder)
        self._weights = self._folder / WEIGHTS
        self._keep = int(keep)
        self._lock = threading.RLock()  # the server may call from Flower's threads
        _make_folders(self._folder, self._weights)
        self._db: sqlite3.Connection | None = _connect(self.path)
        try:
            self._open_run(run_key)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self._folder / DATABASE

    # -- writing ---------------------------------------------------------------------------------

    def checkpoint(
        self,
        round: int,
        arrays: dict[str, np.ndarray],
        vocabulary: Sequence[str],
        experts: Sequence[ExpertState],
        state: dict[str, Any],
    ) -> str:
        """Record one round durably; returns the digest of its weight file.

        ``round`` must exceed the last checkpoint's; ``vocabulary`` must extend the previous one;
        ``experts`` are upserted (absent experts keep their records) and their labels must all be
        in ``vocabulary``. Weight files outside the last ``keep`` checkpoints are deleted after.
        """
        round = _check_round(round)
        vocabulary = _check_vocabulary(vocabulary)
        experts = tuple(experts)  # iterated twice below: a generator would be empty the second time
        known = set(vocabulary)
        rows = [_expert_row(e, known, round) for e in _check_unique(experts)]
        state_json = _encode_state(state)
        data = _encode_arrays(arrays)  # before the lock: serialising 2 MB needs no database
        digest = _sha256(data)
        with self._lock, self._write() as db:
            self._check_against_last(db, round, vocabulary)
            _write_atomically(self._weights, f"{digest}.npz", data)
            _checkpoint_hook("weights_durable")
            self._record(db, round, digest, vocabulary, experts, rows, state_json)
            _checkpoint_hook("before_commit")
        _checkpoint_hook("after_commit")
        try:
            self._collect_garbage()
        except (StoreError, OSError) as err:  # the checkpoint is committed; stale files wait for the next one
            _log.warning("%s: weight files not collected this round (%s)", self.path, err)
        return digest

    def _check_against_last(self, db: sqlite3.Connection, round: int, vocabulary: tuple[str, ...]) -> None:
        last = db.execute("SELECT max(round) FROM history").fetchone()[0]
        if last is not None and round <= last:
            raise StoreError(f"{self.path}: round {round} is not after the last checkpoint (round {last}); rounds must increase")
        previous = _vocabulary(db)
        if vocabulary[: len(previous)] != previous:
            at = next(i for i, name in enumerate(previous) if i >= len(vocabulary) or vocabulary[i] != name)
            found = vocabulary[at] if at < len(vocabulary) else "nothing (removed)"
            raise StoreError(
                f"{self.path}: the vocabulary is append-only, but position {at} holds {found!r} instead of "
                f"{previous[at]!r}; keep the old labels in order and only append new ones"
            )

    def _record(
        self,
        db: sqlite3.Connection,
        round: int,
        digest: str,
        vocabulary: tuple[str, ...],
        experts: Sequence[ExpertState],
        rows: list[tuple[Any, ...]],
        state_json: str,
    ) -> None:
        known = db.execute("SELECT count(*) FROM vocabulary").fetchone()[0]
        db.executemany("INSERT INTO vocabulary (position, name) VALUES (?, ?)", list(enumerate(vocabulary))[known:])
        updates = ", ".join(f"{c} = excluded.{c}" for c in _EXPERT_COLUMNS.split(", ")[1:])
        db.executemany(
            f"INSERT INTO experts ({_EXPERT_COLUMNS}) VALUES ({', '.join('?' * 10)}) "
            f"ON CONFLICT (pseudonym) DO UPDATE SET {updates}",
            rows,
        )
        for expert in experts:  # an expert's label set may change between rounds: replace it
            db.execute("DELETE FROM expert_labels WHERE pseudonym = ?", (expert.pseudonym,))
            db.executemany(
                "INSERT INTO expert_labels (pseudonym, position, label) VALUES (?, ?, ?)",
                [(expert.pseudonym, i, name) for i, name in enumerate(expert.label_names)],
            )
        n_known = db.execute("SELECT count(*) FROM experts").fetchone()[0]
        db.execute(
            "INSERT INTO history (round, weights_digest, created, vocabulary_size, n_experts, n_known) VALUES (?, ?, ?, ?, ?, ?)",
            (round, digest, time.time(), len(vocabulary), len(experts), n_known),
        )
        db.execute("INSERT INTO checkpoints (round, state) VALUES (?, ?)", (round, state_json))
        db.execute(
            "DELETE FROM checkpoints WHERE round NOT IN (SELECT round FROM checkpoints ORDER BY round DESC LIMIT ?)",
            (self._keep,),
        )

    def _collect_garbage(self) -> None:
        """Delete weight files no kept checkpoint references, including interrupted writes.

        Runs under SQLite's write lock: checkpoints write their files under that lock too, so a
        file another process is about to commit is never mistaken for an orphan.
        """
        with self._lock, self._write() as db:
            wanted = {f"{d}.npz" for (d,) in db.execute("SELECT weights_digest FROM checkpoints JOIN history USING (round)")}
            removed = False
            for entry in self._weights.iterdir():
                ours = _WEIGHT_NAME.fullmatch(entry.name) or entry.name.startswith(_TEMP_PREFIX)
                if ours and entry.name not in wanted:
                    with suppress(FileNotFoundError):
                        entry.unlink()
                    removed = True
            if removed:
                _fsync_folder(self._weights)

    # -- reading ---------------------------------------------------------------------------------

    def latest(self) -> Checkpoint | None:
        """The last complete checkpoint, its weight file verified; None for a new store."""
        with self._lock, self._read() as db:
            row = db.execute(
                "SELECT round, weights_digest, vocabulary_size, state FROM checkpoints JOIN history USING (round) "
                "ORDER BY round DESC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            round, digest, size, state_json = row
            vocabulary = _vocabulary(db)[:size]
            experts = _experts(db)
        return Checkpoint(
            round=round,
            weights_digest=digest,
            arrays=self._load_weights(digest),
            vocabulary=vocabulary,
            experts=experts,
            state=json.loads(state_json),
        )

    def experts(self) -> tuple[ExpertState, ...]:
        """Every expert ever checkpointed, sorted by pseudonym."""
        with self._lock, self._read() as db:
            return _experts(db)

    def rounds(self) -> list[tuple[int, str]]:
        """(round, weights digest) of the kept checkpoints, ascending."""
        with self._lock, self._read() as db:
            return list(db.execute("SELECT round, weights_digest FROM checkpoints JOIN history USING (round) ORDER BY round"))

    def history(self) -> list[RoundRecord]:
        """Every round ever checkpointed, ascending, including those whose weights were deleted."""
        with self._lock, self._read() as db:
            rows = db.execute(
                "SELECT round, weights_digest, created, vocabulary_size, n_experts, n_known FROM history ORDER BY round"
            )
            return [RoundRecord(*row) for row in rows]

    def weights(self, round: int) -> dict[str, np.ndarray]:
        """The shared arrays of a kept checkpoint (verified), e.g. to score the bank round by round."""
        digests = dict(self.rounds())
        if round not in digests:
            raise StoreError(f"{self._folder}: no kept checkpoint of round {round} (kept: {sorted(digests)}); keep more with [federation] keep_checkpoints")
        return self._load_weights(digests[round])

    def _load_weights(self, digest: str) -> dict[str, np.ndarray]:
        file = self._weights / f"{digest}.npz"
        fix = f"restore {self._weights} from a backup, or delete {self._folder} to start the run again"
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{file}: weight file of the last checkpoint is missing; {fix}") from None
        if _sha256(data) != digest:
            raise StoreError(f"{file}: contents do not match the SHA-256 in its name (corrupted or truncated); {fix}")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise StoreError(f"{file}: not a plain-array .npz ({err}); {fix}") from None

    # -- connection ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database; further calls raise StoreError. Closing twice is harmless."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_run(self, run_key: str) -> None:
        with self._read() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            with self._write() as db:  # re-read under the write lock: another process may have won
                if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                    self._create_schema(db, run_key)
        with self._read() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version}, this protofuse reads version {SCHEMA_VERSION}; "
                    "open it with the protofuse that wrote it, or use another --out folder"
                )
            stored = db.execute("SELECT run_key FROM run").fetchone()[0]
        if stored != run_key:
            raise StoreError(f"{self.path} holds run {stored}, not {run_key}; use another --out folder or delete it")

    def _create_schema(self, db: sqlite3.Connection, run_key: str) -> None:
        if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(f"{self.path}: a SQLite database that is not a protofuse bank store; use another --out folder")
        # Not executescript: it would COMMIT the open transaction, and the version check with it.
        for statement in _statements(_SCHEMA):
            db.execute(statement)
        db.execute("INSERT INTO run (id, run_key, created) VALUES (1, ?, ?)", (run_key, time.time()))
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot even while another process commits."""
        with self._transaction("BEGIN") as db:
            yield db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start (no upgrade deadlock)."""
        with self._transaction("BEGIN IMMEDIATE") as db:
            yield db

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        if self._db is None:
            raise StoreError(f"{self.path}: the store is closed; open a new BankStore")
        db = self._db
        try:
            db.execute(begin)
        except sqlite3.OperationalError as err:
            raise StoreError(f"{self.path}: {err}; is another server writing to this --out folder?") from None
        try:
            yield db
        except sqlite3.Error as err:  # a constraint the checks above missed: refuse, keep the old state
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreError(f"{self.path}: {err}; nothing was recorded, the previous checkpoint is intact") from None
        except BaseException:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as err:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreError(f"{self.path}: commit failed ({err}); the previous checkpoint is intact") from None


# -- validation -----------------------------------------------------------------------------------


def _check_round(round: int) -> int:
    try:
        value = operator.index(round)
    except TypeError:
        raise StoreError(f"round must be an integer, got {round!r}") from None
    if value < 0:
        raise StoreError(f"round must be non-negative, got {value}")
    return value


def _check_vocabulary(vocabulary: Sequence[str]) -> tuple[str, ...]:
    names = tuple(vocabulary)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise StoreError(f"vocabulary entries must be non-empty strings, got {bad[:3]!r}")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise StoreError(f"vocabulary lists {twice[:3]!r} more than once; each label name appears once")
    return names


def _check_unique(experts: Sequence[ExpertState]) -> Sequence[ExpertState]:
    seen: set[str] = set()
    for expert in experts:
        if not isinstance(expert, ExpertState):
            raise StoreError(f"experts must be ExpertState records, got {type(expert).__name__}")
        if expert.pseudonym in seen:
            raise StoreError(f"expert {expert.pseudonym!r} appears twice in one checkpoint; send one record per expert")
        seen.add(expert.pseudonym)
    return experts


def _expert_row(expert: ExpertState, vocabulary: set[str], round: int) -> tuple[Any, ...]:
    """The expert's ``experts`` row, after checks that name the expert and the field."""
    who = f"expert {expert.pseudonym!r}"
    if not isinstance(expert.pseudonym, str) or not expert.pseudonym:
        raise StoreError(f"an expert's pseudonym must be a non-empty string, got {expert.pseudonym!r}")
    missing = [n for n in expert.label_names if n not in vocabulary]
    if missing:
        raise StoreError(f"{who} has labels {missing[:5]!r} outside the vocabulary; add them to the vocabulary first")
    if len(set(expert.label_names)) != len(expert.label_names):
        raise StoreError(f"{who} lists a label twice in {expert.label_names!r}")
    counts = {name: _count(who, name, getattr(expert, name)) for name in ("n_examples", "n_queries", "fidelity_n", "last_round")}
    if counts["last_round"] > round:
        raise StoreError(f"{who}: last_round {counts['last_round']} is after the checkpoint's round {round}")
    trust = _real(who, "trust", expert.trust)
    if not 0.0 <= trust <= 1.0:
        raise StoreError(f"{who}: trust {trust} is outside [0, 1]")
    consensus = None if expert.consensus is None else _real(who, "consensus", expert.consensus)
    return (
        expert.pseudonym,
        expert.distribution,
        counts["n_examples"],
        counts["n_queries"],
        _real(who, "fidelity_agreement", expert.fidelity_agreement),
        _real(who, "fidelity_kl", expert.fidelity_kl),
        counts["fidelity_n"],
        consensus,
        trust,
        counts["last_round"],
    )


def _count(who: str, name: str, value: Any) -> int:
    try:
        number = operator.index(value)  # numpy integers pass, floats and strings do not
    except TypeError:
        raise StoreError(f"{who}: {name} must be an integer, got {value!r}") from None
    if number < 0:
        raise StoreError(f"{who}: {name} must be non-negative, got {number}")
    return number


def _real(who: str, name: str, value: Any) -> float:
    try:
        number = float(value)  # numpy floats cannot be bound by sqlite3 as they are
    except (TypeError, ValueError):
        raise StoreError(f"{who}: {name} must be a number, got {value!r}") from None
    if math.isnan(number):  # SQLite would store NaN as NULL and lose it
        raise StoreError(f"{who}: {name} is NaN; store a measured value")
    return number


def _encode_state(state: dict[str, Any]) -> str:
    if not isinstance(state, dict):
        raise StoreError(f"state must be a dict, got {type(state).__name__}")
    try:
        return json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"state is not JSON-able ({err}); keep plain numbers, strings, lists and dicts in it") from None


# -- weight files ---------------------------------------------------------------------------------


def _encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` whose bytes depend only on the arrays (sorted names, fixed timestamps, no pickle)."""
    if not arrays:
        raise StoreError("arrays is empty; a checkpoint needs the bank's weights")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as npz:
        for name in sorted(arrays):
            if not isinstance(name, str) or not name:
                raise StoreError(f"array names must be non-empty strings, got {name!r}")
            array = np.asarray(arrays[name])
            if array.dtype.hasobject:
                raise StoreError(f"array {name!r} has dtype {array.dtype}; only plain numeric arrays are stored (no pickle)")
            with npz.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def _write_atomically(folder: Path, name: str, data: bytes) -> None:
    """Temp file in the same folder, flush + fsync, rename over, fsync the folder."""
    fd, temp = tempfile.mkstemp(dir=folder, prefix=_TEMP_PREFIX, suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        _checkpoint_hook("weights_temp")
        os.replace(temp, folder / name)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_folder(folder)  # the rename itself must be durable before SQL refers to the file


def _fsync_folder(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals renames itself
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- database helpers -----------------------------------------------------------------------------


def _make_folders(folder: Path, weights: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder} is a file; give a folder for the bank store (--out)")
    created = not weights.is_dir()
    weights.mkdir(parents=True, exist_ok=True)
    if created:  # make the new folders' entries durable before files go in them
        _fsync_folder(folder)
        _fsync_folder(folder.parent)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are begun and committed explicitly, never implicitly.
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{path}: SQLite cannot use a WAL journal here (got {mode!r}); put --out on a local disk")
        db.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit: a commit survives power loss
        db.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as err:
        db.close()
        raise StoreError(f"{path}: cannot open as a bank store ({err}); use another --out folder or delete the file") from None
    except BaseException:
        db.close()
        raise
    return db


def _statements(script: str) -> list[str]:
    without_comments = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in without_comments.split(";") if s.strip()]


def _vocabulary(db: sqlite3.Connection) -> tuple[str, ...]:
    return tuple(name for (name,) in db.execute("SELECT name FROM vocabulary ORDER BY position"))


def _experts(db: sqlite3.Connection) -> tuple[ExpertState, ...]:
    labels: dict[str, list[str]] = {}
    for pseudonym, label in db.execute("SELECT pseudonym, label FROM expert_labels ORDER BY pseudonym, position"):
        labels.setdefault(pseudonym, []).append(label)
    rows = db.execute(f"SELECT {_EXPERT_COLUMNS} FROM experts ORDER BY pseudonym")
    return tuple(_expert(row, tuple(labels.get(row[0], ()))) for row in rows)


def _expert(row: tuple[Any, ...], label_names: tuple[str, ...]) -> ExpertState:
    pseudonym, distribution, n_examples, n_queries, agreement, kl, fidelity_n, consensus, trust, last_round = row
    return ExpertState(
        pseudonym=pseudonym,
        label_names=label_names,
        distribution=bytes(distribution),
        n_examples=n_examples,
        n_queries=n_queries,
        fidelity_agreement=agreement,
        fidelity_kl=kl,
        fidelity_n=fidelity_n,
        consensus=consensus,
        trust=trust,
        last_round=last_round,
    )
