"""The fusion server's parts: the round schedule (schedule), row-wise averaging (aggregation), the
append-only vocabulary and the admission of described nodes (membership), trust-weighted
aggregation, the round plan sent and the merge of the clients' messages (strategy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from protofuse.protocol import federation as wire
from protofuse.records import Fidelity
from protofuse.settings import FederationSettings, TrainingSettings
from protofuse_server.fusion import defences
from protofuse_server.fusion.aggregation import check_update, extend_rows, to_record
from protofuse_server.fusion.membership import Client, Federation
from protofuse_server.fusion.schedule import Schedule
from protofuse_server.fusion.store import BankStore
from protofuse_server.fusion.strategy import ROUND_PLAN, FederationStopped, FusionStrategy


def test_schedule_has_the_two_phases_of_central_training_with_an_agreement_round_between():
    s = Schedule.from_settings(FederationSettings(rounds=5), TrainingSettings())
    assert (s.consensus, s.weighted, s.total) == (2, 3, 6)
    assert [s.at(r).name for r in range(1, 7)] == [
        "consensus",
        "consensus",
        "agreement",
        "weighted",
        "weighted",
        "weighted",
    ]
    assert [(s.at(r).index, s.at(r).rounds) for r in (1, 2, 4, 6)] == [
        (0, 2),
        (1, 2),
        (0, 3),
        (2, 3),
    ]
    with pytest.raises(ValueError, match="outside"):
        s.at(7)
    # Without reweighting or distillation there is nothing to agree on: one phase.
    single = Schedule.from_settings(
        FederationSettings(rounds=5), TrainingSettings(reweight=False, distill=0.0)
    )
    assert (single.total, {single.at(r).name for r in range(1, 6)}) == (5, {"consensus"})
    assert {s.at(r).name for r in range(1, 7)} == set(
        wire.PHASES
    )  # the names the round plan carries


def test_a_row_is_averaged_over_the_clients_covering_its_label_only():
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((3, 4, 2))  # 3 clients' deltas, 4 labels, 2 features
    weights = np.array([1.0, 2.0, 3.0])
    covers = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0]], dtype=float)
    deltas = [{"prototypes": stack[k], "bias": stack[k, :, 0]} for k in range(3)]
    mean = defences.Bounds(combine="mean")
    out = defences.combine(deltas, weights, covers, mean, rowwise=True)["prototypes"]
    np.testing.assert_allclose(out[0], (1 * stack[0, 0] + 3 * stack[2, 0]) / 4)
    np.testing.assert_allclose(out[1], (1 * stack[0, 1] + 2 * stack[1, 1]) / 3)
    np.testing.assert_allclose(out[2], (2 * stack[1, 2] + 3 * stack[2, 2]) / 5)
    np.testing.assert_allclose(out[3], 0.0)  # nobody covers label 3: the row does not move
    bias = defences.combine(deltas, weights, covers, mean, rowwise=True)["bias"]  # 1-D rows too
    np.testing.assert_allclose(bias, out[:, 0])
    # weights are examples x trust: fractions of an example weigh the same way
    scaled = defences.combine(deltas, weights / 20, covers, mean, rowwise=True)["prototypes"]
    np.testing.assert_allclose(scaled, out)
    # not row-wise: every row over every client
    everyone = defences.combine(deltas, weights, covers, mean, rowwise=False)["prototypes"]
    np.testing.assert_allclose(everyone, np.tensordot(weights / 6, stack, axes=1))


def _describe(
    pseudonym: str, labels: list[str], x_dim: int = 8, x_range: tuple[float, float] = (0.0, 1.0)
) -> wire.NodeDescription:
    return wire.NodeDescription(pseudonym, tuple(labels), x_dim, 10, x_range)


def test_the_vocabulary_is_only_ever_appended_to_and_new_rows_leave_old_ones_in_place():
    fed = Federation([], 8)
    assert fed.admit(1, _describe("a", ["0", "1", "2"])) == ["0", "1", "2"]
    assert fed.nodes[1] == Client(
        "a", ("0", "1", "2"), 10
    )  # 10 queries declared: caps its examples
    assert fed.admit(2, _describe("b", ["2", "3"])) == ["3"]
    assert fed.vocabulary == ["0", "1", "2", "3"]
    assert fed.admit(3, _describe("late", ["7", "1"])) == ["7"]  # a later client extends it
    assert fed.vocabulary == ["0", "1", "2", "3", "7"]
    with pytest.raises(ValueError, match="width 5"):
        fed.admit(4, _describe("c", ["0"], x_dim=5))
    with pytest.raises(ValueError, match="already taken"):
        fed.admit(5, _describe("a", ["0"]))
    arrays = {
        "prototypes": np.ones((4, 3), np.float32),
        "bias": np.arange(4, dtype=np.float32),
        "encoder.w": np.zeros(2, np.float32),
    }
    grown = extend_rows(arrays, 1, seed=0)
    assert grown["prototypes"].shape == (5, 3) and grown["bias"].shape == (5,)
    np.testing.assert_array_equal(grown["prototypes"][:4], arrays["prototypes"])
    np.testing.assert_array_equal(grown["bias"], [0, 1, 2, 3, 0])
    assert grown["encoder.w"] is arrays["encoder.w"] and grown["prototypes"].dtype == np.float32


def test_the_input_range_spans_every_admitted_client():
    fed = Federation([], 8)
    assert fed.input_range is None
    fed.admit(2, _describe("a", ["0"], x_range=(0.0, 0.8)))
    fed.admit(3, _describe("b", ["1"], x_range=(-0.5, 0.6)))
    assert fed.input_range == [-0.5, 0.8]
    with pytest.raises(ValueError, match="width"):
        fed.admit(
            4, _describe("c", ["1"], x_dim=9, x_range=(-9.0, 9.0))
        )  # refused: its range does not count
    assert fed.input_range == [-0.5, 0.8]


def _strategy(
    fed: Federation,
    aggregation: str = "rowwise",
    rounds: int = 2,
    model_config: dict | None = None,
    min_clients: int | None = None,
    training: TrainingSettings | None = None,
) -> tuple[FusionStrategy, list]:
    saved: list = []
    training = training or TrainingSettings()
    s = FusionStrategy(
        fed,
        Schedule.from_settings(FederationSettings(rounds=rounds), training),
        training,
        # peer review has tests of its own (test_peer_review.py): these replies carry no views
        FederationSettings(
            rounds=rounds, aggregation=aggregation, min_clients=min_clients, peer_review=False
        ),
        model_config or {},
        lambda r, a, st: saved.append((r, a)),
    )
    return s, saved


def test_aggregation_weighs_by_examples_times_trust_and_casts_back():
    fed = Federation(["0", "1", "2"], 8)
    fed.nodes = {1: Client("a", ("0", "1"), 50), 2: Client("b", ("1", "2"), 50)}
    fed.trust = {"a": 1.0, "b": 0.5}
    for aggregation in ("rowwise", "fedavg"):
        strategy, _ = _strategy(fed, aggregation)
        strategy._sent = {
            "encoder.w": np.zeros(2, np.float32),
            "encoder.n": np.zeros((), np.int64),
            "prototypes": np.full((3, 2), 9.0, np.float32),
            "bias": np.zeros(3, np.float32),
        }
        a = {
            "encoder.w": np.array([1.0, 1.0], np.float32),
            "encoder.n": np.array(4),
            "prototypes": np.full((3, 2), 1.0, np.float32),
            "bias": np.ones(3, np.float32),
        }
        b = {
            "encoder.w": np.array([4.0, 4.0], np.float32),
            "encoder.n": np.array(7),
            "prototypes": np.full((3, 2), 4.0, np.float32),
            "bias": np.full(3, 4.0, np.float32),
        }
        out = strategy.aggregate(
            [(fed.nodes[1], a, 30), (fed.nodes[2], b, 20)]
        )  # weights 30 and 20 * 0.5
        np.testing.assert_allclose(out["encoder.w"], [(30 * 1 + 10 * 4) / 40] * 2)
        assert out["encoder.w"].dtype == np.float32 and out["encoder.n"].dtype == np.int64
        assert out["encoder.n"] == 0  # an integer buffer (a batch-norm counter) is not averaged
        if aggregation == "rowwise":  # label 0 only a's, label 2 only b's, label 1 both
            np.testing.assert_allclose(out["prototypes"][:, 0], [1.0, 1.75, 4.0])
        else:
            np.testing.assert_allclose(out["prototypes"][:, 0], [1.75] * 3)
    # Everyone distrusted: examples alone weigh; no examples either: equal weights.
    fed.trust = {"a": 0.0, "b": 0.0}
    strategy, _ = _strategy(fed, "fedavg")
    strategy._sent = {"w": np.zeros(2, np.float32)}
    a, b = {"w": np.array([1.0, 1.0], np.float32)}, {"w": np.array([4.0, 4.0], np.float32)}
    out = strategy.aggregate([(fed.nodes[1], a, 30), (fed.nodes[2], b, 20)])
    np.testing.assert_allclose(out["w"], [(30 * 1 + 20 * 4) / 50] * 2)
    out = strategy.aggregate([(fed.nodes[1], a, 0), (fed.nodes[2], b, 0)])
    np.testing.assert_allclose(out["w"], [2.5, 2.5])


def _reply(
    node: int,
    pseudonym: str,
    labels: tuple[str, ...],
    round: int,
    agreement: float | None,
    distribution_name: str | None = None,
    loss: float | None = 0.5,
) -> Message:
    dist = wire.ExpertDistribution(
        distribution_name or pseudonym,
        labels,
        round,
        wire.DiscriminativeHead(0.1, tuple(0.0 for _ in labels)),
    )
    stats = wire.ImitatorStats(pseudonym, round, 20, 30, Fidelity(0.9, 0.1, 5), agreement, loss)
    content = RecordDict(
        {
            "arrays": ArrayRecord(),
            "metrics": MetricRecord({"num-examples": 20}),
            "fusion": ConfigRecord(
                {"distribution": wire.encode_distribution(dist), "stats": wire.encode_stats(stats)}
            ),
        }
    )
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.node_id = node  # the sender: Flower stamps it as the message's source
    message = Message(content, dst_node_id=0, message_type="train")
    assert message.metadata.src_node_id == node
    return message


def test_the_agreement_round_sets_trust_and_records_every_expert_checkpointed(in_a_run):
    fed = Federation(["0", "1", "2", "3"], 8)
    fed.nodes = {
        1: Client("good", ("0", "1"), 30),
        2: Client("fair", ("1", "2"), 30),
        3: Client("poor", ("2", "3"), 30),
    }
    strategy, saved = _strategy(fed, rounds=2)  # rounds: consensus, agreement, weighted
    strategy._sent = {"prototypes": np.zeros((4, 2), np.float32), "bias": np.zeros(4, np.float32)}
    replies = [
        _reply(1, "good", ("0", "1"), 2, 0.98),
        _reply(2, "fair", ("1", "2"), 2, 0.9),
        _reply(3, "poor", ("2", "3"), 2, 0.6),
    ]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert set(arrays) == {"prototypes", "bias"}  # nothing trained: the weights stay
    # relative to the median client: the better half full, a clearly worse one far below
    assert fed.trust["good"] == fed.trust["fair"] == 1.0 and fed.trust["poor"] < 0.1
    assert {r.name: r.weight for r in fed.records.values()} == fed.trust
    assert (
        all(r.last_round == 2 for r in fed.records.values())
        and fed.records["poor"].consensus == 0.6
    )
    good = fed.records["good"]  # the one record type, as the store keeps it and the bank exports it
    assert (good.labels, good.fidelity, good.n_queries, good.n_examples) == (
        ("0", "1"),
        Fidelity(0.9, 0.1, 5),
        30,
        20,
    )
    assert wire.decode_distribution(good.distribution).pseudonym == "good"
    assert saved and saved[-1][0] == 2


def test_without_reweighting_the_agreement_round_gives_everyone_full_trust(in_a_run):
    fed = Federation(["0", "1", "2", "3"], 8)
    fed.nodes = {1: Client("good", ("0", "1"), 30), 3: Client("poor", ("2", "3"), 30)}
    strategy, _ = _strategy(fed, rounds=2, training=TrainingSettings(reweight=False))
    strategy._sent = {"prototypes": np.zeros((4, 2), np.float32), "bias": np.zeros(4, np.float32)}
    replies = [
        _reply(1, "good", ("0", "1"), 2, 0.98, loss=None),  # nothing trained: no loss to report
        _reply(3, "poor", ("2", "3"), 2, 0.6, loss=None),
    ]
    _, metrics = strategy.aggregate_train(2, replies)
    assert fed.trust == {"good": 1.0, "poor": 1.0}
    assert math.isnan(metrics["loss"]) and metrics["fidelity"] == pytest.approx(0.9)


def test_an_invalid_or_impersonating_message_is_dropped_and_the_round_goes_on(in_a_run):
    fed = Federation(["0", "1", "2"], 8)
    fed.nodes = {1: Client("a", ("0", "1"), 30), 2: Client("b", ("1", "2"), 30)}
    strategy, _ = _strategy(fed)
    strategy._sent = {"prototypes": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    forged = _reply(2, "b", ("1", "2"), 2, 0.9, distribution_name="a")  # b speaks for a
    strategy.aggregate_train(2, [_reply(1, "a", ("0", "1"), 2, 0.9), forged])
    assert set(fed.records) == {"a"}
    garbage = _reply(2, "b", ("1", "2"), 2, 0.9)
    garbage.content["fusion"]["stats"] = b"\x00not a message"
    with pytest.raises(RuntimeError, match="no client replied with a usable update"):
        strategy.aggregate_train(2, [garbage])


def test_a_second_reply_from_one_node_is_ignored_and_no_node_weighs_twice(in_a_run):
    fed = Federation(["0", "1", "2"], 8)
    fed.nodes = {1: Client("a", ("0", "1"), 30), 2: Client("b", ("1", "2"), 30)}
    strategy, _ = _strategy(fed, aggregation="fedavg")
    strategy._sent = {"prototypes": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    replies = [
        _trained_reply(1, "a", ("0", "1"), 1.0, 0.25),
        _trained_reply(2, "b", ("1", "2"), 4.0, 0.25),
        _trained_reply(1, "a", ("0", "1"), 100.0, 0.25),  # the same node again
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["prototypes"].numpy(), np.full((3, 2), 2.5))
    assert strategy.history[-1]["clients"] == 2


def _trained_reply(
    node: int,
    pseudonym: str,
    labels: tuple[str, ...],
    value: float,
    loss: float,
    n_examples: int = 20,
):
    """A training round's reply: every shared array filled with ``value``."""
    message = _reply(node, pseudonym, labels, 1, None)
    stats = wire.ImitatorStats(pseudonym, 1, n_examples, 30, Fidelity(0.9, 0.1, 5), None, loss)
    message.content["fusion"]["stats"] = wire.encode_stats(stats)
    message.content["arrays"] = to_record(
        {"prototypes": np.full((3, 2), value, np.float32), "bias": np.full(3, value, np.float32)}
    )
    return message


