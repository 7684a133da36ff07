"""Codecs of peer review (protos/protofuse/v1/federation.proto: LabelRows, ExpertRows,
PeerReview, ReviewScores): the only code touching those generated classes.

Peer review is evidence about a client that does not come from the client: each client fits its
own view of its labels' prototype rows on the shared encoder (``ExpertRows``), the server passes
each view, without its owner's name, to the other clients that declared at least two of those
labels (``PeerReview``), and each of them scores it on its own held-out queries against its own
expert (``ReviewScores``). Every field is validated here, before anything is built from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protofuse.v1 import federation_pb2

from .federation import (
    FORMAT_VERSION,
    MAX_LABELS,
    WireError,
    _check_finite,
    _check_labels,
    _check_pseudonym,
    _check_uint,
    _expect_type,
    _parse,
    _serialize,
)

MAX_DIM = 1 << 16  # a prototype row's width; the bank's feature width is far below it
MAX_VALUES = 1 << 24  # labels x dim of one LabelRows: 64 MiB of float32 at most
MAX_CANDIDATES = 64  # candidates one PeerReview may carry (the server sends at most 16)
MIN_SHARED_LABELS = 2  # a candidate is scored as a classifier over at least two labels
# The largest encoded messages decoded: refused before protobuf parses (and allocates) them.
MAX_SCORES_BYTES = 16 * 1024  # 64 scores of 13 bytes, a pseudonym and the framing
MAX_ROWS_BYTES = 4 * MAX_VALUES + 8 * 1024 * 1024  # the values, the labels and the framing

PEER_REVIEW_KEY = "peer-review"  # in the train message's "config" ConfigRecord
EXPERT_ROWS_KEY = "rows"  # in the reply's "fusion" ConfigRecord
REVIEW_SCORES_KEY = "reviews"  # in the reply's "fusion" ConfigRecord


@dataclass(frozen=True, eq=False)
class LabelRows:
    """Prototype rows (n, F) and biases (n,) of ``labels``; read-only float32 copies."""

    labels: tuple[str, ...]
    prototypes: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        for name in ("prototypes", "bias"):
            array = np.array(getattr(self, name), dtype=np.float32)
            array.flags.writeable = False
            object.__setattr__(self, name, array)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelRows):
            return NotImplemented
        return (
            self.labels == other.labels
            and self.prototypes.shape == other.prototypes.shape
            and bool(np.array_equal(self.prototypes, other.prototypes))
            and bool(np.array_equal(self.bias, other.bias))
        )

    __hash__ = None  # type: ignore[assignment]

    def subset(self, labels: list[str]) -> LabelRows:
        """The rows of ``labels`` (each one of ``self.labels``), in that order."""
        position = {c: i for i, c in enumerate(self.labels)}
        missing = [c for c in labels if c not in position]
        if missing:
            raise ValueError(f"labels {missing[:3]} are not among these rows' labels")
        index = [position[c] for c in labels]
        return LabelRows(tuple(labels), self.prototypes[index], self.bias[index])


@dataclass(frozen=True)
class ExpertRows:
    """A client's own view of its labels' rows in one round."""

    pseudonym: str
    round: int
    rows: LabelRows


@dataclass(frozen=True)
class PeerReview:
    """Anonymous candidates for one reviewer: (id, rows of labels it declared)."""

    round: int
    candidates: tuple[tuple[int, LabelRows], ...]


@dataclass(frozen=True)
class ReviewScores:
    """A reviewer's (candidate id, score in [-1, 1]) pairs."""

    pseudonym: str
    round: int
    scores: tuple[tuple[int, float], ...]


# -- codecs ------------------------------------------------------------------------------------


def encode_expert_rows(e: ExpertRows) -> bytes:
    _expect_type(e, ExpertRows, "ExpertRows")
    _check_pseudonym(e.pseudonym, "ExpertRows.pseudonym")
    _check_uint(e.round, "ExpertRows.round")
    msg = federation_pb2.ExpertRows(
        format_version=FORMAT_VERSION, pseudonym=e.pseudonym, round=int(e.round)
    )
    _rows_to_proto(e.rows, msg.rows, "ExpertRows.rows")
    return _serialize(msg)


