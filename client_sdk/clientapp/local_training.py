"""One federated round on a client: train the shared model on the expert's own triples.

Pure numpy and torch (no Flower here; ``client_app`` converts to and from Flower's records).
What enters: the shared weights, the round's plan from the server and what this client kept
from earlier rounds. What leaves: the shared weights after local training, the expert's
prototype-distribution message (its imitation head) and its imitator statistics. The query
inputs and the expert's answers never leave: only the trained weights and the two messages do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from protofuse.families import family
from protofuse.families.discriminative import PRIVATE_PARAMETERS, load_shared, shared_arrays
from protofuse.model.discriminative import DiscriminativePrototypes
from protofuse.protocol import federation as wire
from protofuse.protocol.federation import (  # re-exported: what the server asks of a round
    PHASES,
    RoundPlan,
)
from protofuse.protocol.review import ExpertRows, LabelRows, PeerReview, ReviewScores
from protofuse.records import Fidelity
from protofuse.training import (
    DiscriminativeTrainer,
    consensus,
    consensus_agreement,
    fidelity,
    n_batches,
)
from protofuse.triples import Triples

from . import peer_review

log = logging.getLogger(__name__)
REVIEW_STATE = "review"  # kept: last round's weights as received and the view fitted on them


@dataclass(frozen=True)
class LocalExpert:
    """An expert's queries and its (cached) answers: the private data of one client."""

    pseudonym: str
    labels: tuple[str, ...]
    x: np.ndarray  # (n, d) float32, often a read-only memory map shared with other clients
    answers: np.ndarray  # (n, len(labels)) float32
    n_queries: int  # black-box queries this client's answers took (each input asked once)


@dataclass
class RoundResult:
    shared: dict[str, np.ndarray] | None  # None when nothing was trained (agreement round)
    n_examples: int
    loss: float | None
    distribution: wire.ExpertDistribution
    stats: wire.ImitatorStats
    state: dict[str, dict[str, np.ndarray]] = field(
        default_factory=dict
    )  # kept on the client for later rounds
    view: ExpertRows | None = None  # the expert's own view of its rows (peer review)
    reviews: ReviewScores | None = None  # its scores of the round's candidates (peer review)