def test_a_training_round_averages_the_updates_and_reports_its_loss_and_traffic(in_a_run):
    fed = Federation(["0", "1", "2"], 8)
    # b declared 10 queries and trained on 10 examples
    fed.nodes = {1: Client("a", ("0", "1"), 30), 2: Client("b", ("1", "2"), 10)}
    strategy, saved = _strategy(fed, aggregation="fedavg")  # round 1: consensus, trained
    assert strategy.trust_of("a") == 1.0  # nobody scored yet: full trust
    fed.trust = {"a": 1.0, "b": 0.5}
    assert strategy.trust_of("late") == 0.5  # never scored: the lowest trust given so far
    strategy._sent = {"prototypes": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    stranger = _trained_reply(9, "a", ("0", "1"), 100.0, 0.0)  # node 9 was never admitted
    misfit = _trained_reply(2, "b", ("1", "2"), 100.0, 0.0)
    misfit.content["arrays"] = to_record({"prototypes": np.zeros((4, 2), np.float32)})
    replies = [
        _trained_reply(2, "b", ("1", "2"), 4.0, 0.75, n_examples=10),
        stranger,
        _trained_reply(1, "a", ("0", "1"), 1.0, 0.25),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = {k: v.numpy() for k, v in arrays.items()}
    # weights: a 20 examples x trust 1, b 10 x trust 0.5
    np.testing.assert_allclose(out["prototypes"], np.full((3, 2), (20 * 1.0 + 5 * 4.0) / 25))
    assert out["prototypes"].dtype == np.float32
    assert dict(metrics) == {
        "loss": 0.5,
        "fidelity": pytest.approx(0.9),
        "bytes-per-client": pytest.approx(strategy.history[-1]["bytes_per_client"]),
    }
    row = strategy.history[-1]
    assert (row["round"], row["phase"], row["clients"], row["shared_bytes"]) == (
        1,
        "consensus",
        2,
        (6 + 3) * 4,
    )
    assert row["bytes_per_client"] > row["shared_bytes"] and row["trust"] == fed.trust
    assert {n: (r.weight, r.last_round) for n, r in fed.records.items()} == {
        "a": (1.0, 1),
        "b": (0.5, 1),
    }
    assert math.isnan(fed.records["a"].consensus)  # not measured yet
    assert saved[-1][0] == 1
    np.testing.assert_allclose(saved[-1][1]["bias"], out["bias"])
    with pytest.raises(RuntimeError, match="no client replied"):  # refused: shapes not sent
        strategy.aggregate_train(1, [misfit])


def test_to_record_round_trips_arrays():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([3], np.int64)}
    back = {k: v.numpy() for k, v in to_record(arrays).items()}
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


def test_an_update_that_does_not_fit_the_shared_weights_is_refused_by_name():
    sent = {"prototypes": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    check_update(to_record(sent), sent)
    bad = [
        ({**sent, "extra": np.zeros(1, np.float32)}, "do not match"),
        ({"prototypes": sent["prototypes"]}, "do not match"),
        ({**sent, "bias": np.zeros(4, np.float32)}, "arrays.bias"),
        ({**sent, "bias": np.zeros(3, np.float64)}, "arrays.bias"),
        (
            {**sent, "prototypes": np.full((3, 2), np.nan, np.float32)},
            "arrays.prototypes: holds NaN",
        ),
    ]
    for arrays, message in bad:
        with pytest.raises(wire.WireError, match=message):
            check_update(to_record(arrays), sent)
    with pytest.raises(wire.WireError) as err:  # names what differs, not what matches
        check_update(to_record({**sent, "extra": np.zeros(1, np.float32)}), sent)
    assert "['extra']" in str(err.value)


# -- admission: typed node descriptions, refusals by name ------------------------------------------


def _from(node: int, content: RecordDict, kind: str = "query") -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.node_id = node  # the sender: Flower stamps it as the message's source
    return Message(content, dst_node_id=0, message_type=kind)


def _description_reply(payload: object) -> RecordDict:
    return RecordDict({"describe": ConfigRecord({"node-description": payload})})


def _skewed(description: wire.NodeDescription, version: int) -> bytes:
    from protofuse.v1 import federation_pb2

    msg = federation_pb2.NodeDescription()
    msg.ParseFromString(wire.encode_node_description(description))
    msg.format_version = version
    return msg.SerializeToString()


class DescribingGrid:
    """Nodes that answer the server's describe query with fixed contents (no Flower engine)."""

    def __init__(self, answers: dict[int, RecordDict]) -> None:
        self.answers = answers
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.answers)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for m in messages:
            assert (
                m.content["ask"]["what"] == "describe"
                and m.content["ask"]["format-version"] == wire.FORMAT_VERSION
            )
        self.asked += [m.metadata.dst_node_id for m in messages]
        return [self._answer(m) for m in messages]

    def _answer(self, query: Message) -> Message:
        answer = self.answers[query.metadata.dst_node_id]
        if isinstance(answer, Error):  # what Flower returns for a node that failed or timed out
            return Message(answer, reply_to=query)
        return _from(query.metadata.dst_node_id, answer)


def test_a_node_whose_description_is_malformed_is_refused_by_name_while_the_others_join(
    in_a_run, caplog
):
    from protofuse.v1 import federation_pb2

    no_range = federation_pb2.NodeDescription()
    no_range.ParseFromString(wire.encode_node_description(_describe("norange", ["0"])))
    no_range.ClearField("x_range")
    answers = {
        1: _description_reply(wire.encode_node_description(_describe("a", ["0", "1"]))),
        2: _description_reply(wire.encode_node_description(_describe("b", ["1", "2"]))),
        3: _description_reply(b"\x00 not a message"),
        4: _description_reply(_skewed(_describe("future", ["9"]), wire.FORMAT_VERSION + 1)),
        # a client of protofuse before NodeDescription: the untyped keys, no version
        5: RecordDict(
            {
                "describe": ConfigRecord(
                    {
                        "pseudonym": "old",
                        "labels": ["7"],
                        "x-dim": 8,
                        "n-queries": 10,
                        "x-range": [0.0, 1.0],
                    }
                )
            }
        ),
        6: _description_reply(no_range.SerializeToString()),
        7: _description_reply(wire.encode_node_description(_describe("wide", ["8"], x_dim=9))),
        8: RecordDict({"metrics": ConfigRecord({"x": 1})}),
    }
    fed = Federation([], 8)
    strategy, _ = _strategy(fed)
    current = {"prototypes": np.zeros((0, 2), np.float32), "bias": np.zeros(0, np.float32)}
    with caplog.at_level("WARNING"):
        grown = strategy._admit_new_nodes(DescribingGrid(answers), current)
    assert set(fed.nodes) == {1, 2} and fed.vocabulary == ["0", "1", "2"]  # the valid ones proceed
    assert grown["prototypes"].shape == (3, 2) and strategy.refused == {3, 4, 5, 6, 7, 8}
    log = {
        n: [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith(f"refusing node {n}")
        ]
        for n in range(3, 9)
    }
    assert all(len(lines) == 1 for lines in log.values()), log  # each refused node named once
    assert "invalid description: NodeDescription: the bytes do not parse" in log[3][0]
    assert (
        f"the client speaks federation format {wire.FORMAT_VERSION + 1}, this server format "
        f"{wire.FORMAT_VERSION}" in log[4][0]
    )
    assert (
        "expert 'old'" in log[5][0]
        and "before the typed federation protocol" in log[5][0]
        and "run matching protofuse versions" in log[5][0]
    )
    assert "NodeDescription.x_range: missing" in log[6][0]
    assert "width 9" in log[7][0]
    assert "without a description" in log[8][0]
    # Refused nodes are never asked again; a node that joins later is.
    grid = DescribingGrid(
        {
            **answers,
            9: _description_reply(wire.encode_node_description(_describe("late", ["2", "3"]))),
        }
    )
    strategy._admit_new_nodes(grid, grown)
    assert grid.asked == [9] and fed.vocabulary == ["0", "1", "2", "3"]
    strategy._admit_new_nodes(grid, grown)
    assert grid.asked == [9]  # the refusals outlast the round that admitted node 9


def test_nodes_joining_together_extend_the_vocabulary_in_the_order_of_their_pseudonyms(
    in_a_run,
):
    # node ids change from run to run; pseudonyms do not, so neither does the label order
    answers = {
        n: _description_reply(wire.encode_node_description(_describe(p, labels)))
        for n, p, labels in ((1, "zed", ["z"]), (2, "amy", ["a"]), (3, "kim", ["k"]))
    }
    fed = Federation([], 8)
    strategy, _ = _strategy(fed)
    current = {"prototypes": np.zeros((0, 2), np.float32), "bias": np.zeros(0, np.float32)}
    strategy._admit_new_nodes(DescribingGrid(answers), current)
    assert fed.vocabulary == ["a", "k", "z"]


def test_a_node_that_fails_to_describe_itself_is_refused_and_the_others_still_join(
    in_a_run, caplog
):
    answers = {
        1: Error(0, "the expert's process died"),
        2: _description_reply(wire.encode_node_description(_describe("a", ["0", "1"]))),
    }
    fed = Federation([], 8)
    strategy, _ = _strategy(fed)
    current = {"prototypes": np.zeros((0, 2), np.float32), "bias": np.zeros(0, np.float32)}
    with caplog.at_level("WARNING"):
        strategy._admit_new_nodes(DescribingGrid(answers), current)
    assert set(fed.nodes) == {2} and strategy.refused == {1}
    assert [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()] == [
        "refusing node 1: it could not describe its expert: the expert's process died"
    ]


def test_every_train_message_carries_the_typed_round_plan(in_a_run):
    fed = Federation([], 8)
    config = {"x_dim": 8, "feat_dim": 4, "encoder": "mlp", "image_shape": None}
    strategy, _ = _strategy(fed, rounds=2, model_config=config)
    grid = DescribingGrid(
        {
            n: _description_reply(wire.encode_node_description(_describe(p, labels)))
            for n, p, labels in ((1, "a", ["0", "1"]), (2, "b", ["1", "2"]))
        }
    )
    arrays = to_record(
        {"prototypes": np.zeros((0, 2), np.float32), "bias": np.zeros(0, np.float32)}
    )
    messages = list(
        strategy.configure_train(2, arrays, ConfigRecord(), grid)
    )  # round 2 of consensus, agreement, weighted
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]
    for m in messages:
        plan = wire.decode_round_plan(m.content["config"][ROUND_PLAN])
        assert (plan.round, plan.phase, plan.phase_round, plan.phase_rounds) == (
            2,
            "agreement",
            0,
            1,
        )
        assert plan.vocabulary == ("0", "1", "2") and plan.model == config
        assert plan.training == strategy.training and plan.federation == strategy.settings
        assert m.content["arrays"]["prototypes"].numpy().shape == (3, 2)  # rows for the new labels