def decode_expert_rows(data: bytes, *, dim: int | None = None) -> ExpertRows:
    """``dim``: the width the receiver's bank has; rows of another width are refused."""
    _check_size(data, MAX_ROWS_BYTES, "ExpertRows")
    msg = _parse(federation_pb2.ExpertRows, data, "ExpertRows", sender="client")
    _check_pseudonym(msg.pseudonym, "ExpertRows.pseudonym")
    if not msg.HasField("rows"):
        raise WireError("ExpertRows.rows: missing; send one row per label the node declared")
    return ExpertRows(msg.pseudonym, msg.round, _rows_from_proto(msg.rows, "ExpertRows.rows", dim))


def encode_peer_review(p: PeerReview) -> bytes:
    _expect_type(p, PeerReview, "PeerReview")
    _check_uint(p.round, "PeerReview.round")
    _check_candidate_count(len(p.candidates), "PeerReview.candidates")
    msg = federation_pb2.PeerReview(format_version=FORMAT_VERSION, round=int(p.round))
    seen: set[int] = set()
    for i, (cid, rows) in enumerate(p.candidates):
        path = f"PeerReview.candidates[{i}]"
        _check_id(cid, f"{path}.id", seen)
        _check_shared(rows, path)
        c = msg.candidates.add(id=int(cid))
        _rows_to_proto(rows, c.rows, f"{path}.rows")
    return _serialize(msg)


def decode_peer_review(data: bytes, *, dim: int | None = None) -> PeerReview:
    _check_size(data, MAX_CANDIDATES * MAX_ROWS_BYTES, "PeerReview")
    msg = _parse(federation_pb2.PeerReview, data, "PeerReview", sender="server")
    _check_candidate_count(len(msg.candidates), "PeerReview.candidates")
    seen: set[int] = set()
    out = []
    for i, c in enumerate(msg.candidates):
        path = f"PeerReview.candidates[{i}]"
        _check_id(c.id, f"{path}.id", seen)
        if not c.HasField("rows"):
            raise WireError(f"{path}.rows: missing; send the candidate's rows")
        rows = _rows_from_proto(c.rows, f"{path}.rows", dim)
        _check_shared(rows, path)
        out.append((int(c.id), rows))
    return PeerReview(msg.round, tuple(out))


def encode_review_scores(s: ReviewScores) -> bytes:
    _expect_type(s, ReviewScores, "ReviewScores")
    _check_review_scores(s)
    msg = federation_pb2.ReviewScores(
        format_version=FORMAT_VERSION,
        pseudonym=s.pseudonym,
        round=int(s.round),
        candidate=[int(c) for c, _ in s.scores],
        score=[float(v) for _, v in s.scores],
    )
    return _serialize(msg)


def decode_review_scores(data: bytes, *, sent: set[int] | None = None) -> ReviewScores:
    """``sent``: the candidate ids the receiver sent; a score for any other id is refused."""
    _check_size(data, MAX_SCORES_BYTES, "ReviewScores")
    msg = _parse(federation_pb2.ReviewScores, data, "ReviewScores", sender="client")
    _check_candidate_count(len(msg.candidate), "ReviewScores.candidate")
    if len(msg.candidate) != len(msg.score):
        raise WireError(
            f"ReviewScores.score: {len(msg.score)} scores for {len(msg.candidate)} candidates; "
            "send one score per candidate"
        )
    s = ReviewScores(
        msg.pseudonym,
        msg.round,
        tuple((int(c), float(v)) for c, v in zip(msg.candidate, msg.score, strict=True)),
    )
    _check_review_scores(s)
    if sent is not None:
        unknown = sorted({c for c, _ in s.scores} - sent)
        if unknown:
            raise WireError(
                f"ReviewScores.candidate: {unknown[:5]} were not sent to this client; score only "
                "the candidates of the round's PeerReview"
            )
    return s


# -- checks ------------------------------------------------------------------------------------


def _check_size(data: object, limit: int, name: str) -> None:
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > limit:
        raise WireError(f"{name}: {len(data)} bytes; a valid message is at most {limit}")


def _check_candidate_count(n: int, path: str) -> None:
    if n > MAX_CANDIDATES:
        raise WireError(f"{path}: {n} candidates; send at most {MAX_CANDIDATES}")


