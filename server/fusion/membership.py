"""Who is in the run: the nodes admitted to the federation, the append-only vocabulary their
experts' labels make, and the experts' latest records.

A node is admitted from its ``NodeDescription`` (protos/protofuse/v1/federation.proto), asked for
with a ``describe`` query before its first round. A node that cannot be admitted (a malformed or
missing description, another federation format, a client of an older protofuse that sends the
untyped keys, another input width, a pseudonym already taken) is refused by name in the log and
never asked again; the others go on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from protofuse.protocol import federation as wire
from protofuse.records import ExpertRecord

# The query that asks a node to describe itself, and where the reply carries the encoded
# NodeDescription (names in protofuse.protocol.federation). The query names this server's format,
# so a client of another format can say so at once (client_sdk.clientapp.app.describe).
ASK, DESCRIBE, NODE_DESCRIPTION = wire.ASK_RECORD, wire.DESCRIBE, wire.NODE_DESCRIPTION_KEY
# The keys of the untyped description of protofuse before NodeDescription (no format version).
_LEGACY_KEYS = ("pseudonym", "labels", "x-dim", "n-queries")


class PseudonymTaken(ValueError):
    """Another node online holds the pseudonym. Not a refusal for good: a SuperNode restarted
    after a crash comes back under a new node id while the SuperLink still lists the old one
    (until its heartbeats lapse, about a minute), and is admitted once the old one is gone."""


@dataclass
class Client:
    """What the server knows of one admitted node: from its description."""

    pseudonym: str
    labels: tuple[str, ...]
    n_queries: int


@dataclass
class Federation:
    """The server's view of the run: vocabulary (append-only), clients and experts' records."""

    vocabulary: list[str]
    x_dim: int
    nodes: dict[int, Client] = field(default_factory=dict)  # node id -> client
    records: dict[str, ExpertRecord] = field(default_factory=dict)  # pseudonym -> latest record
    trust: dict[str, float] = field(default_factory=dict)  # pseudonym -> trust weight
    input_range: list[float] | None = None  # [min, max] over every admitted client's queries
    # What the server measured of each client's updates (defences.evidence, averaged over rounds),
    # the invalid replies each has sent, and the experts expelled for them (never re-admitted).
    evidence: dict[str, float] = field(default_factory=dict)
    # The peers' scores of each client's view of its rows (defences.peer_scores, averaged over
    # rounds), by pseudonym: kept with the checkpoint, like the evidence.
    reviews: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)
    expelled: set[str] = field(default_factory=set)
    max_labels: int = 1000  # per client ([federation] max_labels_per_client)
    max_vocabulary: int = 10_000

    def admit(
        self, node_id: int, description: wire.NodeDescription, online: set[int] | None = None
    ) -> list[str]:
        """Register a described node; returns the labels it adds to the vocabulary.

        The description was validated by its codec; what is checked here is what only the run
        knows: the input width and the pseudonym's owner. ``online``: the nodes connected now. A
        pseudonym held by a node that is gone passes to the new node (a restarted SuperNode comes
        back under a new node id)."""
        pseudonym = description.pseudonym
        if pseudonym in self.expelled:
            raise ValueError(
                f"node {node_id} ({pseudonym}): this expert was expelled from the run for invalid "
                "replies; it is not re-admitted (start a new run to admit it again)"
            )
        if len(description.label_names) > self.max_labels:
            raise ValueError(
                f"node {node_id} ({pseudonym}) declares {len(description.label_names)} labels, "
                f"more than the {self.max_labels} a client may bring ([federation] "
                "max_labels_per_client)"
            )
        grown = len(set(self.vocabulary) | set(description.label_names))
        if grown > self.max_vocabulary:
            raise ValueError(
                f"node {node_id} ({pseudonym}) would grow the vocabulary to {grown} labels, more "
                f"than the federation's {self.max_vocabulary} ([federation] max_vocabulary)"
            )
        if description.x_dim != self.x_dim:
            raise ValueError(
                f"node {node_id} ({pseudonym}) has inputs of width {description.x_dim}, the "
                f"federation's are {self.x_dim}"
            )
        holders = [
            nid for nid, c in self.nodes.items() if c.pseudonym == pseudonym and nid != node_id
        ]
        if any(online is None or nid in online for nid in holders):
            raise PseudonymTaken(
                f"node {node_id} uses pseudonym {pseudonym!r}, already taken by another node; give "
                "each expert a unique name"
            )
        for nid in holders:  # gone: its expert is back under a new node id
            del self.nodes[nid]
        self.nodes[node_id] = Client(pseudonym, description.label_names, description.n_queries)
        lo, hi = description.x_range
        old = self.input_range or [lo, hi]
        self.input_range = [min(old[0], lo), max(old[1], hi)]
        new = [c for c in description.label_names if c not in self.vocabulary]
        self.vocabulary.extend(new)
        return new


def describe_query(node_id: int) -> Message:
    """The ``describe`` query to one node, naming this server's federation format."""
    ask = ConfigRecord({"what": DESCRIBE, wire.FORMAT_VERSION_KEY: wire.FORMAT_VERSION})
    return Message(RecordDict({ASK: ask}), dst_node_id=node_id, message_type=MessageType.QUERY)


def read_description(content: RecordDict) -> wire.NodeDescription:
    """A node's description from its reply to the describe query, or a ValueError saying why it
    cannot be admitted and the fix (the caller names the node)."""
    record = content.get(DESCRIBE)
    if record is None:
        raise ValueError(
            f"it replied without a description (no {DESCRIBE!r} record); is it a protofuse client?"
        )
    if NODE_DESCRIPTION in record:
        payload = record[NODE_DESCRIPTION]
        if not isinstance(payload, bytes):
            raise ValueError(
                f"its {NODE_DESCRIPTION!r} holds a {type(payload).__name__}, not an encoded "
                "NodeDescription; run matching protofuse versions"
            )
        try:
            return wire.decode_node_description(payload)
        except wire.WireError as err:
            raise ValueError(f"invalid description: {err}") from None
    if any(key in record for key in _LEGACY_KEYS):
        who = f" of expert {str(record['pseudonym'])!r}" if "pseudonym" in record else ""
        raise ValueError(
            f"it runs a protofuse from before the typed federation protocol (its description{who} "
            "has the untyped keys "
            f"{sorted(record.keys())} and no NodeDescription); this server speaks federation "
            f"format {wire.FORMAT_VERSION}: run matching protofuse versions"
        )
    raise ValueError(
        f"its {DESCRIBE!r} record holds no {NODE_DESCRIPTION!r} message (keys "
        f"{sorted(record.keys())}); run matching protofuse versions"
    )


def describe_nodes(
    grid: Grid, node_ids: Iterable[int], timeout: float
) -> dict[int, wire.NodeDescription]:
    """Ask nodes to describe their expert; returns the valid descriptions by node id. Every node
    that does not give one is named in a warning (and left out)."""
    out: dict[int, wire.NodeDescription] = {}
    for reply in grid.send_and_receive([describe_query(n) for n in node_ids], timeout=timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log(
                WARNING,
                "refusing node %s: it could not describe its expert: %s",
                node_id,
                reply.error.reason,
            )
            continue
        try:
            out[node_id] = read_description(reply.content)
        except ValueError as err:
            log(WARNING, "refusing node %s: %s", node_id, err)
    return out
