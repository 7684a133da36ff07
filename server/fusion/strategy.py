"""The fusion strategy: Flower's FedAvg plus the prototype bank.

Each round it admits the nodes that joined (``membership``), sends every client the shared
weights and the round's ``RoundPlan`` (``schedule``), and on the replies decodes (validates) each
client's prototype-distribution message and imitator statistics, merges them into the experts'
records, sets trust in the agreement round, averages the shared weights (``aggregation``) and
checkpoints the bank. Resume, the store and the bank's export are the ServerApp's
(``server_app``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.logger import log
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from protofuse.privacy import DpPlan
from protofuse.protocol import federation as wire
from protofuse.protocol import review as peer
from protofuse.protocol import secure_sum
from protofuse.records import NOT_MEASURED, ExpertRecord
from protofuse.settings import FederationSettings, TrainingSettings
from protofuse.training import reliability_weights

from ..metrics import FusionMetrics
from . import defences, dp
from .aggregation import check_update, extend_rows, to_record
from .membership import Client, Federation, PseudonymTaken, describe_nodes
from .schedule import AGREEMENT, Phase, Schedule
from .secure_aggregation import SecureRounds

ROUND_PLAN = (
    wire.ROUND_PLAN_KEY
)  # the key of the encoded RoundPlan in the train message's ConfigRecord

MAX_REVIEWS = 16  # candidates sent to one reviewer per round (a seeded choice where more)

Checkpointer = Callable[[int, dict[str, np.ndarray], "FusionStrategy"], None]


class FederationStopped(RuntimeError):
    """Too few clients to go on; every completed round is checkpointed, so a new run resumes."""


class FusionStrategy(FedAvg):
    """FedAvg over the shared weights; merges prototype-distribution messages into the bank.

    ``on_replies(round)``: called in every round once the replies are in and before anything is
    merged or checkpointed (tests of resumption kill the server there, as a power cut would)."""

    def __init__(
        self,
        federation: Federation,
        schedule: Schedule,
        training: TrainingSettings,
        settings: FederationSettings,
        model_config: dict[str, Any],
        checkpoint: Checkpointer,
        round_offset: int = 0,
        on_replies: Callable[[int], None] | None = None,
        dp_plan: DpPlan | None = None,
        secure: SecureRounds | None = None,
        metrics: FusionMetrics | None = None,
        **fedavg: Any,
    ) -> None:
        super().__init__(
            fraction_evaluate=0.0,
            min_train_nodes=settings.min_clients or 2,
            min_available_nodes=settings.min_clients or 2,
            **fedavg,
        )
        self.federation = federation
        self.schedule = schedule
        self.training = training
        self.settings = settings
        self.model_config = model_config
        self.checkpoint = checkpoint
        self.offset = round_offset
        self.on_replies = on_replies
        self.metrics = metrics  # Prometheus counters of the rounds (server.metrics), if exposed
        # [privacy] mode = "dp": every update is DP-FedAvg's (dp.noisy_mean) and no client's own
        # report sets a weight; the noise is drawn from the OS's entropy, never from a seed.
        self.dp_plan = dp_plan
        self._dp_rng = np.random.default_rng()
        # [privacy] mode = "secagg": the Grid the strategy runs on sends each round that returns
        # weights through SecAgg+; the server sees the sum only, so every client weighs the same.
        self.secure = secure
        if secure is not None:
            secure.on_refused = self._refused
        self._round_nodes: dict[int, Client] = {}  # the nodes asked this round
        self._halted_in_a_row = 0  # secure rounds SecAgg+ could not finish, in a row
        self.history: list[dict[str, Any]] = []
        self.refused: set[int] = set()  # nodes not admitted: not asked again
        self._sent: dict[str, np.ndarray] = {}
        # What this round measured of each update (defences.evidence_parts, the clip scale), for
        # the round's history.
        self._evidence_seen: dict[str, dict[str, float | None]] = {}
        self._momentum = defences.Momentum()  # each client's updates over rounds (in memory)
        # Peer review: each client's latest view of its rows, and per node the candidate ids
        # sent this round (id -> pseudonym; the reviewer never learns whose view it scored).
        self._views: dict[str, tuple[int, peer.LabelRows]] = {}  # name -> (round, view)
        self._review_ids: dict[int, dict[int, str]] = {}
        self._reviews_seen: dict[str, float] = {}  # this round's peer scores, for the history

    # -- sending -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        r = self.offset + server_round
        phase = self.schedule.at(r)
        if server_round > 1:
            # min_clients is a start-up condition: a client going offline later must not stall
            # the federation. Flower's sampling would wait forever for its minimum: the wait for
            # min_replies is ours, and it ends (ServerApp's round_timeout).
            self.min_available_nodes = self.min_train_nodes = 1
            self._wait_for_replies_possible(grid, r)
        current = {k: v.numpy() for k, v in arrays.items()}
        current = self._admit_new_nodes(grid, current)
        self._sent = current
        plan = wire.RoundPlan(
            r,
            phase.name,
            phase.index,
            phase.rounds,
            tuple(self.federation.vocabulary),
            self.model_config,
            self.training,
            # Under DP or secure aggregation no client's own view may be seen: none is asked for.
            self.settings
            if self._peer_review
            else self.settings.model_copy(update={"peer_review": False}),
        )
        config = ConfigRecord({ROUND_PLAN: wire.encode_round_plan(plan)})
        messages = list(super().configure_train(server_round, to_record(current), config, grid))
        if self.secure is not None:  # the agreement round returns no weights: nothing to hide
            self.secure.secure_next = phase.name != AGREEMENT
        self._round_nodes = dict(self.federation.nodes)
        messages = [m for m in messages if m.metadata.dst_node_id in self.federation.nodes]
        self._review_ids = {}
        return [self._with_review(m, r) for m in messages] if self._peer_review else messages

    @property
    def _peer_review(self) -> bool:
        return self.settings.peer_review and not self._equal_weights

    def _with_review(self, message: Message, r: int) -> Message:
        """``message`` with a PeerReview for its node beside the plan: the latest views of the
        other clients that declared at least two of its labels, cut to those labels, each under a
        random number (at most MAX_REVIEWS, a seeded choice where there are more)."""
        node = message.metadata.dst_node_id
        client = self.federation.nodes[node]
        admitted = {c.pseudonym for c in self.federation.nodes.values()}
        # Only last round's views of clients still admitted: an older view was fitted on another
        # encoder, and a client gone keeps its view to itself.
        chosen = []
        for name, (round_, view) in sorted(self._views.items()):
            if round_ != r - 1 or name not in admitted or name == client.pseudonym:
                continue
            theirs = set(view.labels)  # once per view: labels x labels lookups otherwise
            shared = [c for c in client.labels if c in theirs]
            if len(shared) >= peer.MIN_SHARED_LABELS:
                chosen.append((name, shared, view))
        if not chosen:
            return message
        if len(chosen) > MAX_REVIEWS:
            seed = [self.training.seed % 2**32, r % 2**32, node % 2**32]
            pick = np.random.default_rng(seed).choice(len(chosen), MAX_REVIEWS, replace=False)
            chosen = [chosen[i] for i in sorted(pick)]
        candidates = [(name, view.subset(shared)) for name, shared, view in chosen]
        ids = np.random.default_rng().permutation(len(candidates))  # OS entropy: not guessable
        self._review_ids[node] = {
            int(i): name for i, (name, _) in zip(ids, candidates, strict=True)
        }
        review = peer.PeerReview(
            r, tuple(sorted((int(i), rows) for i, (_, rows) in zip(ids, candidates, strict=True)))
        )
        config = ConfigRecord(dict(message.content.config_records["config"]))
        config[peer.PEER_REVIEW_KEY] = peer.encode_peer_review(review)
        content = RecordDict({"arrays": message.content.array_records["arrays"], "config": config})
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)

    @property
    def min_replies(self) -> int:
        """Usable replies a round needs (``[federation] min_replies``; default half of
        min_clients, rounded up)."""
        s = self.settings
        return s.min_replies or max(1, -(-(s.min_clients or 2) // 2))

    def _wait_for_replies_possible(self, grid: Grid, r: int) -> None:
        """Wait (up to round_timeout) until at least min_replies clients that may take part are
        online; else stop the federation with a message instead of waiting forever."""
        deadline = time.monotonic() + self.settings.round_timeout
        while True:
            online = [
                n
                for n in grid.get_node_ids()
                if n not in self.refused  # admitted, or new (it will describe itself)
            ]
            if len(online) >= self.min_replies:
                return
            if time.monotonic() >= deadline:
                raise FederationStopped(
                    f"round {r}: {len(online)} clients online, fewer than the {self.min_replies} "
                    f"a round needs ([federation] min_replies), for "
                    f"{self.settings.round_timeout:.0f} s ([federation] round_timeout); every "
                    f"round up to {r - 1} is checkpointed: run again to resume once the clients "
                    "are back"
                )
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _admit_new_nodes(self, grid: Grid, current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Nodes that joined since the last round describe themselves; their new labels are
        appended to the vocabulary, with fresh prototype rows (existing rows keep their index)."""
        online = set(grid.get_node_ids())
        new_nodes = sorted(
            n for n in online if n not in self.federation.nodes and n not in self.refused
        )
        if not new_nodes:
            return current
        added: list[str] = []
        described = describe_nodes(grid, new_nodes, self.settings.round_timeout)
        self.refused |= set(new_nodes) - set(described)  # each named in a warning by describe_nodes
        for node_id in sorted(
            described, key=lambda n: described[n].pseudonym
        ):  # the same order every time
            try:
                added += self.federation.admit(node_id, described[node_id], online)
            except PseudonymTaken as err:  # asked again next round: the holder may be gone
                log(WARNING, "not admitting node %s this round: %s", node_id, err)
            except ValueError as err:
                self.refused.add(node_id)
                log(WARNING, "refusing node %s: %s", node_id, err)
        return (
            extend_rows(current, len(added), self.training.seed + len(self.federation.vocabulary))
            if added
            else current
        )

    # -- receiving -----------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = self.offset + server_round
        phase = self.schedule.at(r)
        replies = list(replies)
        if self.on_replies is not None:
            self.on_replies(r)
        if self.secure is not None and self.secure.halted and phase.name != AGREEMENT:
            return self._skip_halted_round(r, phase)
        ok: list[tuple[Client, Message, wire.ImitatorStats]] = []
        reviews: list[tuple[str, str, float]] = []  # (reviewer, candidate, score)
        replied: set[int] = set()
        for reply in replies:
            client = self.federation.nodes.get(reply.metadata.src_node_id)
            # Flower's SuperLink keeps one reply per message; should another engine deliver two
            # from one node, the first counts and no node weighs twice.
            if reply.metadata.src_node_id in replied:
                self._count_reply("invalid")
                log(
                    WARNING,
                    "round %s: a second reply from node %s, ignored",
                    r,
                    reply.metadata.src_node_id,
                )
                continue
            replied.add(reply.metadata.src_node_id)
            if reply.has_error() or client is None:
                self._count_reply("error")
                log(
                    WARNING,
                    "round %s: no usable reply from node %s (%s)",
                    r,
                    reply.metadata.src_node_id,
                    reply.error.reason if reply.has_error() else "unknown node",
                )
                continue
            try:
                if phase.name != AGREEMENT and self.secure is None:
                    check_update(reply.content.array_records["arrays"], self._sent)
                view, scored = self._decoded_review(client, reply, r)
                stats = self._merge(client, reply, r)
            except (
                wire.WireError,
                KeyError,
                TypeError,
                ValueError,
            ) as err:  # a malformed reply is dropped, the round goes on
                log(
                    WARNING,
                    "round %s: node %s (%s) sent an invalid message, ignored: %s",
                    r,
                    reply.metadata.src_node_id,
                    client.pseudonym,
                    err,
                )
                self._strike(reply.metadata.src_node_id, client)
                self._count_reply("invalid")
                continue
            ok.append((client, reply, stats))
            self._count_reply("ok")
            if view is not None:
                self._views[client.pseudonym] = (r, view)
            reviews += scored
        if not ok:
            raise FederationStopped(
                f"round {r}: no client replied with a usable update; see the warnings above (the "
                f"run resumes from round {r - 1}'s checkpoint when started again)"
            )
        if len(ok) < self.min_replies and server_round > 1:
            raise FederationStopped(
                f"round {r}: {len(ok)} usable replies, fewer than the {self.min_replies} a round "
                f"needs ([federation] min_replies), no reply from {self._missing(ok)}; the run "
                f"resumes from round {r - 1}'s checkpoint when started again"
            )
        ok.sort(
            key=lambda item: item[0].pseudonym
        )  # replies arrive in any order; sums must not depend on it
        if reviews:
            self._record_reviews(reviews)
        if phase.name == AGREEMENT:
            if not self._equal_weights:  # reports set no weight under DP or SecAgg
                self._set_trust([(c, s) for c, _, s in ok])
            arrays = self._sent
        elif self.secure is not None:
            arrays = self._aggregate_secure(r)
        else:
            # Examples are self-reported: aggregate bounds them (defences.example_weights).
            arrays = self.aggregate(
                [
                    (
                        c,
                        {k: v.numpy() for k, v in m.content.array_records["arrays"].items()},
                        s.n_examples,
                    )
                    for c, m, s in ok
                ]
            )
        metrics = self._round_metrics(r, phase, ok, arrays)
        self.checkpoint(r, arrays, self)
        return to_record(arrays), metrics

    def _count_reply(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.replies.labels(status).inc()

    def _missing(self, ok: list[tuple[Client, Message, wire.ImitatorStats]]) -> list[str]:
        replied = {c.pseudonym for c, _, _ in ok}
        return sorted({c.pseudonym for c in self.federation.nodes.values()} - replied)

    def _merge(self, client: Client, reply: Message, round: int) -> wire.ImitatorStats:
        dist, stats = self._decoded(client, reply.content)
        old = self.federation.records.get(client.pseudonym)
        consensus = (
            stats.consensus_agreement
            if stats.consensus_agreement is not None
            else (old.consensus if old else NOT_MEASURED)
        )
        # Counts are self-reported: never above the queries the node declared (<= MAX_QUERIES),
        # so no value valid on the wire (up to 2**64 - 1) can overflow the store's integers.
        fidelity = replace(stats.fidelity, n=min(stats.fidelity.n, client.n_queries))
        self.federation.records[client.pseudonym] = ExpertRecord(
            client.pseudonym,
            client.labels,
            fidelity,
            min(stats.n_queries, client.n_queries),  # self-reported: never above what it declared
            consensus,
            self.trust_of(client.pseudonym),
            n_examples=min(stats.n_examples, client.n_queries),
            last_round=round,
            distribution=wire.encode_distribution(dist),
        )
        return stats

    def _decoded(
        self, client: Client, content: RecordDict
    ) -> tuple[wire.ExpertDistribution, wire.ImitatorStats]:
        """A reply's prototype-distribution message and imitator statistics, decoded and checked
        against what ``client`` declared (a WireError names the field)."""
        fusion = content.config_records["fusion"]
        dist = wire.decode_distribution(_encoded(fusion, "distribution"))
        stats = wire.decode_stats(_encoded(fusion, "stats"))
        for who in (dist.pseudonym, stats.pseudonym):
            if who != client.pseudonym:
                raise wire.WireError(
                    f"ExpertDistribution.pseudonym: {who!r} from the node registered as "
                    f"{client.pseudonym!r}"
                )
        if tuple(dist.label_names) != client.labels:
            raise wire.WireError(
                f"ExpertDistribution.label_names: {list(dist.label_names)} differ from the labels "
                f"the node declared {list(client.labels)}"
            )
        if stats.n_examples > client.n_queries:  # only a lying client trains on more
            raise wire.WireError(
                f"ImitatorStats.n_examples: {stats.n_examples} examples trained on, more than the "
                f"{client.n_queries} query inputs the node declared"
            )
        return dist, stats

    def _decoded_review(
        self, client: Client, reply: Message, r: int
    ) -> tuple[peer.LabelRows | None, list[tuple[str, str, float]]]:
        """A reply's view of its rows and its scores of the candidates it was sent, decoded
        and checked (a WireError names the field); nothing where peer review is off. The plan
        asked for a view: a reply without one is refused (a client that withheld its view would
        otherwise escape review)."""
        if not self._peer_review:
            return None, []
        fusion = reply.content.config_records["fusion"]
        if peer.EXPERT_ROWS_KEY not in fusion:
            raise wire.WireError(
                "ExpertRows: missing; the round plan asks for peer review ([federation] "
                "peer_review): send the expert's own view of its rows (run matching versions)"
            )
        rows = peer.decode_expert_rows(
            _encoded(fusion, peer.EXPERT_ROWS_KEY), dim=self._sent["prototypes"].shape[1]
        )
        if (rows.pseudonym, rows.round, rows.rows.labels) != (client.pseudonym, r, client.labels):
            raise wire.WireError(
                f"ExpertRows: {rows.pseudonym!r}, round {rows.round}, labels "
                f"{list(rows.rows.labels)[:5]} from the node registered as {client.pseudonym!r} "
                f"with {list(client.labels)[:5]} in round {r}; send the node's own labels in "
                "declared order, fitted this round"
            )
        scored: list[tuple[str, str, float]] = []
        if peer.REVIEW_SCORES_KEY in fusion:
            sent = self._review_ids.get(reply.metadata.src_node_id, {})
            scores = peer.decode_review_scores(
                _encoded(fusion, peer.REVIEW_SCORES_KEY), sent=set(sent)
            )
            if (scores.pseudonym, scores.round) != (client.pseudonym, r):
                raise wire.WireError(
                    f"ReviewScores: {scores.pseudonym!r}, round {scores.round}, from the node "
                    f"registered as {client.pseudonym!r} in round {r}; score this round's "
                    "PeerReview under the node's own pseudonym"
                )
            scored = [(client.pseudonym, sent[c], v) for c, v in scores.scores]
        return rows.rows, scored

    def _record_reviews(self, reviews: list[tuple[str, str, float]]) -> None:
        """The round's peer scores (``defences.peer_scores``), averaged into each client's
        history of them like the evidence of its updates (half the weight on this round)."""
        # Each reviewer weighs its trust from before this round's scores (defences.peer_scores).
        scores = defences.peer_scores(reviews, {j: self.trust_of(j) for j, _, _ in reviews})
        self._reviews_seen = scores
        history = self.federation.reviews
        for name, score in scores.items():
            old = history.get(name)
            history[name] = score if old is None else 0.5 * old + 0.5 * score
        self._refresh_records()

    def _refused(self, node_id: int, reason: str) -> None:
        """A reply to a SecAgg+ stage was malformed (``secure_aggregation``): a strike."""
        client = self.federation.nodes.get(node_id)
        if client is not None:
            self._strike(node_id, client)

    def _skip_halted_round(self, r: int, phase: Phase) -> tuple[ArrayRecord, MetricRecord]:
        """A secure round SecAgg+ could not finish moves nothing (its checkpoint is the weights
        sent); ``max_strikes`` of them in a row stop the federation with the reason."""
        assert self.secure is not None
        self._halted_in_a_row += 1
        reason = self.secure.halted
        if self._halted_in_a_row >= self.settings.max_strikes:
            raise FederationStopped(
                f"round {r}: secure aggregation could not finish {self._halted_in_a_row} rounds "
                f"in a row ([federation] max_strikes); the last: {reason}. The run resumes from "
                f"round {r - 1}'s checkpoint when started again"
            )
        log(WARNING, "round %s: secure aggregation halted, the bank does not move: %s", r, reason)
        self.history.append(
            {
                "round": r,
                "phase": phase.name,
                "clients": 0,
                "loss": None,
                "bytes_per_client": 0.0,
                "shared_bytes": sum(a.nbytes for a in self._sent.values()),
                "fidelity": None,
                "trust": {},
                "evidence": {},
                "halted": reason,
            }
        )
        self.checkpoint(r, self._sent, self)
        return to_record(self._sent), MetricRecord({"clients": 0})

    def _set_trust(self, scored: list[tuple[Client, wire.ImitatorStats]]) -> None:
        """The agreement round: each client's reported agreement with the consensus, relative to
        the median client (an overstated score raises only its sender, and only up to the
        evidence its updates give: see ``trust_of``)."""
        agreement = np.array(
            [
                s.consensus_agreement if s.consensus_agreement is not None else np.nan
                for _, s in scored
            ]
        )
        n_labels = np.array([len(c.labels) for c, _ in scored])
        weights = (
            reliability_weights(agreement, n_labels, relative_to="median")
            if self.training.reweight and len(scored) > 1
            else np.ones(len(scored))
        )
        for (client, _), w in zip(scored, weights, strict=True):
            self.federation.trust[client.pseudonym] = float(w)
        self._refresh_records()

    def trust_of(self, pseudonym: str) -> float:
        """A client's trust: the lowest of what its reported agreement earns (one never scored,
        it missed the agreement round or joined after it, gets the lowest given so far, not full
        trust), what the evidence of its updates earns (``defences.evidence_trust``) and what its
        peers' reviews of its view earn (``defences.review_trust``); an expelled client has
        none."""
        if pseudonym in self.federation.expelled:
            return 0.0
        if self._equal_weights:
            return 1.0
        trust = self.federation.trust
        reported = trust.get(pseudonym, min(trust.values()) if trust else 1.0)
        return min(
            reported, self._evidence_trust.get(pseudonym, 1.0), self._review_trust(pseudonym)
        )

    def _review_trust(self, pseudonym: str) -> float:
        if not self._peer_review:
            return 1.0
        return defences.review_trust(self.federation.reviews.get(pseudonym, float("nan")))

    @property
    def _equal_weights(self) -> bool:
        """Under DP or secure aggregation no client's report or update sets its weight."""
        return self.dp_plan is not None or self.secure is not None

    @property
    def _evidence_trust(self) -> dict[str, float]:
        if not self.settings.evidence:
            return {}
        return defences.evidence_trust(self.federation.evidence)

    def _refresh_records(self) -> None:
        """Every expert's record carries its current trust."""
        for name, rec in self.federation.records.items():
            self.federation.records[name] = replace(rec, weight=self.trust_of(name))

    def _strike(self, node_id: int, client: Client) -> None:
        """One more invalid reply from ``client``; at ``max_strikes`` it is expelled: asked no
        more, its expert refused if it comes back (also after a resume). Its record stays."""
        fed = self.federation
        fed.strikes[client.pseudonym] = fed.strikes.get(client.pseudonym, 0) + 1
        if fed.strikes[client.pseudonym] >= self.settings.max_strikes:
            fed.expelled.add(client.pseudonym)
            fed.nodes.pop(node_id, None)
            self.refused.add(node_id)
            log(
                WARNING,
                "expelling node %s (%s): %d invalid replies ([federation] max_strikes)",
                node_id,
                client.pseudonym,
                fed.strikes[client.pseudonym],
            )

    def aggregate(
        self, updates: list[tuple[Client, dict[str, np.ndarray], int]]
    ) -> dict[str, np.ndarray]:
        """The clients' shared arrays combined, each client bounded (``defences``): weights from
        capped example counts times trust, updates clipped to the round's median norm, the
        evidence of each update recorded before its weight is taken; integer arrays keep what was
        sent."""
        if self.dp_plan is not None:
            return self._aggregate_dp(updates)
        s = self.settings
        bounds = defences.Bounds(
            s.clip_factor, s.max_weight_ratio, s.combine, s.trim, s.assumed_hostile
        )
        rowwise = s.aggregation == "rowwise"
        counts = defences.example_weights(
            np.array([n for _, _, n in updates], dtype=np.float64),
            np.array([c.n_queries for c, _, _ in updates], dtype=np.float64),
            bounds.max_weight_ratio,
        )
        covers = self._covers([c for c, _, _ in updates])
        deltas = defences.deltas_of([u for _, u, _ in updates], self._sent)
        deltas, scale = defences.clip_to_median_norm(deltas, bounds.clip_factor)

        names = [c.pseudonym for c, _, _ in updates]
        # Evidence is measured on each client's momentum: one round's rows are mostly noise.
        momenta = self._momentum.update(names, deltas, covers, rowwise)
        # A row's reference is made of the clients whose shared arrays this round and evidence
        # so far have not given them away (the shared arrays' reference is everyone else).
        shared = defences.shared_part(momenta, covers, rowwise)
        speakers = defences.row_speakers(
            shared,
            np.array(
                [self._evidence_trust.get(n, 1.0) > 0 and self._review_trust(n) > 0 for n in names]
            ),
        )
        cosines = defences.row_cosines(momenta, covers, speakers) if rowwise else None
        rows = defences.row_part(cosines) if cosines is not None else np.full(len(names), np.nan)
        self._evidence_seen = {
            n: {"shared": _finite(a), "rows": _finite(b), "scale": float(c)}
            for n, a, b, c in zip(names, shared, rows, scale, strict=True)
        }
        self._record_evidence(names, defences.evidence_of(shared, rows, scale))
        row_weights = defences.row_trust(cosines) if s.evidence and cosines is not None else None
        weights = counts * np.array([self.trust_of(c.pseudonym) for c, _, _ in updates])
        if weights.sum() <= 0:  # everyone distrusted: the capped counts alone
            weights = counts
        step = defences.combine(deltas, weights, covers, bounds, rowwise, row_weights)
        return self._applied(step)

    def _aggregate_dp(
        self, updates: list[tuple[Client, dict[str, np.ndarray], int]]
    ) -> dict[str, np.ndarray]:
        """The round's update under client-level DP (``dp.noisy_mean``): fixed clipping, noise on
        the sums, public counts; reported counts and trust set nothing."""
        assert self.dp_plan is not None
        covers = self._covers([c for c, _, _ in updates])
        # Public counts: who was admitted and which labels each declared, not who replied.
        coverage = self._covers(list(self.federation.nodes.values())).sum(0)
        deltas = defences.deltas_of([u for _, u, _ in updates], self._sent)
        step = dp.noisy_mean(
            deltas,
            covers,
            coverage,
            len(self.federation.nodes),
            self.dp_plan.clip,
            self.dp_plan.noise_multiplier,
            self.settings.aggregation == "rowwise",
            self._dp_rng,
        )
        return self._applied(step)

    def _aggregate_secure(self, r: int) -> dict[str, np.ndarray]:
        """The round's step from the mean SecAgg+ unmasked (``secure_sum.step``): each client
        weighs 1, a row is averaged over the clients in the sum that declared its label (a
        client whose report was refused is still in the sum). A sum that fails its checks (a
        client misstated its weight or forged its vector) moves nothing."""
        assert self.secure is not None and self.secure.last_mean is not None
        self._halted_in_a_row = 0
        summed = [self._round_nodes[n] for n in self.secure.summed]
        try:
            step = secure_sum.step(
                self.secure.last_mean,
                self._sent,
                self._covers(summed),
                self.settings.aggregation == "rowwise",
            )
        except secure_sum.SecureSumError as err:
            log(WARNING, "round %s: %s", r, err)
            return self._sent
        return self._applied(step)

    def _covers(self, clients: list[Client]) -> np.ndarray:
        """(K, C) 0/1: client k declared label c of the vocabulary."""
        vocab = {c: i for i, c in enumerate(self.federation.vocabulary)}
        covers = np.zeros((len(clients), len(vocab)))
        for i, client in enumerate(clients):
            covers[i, [vocab[c] for c in client.labels]] = 1.0
        return covers

    def _applied(self, step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The weights sent this round moved by ``step`` (arrays without a step keep theirs)."""
        return defences.within_domain(
            {
                k: (v.astype(np.float64) + step[k]).astype(v.dtype) if k in step else v
                for k, v in self._sent.items()
            }
        )

    def _record_evidence(self, pseudonyms: list[str], scores: np.ndarray) -> None:
        """Each client's evidence, averaged over the rounds it took part in (half the weight on
        this round): one good round does not wash out a hostile history."""
        evidence = self.federation.evidence
        for name, score in zip(pseudonyms, scores, strict=True):
            if np.isfinite(score):
                old = evidence.get(name)
                evidence[name] = float(score) if old is None else 0.5 * old + 0.5 * float(score)
        self._refresh_records()

    def _round_metrics(
        self,
        r: int,
        phase: Phase,
        ok: list[tuple[Client, Message, wire.ImitatorStats]],
        arrays: dict[str, np.ndarray],
    ) -> MetricRecord:
        sent = [recorddict_to_proto(m.content).ByteSize() for _, m, _ in ok]
        shared = sum(a.nbytes for a in arrays.values())
        losses = [s.loss for _, _, s in ok if s.loss is not None]
        mean_loss = float(np.mean(losses)) if losses else None  # None: nothing trained
        bytes_per_client = float(np.mean(sent))
        fidelity = float(np.mean([s.fidelity.agreement for _, _, s in ok]))
        agreements = [s.consensus_agreement for _, _, s in ok if s.consensus_agreement is not None]
        row = {
            "round": r,
            "phase": phase.name,
            "clients": len(ok),
            "loss": mean_loss,
            "bytes_per_client": bytes_per_client,
            "shared_bytes": shared,
            "fidelity": fidelity,
            # the clients' reported agreement with the consensus (an agreement round's)
            "agreement": _finite(float(np.mean(agreements))) if agreements else None,
            "trust": {c.pseudonym: self.trust_of(c.pseudonym) for c, _, _ in ok},
            "evidence": self._evidence_seen,
            "reviews": self._reviews_seen,  # this round's peer scores (defences.peer_scores)
        }
        self._evidence_seen = {}
        self._reviews_seen = {}
        self.history.append(row)
        if self.metrics is not None:
            self.metrics.round_done(r, len(ok), sum(sent))
        loss = math.nan if mean_loss is None else mean_loss
        log(
            INFO,
            "round %d/%d %-9s clients %d  loss %.4f  fidelity %.3f  sent %.0f kB/client (shared "
            "weights %.0f kB)",
            r,
            self.schedule.total,
            phase.name,
            len(ok),
            loss,
            fidelity,
            bytes_per_client / 1e3,
            shared / 1e3,
        )
        return MetricRecord(
            {"loss": loss, "fidelity": fidelity, "bytes-per-client": bytes_per_client}
        )


def _finite(value: float) -> float | None:
    """A measurement as the history stores it: None where there was nothing to measure."""
    return float(value) if np.isfinite(value) else None


def _encoded(fusion: ConfigRecord, key: str) -> bytes:
    """The encoded message a client's reply carries under ``fusion[key]``."""
    value = fusion[key]
    if not isinstance(value, bytes):
        raise wire.WireError(
            f"fusion[{key!r}]: holds a {type(value).__name__}, not the encoded message"
        )
    return value
