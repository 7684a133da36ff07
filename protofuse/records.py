"""What protofuse knows about one expert: its imitation fidelity and its record, in one shape.

The bank (``bank.experts``), the fusion server's store (its SQLite rows), the strategy (the
latest record of each pseudonym) and the bank manifest's codec (``protofuse.protocol``) all use
these two dataclasses, so a field is added, renamed or documented once. Plain data, no torch and
no protobuf: the networks (``protofuse.model``) never see it, the codecs convert it to and from
their messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

NOT_MEASURED = float("nan")


@dataclass(frozen=True)
class Fidelity:
    """How faithfully the bank (or a client's imitator) reproduces one expert on held-out queries,
    restricted to the expert's own labels. NaN agreement and KL with ``n == 0``: nothing held
    out."""

    agreement: (
        float  # fraction of queries where the imitation's top label is the expert's, in [0, 1]
    )
    kl: float  # mean KL(expert || imitation) in nats, >= 0
    n: int  # held-out queries measured


@dataclass(frozen=True, eq=False)
class ExpertRecord:
    """One expert fused into a bank.

    The first six fields are what a saved bank's ``meta.json`` lists for each expert (and what
    ``protofuse info`` prints); the others are what the federation adds: the examples its client
    trained on in its last round, that round, and the encoded prototype-distribution message the
    fusion server keeps until it exports the bank (empty outside the server).

    ``consensus`` is NaN when it was never measured (``None`` is accepted and stored as NaN), as a
    saved bank has always written it; the bank manifest sends it as an absent field and the store
    as NULL. Equality treats NaN as equal to NaN, so a record read back equals the one written.
    """

    name: str  # the expert's pseudonym: never its real name
    labels: tuple[str, ...]  # the expert's own labels, in its output-column order
    fidelity: Fidelity
    n_queries: int  # black-box queries made to the expert (cumulative)
    consensus: float = (
        NOT_MEASURED  # agreement with the bank's consensus on its own labels, in [0, 1]
    )
    weight: float = 1.0  # trust given to its answers when fusing, in [0, 1]
    n_examples: int = 0  # examples its imitator trained on in its last round (federation)
    last_round: int = 0  # last federation round its client reported in (0: not federated)
    distribution: bytes = b""  # its encoded ExpertDistribution message (fusion server only)

    def __post_init__(self) -> None:
        # A list or a bytearray would compare unequal to what a store or a decoder gives back.
        if isinstance(self.labels, str):
            raise TypeError(
                f"labels must be a sequence of label names, got the string {self.labels!r}"
            )
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(
            self, "distribution", bytes(memoryview(self.distribution))
        )  # an int is no message
        if self.consensus is None:
            object.__setattr__(self, "consensus", NOT_MEASURED)

    # The names the wire and the server's store use for three of the fields (the manifest's
    # ``ManifestExpert.pseudonym``, ``label_names`` and ``trust``).
    @property
    def pseudonym(self) -> str:
        return self.name

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.labels

    @property
    def trust(self) -> float:
        return self.weight

    @property
    def consensus_measured(self) -> bool:
        return not _is_nan(self.consensus)

    def _key(self) -> tuple[Any, ...]:
        return tuple(_nan_free(getattr(self, f.name)) for f in fields(self))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertRecord):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _nan_free(value: Any) -> Any:
    """A value where every NaN float is replaced by a marker that equals itself."""
    if _is_nan(value):
        return ("nan",)
    if isinstance(value, Fidelity):
        return tuple(_nan_free(getattr(value, f.name)) for f in fields(value))
    return value