@pytest.mark.parametrize("min_clients,waits_for", [(None, 2), (3, 3)])
def test_min_clients_holds_the_first_round_only_and_nobody_is_asked_to_evaluate(
    in_a_run, min_clients, waits_for
):
    fed = Federation([], 8)
    strategy, _ = _strategy(fed, rounds=2, min_clients=min_clients)
    grid = DescribingGrid(
        {
            n: _description_reply(wire.encode_node_description(_describe(p, ["0"])))
            for n, p in ((1, "a"), (2, "b"), (3, "c"))
        }
    )
    arrays = to_record(
        {"prototypes": np.zeros((0, 2), np.float32), "bias": np.zeros(0, np.float32)}
    )
    # Flower waits for min_available_nodes before sampling min_train_nodes of them
    assert (strategy.min_available_nodes, strategy.min_train_nodes) == (waits_for, waits_for)
    strategy.configure_train(1, arrays, ConfigRecord(), grid)
    assert (strategy.min_available_nodes, strategy.min_train_nodes) == (waits_for, waits_for)
    strategy.configure_train(2, arrays, ConfigRecord(), grid)  # later: a node going offline
    assert (strategy.min_available_nodes, strategy.min_train_nodes) == (1, 1)  # does not stall
    assert list(strategy.configure_evaluate(2, arrays, ConfigRecord(), grid)) == []