def _check_id(cid: object, path: str, seen: set[int]) -> None:
    value = _check_uint(cid, path)
    if value > 0xFFFFFFFF:
        raise WireError(f"{path}: {value} does not fit uint32")
    if value in seen:
        raise WireError(f"{path}: {value} appears twice; candidate ids are unique")
    seen.add(value)


def _check_shared(rows: LabelRows, path: str) -> None:
    if len(rows.labels) < MIN_SHARED_LABELS:
        raise WireError(
            f"{path}.rows.labels: {len(rows.labels)} label; a candidate is scored over at least "
            f"{MIN_SHARED_LABELS} labels the reviewer shares with it"
        )


def _check_review_scores(s: ReviewScores) -> None:
    _check_pseudonym(s.pseudonym, "ReviewScores.pseudonym")
    _check_uint(s.round, "ReviewScores.round")
    _check_candidate_count(len(s.scores), "ReviewScores.candidate")
    seen: set[int] = set()
    for i, (cid, value) in enumerate(s.scores):
        _check_id(cid, f"ReviewScores.candidate[{i}]", seen)
        v = _check_finite(value, f"ReviewScores.score[{i}]")
        if not -1.0 <= v <= 1.0:
            raise WireError(
                f"ReviewScores.score[{i}]: {v!r} is outside [-1, 1]; a score is a change in "
                "agreement"
            )


def _check_rows(rows: LabelRows, path: str, dim: int | None) -> None:
    _expect_type(rows, LabelRows, path)
    _check_labels(rows.labels, f"{path}.labels", what="label names", bounded=True)
    n = len(rows.labels)
    if rows.prototypes.ndim != 2 or rows.prototypes.shape[0] != n:
        raise WireError(
            f"{path}.prototypes: shape {list(rows.prototypes.shape)} for {n} labels; send one "
            "row per label"
        )
    width = rows.prototypes.shape[1]
    if not 1 <= width <= MAX_DIM:
        raise WireError(f"{path}.dim: {width} is outside [1, {MAX_DIM}]")
    if dim is not None and width != dim:
        raise WireError(f"{path}.dim: {width}, but the bank's prototypes are {dim} wide")
    if rows.bias.shape != (n,):
        raise WireError(f"{path}.bias: {rows.bias.size} values for {n} labels; one per label")
    for name, array in (("prototypes", rows.prototypes), ("bias", rows.bias)):
        if not np.isfinite(array).all():
            raise WireError(f"{path}.{name}: holds a value that is not finite; send finite rows")


def _rows_to_proto(rows: LabelRows, out: federation_pb2.LabelRows, path: str) -> None:
    _check_rows(rows, path, None)
    out.labels.extend(rows.labels)
    out.dim = int(rows.prototypes.shape[1])
    out.prototypes.extend(rows.prototypes.ravel().tolist())
    out.bias.extend(rows.bias.tolist())


def _rows_from_proto(msg: federation_pb2.LabelRows, path: str, dim: int | None) -> LabelRows:
    if len(msg.labels) > MAX_LABELS:
        raise WireError(f"{path}.labels: {len(msg.labels)} labels; send at most {MAX_LABELS}")
    if len(msg.bias) != len(msg.labels):
        raise WireError(f"{path}.bias: {len(msg.bias)} values for {len(msg.labels)} labels")
    labels = tuple(msg.labels)
    if not 1 <= msg.dim <= MAX_DIM:
        raise WireError(f"{path}.dim: {msg.dim} is outside [1, {MAX_DIM}]")
    # Sizes are checked before anything is built from the values.
    if len(msg.prototypes) != len(labels) * msg.dim or len(msg.prototypes) > MAX_VALUES:
        raise WireError(
            f"{path}.prototypes: {len(msg.prototypes)} values for {len(labels)} labels of width "
            f"{msg.dim}; send labels x dim values (at most {MAX_VALUES})"
        )
    rows = LabelRows(
        labels,
        np.asarray(msg.prototypes, dtype=np.float32).reshape(len(labels), msg.dim),
        np.asarray(msg.bias, dtype=np.float32),
    )
    _check_rows(rows, path, dim)
    return rows
