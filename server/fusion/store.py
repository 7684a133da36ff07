"""The fusion server's durable bank store: one SQLite file plus content-addressed weight files.

Layout of a store folder::

    <folder>/bank.sqlite            run key, vocabulary, expert records, checkpoints, round history
    <folder>/weights/<sha256>.npz   the bank's shared arrays of a checkpoint, named by their digest

The server checkpoints after every federated round. A run killed at any instant (SIGKILL included,
even in the middle of a checkpoint) and restarted resumes from the last complete checkpoint with
every expert record it held. That rests on two orderings:

* a weight file is written to a temporary file in ``weights/``, flushed and fsynced, renamed into
  place with ``os.replace`` and the folder fsynced (``protofuse.io.atomic_write_bytes``), *before*
  the SQL transaction that references it commits; so a committed checkpoint never points at a
  missing or half-written file;
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
fixed timestamps (``protofuse.io.npz_bytes``), never pickled, so equal arrays give equal bytes
and share one file.

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
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from protofuse.io import TEMP_PREFIX, atomic_write_bytes, fsync_dir, npz_bytes
from protofuse.records import ExpertRecord, Fidelity

SCHEMA_VERSION = 1
DATABASE = "bank.sqlite"
WEIGHTS = "weights"
BUSY_TIMEOUT_S = 10.0
_WEIGHT_NAME = re.compile(r"[0-9a-f]{64}\.npz")
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
    "pseudonym, distribution, n_examples, n_queries, fidelity_agreement, fidelity_kl, "
    "fidelity_n, consensus, trust, last_round"
)


class StoreError(RuntimeError):
    """The bank store refuses an operation or finds its files damaged; the message names the fix."""


@dataclass(frozen=True)
class Checkpoint:
    """The last complete checkpoint: shared weights, vocabulary, every expert ever seen, state."""

    round: int
    weights_digest: str
    arrays: dict[str, np.ndarray]
    vocabulary: tuple[str, ...]
    experts: tuple[ExpertRecord, ...]  # every expert ever seen, sorted by name (pseudonym)
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


class BankStore:
    """A folder holding one federated run's bank: ``bank.sqlite`` and ``weights/``.

    ``on_stage``, when given, is called with ``"weights_temp"`` (weight file fsynced under its
    temporary name), ``"weights_durable"`` (renamed into place, folder fsynced), ``"before_commit"``
    and ``"after_commit"`` as each checkpoint passes them: the crash-safety tests kill a child
    process there. It runs inside the checkpoint, under the store's locks; keep it quick.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        run_key: str,
        *,
        keep: int = 2,
        on_stage: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(run_key, str) or not run_key:
            raise StoreError(f"run_key must be a non-empty string, got {run_key!r}")
        if operator.index(keep) < 1:
            raise StoreError(f"keep must be at least 1 (the last checkpoint), got {keep}")
        self._folder = Path(folder)
        self._weights = self._folder / WEIGHTS
        self._keep = int(keep)
        self._on_stage = on_stage
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
        experts: Sequence[ExpertRecord],
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
            # Durable (fsynced, renamed, folder fsynced) before the transaction that refers to it.
            atomic_write_bytes(
                self._weights / f"{digest}.npz",
                data,
                before_replace=lambda: self._stage("weights_temp"),
            )
            self._stage("weights_durable")
            self._record(db, round, digest, vocabulary, experts, rows, state_json)
            self._stage("before_commit")
        self._stage("after_commit")
        try:
            self._collect_garbage()
        except (
            StoreError,
            OSError,
        ) as err:  # the checkpoint is committed; stale files wait for the next one
            _log.warning("%s: weight files not collected this round (%s)", self.path, err)
        return digest

    def _stage(self, stage: str) -> None:
        if self._on_stage is not None:
            self._on_stage(stage)

    def _check_against_last(
        self, db: sqlite3.Connection, round: int, vocabulary: tuple[str, ...]
    ) -> None:
        last = db.execute("SELECT max(round) FROM history").fetchone()[0]
        if last is not None and round <= last:
            raise StoreError(
                f"{self.path}: round {round} is not after the last checkpoint (round {last}); "
                "rounds must increase"
            )
        previous = _vocabulary(db)
        if vocabulary[: len(previous)] != previous:
            at = next(
                i
                for i, name in enumerate(previous)
                if i >= len(vocabulary) or vocabulary[i] != name
            )
            found = vocabulary[at] if at < len(vocabulary) else "nothing (removed)"
            raise StoreError(
                f"{self.path}: the vocabulary is append-only, but position {at} holds {found!r} "
                "instead of "
                f"{previous[at]!r}; keep the old labels in order and only append new ones"
            )

    def _record(
        self,
        db: sqlite3.Connection,
        round: int,
        digest: str,
        vocabulary: tuple[str, ...],
        experts: Sequence[ExpertRecord],
        rows: list[tuple[Any, ...]],
        state_json: str,
    ) -> None:
        known = db.execute("SELECT count(*) FROM vocabulary").fetchone()[0]
        db.executemany(
            "INSERT INTO vocabulary (position, name) VALUES (?, ?)",
            list(enumerate(vocabulary))[known:],
        )
        updates = ", ".join(f"{c} = excluded.{c}" for c in _EXPERT_COLUMNS.split(", ")[1:])
        db.executemany(
            f"INSERT INTO experts ({_EXPERT_COLUMNS}) VALUES ({', '.join('?' * 10)}) "
            f"ON CONFLICT (pseudonym) DO UPDATE SET {updates}",
            rows,
        )
        for expert in experts:  # an expert's label set may change between rounds: replace it
            db.execute("DELETE FROM expert_labels WHERE pseudonym = ?", (expert.name,))
            db.executemany(
                "INSERT INTO expert_labels (pseudonym, position, label) VALUES (?, ?, ?)",
                [(expert.name, i, name) for i, name in enumerate(expert.labels)],
            )
        n_known = db.execute("SELECT count(*) FROM experts").fetchone()[0]
        db.execute(
            "INSERT INTO history (round, weights_digest, created, vocabulary_size, n_experts, "
            "n_known) VALUES (?, ?, ?, ?, ?, ?)",
            (round, digest, time.time(), len(vocabulary), len(experts), n_known),
        )
        db.execute("INSERT INTO checkpoints (round, state) VALUES (?, ?)", (round, state_json))
        db.execute(
            "DELETE FROM checkpoints WHERE round NOT IN (SELECT round FROM checkpoints ORDER BY "
            "round DESC LIMIT ?)",
            (self._keep,),
        )

    def _collect_garbage(self) -> None:
        """Delete weight files no kept checkpoint references, including interrupted writes.

        Runs under SQLite's write lock: checkpoints write their files under that lock too, so a
        file another process is about to commit is never mistaken for an orphan.
        """
        with self._lock, self._write() as db:
            wanted = {
                f"{d}.npz"
                for (d,) in db.execute(
                    "SELECT weights_digest FROM checkpoints JOIN history USING (round)"
                )
            }
            removed = False
            for entry in self._weights.iterdir():
                ours = _WEIGHT_NAME.fullmatch(entry.name) or entry.name.startswith(TEMP_PREFIX)
                if ours and entry.name not in wanted:
                    with suppress(FileNotFoundError):
                        entry.unlink()
                    removed = True
            if removed:
                fsync_dir(self._weights)

    # -- reading ---------------------------------------------------------------------------------

    def latest(self) -> Checkpoint | None:
        """The last complete checkpoint, its weight file verified; None for a new store."""
        with self._lock, self._read() as db:
            row = db.execute(
                "SELECT round, weights_digest, vocabulary_size, state FROM checkpoints JOIN "
                "history USING (round) "
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

    def experts(self) -> tuple[ExpertRecord, ...]:
        """Every expert ever checkpointed, sorted by name (pseudonym)."""
        with self._lock, self._read() as db:
            return _experts(db)

    def rounds(self) -> list[tuple[int, str]]:
        """(round, weights digest) of the kept checkpoints, ascending."""
        with self._lock, self._read() as db:
            return list(
                db.execute(
                    "SELECT round, weights_digest FROM checkpoints JOIN history USING (round) "
                    "ORDER BY round"
                )
            )

    def history(self) -> list[RoundRecord]:
        """Every round ever checkpointed, ascending, including those whose weights were deleted."""
        with self._lock, self._read() as db:
            rows = db.execute(
                "SELECT round, weights_digest, created, vocabulary_size, n_experts, n_known FROM "
                "history ORDER BY round"
            )
            return [RoundRecord(*row) for row in rows]

    def weights(self, round: int) -> dict[str, np.ndarray]:
        """The shared arrays of a kept checkpoint (verified), e.g. to score the bank round by
        round."""
        digests = dict(self.rounds())
        if round not in digests:
            raise StoreError(
                f"{self._folder}: no kept checkpoint of round {round} (kept: {sorted(digests)}); "
                "keep more with [federation] keep_checkpoints"
            )
        return self._load_weights(digests[round])

    def _load_weights(self, digest: str) -> dict[str, np.ndarray]:
        file = self._weights / f"{digest}.npz"
        fix = (
            f"restore {self._weights} from a backup, or delete {self._folder} to start the run "
            "again"
        )
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"{file}: weight file of the last checkpoint is missing; {fix}"
            ) from None
        if _sha256(data) != digest:
            raise StoreError(
                f"{file}: contents do not match the SHA-256 in its name (corrupted or truncated); "
                f"{fix}"
            )
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
                    f"{self.path}: schema version {version}, this protofuse reads version "
                    f"{SCHEMA_VERSION}; "
                    "open it with the protofuse that wrote it, or use another --out folder"
                )
            stored = db.execute("SELECT run_key FROM run").fetchone()[0]
        if stored != run_key:
            raise StoreError(
                f"{self.path} holds run {stored}, not {run_key}; use another --out folder or "
                "delete it"
            )

    def _create_schema(self, db: sqlite3.Connection, run_key: str) -> None:
        if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(
                f"{self.path}: a SQLite database that is not a protofuse bank store; use another "
                "--out folder"
            )
        # Not executescript: it would COMMIT the open transaction, and the version check with it.
        for statement in _statements(_SCHEMA):
            db.execute(statement)
        db.execute(
            "INSERT INTO run (id, run_key, created) VALUES (1, ?, ?)", (run_key, time.time())
        )
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
            raise StoreError(
                f"{self.path}: {err}; is another server writing to this --out folder?"
            ) from None
        try:
            yield db
        except (
            sqlite3.Error
        ) as err:  # a constraint the checks above missed: refuse, keep the old state
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreError(
                f"{self.path}: {err}; nothing was recorded, the previous checkpoint is intact"
            ) from None
        except BaseException:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as err:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreError(
                f"{self.path}: commit failed ({err}); the previous checkpoint is intact"
            ) from None


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
        raise StoreError(
            f"vocabulary lists {twice[:3]!r} more than once; each label name appears once"
        )
    return names