def test_on_replies_runs_before_anything_is_merged_or_checkpointed(in_a_run):
    fed = Federation(["0", "1"], 8)
    fed.nodes = {1: Client("a", ("0", "1"), 30)}
    seen: list[int] = []

    class PowerCut(Exception):
        pass

    def cut(round: int) -> None:
        seen.append(round)
        raise PowerCut

    saved: list = []
    strategy = FusionStrategy(
        fed,
        Schedule.from_settings(FederationSettings(rounds=2), TrainingSettings()),
        TrainingSettings(),
        FederationSettings(rounds=2, peer_review=False),
        {},
        lambda r, a, st: saved.append(r),
        round_offset=1,
        on_replies=cut,
    )
    strategy._sent = {"prototypes": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    with pytest.raises(PowerCut):
        strategy.aggregate_train(1, [_reply(1, "a", ("0", "1"), 2, 0.9)])
    assert (
        seen == [2] and fed.records == {} and fed.trust == {} and saved == []
    )  # round 2 = offset 1 + 1


@pytest.mark.parametrize("combine", ["mean", "median", "trimmed_mean", "krum"])
def test_one_hostile_client_cannot_take_a_round_over(in_a_run, combine, tmp_path):
    """Five honest clients move every weight up by about 1; mallory sends -1e30 (a scaled,
    sign-flipped update) and claims 2**64 - 1 queries. The round's result stays with the honest
    clients, mallory's trust drops to 0 and its record counts what it declared, not what it
    claimed."""
    labels = ("0", "1", "2")
    fed = Federation(list(labels), 8)
    names = ["a", "b", "c", "d", "e", "mallory"]
    fed.nodes = {i + 1: Client(n, labels, 30) for i, n in enumerate(names)}
    strategy, _ = _strategy(fed, aggregation="rowwise")
    strategy.settings = strategy.settings.model_copy(update={"combine": combine})
    strategy._sent = {"prototypes": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    honest = [_trained_reply(i + 1, n, labels, 1.0 + 0.1 * i, 0.5) for i, n in enumerate(names[:5])]
    hostile = _trained_reply(6, "mallory", labels, -1e30, 0.5)
    most = 2**64 - 1  # valid on the wire (uint64), beyond SQLite's integers
    hostile.content["fusion"]["stats"] = wire.encode_stats(
        wire.ImitatorStats("mallory", 1, 30, most, Fidelity(0.9, 0.1, most), None, 0.5)
    )
    arrays, _ = strategy.aggregate_train(1, [*honest, hostile])
    out = arrays["prototypes"].numpy()
    assert np.all(out >= 1.0) and np.all(out <= 1.4)
    assert strategy.trust_of("mallory") == 0.0 and all(strategy.trust_of(n) == 1 for n in names[:5])
    record = fed.records["mallory"]
    assert (record.n_examples, record.n_queries, record.fidelity.n, record.weight) == (
        30,
        30,
        30,
        0,
    )
    with BankStore(tmp_path, "run") as store:  # the round's checkpoint takes every record
        store.checkpoint(
            1, {k: v.numpy() for k, v in arrays.items()}, labels, [*fed.records.values()], {}
        )


def test_a_client_claiming_more_examples_than_queries_is_refused_struck_and_loses_trust(
    in_a_run,
):
    """Only a lying client trains on more examples than the query inputs it declared: its reply
    is refused (a strike), the round goes on with the others, and once expelled its trust is 0."""
    labels = ("0", "1")
    fed = Federation(["0", "1", "2"], 8)
    fed.nodes = {
        1: Client("a", labels, 30),
        2: Client("b", labels, 30),
        3: Client("liar", labels, 30),
    }
    strategy, _ = _strategy(fed, aggregation="rowwise", rounds=4)
    strategy._sent = {"prototypes": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    for round in (1, 2, 4):
        replies = [
            _trained_reply(1, "a", labels, 1.0, 0.5),
            _trained_reply(2, "b", labels, 1.2, 0.5),
            _trained_reply(3, "liar", labels, 1.1, 0.5, n_examples=31),
        ]
        arrays, _ = strategy.aggregate_train(round, replies)
        np.testing.assert_allclose(arrays["bias"].numpy()[:2], 1.1, rtol=1e-6)  # a and b alone
        assert "liar" not in fed.records
    assert fed.strikes == {"liar": 3} and fed.expelled == {"liar"}
    assert strategy.trust_of("liar") == 0.0 < min(strategy.trust_of(n) for n in "ab")


def test_a_client_sending_invalid_replies_is_expelled_and_not_readmitted(in_a_run):
    fed = Federation(["0", "1", "2"], 8)
    fed.nodes = {1: Client("a", ("0",), 30), 2: Client("b", ("1",), 30)}
    strategy, _ = _strategy(fed, rounds=4)  # consensus 1-2, agreement 3, weighted 4-5
    strategy._sent = {"prototypes": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    for round in (1, 2, 4):  # training rounds: the arrays are checked
        bad = _trained_reply(2, "b", ("1",), 1.0, 0.5)
        bad.content["arrays"] = to_record(
            {"prototypes": np.full((3, 2), np.nan, np.float32), "bias": np.zeros(3, np.float32)}
        )
        strategy.aggregate_train(round, [_trained_reply(1, "a", ("0",), 1.0, 0.5), bad])
    assert fed.strikes == {"b": 3} and fed.expelled == {"b"} and set(fed.nodes) == {1}
    assert 2 in strategy.refused  # not asked again
    with pytest.raises(ValueError, match="expelled"):  # nor admitted under a new node id
        fed.admit(5, wire.NodeDescription("b", ("1",), 8, 30, (0.0, 1.0)))


# -- too few clients: the federation stops with a message, never waits forever -------------------


def test_a_round_with_too_few_clients_online_stops_after_the_timeout(in_a_run):
    """Flower's sampling waits forever for its minimum: after round 1 the wait is ours, bounded
    by round_timeout, and ends with a message that says how to resume."""
    import time

    fed = Federation(["0", "1"], 8)
    fed.nodes = {1: Client("a", ("0", "1"), 30), 2: Client("b", ("0", "1"), 30)}
    strategy, _ = _strategy(fed, min_clients=4)  # min_replies: half of 4
    strategy.settings = strategy.settings.model_copy(update={"round_timeout": 0.5})
    assert strategy.min_replies == 2
    arrays = to_record({"prototypes": np.zeros((2, 2), np.float32)})
    t0 = time.monotonic()
    with pytest.raises(FederationStopped) as err:
        strategy.configure_train(2, arrays, ConfigRecord(), DescribingGrid({1: RecordDict()}))
    assert 0.4 < time.monotonic() - t0 < 5
    assert "1 clients online, fewer than the 2" in str(err.value) and "resume" in str(err.value)


def test_a_round_merges_with_the_replies_it_has_when_they_reach_min_replies(in_a_run):
    """Three clients, one misses round 2: with min_replies 2 the round is merged from the two
    and the missing expert's record stays (stale: its last round is older); with min_replies 3
    the federation stops naming it, nothing merged."""
    labels = ("0", "1", "2")
    fed = Federation(list(labels), 8)
    fed.nodes = {i + 1: Client(n, labels, 30) for i, n in enumerate(["a", "b", "c"])}
    strategy, saved = _strategy(fed, rounds=4)
    sent = {"prototypes": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    strategy._sent = sent
    strategy.aggregate_train(
        1, [_trained_reply(i + 1, n, labels, 1.0, 0.5) for i, n in enumerate("abc")]
    )
    assert {r.last_round for r in fed.records.values()} == {1}
    strategy.settings = strategy.settings.model_copy(update={"min_replies": 3})
    strategy._sent = sent
    with pytest.raises(FederationStopped, match=r"2 usable replies, fewer than the 3.*\['c'\]"):
        strategy.aggregate_train(
            2, [_trained_reply(i + 1, n, labels, 2.0, 0.5) for i, n in enumerate("ab")]
        )
    assert len(saved) == 1  # round 2 was not checkpointed
    strategy.settings = strategy.settings.model_copy(update={"min_replies": 2})
    arrays, _ = strategy.aggregate_train(
        2, [_trained_reply(i + 1, n, labels, 2.0, 0.5) for i, n in enumerate("ab")]
    )
    assert np.allclose(arrays["prototypes"].numpy(), 2.0) and len(saved) == 2
    assert {n: r.last_round for n, r in fed.records.items()} == {"a": 2, "b": 2, "c": 1}


def test_a_restarted_supernode_is_admitted_once_its_old_node_id_is_gone(in_a_run, caplog):
    """kill -9 of a SuperNode, restarted at once: the SuperLink still lists the old node id
    until its heartbeats lapse. The new node is not refused for good: it is asked again each
    round and takes its pseudonym over when the old id is gone."""
    description = _description_reply(wire.encode_node_description(_describe("a", ["0", "1"])))
    fed = Federation([], 8)
    strategy, _ = _strategy(fed)
    current = {"prototypes": np.zeros((0, 2), np.float32), "bias": np.zeros(0, np.float32)}
    current = strategy._admit_new_nodes(DescribingGrid({1: description}), current)
    both = DescribingGrid({1: description, 7: description})  # the old id still listed
    with caplog.at_level("WARNING"):
        current = strategy._admit_new_nodes(both, current)
    assert set(fed.nodes) == {1} and 7 not in strategy.refused
    assert any("not admitting node 7 this round" in r.getMessage() for r in caplog.records)
    restarted = DescribingGrid({7: description})  # the old id lapsed
    strategy._admit_new_nodes(restarted, current)
    assert set(fed.nodes) == {7} and restarted.asked == [7] and fed.vocabulary == ["0", "1"]


def _three_updates(strategy, values):
    labels = ("0", "1", "2")
    return [
        (Client(n, labels, 30), {"prototypes": np.full((3, 2), v), "bias": np.full(3, v)}, 20)
        for n, v in zip("abc", values, strict=True)
    ]


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"combine": "mean"}, (1.0 + 2.0 + 9.0) / 3),
        ({"combine": "median"}, 2.0),
        ({"combine": "trimmed_mean", "trim": 0.2}, (1.0 + 2.0 + 9.0) / 3),  # cuts int(0.6) = 0
        ({"combine": "trimmed_mean", "trim": 0.4}, 2.0),  # cuts one at each end
        ({"combine": "krum", "assumed_hostile": 1}, 1.5),  # keeps the two closest
    ],
)
def test_the_strategy_combines_with_the_rule_its_settings_name(settings, expected):
    """Clipping and the weight cap off, equal trust: what remains is the combine rule."""
    fed = Federation(["0", "1", "2"], 8)
    strategy, _ = _strategy(fed)
    strategy.settings = strategy.settings.model_copy(
        update={"clip_factor": None, "max_weight_ratio": None, "evidence": False, **settings}
    )
    strategy._sent = {"prototypes": np.zeros((3, 2)), "bias": np.zeros(3)}
    out = strategy.aggregate(_three_updates(strategy, (1.0, 2.0, 9.0)))
    assert np.allclose(out["prototypes"], expected) and np.allclose(out["bias"], expected)


def test_the_weight_cap_and_clipping_come_from_the_settings():
    fed = Federation(["0", "1", "2"], 8)
    strategy, _ = _strategy(fed)
    strategy._sent = {"prototypes": np.zeros((3, 2)), "bias": np.zeros(3)}
    updates = _three_updates(strategy, (1.0, 1.0, 100.0))
    strategy.settings = strategy.settings.model_copy(
        update={"clip_factor": 1.0, "max_weight_ratio": None, "evidence": False}
    )
    assert np.allclose(strategy.aggregate(updates)["bias"], 1.0)  # cut to the median norm
    strategy.settings = strategy.settings.model_copy(update={"clip_factor": None})
    assert np.allclose(strategy.aggregate(updates)["bias"], 34.0)
    heavy = [(c, u, n) for c, u, n in updates[:2]] + [(updates[2][0], updates[2][1], 30)]
    strategy.settings = strategy.settings.model_copy(update={"max_weight_ratio": 1.0})
    assert np.allclose(strategy.aggregate(heavy)["bias"], 34.0)  # 30 examples count as 20
    strategy.settings = strategy.settings.model_copy(update={"max_weight_ratio": None})
    assert np.allclose(strategy.aggregate(heavy)["bias"], (1 + 1 + 1.5 * 100) / 3.5)


def test_evidence_is_averaged_over_rounds_half_on_the_latest():
    fed = Federation(["0"], 8)
    strategy, _ = _strategy(fed)
    strategy._record_evidence(["a", "b"], np.array([0.8, np.nan]))
    assert fed.evidence == {"a": 0.8}  # no score: nothing recorded
    strategy._record_evidence(["a", "b"], np.array([0.2, -0.4]))
    assert fed.evidence == pytest.approx({"a": 0.5, "b": -0.4})


def test_two_clients_get_trust_from_their_agreement():
    """The agreement round with two clients already sets trust (one alone keeps full trust)."""
    fed = Federation(["0", "1"], 8)
    fed.nodes = {1: Client("a", ("0", "1"), 30), 2: Client("b", ("0", "1"), 30)}
    strategy, _ = _strategy(fed)
    stats = [
        (fed.nodes[1], wire.ImitatorStats("a", 1, 20, 30, Fidelity(0.9, 0.1, 5), 0.95, 0.5)),
        (fed.nodes[2], wire.ImitatorStats("b", 1, 20, 30, Fidelity(0.9, 0.1, 5), 0.40, 0.5)),
    ]
    strategy._set_trust(stats)
    assert fed.trust["a"] > fed.trust["b"]


def test_combined_batch_norm_variances_never_go_negative():
    """Two scaled attackers of seven, clipped to twice the median norm, still pushed a running
    variance below zero in `make bench-hostile`; every client's forward pass was NaN from then
    on and the federation stopped. The combined variance is held at zero or above."""
    fed = Federation(["0"], 8)
    strategy, _ = _strategy(fed)
    strategy.settings = strategy.settings.model_copy(update={"evidence": False})
    sent = {"encoder.bn.running_var": np.full(4, 0.01, np.float32), "bias": np.zeros(1)}
    strategy._sent = sent
    updates = [
        (
            Client(n, ("0",), 30),
            {"encoder.bn.running_var": np.full(4, v, np.float32), "bias": np.zeros(1)},
            20,
        )
        for n, v in zip("abc", (-0.5, -0.5, 0.02), strict=True)
    ]
    out = strategy.aggregate(updates)["encoder.bn.running_var"]
    assert out.dtype == np.float32 and np.all(out >= 0)


def test_the_store_holds_combined_weights_except_rows_one_client_carries(in_a_run, tmp_path):
    """What an operator with the server's disk reads (docs/threat-model.md): arrays every client
    trains are stored combined, never as one client's own update; but the row of a label only
    one client covers is that client's row, in the checkpoint (and in the weights every other
    organization receives)."""
    from protofuse_server.fusion.server_app import _checkpoint

    fed = Federation(["0", "1", "2"], 8)
    fed.nodes = {
        1: Client("a", ("0", "1"), 30),
        2: Client("b", ("0", "1"), 30),
        3: Client("c", ("1", "2"), 30),
    }
    strategy, _ = _strategy(fed, aggregation="rowwise")
    rng = np.random.default_rng(5)
    shapes = {"encoder.w": (16,), "prototypes": (3, 8), "bias": (3,)}
    strategy._sent = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
    common = {k: 0.1 * rng.standard_normal(v) for k, v in shapes.items()}  # clients agree...
    own, replies = {}, []
    for node, client in fed.nodes.items():
        reply = _trained_reply(node, client.pseudonym, client.labels, 0.0, 0.5)
        own[client.pseudonym] = {  # ... up to their own data
            k: (v + 0.03 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in common.items()
        }
        reply.content["arrays"] = to_record(own[client.pseudonym])
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    combined = {k: v.numpy() for k, v in arrays.items()}
    assert all(strategy.trust_of(n) > 0 for n in "abc")
    with BankStore(tmp_path, "run") as store:
        _checkpoint(store, 1, combined, strategy, {}, [])
        disk = b"".join(p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file())

    def on_disk(a: np.ndarray) -> bool:
        return a.tobytes() in disk

    assert on_disk(combined["encoder.w"]) and on_disk(combined["prototypes"][1])  # found if kept
    for name, update in own.items():
        assert not on_disk(update["encoder.w"]), f"{name}'s own encoder update is on disk"
        assert not on_disk(update["prototypes"][1]), f"{name}'s row of a shared label is on disk"
    # Label 2 is c's alone: its row in the bank is c's row.
    np.testing.assert_array_equal(combined["prototypes"][2], own["c"]["prototypes"][2])
    assert on_disk(own["c"]["prototypes"][2])


# -- secure aggregation: the strategy's side (the protocol itself: test_simulation.py) ------------


def test_under_secure_aggregation_the_step_comes_from_the_sum_and_halted_rounds_move_nothing(
    in_a_run,
):
    """[privacy] mode = "secagg": the round's step is read from the mean Flower unmasks (each
    client weighs 1; a row over the clients in the sum that declared it, the liar whose report is
    refused included: its vector is in the sum); trust stays 1; a malformed SecAgg+ reply is a
    strike; a sum with a spoiled canary moves nothing; a round SecAgg+ could not finish moves
    nothing, and max_strikes of them in a row stop the federation with the reason."""
    from protofuse.protocol import secure_sum
    from protofuse_server.fusion.secure_aggregation import SecureRounds

    fed = Federation(["0", "1", "2"], 8)
    fed.nodes = {
        1: Client("a", ("0", "1"), 30),
        2: Client("b", ("1",), 30),
        3: Client("liar", ("2",), 30),
    }
    strategy, saved = _strategy(fed, rounds=8)
    strategy.secure = secure = SecureRounds(None, 0.5, 10.0)  # type: ignore[arg-type]
    secure.on_refused = strategy._refused
    sent = {"prototypes": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float32)}
    strategy._sent, strategy._round_nodes = sent, dict(fed.nodes)

    # a's change: 1 on its rows 0 and 1; b's: 3 on its row 1; the liar's: 5 on its row 2.
    covers = strategy._covers(list(fed.nodes.values()))
    vectors = [
        secure_sum.masked_vector(sent, {k: v + d for k, v in sent.items()}, c, True)
        for d, c in zip((1.0, 3.0, 5.0), covers, strict=True)
    ]
    secure.last_mean = [np.mean(parts, axis=0) for parts in zip(*vectors, strict=True)]
    secure.summed = [1, 2, 3]
    replies = [
        _trained_reply(1, "a", ("0", "1"), 0.0, 0.5),
        _trained_reply(2, "b", ("1",), 0.0, 0.5),
        _trained_reply(3, "liar", ("2",), 0.0, 0.5, n_examples=31),
    ]
    for reply in replies:
        del reply.content["arrays"]  # a secure reply carries no array
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["prototypes"].numpy()[:, 0], [1.0, 2.0, 5.0])
    np.testing.assert_allclose(arrays["bias"].numpy(), [1.0, 2.0, 5.0])
    assert fed.strikes == {"liar": 1} and "liar" not in fed.records
    assert strategy.trust_of("a") == strategy.trust_of("b") == 1.0

    strategy._refused(2, "share_keys: lists of 2 and 3 entries")
    assert fed.strikes == {"liar": 1, "b": 1}

    secure.last_mean[-1] = np.array([secure_sum.CLIP_RANGE / 2])  # a weight-inflating client
    arrays, _ = strategy.aggregate_train(2, replies[:2])
    np.testing.assert_array_equal(arrays["prototypes"].numpy(), sent["prototypes"])

    secure.halted = "SecAgg+ failed (ValueError: Failed to combine shares)"
    for r in (3, 4):  # a halted round is checkpointed, unmoved
        arrays, _ = strategy.aggregate_train(r, [])
        np.testing.assert_array_equal(arrays["bias"].numpy(), sent["bias"])
        assert saved[-1][0] == r and strategy.history[-1]["halted"] == secure.halted
    with pytest.raises(FederationStopped, match=r"3 rounds in a row.*combine shares"):
        strategy.aggregate_train(6, [])  # round 5 is the agreement round: plain
