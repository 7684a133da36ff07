"""Peer review: each client's own view of its rows, scored by the clients sharing its labels on
their own queries (protofuse/protocol/review.py, client_sdk/clientapp/peer_review.py,
server/fusion/defences.py's peer_scores, the strategy's rounds)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from client_sdk.clientapp import peer_review
from protofuse.model.discriminative import fit_view
from protofuse.protocol import federation as wire
from protofuse.protocol import review as peer
from protofuse.records import Fidelity
from protofuse.settings import FederationSettings, TrainingSettings
from protofuse_server.fusion import defences
from protofuse_server.fusion.aggregation import to_record
from protofuse_server.fusion.membership import Client, Federation
from protofuse_server.fusion.schedule import Schedule
from protofuse_server.fusion.strategy import FusionStrategy


def _rows(labels: tuple[str, ...], dim: int = 3, value: float = 0.5) -> peer.LabelRows:
    return peer.LabelRows(
        labels, np.full((len(labels), dim), value, np.float32), np.zeros(len(labels))
    )


# -- the wire ----------------------------------------------------------------------------------


def test_the_three_messages_round_trip():
    view = peer.ExpertRows("a", 3, _rows(("0", "1", "2")))
    assert peer.decode_expert_rows(peer.encode_expert_rows(view), dim=3) == view
    review = peer.PeerReview(4, ((7, _rows(("0", "1"))), (2, _rows(("1", "2"), value=-1.0))))
    assert peer.decode_peer_review(peer.encode_peer_review(review)) == review
    scores = peer.ReviewScores("b", 4, ((7, -0.25), (2, 0.0)))
    assert peer.decode_review_scores(peer.encode_review_scores(scores), sent={2, 7}) == scores


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: peer.ExpertRows("a", 1, _rows(("0", "0"))), "appears twice"),
        (lambda: peer.ExpertRows("a b", 1, _rows(("0",))), "ExpertRows.pseudonym"),
        (
            lambda: peer.ExpertRows(
                "a", 1, peer.LabelRows(("0",), np.array([[np.inf]]), np.zeros(1))
            ),
            "ExpertRows.rows.prototypes",
        ),
        (
            lambda: peer.ExpertRows("a", 1, peer.LabelRows(("0",), np.ones((1, 2)), np.zeros(2))),
            "ExpertRows.rows.bias",
        ),
        (lambda: peer.PeerReview(1, ((1, _rows(("0",))),)), "at least 2 labels"),
        (
            lambda: peer.PeerReview(1, ((1, _rows(("0", "1"))), (1, _rows(("1", "2"))))),
            "appears twice",
        ),
        (
            lambda: peer.PeerReview(1, tuple((i, _rows(("0", "1"))) for i in range(65))),
            "at most 64",
        ),
        (lambda: peer.ReviewScores("b", 1, ((1, 1.5),)), "outside \\[-1, 1\\]"),
        (lambda: peer.ReviewScores("b", 1, ((1, float("nan")),)), "not finite"),
        (lambda: peer.ReviewScores("b", 1, ((1, 0.1), (1, 0.2))), "appears twice"),
    ],
)
def test_a_malformed_message_is_refused_by_field_before_it_is_sent(make, field):
    encode = {
        peer.ExpertRows: peer.encode_expert_rows,
        peer.PeerReview: peer.encode_peer_review,
        peer.ReviewScores: peer.encode_review_scores,
    }
    message = make()
    with pytest.raises(wire.WireError, match=field):
        encode[type(message)](message)


def test_received_messages_are_checked_against_what_the_receiver_knows():
    data = peer.encode_expert_rows(peer.ExpertRows("a", 1, _rows(("0", "1"), dim=4)))
    with pytest.raises(wire.WireError, match="dim: 4, but the bank's prototypes are 3 wide"):
        peer.decode_expert_rows(data, dim=3)
    data = peer.encode_review_scores(peer.ReviewScores("b", 1, ((9, 0.0),)))
    with pytest.raises(wire.WireError, match="were not sent to this client"):
        peer.decode_review_scores(data, sent={1, 2})
    # sizes are checked before an array is built: 10**6 labels declared, 6 values sent
    from protofuse.v1 import federation_pb2

    msg = federation_pb2.ExpertRows(format_version=1, pseudonym="a", round=1)
    msg.rows.labels.extend(["0", "1"])
    msg.rows.dim = 60_000
    msg.rows.prototypes.extend([0.0] * 6)
    msg.rows.bias.extend([0.0, 0.0])
    with pytest.raises(wire.WireError, match="6 values for 2 labels of width 60000"):
        peer.decode_expert_rows(msg.SerializeToString())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_are_refused_by_name(data):
    for decode, kind in (
        (peer.decode_expert_rows, peer.ExpertRows),
        (peer.decode_peer_review, peer.PeerReview),
        (peer.decode_review_scores, peer.ReviewScores),
    ):
        try:
            assert isinstance(decode(data), kind)
        except wire.WireError as err:  # never another exception, and the message named first
            assert str(err).startswith(kind.__name__)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text("abc01", min_size=1, max_size=4), min_size=2, max_size=6, unique=True),
    st.integers(1, 5),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)
def test_generated_views_round_trip_exactly(labels, dim, value):
    rows = peer.LabelRows(
        tuple(labels), np.full((len(labels), dim), value, np.float32), np.full(len(labels), value)
    )
    view = peer.ExpertRows("x", 2, rows)
    assert peer.decode_expert_rows(peer.encode_expert_rows(view), dim=dim) == view


# -- scoring on the server ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1, 1), min_size=1, max_size=9),
    st.lists(st.floats(0.01, 5), min_size=9, max_size=9),
)
def test_the_weighted_median_lies_within_the_values_and_is_the_median_for_equal_weights(v, w):
    values, weights = np.array(v), np.array(w[: len(v)])
    m = defences.weighted_median(values, weights)
    assert values.min() <= m <= values.max()
    assert defences.weighted_median(values, np.ones(len(v))) == pytest.approx(np.median(values))


def _reviews(scores: dict[tuple[str, str], float]) -> list[tuple[str, str, float]]:
    return [(j, k, s) for (j, k), s in scores.items()]


def _equal(reviews: list[tuple[str, str, float]]) -> dict[str, float]:
    return defences.peer_scores(reviews, dict.fromkeys({j for j, _, _ in reviews}, 1.0))


def test_a_view_is_scored_by_its_peers_never_by_itself_and_needs_three_of_them():
    honest = ["a", "b", "c", "d"]
    said = {(j, k): 0.0 for j in honest for k in honest if j != k}
    said |= {(j, "flip"): -0.5 for j in honest}
    said |= {("flip", k): -0.6 for k in honest}
    said[("flip", "flip")] = 1.0  # a self-review is ignored
    scores = _equal(_reviews(said))
    assert scores["flip"] == pytest.approx(-0.5) and defences.review_trust(scores["flip"]) == 0.0
    assert all(defences.review_trust(scores[k]) == 1.0 for k in honest)
    two = _equal([("a", "x", 0.0), ("b", "x", 0.0)])
    assert "x" not in two  # two reviewers: no judgement, full trust
    assert defences.review_trust(float("nan")) == 1.0


def test_a_reviewer_weighs_its_trust_from_before_the_round_and_one_of_none_does_not_count():
    said = [("a", "x", 0.0), ("b", "x", 0.0), ("c", "x", 0.0), ("flip", "x", -1.0)]
    # the flipper was scored down in an earlier round: its say is gone, the rest agree
    assert defences.peer_scores(said, {"a": 1, "b": 1, "c": 1, "flip": 0})["x"] == 0.0
    # with two reviewers of positive weight left the view is not judged
    assert "x" not in defences.peer_scores(said, {"a": 1, "b": 1, "c": 0, "flip": 0})
    # a reviewer the server does not know has no say
    assert "x" not in defences.peer_scores(said, {"a": 1, "b": 1})


def test_two_colluding_reviewers_against_two_honest_ones_cannot_sink_an_honest_view():
    # the benchmark's shape: "poor" is reviewed by two label flippers and two honest clients;
    # the colluders score it as low as they can, every weight equal (the first round)
    said = [("flip1", "poor", -1.0), ("flip2", "poor", -1.0)]
    said += [("forest", "poor", 0.0), ("mlp", "poor", -0.05)]
    scores = _equal(said)
    assert defences.review_trust(scores["poor"]) == 1.0  # a tie: the upper median, not the lie
    # three colluders of four are a majority of the weight: that is what the median gives up
    said[2] = ("flip3", "poor", -1.0)
    assert defences.review_trust(_equal(said)["poor"]) == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=3, max_size=8), st.floats(-1, 1), st.floats(-1, 1))
def test_one_hostile_reviewer_moves_a_view_by_at_most_one_place_of_the_median(honest, lie1, lie2):
    said = [(f"h{i}", "x", s) for i, s in enumerate(honest)]
    low, high = sorted(honest)[0], sorted(honest)[-1]
    for lie in (lie1, lie2):
        score = _equal([*said, ("liar", "x", lie)])["x"]
        assert low <= score <= high  # within the honest reviewers' range, whatever it says


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-1, 1), min_size=2, max_size=6),
    st.lists(st.floats(-1, 1), min_size=0, max_size=6),
    st.lists(st.floats(0, 2), min_size=12, max_size=12),
)
def test_no_minority_of_reviewer_weight_can_score_a_view_below_every_honest_score(honest, lies, w):
    """Hostile reviewers holding at most half the reviewing weight leave the score at or above
    the lowest honest score, whatever they say."""
    said = [(f"h{i}", "x", s) for i, s in enumerate(honest)]
    said += [(f"l{i}", "x", s) for i, s in enumerate(lies)]
    weights = {f"h{i}": w[i] + 0.01 for i in range(len(honest))}
    hostile = {f"l{i}": w[6 + i] for i in range(len(lies))}
    if sum(hostile.values()) > sum(weights.values()):
        hostile = {k: v * sum(weights.values()) / sum(hostile.values()) for k, v in hostile.items()}
    score = defences.peer_scores(said, weights | hostile).get("x")
    if score is not None:
        assert score >= min(honest) - 1e-12


# -- the client's part -------------------------------------------------------------------------


def _blobs(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Features of three well-separated classes and one-hot answers."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.eye(3, 4) * 4.0
    z = centres[y] + rng.standard_normal((n, 4))
    return torch.tensor(z, dtype=torch.float32), np.eye(3, dtype=np.float32)[y]


def test_a_fitted_view_classifies_as_the_expert_does_and_a_flipped_one_is_scored_down():
    z, answers = _blobs()
    labels = ("a", "b", "c")
    p0, b0 = torch.zeros(3, 4), torch.zeros(3)
    own = peer.LabelRows(labels, *(t.numpy() for t in fit_view(z, torch.tensor(answers), p0, b0)))
    flipped = np.roll(answers, 1, axis=1)  # every answer names the wrong class
    theirs = peer.LabelRows(
        labels, *(t.numpy() for t in fit_view(z, torch.tensor(flipped), p0, b0))
    )
    honest = peer.LabelRows(
        labels,
        *(
            t.numpy()
            for t in fit_view(*_blobs(seed=1)[:1], torch.tensor(_blobs(seed=1)[1]), p0, b0)
        ),
    )
    review = peer.PeerReview(
        2, ((0, theirs.subset(["a", "b", "c"])), (1, honest.subset(["b", "c"])))
    )
    scores = dict(peer_review.score_candidates(z, answers, own, review))
    assert scores[0] < -0.9  # it names the wrong class almost always
    assert abs(scores[1]) < 0.05  # an honest view of two of the labels: as good as its own
    # a candidate of a label this expert lacks is the server's fault, named
    bad = peer.PeerReview(2, ((3, _rows(("a", "z"), dim=4)),))
    with pytest.raises(ValueError, match="'z'"):
        peer_review.score_candidates(z, answers, own, bad)
    # too few of its queries fall on the candidate's labels: not scored
    few = peer.PeerReview(2, ((4, honest.subset(["b", "c"])),))
    assert peer_review.score_candidates(z[:10], answers[:10], own, few) == ()


def test_labels_declared_with_nothing_behind_them_give_a_view_its_peers_score_down():
    z, answers = _blobs()
    labels = ("a", "b", "c")
    p0, b0 = torch.zeros(3, 4), torch.zeros(3)
    own = peer.LabelRows(labels, *(t.numpy() for t in fit_view(z, torch.tensor(answers), p0, b0)))
    phantom = answers.copy()
    phantom[:, 2] = 0.0  # it declares c but answers only a and b
    phantom[answers[:, 2] == 1, 0] = 1.0  # a c is an a, to its real expert
    view = peer.LabelRows(labels, *(t.numpy() for t in fit_view(z, torch.tensor(phantom), p0, b0)))
    review = peer.PeerReview(1, ((0, view.subset(["a", "c"])),))
    assert dict(peer_review.score_candidates(z, answers, own, review))[0] < -0.3


def test_a_view_that_does_not_stay_finite_is_the_banks_rows():
    z = torch.full((5, 2), 1e30)
    p0, b0 = torch.ones(2, 2), torch.zeros(2)
    protos, bias = fit_view(z, torch.eye(2)[[0, 1, 0, 1, 0]], p0, b0)
    assert torch.isfinite(protos).all() and torch.isfinite(bias).all()


def test_a_client_scores_last_rounds_views_on_last_rounds_weights_against_its_own_view_then():
    from toys import answers, clusters

    from client_sdk.clientapp.local_training import LocalExpert, RoundPlan, run_round
    from protofuse.families.discriminative import shared_arrays
    from protofuse.model.discriminative import DiscriminativeConfig, DiscriminativePrototypes

    torch.manual_seed(0)
    x, y, _ = clusters(n=300)
    keep = y < 3
    expert = LocalExpert("a", ("0", "1", "2"), x[keep], answers(y[keep], [0, 1, 2]), 300)
    vocabulary = ("0", "1", "2", "3")
    model = {"x_dim": 16, "feat_dim": 8, "encoder": "mlp", "image_shape": None}
    shared = shared_arrays(
        DiscriminativePrototypes(DiscriminativeConfig(n_labels=4, n_experts=1, **model))
    )

    def plan(r: int) -> RoundPlan:
        return RoundPlan(
            r, "consensus", r - 1, 3, vocabulary, model, TrainingSettings(), FederationSettings()
        )

    first = run_round(expert, plan(1), shared, {})
    assert first.view is not None and first.reviews is None
    then = first.view.rows
    swap = [1, 0, 2]  # a view naming every 0 a 1 and every 1 a 0
    wrong = peer.LabelRows(then.labels, then.prototypes[swap], then.bias[swap])
    review = peer.PeerReview(2, ((0, then), (1, wrong.subset(["0", "1"]))))
    # round 2's weights have moved (round 1 trained them): the candidates, fitted on round 1's,
    # are scored on round 1's encoder against this client's own view of round 1
    assert first.shared is not None
    second = run_round(expert, plan(2), first.shared, first.state, review)
    assert second.reviews is not None and second.reviews.round == 2
    scores = dict(second.reviews.scores)
    assert scores[0] == 0.0  # its own view of then: exactly as good as itself
    assert scores[1] < -0.2  # it names the other class of the two far more often
    # a client that kept nothing of last round (it missed it, or restarted) scores nothing
    missed = run_round(expert, plan(2), first.shared, {}, review)
    assert missed.reviews is None and missed.view is not None
    # nor does one whose kept weights are of another round than the candidates'
    late = run_round(
        expert, plan(3), first.shared, first.state, dataclasses.replace(review, round=3)
    )
    assert late.reviews is None
    # nor does one asked for another round than the plan's, or whose labels changed since
    assert run_round(expert, plan(3), first.shared, first.state, review).reviews is None
    two = y < 2
    fewer = LocalExpert("a", ("0", "1"), x[two], answers(y[two], [0, 1]), 300)
    moved = run_round(fewer, plan(2), first.shared, first.state, review)
    assert moved.reviews is None and moved.view is not None


# -- the rounds --------------------------------------------------------------------------------


CLIENTS = {
    1: ("a", ("0", "1", "2")),
    2: ("b", ("1", "2", "3")),
    3: ("c", ("0", "3")),
    4: ("d", ("2", "3", "0")),
}


def _strategy(peer_review_on: bool = True) -> FusionStrategy:
    fed = Federation(["0", "1", "2", "3"], 8)
    fed.nodes = {n: Client(p, labels, 30) for n, (p, labels) in CLIENTS.items()}
    training = TrainingSettings()
    settings_ = FederationSettings(rounds=4, peer_review=peer_review_on)
    return FusionStrategy(
        fed, Schedule.from_settings(settings_, training), training, settings_, {}, lambda *a: None
    )


def _reply(node: int, view: peer.ExpertRows | None, scores: peer.ReviewScores | None) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    pseudonym, labels = CLIENTS[node]
    dist = wire.ExpertDistribution(
        pseudonym, labels, 1, wire.DiscriminativeHead(0.0, (0.0,) * len(labels))
    )
    stats = wire.ImitatorStats(pseudonym, 1, 20, 30, Fidelity(0.9, 0.1, 5), None, 0.5)
    fusion = ConfigRecord(
        {"distribution": wire.encode_distribution(dist), "stats": wire.encode_stats(stats)}
    )
    if view is not None:
        fusion[peer.EXPERT_ROWS_KEY] = peer.encode_expert_rows(view)
    if scores is not None:
        fusion[peer.REVIEW_SCORES_KEY] = peer.encode_review_scores(scores)
    arrays = to_record(
        {"prototypes": np.full((4, 3), 0.1, np.float32), "bias": np.zeros(4, np.float32)}
    )
    TaskIdentity.node_id = node
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": 20}), "fusion": fusion}
    )
    return Message(content, dst_node_id=0, message_type="train")


class _Grid:
    def __init__(self, nodes=tuple(CLIENTS)):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def test_views_travel_to_the_clients_sharing_two_labels_without_names_and_scores_set_trust(
    in_a_run,
):
    strategy = _strategy()
    strategy._sent = {"prototypes": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)}
    views = {n: peer.ExpertRows(p, 1, _rows(labels, value=n)) for n, (p, labels) in CLIENTS.items()}
    strategy.aggregate_train(1, [_reply(n, views[n], None) for n in CLIENTS])
    arrays = to_record(strategy._sent)
    messages = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(2, arrays, ConfigRecord(), _Grid())
    }
    assert set(messages) == set(CLIENTS)
    received = {}
    for node, m in messages.items():
        config = m.content["config"]
        assert wire.ROUND_PLAN_KEY in config and m.content["arrays"]["bias"].numpy().shape == (4,)
        review = peer.decode_peer_review(config[peer.PEER_REVIEW_KEY], dim=3)
        received[node] = review
        own = set(CLIENTS[node][1])
        for cid, rows in review.candidates:
            assert set(rows.labels) <= own and len(rows.labels) >= 2
            assert float(rows.prototypes[0, 0]) != node  # never its own view
            name = strategy._review_ids[node][cid]
            assert name != CLIENTS[node][0]
            assert set(rows.labels) == own & set(strategy._views[name][1].labels)
    # c (labels 0, 3) shares two labels with d only; a shares two with b and d
    assert len(received[3].candidates) == 1 and len(received[1].candidates) == 2
    # the reviews come back: everyone scores d's view far below its own, the rest as good
    replies = []
    for node, review in received.items():
        d_ids = [c for c, _ in review.candidates if strategy._review_ids[node][c] == "d"]
        scores = tuple((c, -0.6 if c in d_ids else 0.0) for c, _ in review.candidates)
        view = dataclasses.replace(views[node], round=2)
        replies.append(_reply(node, view, peer.ReviewScores(CLIENTS[node][0], 2, scores)))
    strategy.aggregate_train(2, replies)
    assert strategy.federation.reviews["d"] == pytest.approx(-0.6)
    assert strategy.trust_of("d") == 0.0 and strategy.history[-1]["reviews"]["d"] == -0.6
    assert strategy.trust_of("a") == 1.0  # a has two reviewers only (b, d): not judged


def test_a_score_for_a_candidate_not_sent_or_a_foreign_view_costs_the_reply(in_a_run):
    strategy = _strategy()
    strategy._sent = {"prototypes": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)}
    foreign = peer.ExpertRows("a", 1, _rows(("0", "1")))  # not the labels a declared
    forged = peer.ReviewScores("b", 1, ((12345, -1.0),))  # nothing was sent to b
    b_view = peer.ExpertRows("b", 1, _rows(CLIENTS[2][1]))
    good = [
        _reply(n, peer.ExpertRows(CLIENTS[n][0], 1, _rows(CLIENTS[n][1])), None) for n in (3, 4)
    ]
    strategy.aggregate_train(1, [_reply(1, foreign, None), _reply(2, b_view, forged), *good])
    assert set(strategy.federation.records) == {"c", "d"}
    assert strategy.federation.strikes == {"a": 1, "b": 1}
    assert set(strategy._views) == {"c", "d"} and strategy.federation.reviews == {}


def test_a_reply_without_its_view_or_with_another_rounds_is_refused(in_a_run):
    strategy = _strategy()
    strategy._sent = {"prototypes": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)}
    stale = peer.ExpertRows("b", 0, _rows(CLIENTS[2][1]))  # a view fitted in another round
    good = [
        _reply(n, peer.ExpertRows(CLIENTS[n][0], 1, _rows(CLIENTS[n][1])), None) for n in (3, 4)
    ]
    strategy.aggregate_train(1, [_reply(1, None, None), _reply(2, stale, None), *good])
    assert set(strategy.federation.records) == {"c", "d"}
    assert strategy.federation.strikes == {"a": 1, "b": 1}


def test_only_last_rounds_views_of_admitted_clients_are_sent_for_review(in_a_run):
    strategy = _strategy()
    strategy._sent = {"prototypes": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)}
    views = {n: peer.ExpertRows(p, 1, _rows(labels, value=n)) for n, (p, labels) in CLIENTS.items()}
    strategy.aggregate_train(1, [_reply(n, views[n], None) for n in CLIENTS])
    del strategy.federation.nodes[4]  # d has left: its view goes nowhere
    arrays = to_record(strategy._sent)
    for m in strategy.configure_train(2, arrays, ConfigRecord(), _Grid((1, 2, 3))):
        sent = strategy._review_ids.get(m.metadata.dst_node_id, {})
        assert "d" not in sent.values()
    # a round later every view is a round old: none is sent
    for m in strategy.configure_train(3, arrays, ConfigRecord(), _Grid((1, 2, 3))):
        assert peer.PEER_REVIEW_KEY not in m.content["config"]


def test_review_scores_past_their_size_are_refused_before_parsing():
    big = b"\x0a" + b"\xff" * (peer.MAX_SCORES_BYTES + 1)
    with pytest.raises(wire.WireError, match=r"ReviewScores: \d+ bytes"):
        peer.decode_review_scores(big)


def test_without_peer_review_nothing_is_sent_asked_or_read(in_a_run):
    strategy = _strategy(peer_review_on=False)
    strategy._sent = {"prototypes": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)}
    view = peer.ExpertRows("a", 1, _rows(("0", "1", "2")))
    strategy.aggregate_train(1, [_reply(1, view, None), _reply(2, None, None)])
    assert strategy._views == {}
    for m in strategy.configure_train(2, to_record(strategy._sent), ConfigRecord(), _Grid()):
        assert peer.PEER_REVIEW_KEY not in m.content["config"]
        assert not wire.decode_round_plan(
            m.content["config"][wire.ROUND_PLAN_KEY]
        ).federation.peer_review


def test_a_subset_of_rows_keeps_the_order_asked_and_names_labels_it_lacks():
    rows = peer.LabelRows(
        ("a", "b", "c"), np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(3.0)
    )
    part = rows.subset(["c", "a"])
    assert part.labels == ("c", "a")
    np.testing.assert_array_equal(part.prototypes, rows.prototypes[[2, 0]])
    np.testing.assert_array_equal(part.bias, rows.bias[[2, 0]])
    with pytest.raises(ValueError, match="'z'"):
        rows.subset(["a", "z"])