def _check_unique(experts: Sequence[ExpertRecord]) -> Sequence[ExpertRecord]:
    seen: set[str] = set()
    for expert in experts:
        if not isinstance(expert, ExpertRecord):
            raise StoreError(
                "experts must be protofuse.records.ExpertRecord records, got "
                f"{type(expert).__name__}"
            )
        if expert.name in seen:
            raise StoreError(
                f"expert {expert.name!r} appears twice in one checkpoint; send one record per "
                "expert"
            )
        seen.add(expert.name)
    return experts


def _expert_row(expert: ExpertRecord, vocabulary: set[str], round: int) -> tuple[Any, ...]:
    """The expert's ``experts`` row, after checks that name the expert and the field (the
    record's name is the ``pseudonym`` column, its weight the ``trust`` column)."""
    who = f"expert {expert.name!r}"
    if not isinstance(expert.name, str) or not expert.name:
        raise StoreError(
            f"an expert's name (pseudonym) must be a non-empty string, got {expert.name!r}"
        )
    missing = [n for n in expert.labels if n not in vocabulary]
    if missing:
        raise StoreError(
            f"{who} has labels {missing[:5]!r} outside the vocabulary; add them to the vocabulary "
            "first"
        )
    if len(set(expert.labels)) != len(expert.labels):
        raise StoreError(f"{who} lists a label twice in {expert.labels!r}")
    fidelity = expert.fidelity
    if not isinstance(fidelity, Fidelity):
        raise StoreError(
            f"{who}: fidelity must be a protofuse.records.Fidelity, got {type(fidelity).__name__}"
        )
    counts = {
        name: _count(who, name, value)
        for name, value in (
            ("n_examples", expert.n_examples),
            ("n_queries", expert.n_queries),
            ("fidelity.n", fidelity.n),
            ("last_round", expert.last_round),
        )
    }
    if counts["last_round"] > round:
        raise StoreError(
            f"{who}: last_round {counts['last_round']} is after the checkpoint's round {round}"
        )
    trust = _real(who, "weight", expert.weight)
    if not 0.0 <= trust <= 1.0:
        raise StoreError(f"{who}: weight (trust) {trust} is outside [0, 1]")
    consensus = (
        _real(who, "consensus", expert.consensus) if expert.consensus_measured else None
    )  # NaN: not measured, NULL
    return (
        expert.name,
        expert.distribution,
        counts["n_examples"],
        counts["n_queries"],
        _real(who, "fidelity.agreement", fidelity.agreement),
        _real(who, "fidelity.kl", fidelity.kl),
        counts["fidelity.n"],
        consensus,
        trust,
        counts["last_round"],
    )