def client_seed(seed: int, pseudonym: str, round: int) -> int:
    """A seed of this client and round: clients never shuffle alike, rounds never repeat."""
    digest = hashlib.sha256(f"{seed}/{pseudonym}/{round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def local_triples(expert: LocalExpert, vocabulary: tuple[str, ...]) -> Triples:
    """The client's triples over the server's vocabulary: one expert, its answers embedded."""
    index = {c: i for i, c in enumerate(vocabulary)}
    missing = [c for c in expert.labels if c not in index]
    if missing:
        raise ValueError(
            f"the server's vocabulary lacks this expert's labels {missing}; it should have "
            "appended them (is the server older than this client?)"
        )
    eta = np.zeros((len(expert.x), 1, len(vocabulary)), dtype=np.float32)
    eta[:, 0, [index[c] for c in expert.labels]] = expert.answers
    return Triples(
        expert.x,
        eta,
        np.ones((len(expert.x), 1), dtype=bool),
        vocabulary,
        (expert.pseudonym,),
        (expert.labels,),
    )


def run_round(
    expert: LocalExpert,
    plan: RoundPlan,
    shared: dict[str, np.ndarray],
    kept: dict[str, dict[str, np.ndarray]],
    review: PeerReview | None = None,
) -> RoundResult:
    """Train (or, in the agreement round, score) locally; returns what to send and what to keep.
    Where the plan's settings ask for peer review, first (on the weights as sent) fit the
    expert's own view of its rows and score ``review``'s candidates."""
    triples = local_triples(expert, plan.vocabulary)
    # The held-out split is fixed per client (not per round): fidelity is always measured on
    # queries the imitation never trained on.
    train, held = triples.split(
        plan.training.holdout, client_seed(plan.training.seed, expert.pseudonym, 0)
    )
    model = _local_model(expert, plan, shared, kept.get("head"))
    out_state: dict[str, dict[str, np.ndarray]] = {}
    view, reviews = None, None
    if plan.federation.peer_review:
        view, reviews, out_state[REVIEW_STATE] = _peer_review(
            model, expert, plan, (train, held), review, shared, kept.get(REVIEW_STATE)
        )
    agreement: float | None = None
    loss: float | None = None
    trained: dict[str, np.ndarray] | None = None
    if plan.phase == "agreement":
        score = float(consensus_agreement(consensus(model, train.x), train)[0])
        agreement = None if np.isnan(score) else score  # NaN: the consensus never chose its labels
    else:
        teacher = _teacher(model, train, plan, kept, out_state)
        loss = _train(model, train, plan, teacher, kept, out_state, expert.pseudonym)
        trained = shared_arrays(model)
    out_state["head"] = _head_arrays(model, expert, plan.vocabulary)
    if "teacher" in kept and "teacher" not in out_state:
        out_state["teacher"] = kept["teacher"]
    fid = _fidelity(model, held)
    head = out_state["head"]
    distribution = wire.ExpertDistribution(
        expert.pseudonym,
        expert.labels,
        plan.round,
        wire.DiscriminativeHead(float(head["log_temp"][0]), tuple(float(b) for b in head["bias"])),
    )
    stats = wire.ImitatorStats(
        expert.pseudonym, plan.round, len(train.x), expert.n_queries, fid, agreement, loss
    )
    return RoundResult(trained, len(train.x), loss, distribution, stats, out_state, view, reviews)


def _peer_review(
    model: DiscriminativePrototypes,
    expert: LocalExpert,
    plan: RoundPlan,
    data: tuple[Triples, Triples],
    review: PeerReview | None,
    shared: dict[str, np.ndarray],
    before: dict[str, np.ndarray] | None,
) -> tuple[ExpertRows, ReviewScores | None, dict[str, np.ndarray]]:
    """The expert's own view of its rows, fitted on part of its training queries; its scores of
    the candidates on the held-out queries and the rest; and what to keep for next round's.

    The candidates are views the other clients fitted last round, on last round's weights: they
    are scored on those weights, against this client's own view of last round (both kept, as
    ``before``), never on this round's encoder, which has moved since (a stale view would lose
    to a fresh one for that alone). A client that did not take part last round scores nothing."""
    train, held = data
    fit, scored = peer_review.review_split(
        len(train.x), client_seed(plan.training.seed, expert.pseudonym, 1)
    )
    cols = [plan.vocabulary.index(c) for c in expert.labels]
    answers = train.eta[:, 0, :][:, cols]  # (n, K): the expert's answers, in its label order
    own = peer_review.own_view(
        model,
        peer_review.embed(model, train.x[fit]),
        answers[fit],
        expert.labels,
        plan.vocabulary,
    )
    view = ExpertRows(expert.pseudonym, plan.round, own)
    keep = {
        "round": np.array([plan.round], np.uint64),  # the wire's round: any 64-bit count
        "labels": _labels_digest(expert.labels),
        "own.prototypes": own.prototypes,
        "own.bias": own.bias,
        **{f"shared.{k}": v for k, v in shared.items()},
    }
    if review is None or not review.candidates or review.round != plan.round:
        return view, None, keep  # nothing asked for this round
    if (
        before is None
        or int(before["round"][0]) != review.round - 1
        or not ("labels" in before and np.array_equal(before["labels"], keep["labels"]))
    ):
        return view, None, keep  # last round's weights (or view of these labels) are not here
    then = {k.removeprefix("shared."): v for k, v in before.items() if k.startswith("shared.")}
    previous = plan_networks(plan, len(then["bias"]), then)
    own_then = LabelRows(expert.labels, before["own.prototypes"], before["own.bias"])
    x = np.concatenate([held.x, train.x[scored]])
    eta = np.concatenate([held.eta[:, 0, :][:, cols], answers[scored]])
    z = peer_review.embed(previous.eval(), x)
    scores = peer_review.score_candidates(z, eta, own_then, review)
    return view, ReviewScores(expert.pseudonym, plan.round, scores), keep


def _labels_digest(labels: Sequence[str]) -> np.ndarray:
    """The expert's labels, in order, as 32 bytes: a view kept of other labels is not compared."""
    return np.frombuffer(hashlib.sha256(json.dumps(list(labels)).encode()).digest(), np.uint8)


def _local_model(
    expert: LocalExpert,
    plan: RoundPlan,
    shared: dict[str, np.ndarray],
    head: dict[str, np.ndarray] | None,
) -> DiscriminativePrototypes:
    model = plan_networks(plan, len(plan.vocabulary), shared)
    if head is not None and len(head["bias"]) == len(expert.labels):
        cols = [plan.vocabulary.index(c) for c in expert.labels]
        with torch.no_grad():
            model.expert_log_temp[0] = float(head["log_temp"][0])
            model.expert_bias[0, cols] = torch.from_numpy(np.array(head["bias"], dtype=np.float32))
    return model.eval()


def plan_networks(
    plan: RoundPlan, n_labels: int, shared: dict[str, np.ndarray]
) -> DiscriminativePrototypes:
    """The networks the plan names, for ``n_labels`` rows and this node's one expert, with the
    ``shared`` arrays loaded. The plan's config is first built on torch's meta device (no
    memory) and its shared part compared with the arrays' names and shapes: a config that does
    not describe the arrays sent (a feature size of 10**9, an unknown normalization or key) is
    refused, naming it, before anything is allocated, so the networks never take more memory
    than the arrays this node already received."""
    config = {**plan.model, "n_labels": n_labels, "n_experts": 1}
    impl = family("discriminative")
    try:
        with torch.device("meta"):
            skeleton = impl.build(config)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise wire.WireError(
            f"RoundPlan.model_json: {(str(err).splitlines() or [type(err).__name__])[0]}; the "
            "server must send the networks' config of protofuse's discriminative family"
        ) from None
    # A 0-d tensor (batch norm's count) travels as one value of shape (1,), which loads into it.
    expected = {
        k: tuple(v.shape) or (1,)
        for k, v in skeleton.state_dict().items()
        if k not in PRIVATE_PARAMETERS
    }
    got = {k: tuple(np.shape(v)) or (1,) for k, v in shared.items()}
    if expected != got:
        wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise wire.WireError(
            f"RoundPlan.model_json: the networks it names do not fit the shared weights sent "
            f"(first differing: {wrong[:3]}); the server must send the config it trains"
        )
    model = impl.build(config)
    load_shared(model, shared)
    return model


def _head_arrays(
    model: DiscriminativePrototypes, expert: LocalExpert, vocabulary: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """The private imitation head over the expert's own labels (robust to a growing vocabulary)."""
    cols = [vocabulary.index(c) for c in expert.labels]
    return {
        "log_temp": model.expert_log_temp.detach().numpy()[:1].copy(),
        "bias": model.expert_bias.detach().numpy()[0, cols].copy(),
    }


def _teacher(
    model: DiscriminativePrototypes,
    train: Triples,
    plan: RoundPlan,
    kept: dict[str, dict[str, np.ndarray]],
    out_state: dict[str, dict[str, np.ndarray]],
) -> np.ndarray | None:
    """Weighted rounds distil the consensus of the bank as it stood when they began, computed
    on this client's own queries (the teacher never leaves the client)."""
    if plan.phase != "weighted" or plan.training.distill <= 0:
        return None
    old = kept.get("teacher", {}).get("teacher")
    if (
        plan.phase_round > 0
        and old is not None
        and old.shape == (len(train.x), len(plan.vocabulary))
    ):
        out_state["teacher"] = kept["teacher"]
        return old
    teacher = consensus(model, train.x).astype(np.float32)
    out_state["teacher"] = {"teacher": teacher}
    return teacher


def _train(
    model: DiscriminativePrototypes,
    train: Triples,
    plan: RoundPlan,
    teacher: np.ndarray | None,
    kept: dict[str, dict[str, np.ndarray]],
    out_state: dict[str, dict[str, np.ndarray]],
    pseudonym: str,
) -> float:
    """Local epochs with the optimizer and schedule carried over from this phase's earlier
    rounds."""
    t, f = plan.training, plan.federation
    batch = f.client_batch_size(len(train.x), t)
    trainer = DiscriminativeTrainer(
        model, t.lr, total_steps=plan.phase_rounds * f.local_epochs * n_batches(len(train.x), batch)
    )
    previous = kept.get("trainer")
    if (
        previous is not None
        and plan.phase_round > 0
        and int(np.ravel(previous.get("phase", -1))[0]) == PHASES.index(plan.phase)
        # restores the optimizer state kept from the last round, unless it does not fit
        and not trainer.load_state_arrays({k: v for k, v in previous.items() if k != "phase"})
    ):
        log.warning(
            "%s: the optimizer state kept from the last round does not fit the model; this round "
            "starts a fresh one",
            pseudonym,
        )
    gen = torch.Generator().manual_seed(client_seed(t.seed, pseudonym, plan.round))
    aug = t.resolved_augmentation(
        model.cfg.image_shape, model.cfg.x_dim
    )  # the rule of central training, tables included
    loss = 0.0
    for _ in range(f.local_epochs):
        loss = trainer.epoch(
            train, batch, gen, aug, None, teacher, t.distill if teacher is not None else 0.0
        )
    out_state["trainer"] = {
        **trainer.state_arrays(),
        "phase": np.asarray([PHASES.index(plan.phase)], dtype=np.int64),
    }
    return loss


def _fidelity(model: DiscriminativePrototypes, held: Triples) -> Fidelity:
    if len(held.x) == 0:
        return Fidelity(0.0, 0.0, 0)  # nothing held out: sent as measured on none
    f = fidelity(
        model.expert_log_proba(
            model.embed(torch.from_numpy(held.x)), torch.from_numpy(held.tau)
        ).detach(),
        held,
    )[0]
    return Fidelity(f.agreement, max(f.kl, 0.0), f.n)
