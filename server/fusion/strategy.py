"""The fusion strategy: Flower's FedAvg plus the prototype bank.

Round schedule (the two phases of central training, as rounds):
1. consensus rounds: every client imitates its expert; the shared weights are averaged;
2. one agreement round: each client scores its expert against the bank's consensus on its own
   queries; the server turns the scores into trust weights (``reliability_weights``);
3. weighted rounds: clients also distil the consensus (each computes its teacher locally) and
   their updates count in proportion to examples x trust.

Aggregation: encoder weights are averaged over all clients (FedAvg). A prototype row and its bias
are averaged over the clients whose expert covers that label (``rowwise``, the default), or over
all clients (``fedavg``). Every reply's prototype-distribution message and imitator statistics
are decoded (validated) and merged into the experts' records; the bank is checkpointed every round.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from protofuse.protocol import federation as wire
from protofuse.schedule import TwoPhases
from protofuse.settings import FederationSettings, TrainingSettings
from protofuse.training import reliability_weights

from .store import ExpertState

ROW_KEYS = ("prototypes", "bias")  # arrays with one row per label of the vocabulary


@dataclass(frozen=True)
class Phase:
    name: str  # "consensus", "agreement" or "weighted"
    index: int  # 0-based position of the round within its phase
    rounds: int  # rounds in the phase


@dataclass(frozen=True)
class Schedule:
    """Training rounds split between the two phases, an agreement round between them."""

    consensus: int
    weighted: int

    @classmethod
    def from_settings(cls, federation: FederationSettings, training: TrainingSettings) -> "Schedule":
        phases = TwoPhases.split(federation.rounds, training)  # the same rule as central training
        return cls(phases.consensus, phases.weighted)

    @property
    def total(self) -> int:
        return self.consensus + (1 + self.weighted if self.weighted else 0)

    def at(self, round: int) -> Phase:
        """The phase of a 1-based round."""
        if not 1 <= round <= self.total:
            raise ValueError(f"round {round} outside the schedule's 1..{self.total}")
        if round <= self.consensus:
            return Phase("consensus", round - 1, self.consensus)
        if round == self.consensus + 1:
            return Phase("agreement", 0, 1)
        return Phase("weighted", round - self.consensus - 2, self.weighted)


@dataclass
class Client:
    """What the server knows of one node: from its description and its latest messages."""

    pseudonym: str
    labels: tuple[str, ...]
    n_queries: int
    record: ExpertState | None = None


@dataclass
class Federation:
    """The server's view of the run: vocabulary (append-only), clients and experts' records."""

    vocabulary: list[str]
    x_dim: int
    nodes: dict[int, Client] = field(default_factory=dict)  # node id -> client
    records: dict[str, ExpertState] = field(default_factory=dict)  # pseudonym -> latest record
    trust: dict[str, float] = field(default_factory=dict)  # pseudonym -> trust weight
    input_range: list[float] | None = None  # [min, max] over every client's queries, as described

    def admit(self, node_id: int, describe: ConfigRecord, online: set[int] | None = None) -> list[str]:
        """Register a described node; returns the labels it adds to the vocabulary.

        ``online``: the nodes connected now. A pseudonym held by a node that is gone passes to
        the new node (a restarted SuperNode comes back under a new node id)."""
        try:
            pseudonym = str(describe["pseudonym"])
            labels = tuple(str(c) for c in describe["labels"])
            x_dim, n_queries = int(describe["x-dim"]), int(describe["n-queries"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"node {node_id} sent an incomplete description ({err!r})") from None
        if x_dim != self.x_dim:
            raise ValueError(f"node {node_id} ({pseudonym}) has inputs of width {x_dim}, the federation's are {self.x_dim}")
        holders = [nid for nid, c in self.nodes.items() if c.pseudonym == pseudonym and nid != node_id]
        if any(online is None or nid in online for nid in holders):
            raise ValueError(f"node {node_id} uses pseudonym {pseudonym!r}, already taken by another node; give each expert a unique name")
        for nid in holders:  # gone: its expert is back under a new node id
            del self.nodes[nid]
        self.nodes[node_id] = Client(pseudonym, labels, n_queries)
        self._widen_range(describe)
        new = [c for c in labels if c not in self.vocabulary]
        self.vocabulary.extend(new)
        return new


    def _widen_range(self, describe: ConfigRecord) -> None:
        """Take in a client's queries' [min, max]; clients of earlier versions do not send it."""
        try:
            lo, hi = (float(v) for v in describe["x-range"])
        except (KeyError, TypeError, ValueError):
            return
        if not lo <= hi:  # NaN or reversed: not a range to warn against
            return
        old = self.input_range or [lo, hi]
        self.input_range = [min(old[0], lo), max(old[1], hi)]


def describe_nodes(grid: Grid, node_ids: Iterable[int], timeout: float) -> dict[int, ConfigRecord]:
    """Ask nodes for their expert's pseudonym, labels and input width (a ``query`` message)."""
    messages = [Message(RecordDict({"ask": ConfigRecord({"what": "describe"})}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    out: dict[int, ConfigRecord] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log(WARNING, "node %s could not describe its expert: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        out[reply.metadata.src_node_id] = reply.content["describe"]
    return out


class FusionStrategy(FedAvg):
    """FedAvg over the shared weights; merges prototype-distribution messages into the bank."""

    def __init__(self, federation: Federation, schedule: Schedule, training: TrainingSettings, settings: FederationSettings, model_config: dict[str, Any], checkpoint: Callable[[int, dict[str, np.ndarray], "FusionStrategy"], None], round_offset: int = 0, **fedavg: Any) -> None:
        super().__init__(fraction_evaluate=0.0, min_train_nodes=settings.min_clients or 2, min_available_nodes=settings.min_clients or 2, **fedavg)
        self.federation = federation
        self.schedule = schedule
        self.training = training
        self.settings = settings
        self.model_config = model_config
        self.checkpoint = checkpoint
        self.offset = round_offset
        self.history: list[dict[str, Any]] = []
        self.refused: set[int] = set()  # nodes not admitted: not asked again
        self._sent: dict[str, np.ndarray] = {}

    # -- sending -------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        r = self.offset + server_round
        phase = self.schedule.at(r)
        if server_round > 1:
            # min_clients is a start-up condition: a client going offline later must not stall
            # the federation (Flower's sampling would wait for it forever).
            self.min_available_nodes = self.min_train_nodes = 1
        current = {k: v.numpy() for k, v in arrays.items()}
        current = self._admit_new_nodes(grid, current)
        self._sent = current
        config = ConfigRecord({
            "round": r, "phase": phase.name, "phase-round": phase.index, "phase-rounds": phase.rounds,
            "vocabulary": list(self.federation.vocabulary), "model": json.dumps(self.model_config),
            "training": self.training.model_dump_json(), "federation": self.settings.model_dump_json(),
        })
        messages = list(super().configure_train(server_round, to_record(current), config, grid))
        return [m for m in messages if m.metadata.dst_node_id in self.federation.nodes]

    def _admit_new_nodes(self, grid: Grid, current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Nodes that joined since the last round describe themselves; their new labels are
        appended to the vocabulary, with fresh prototype rows (existing rows keep their index)."""
        online = set(grid.get_node_ids())
        new_nodes = sorted(n for n in online if n not in self.federation.nodes and n not in self.refused)
        if not new_nodes:
            return current
        added: list[str] = []
        described = describe_nodes(grid, new_nodes, self.settings.round_timeout)
        self.refused |= set(new_nodes) - set(described)
        for node_id in sorted(described, key=lambda n: str(described[n].get("pseudonym", ""))):  # the same order every time
            try:
                added += self.federation.admit(node_id, described[node_id], online)
            except ValueError as err:
                self.refused.add(node_id)
                log(WARNING, "refusing node %s: %s", node_id, err)
        return extend_rows(current, len(added), self.training.seed + len(self.federation.vocabulary)) if added else current

    # -- receiving -----------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self.offset + server_round
        phase = self.schedule.at(r)
        _crash_point(r)
        ok: list[tuple[Client, Message, wire.ImitatorStats]] = []
        for reply in list(replies):
            client = self.federation.nodes.get(reply.metadata.src_node_id)
            if reply.has_error() or client is None:
                log(WARNING, "round %s: no usable reply from node %s (%s)", r, reply.metadata.src_node_id, reply.error.reason if reply.has_error() else "unknown node")
                continue
            try:
                if phase.name != "agreement":
                    check_update(reply.content["arrays"], self._sent)
                stats = self._merge(client, reply, r)
            except (wire.WireError, KeyError, TypeError, ValueError) as err:  # a malformed reply is dropped, the round goes on
                log(WARNING, "round %s: node %s (%s) sent an invalid message, ignored: %s", r, reply.metadata.src_node_id, client.pseudonym, err)
                continue
            ok.append((client, reply, stats))
        if not ok:
            raise RuntimeError(f"round {r}: no client replied with a usable update; see the warnings above (the run resumes from round {r - 1}'s checkpoint when started again)")
        ok.sort(key=lambda item: item[0].pseudonym)  # replies arrive in any order; sums must not depend on it
        if phase.name == "agreement":
            self._set_trust([(c, s) for c, _, s in ok])
            arrays = self._sent
        else:
            # Examples are self-reported: never more than the queries the node declared.
            arrays = self.aggregate([(c, {k: v.numpy() for k, v in m.content["arrays"].items()}, min(s.n_examples, c.n_queries)) for c, m, s in ok])
        metrics = self._round_metrics(r, phase, ok, arrays)
        self.checkpoint(r, arrays, self)
        return to_record(arrays), metrics

    def _merge(self, client: Client, reply: Message, round: int) -> wire.ImitatorStats:
        fusion = reply.content["fusion"]
        dist = wire.decode_distribution(bytes(fusion["distribution"]))
        stats = wire.decode_stats(bytes(fusion["stats"]))
        for who in (dist.pseudonym, stats.pseudonym):
            if who != client.pseudonym:
                raise wire.WireError(f"ExpertDistribution.pseudonym: {who!r} from the node registered as {client.pseudonym!r}")
        if tuple(dist.label_names) != client.labels:
            raise wire.WireError(f"ExpertDistribution.label_names: {list(dist.label_names)} differ from the labels the node declared {list(client.labels)}")
        old = self.federation.records.get(client.pseudonym)
        consensus = stats.consensus_agreement if stats.consensus_agreement is not None else (old.consensus if old else None)
        self.federation.records[client.pseudonym] = ExpertState(
            client.pseudonym, client.labels, wire.encode_distribution(dist), stats.n_examples, stats.n_queries,
            stats.fidelity.agreement, stats.fidelity.kl, stats.fidelity.n, consensus, self.trust_of(client.pseudonym), round,
        )
        return stats

    def _set_trust(self, scored: list[tuple[Client, wire.ImitatorStats]]) -> None:
        agreement = np.array([s.consensus_agreement if s.consensus_agreement is not None else np.nan for _, s in scored])
        n_labels = np.array([len(c.labels) for c, _ in scored])
        weights = reliability_weights(agreement, n_labels) if self.training.reweight and len(scored) > 1 else np.ones(len(scored))
        for (client, _), w in zip(scored, weights):
            self.federation.trust[client.pseudonym] = float(w)
            rec = self.federation.records[client.pseudonym]
            self.federation.records[client.pseudonym] = replace(rec, trust=float(w))

    def trust_of(self, pseudonym: str) -> float:
        """A client's trust; one never scored (it missed the agreement round or joined after it)
        gets the lowest trust given so far, not full trust."""
        trust = self.federation.trust
        return trust.get(pseudonym, min(trust.values()) if trust else 1.0)

    def aggregate(self, updates: list[tuple[Client, dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
        """Weighted means of the clients' shared arrays (weights: examples x trust)."""
        weights = np.array([n * self.trust_of(c.pseudonym) for c, _, n in updates], dtype=np.float64)
        if weights.sum() <= 0:  # everyone distrusted: fall back to examples alone, then to equal weights
            weights = np.array([n for _, _, n in updates], dtype=np.float64)
        if weights.sum() <= 0:
            weights = np.ones(len(updates))
        vocab = {c: i for i, c in enumerate(self.federation.vocabulary)}
        covers = np.zeros((len(updates), len(vocab)))
        for i, (client, _, _) in enumerate(updates):
            covers[i, [vocab[c] for c in client.labels]] = 1.0
        out: dict[str, np.ndarray] = {}
        for key, reference in self._sent.items():
            stack = np.stack([u[key] for _, u, _ in updates]).astype(np.float64)
            if key in ROW_KEYS and self.settings.aggregation == "rowwise":
                out[key] = rowwise_mean(stack, weights, covers, reference)
            else:
                out[key] = np.tensordot(weights / weights.sum(), stack, axes=1)
            out[key] = out[key].astype(reference.dtype) if np.issubdtype(reference.dtype, np.floating) else np.rint(out[key]).astype(reference.dtype)
        return out

    def _round_metrics(self, r: int, phase: Phase, ok: list[tuple[Client, Message, wire.ImitatorStats]], arrays: dict[str, np.ndarray]) -> MetricRecord:
        sent = [recorddict_to_proto(m.content).ByteSize() for _, m, _ in ok]
        shared = sum(a.nbytes for a in arrays.values())
        losses = [s.loss for _, _, s in ok if s.loss is not None]
        row = {
            "round": r, "phase": phase.name, "clients": len(ok), "loss": float(np.mean(losses)) if losses else None,  # None: nothing trained
            "bytes_per_client": float(np.mean(sent)), "shared_bytes": shared,
            "fidelity": float(np.mean([s.fidelity.agreement for _, _, s in ok])),
            "trust": {c.pseudonym: self.trust_of(c.pseudonym) for c, _, _ in ok},
        }
        self.history.append(row)
        loss = math.nan if row["loss"] is None else row["loss"]
        log(INFO, "round %d/%d %-9s clients %d  loss %.4f  fidelity %.3f  sent %.0f kB/client (shared weights %.0f kB)", r, self.schedule.total, phase.name, len(ok), loss, row["fidelity"], row["bytes_per_client"] / 1e3, shared / 1e3)
        return MetricRecord({"loss": loss, "fidelity": row["fidelity"], "bytes-per-client": row["bytes_per_client"]})


def check_update(record: ArrayRecord, sent: dict[str, np.ndarray]) -> None:
    """A client's shared weights must be the arrays it was sent: same names, shapes and dtypes,
    finite values; anything else is refused (WireError naming the array) before averaging."""
    names = set(record.keys())
    if names != set(sent):
        raise wire.WireError(f"arrays: got {sorted(names ^ set(sent))[:5]} that do not match the shared weights sent")
    for key, reference in sent.items():
        value = record[key].numpy()
        if value.shape != reference.shape or value.dtype != reference.dtype:
            raise wire.WireError(f"arrays.{key}: {value.dtype} {value.shape}, the shared weights are {reference.dtype} {reference.shape}")
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise wire.WireError(f"arrays.{key}: holds NaN or infinite values (a diverged local fit)")


def _crash_point(round: int) -> None:
    """Tests of resumption kill the server here, in the middle of a round (replies received,
    nothing merged or checkpointed), exactly as a power cut would: SIGKILL, no cleanup."""
    if os.environ.get("PROTOFUSE_TEST_KILL_IN_ROUND") == str(round):
        os.kill(os.getpid(), signal.SIGKILL)


def rowwise_mean(stack: np.ndarray, weights: np.ndarray, covers: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Row c averaged over the clients covering label c; rows nobody covers keep ``reference``.

    stack (K, C, ...) the clients' arrays; weights (K,); covers (K, C) 0/1; reference (C, ...).
    """
    w = weights[:, None] * covers  # (K, C)
    total = w.sum(0)  # (C,)
    extra = (1,) * (stack.ndim - 2)
    mean = (w.reshape(w.shape + extra) * stack).sum(0) / np.maximum(total, 1e-12).reshape(total.shape + extra)
    return np.where((total > 0).reshape(total.shape + extra), mean, reference.astype(np.float64))


def extend_rows(arrays: dict[str, np.ndarray], n_new: int, seed: int) -> dict[str, np.ndarray]:
    """Append rows for new labels: prototypes drawn like the model's initial rows, biases 0."""
    out = dict(arrays)
    protos = arrays["prototypes"]
    rng = np.random.default_rng(seed)
    out["prototypes"] = np.concatenate([protos, (rng.standard_normal((n_new, protos.shape[1])) / np.sqrt(protos.shape[1])).astype(protos.dtype)])
    out["bias"] = np.concatenate([arrays["bias"], np.zeros(n_new, dtype=arrays["bias"].dtype)])
    return out


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