_INT64_MAX = 2**63 - 1


def _count(who: str, name: str, value: Any) -> int:
    try:
        number = operator.index(value)  # numpy integers pass, floats and strings do not
    except TypeError:
        raise StoreError(f"{who}: {name} must be an integer, got {value!r}") from None
    if number < 0:
        raise StoreError(f"{who}: {name} must be non-negative, got {number}")
    if number > _INT64_MAX:  # SQLite's integers are signed 64-bit
        raise StoreError(f"{who}: {name} is {number}, more than a count can be (2**63 - 1)")
    return number


def _real(who: str, name: str, value: Any) -> float:
    try:
        number = float(value)  # numpy floats cannot be bound by sqlite3 as they are
    except (TypeError, ValueError):
        raise StoreError(f"{who}: {name} must be a number, got {value!r}") from None
    if math.isnan(number):  # SQLite would store NaN as NULL and lose it
        raise StoreError(f"{who}: {name} is NaN; store a measured value")
    if math.isinf(number):  # nothing non-finite is written: a bank built on it cannot be served
        raise StoreError(f"{who}: {name} is not finite ({number!r}); store a measured value")
    return number


def _encode_state(state: dict[str, Any]) -> str:
    if not isinstance(state, dict):
        raise StoreError(f"state must be a dict, got {type(state).__name__}")
    try:
        return json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(
            f"state is not JSON-able ({err}); keep plain numbers, strings, lists and dicts in it"
        ) from None


# -- weight files ---------------------------------------------------------------------------------


def _encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` whose bytes depend only on the arrays (sorted names, fixed timestamps, no
    pickle)."""
    if not arrays:
        raise StoreError("arrays is empty; a checkpoint needs the bank's weights")
    for name in arrays:
        if not isinstance(name, str) or not name:
            raise StoreError(f"array names must be non-empty strings, got {name!r}")
        if np.asarray(arrays[name]).dtype.hasobject:
            raise StoreError(
                f"array {name!r} has dtype {np.asarray(arrays[name]).dtype}; only plain numeric "
                "arrays are stored (no pickle)"
            )
    return npz_bytes({name: arrays[name] for name in sorted(arrays)})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- database helpers -----------------------------------------------------------------------------


def _make_folders(folder: Path, weights: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder} is a file; give a folder for the bank store (--out)")
    created = not weights.is_dir()
    weights.mkdir(parents=True, exist_ok=True)
    if created:  # make the new folders' entries durable before files go in them
        fsync_dir(folder)
        fsync_dir(folder.parent)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are begun and committed explicitly, never implicitly.
    db = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(
                f"{path}: SQLite cannot use a WAL journal here (got {mode!r}); put --out on a "
                "local disk"
            )
        db.execute(
            "PRAGMA synchronous = FULL"
        )  # fsync the WAL at every commit: a commit survives power loss
        db.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as err:
        db.close()
        raise StoreError(
            f"{path}: cannot open as a bank store ({err}); use another --out folder or delete the "
            "file"
        ) from None
    except BaseException:
        db.close()
        raise
    return db


def _statements(script: str) -> list[str]:
    without_comments = "\n".join(
        line for line in script.splitlines() if not line.lstrip().startswith("--")
    )
    return [s.strip() for s in without_comments.split(";") if s.strip()]


def _vocabulary(db: sqlite3.Connection) -> tuple[str, ...]:
    return tuple(name for (name,) in db.execute("SELECT name FROM vocabulary ORDER BY position"))


def _experts(db: sqlite3.Connection) -> tuple[ExpertRecord, ...]:
    labels: dict[str, list[str]] = {}
    for pseudonym, label in db.execute(
        "SELECT pseudonym, label FROM expert_labels ORDER BY pseudonym, position"
    ):
        labels.setdefault(pseudonym, []).append(label)
    rows = db.execute(f"SELECT {_EXPERT_COLUMNS} FROM experts ORDER BY pseudonym")
    return tuple(_expert(row, tuple(labels.get(row[0], ()))) for row in rows)


def _expert(row: tuple[Any, ...], label_names: tuple[str, ...]) -> ExpertRecord:
    (
        pseudonym,
        distribution,
        n_examples,
        n_queries,
        agreement,
        kl,
        fidelity_n,
        consensus,
        trust,
        last_round,
    ) = row
    return ExpertRecord(
        name=pseudonym,
        labels=label_names,
        fidelity=Fidelity(agreement, kl, fidelity_n),
        n_queries=n_queries,
        consensus=consensus,  # NULL: not measured (NaN)
        weight=trust,
        n_examples=n_examples,
        last_round=last_round,
        distribution=bytes(distribution),
    )
