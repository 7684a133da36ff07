"""The ClientApp, called the way a SuperNode calls it: what it sends, what it keeps, what it asks
of the black box. The privacy test inspects the exact bytes of a reply."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from hypothesis import given, settings
from hypothesis import strategies as st
from toys import clusters

from client_sdk.clientapp import app as client_app
from client_sdk.clientapp.local_training import client_seed, plan_networks
from protofuse.families.discriminative import PRIVATE_PARAMETERS, shared_arrays
from protofuse.model.discriminative import DiscriminativeConfig, DiscriminativePrototypes
from protofuse.protocol import federation as wire
from protofuse.settings import FederationSettings, TrainingSettings
from protofuse_server.fusion.aggregation import to_record

EXPERTS = """
from pathlib import Path
import numpy as np

HERE = Path(__file__).parent
CENTRES = np.load(HERE / "centres.npy")

def _answer(x, cols):
    with open(HERE / "calls.txt", "a") as f:  # every row the black box is asked about
        f.write(f"{len(x)}\\n")
    d = ((np.asarray(x)[:, None, :] - CENTRES[None, cols]) ** 2).sum(-1)
    p = np.exp(-(d - d.min(1, keepdims=True)) * 20)
    return p / p.sum(1, keepdims=True)

def a(x):
    return _answer(x, [0, 1, 2])
"""


@pytest.fixture
def node(tmp_path):
    """A spec folder with one expert (labels 0, 1, 2 of the toy clusters) and a node's context."""
    x, _, centres = clusters(seed=3, n=240)
    np.save(tmp_path / "queries.npy", x)
    np.save(tmp_path / "centres.npy", centres)
    (tmp_path / "experts.py").write_text(EXPERTS)
    (tmp_path / "spec.toml").write_text(
        '[[experts]]\nname = "a"\npredict = "experts:a"\nlabels = ["0", "1", "2"]\nqueries = '
        '"queries.npy"\n'
    )
    client_app._EXPERTS.clear()  # a fresh process
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"spec": str(tmp_path / "spec.toml"), "cache-dir": str(tmp_path / "cache")},
        state=RecordDict(),
        run_config={},
    )
    return tmp_path, x, context


pytestmark = pytest.mark.usefixtures("as_a_node")  # tests/conftest.py


VOCAB = ["0", "1", "2", "3"]


def _plan(round: int, phase: str, phase_round: int, phase_rounds: int) -> wire.RoundPlan:
    # What a server plans by default (normalization "auto" is layer norm in a federation).
    model = {"x_dim": 16, "feat_dim": 8, "encoder": "mlp", "image_shape": None, "norm": "layer"}
    return wire.RoundPlan(
        round,
        phase,
        phase_round,
        phase_rounds,
        tuple(VOCAB),
        model,
        TrainingSettings(seed=0, holdout=0.25),
        FederationSettings(rounds=4, local_epochs=1),
    )


def _instruction(
    round: int,
    phase: str,
    phase_round: int,
    phase_rounds: int,
    arrays: dict[str, np.ndarray],
    config: ConfigRecord | None = None,
) -> Message:
    """The server's train message: the shared weights and the encoded RoundPlan (as FedAvg adds it,
    beside its server-round)."""
    config = (
        config
        if config is not None
        else ConfigRecord(
            {
                "round-plan": wire.encode_round_plan(
                    _plan(round, phase, phase_round, phase_rounds)
                ),
                "server-round": round,
            }
        )
    )
    return Message(
        RecordDict({"arrays": to_record(arrays), "config": config}),
        dst_node_id=7,
        message_type="train",
    )


def _ask(**ask: object) -> Message:
    return Message(
        RecordDict({"ask": ConfigRecord({"what": "describe", **ask})}),
        dst_node_id=7,
        message_type="query",
    )


def _initial() -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(0)
    return shared_arrays(
        DiscriminativePrototypes(
            DiscriminativeConfig(16, len(VOCAB), 1, 8, "mlp", None, norm="layer")
        )
    )


def test_describe_names_the_expert_and_asks_the_black_box_once(node):
    folder, x, context = node
    reply = client_app.app(_ask(**{"format-version": wire.FORMAT_VERSION}), context)
    assert list(reply.content["describe"].keys()) == [
        "node-description"
    ]  # one typed message, nothing else
    d = wire.decode_node_description(reply.content["describe"]["node-description"])
    assert (d.pseudonym, d.label_names, d.x_dim, d.n_queries) == ("a", ("0", "1", "2"), 16, len(x))
    assert d.x_range == (float(x.min()), float(x.max()))
    client_app.app(_instruction(1, "consensus", 0, 2, _initial()), context)
    client_app._EXPERTS.clear()  # a restarted client reads its answers from the disk cache
    client_app.app(_instruction(2, "consensus", 1, 2, _initial()), context)
    assert sum(int(n) for n in (folder / "calls.txt").read_text().split()) == len(x)


def test_a_reply_holds_the_shared_weights_and_two_messages_and_nothing_private(node):
    folder, x, context = node
    start = _initial()
    reply = client_app.app(_instruction(1, "consensus", 0, 2, start), context)
    assert set(reply.content.keys()) == {"arrays", "metrics", "fusion"}
    arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert set(arrays) == set(start) and not set(arrays) & set(
        PRIVATE_PARAMETERS
    )  # the imitation head stays
    assert not np.allclose(arrays["prototypes"], start["prototypes"])  # it trained
    dist = wire.decode_distribution(bytes(reply.content["fusion"]["distribution"]))
    stats = wire.decode_stats(bytes(reply.content["fusion"]["stats"]))
    assert (
        dist.label_names == ("0", "1", "2")
        and len(dist.head.label_bias) == 3
        and stats.n_examples == 180
        and stats.n_queries == len(x)
    )
    assert 0.8 < stats.fidelity.agreement <= 1.0 and stats.fidelity.n == 60

    # The bytes that leave the client: no query input, no answer of the expert, in any encoding.
    sent = recorddict_to_proto(reply.content).SerializeToString()
    expert = __import__("importlib").util.spec_from_file_location(
        "experts_probe", folder / "experts.py"
    )
    module = __import__("importlib").util.module_from_spec(expert)
    expert.loader.exec_module(module)
    answers = module.a(x)
    for i in range(len(x)):
        for row in (x[i], answers[i]):
            for dtype in (np.float32, np.float64):
                assert np.asarray(row, dtype=dtype).tobytes()[:16] not in sent, (
                    f"row {i} of the private data appears in the reply"
                )
    shared = sum(a.nbytes for a in start.values())
    assert len(sent) <= 1.05 * shared + 2048  # the weights, two small messages and framing


def test_the_optimizer_and_schedule_carry_over_rounds_and_reset_with_the_phase(node):
    _, _, context = node
    arrays = _initial()
    client_app.app(_instruction(1, "consensus", 0, 3, arrays), context)
    first = int(np.ravel(context.state["trainer"]["steps_done"].numpy())[0])
    reply = client_app.app(_instruction(2, "consensus", 1, 3, arrays), context)
    assert int(np.ravel(context.state["trainer"]["steps_done"].numpy())[0]) == 2 * first > 0
    # The agreement round trains nothing and measures the expert against the bank's consensus.
    agreed = client_app.app(
        _instruction(
            3, "agreement", 0, 1, {k: v.numpy() for k, v in reply.content["arrays"].items()}
        ),
        context,
    )
    assert len(agreed.content["arrays"]) == 0
    stats = wire.decode_stats(bytes(agreed.content["fusion"]["stats"]))
    assert stats.consensus_agreement is not None and 0.0 <= stats.consensus_agreement <= 1.0
    # A new phase starts a new optimizer and schedule, and keeps its teacher for later rounds.
    client_app.app(_instruction(4, "weighted", 0, 2, arrays), context)
    assert int(np.ravel(context.state["trainer"]["steps_done"].numpy())[0]) == first
    teacher = context.state["teacher"]["teacher"].numpy()
    assert teacher.shape == (180, len(VOCAB)) and np.allclose(teacher.sum(1), 1, atol=1e-5)
    client_app.app(
        _instruction(5, "weighted", 1, 2, {k: v * 0 for k, v in arrays.items()}), context
    )
    np.testing.assert_array_equal(
        context.state["teacher"]["teacher"].numpy(), teacher
    )  # not recomputed


def _batch_norm_round(context: Context) -> Message:
    import torch

    torch.manual_seed(0)
    start = shared_arrays(
        DiscriminativePrototypes(DiscriminativeConfig(16, len(VOCAB), 1, 8, "mlp", None))
    )
    plan = _plan(1, "consensus", 0, 2)
    plan = dataclasses.replace(plan, model={**plan.model, "norm": "batch"})
    config = ConfigRecord({"round-plan": wire.encode_round_plan(plan), "server-round": 1})
    return client_app.app(_instruction(1, "consensus", 0, 2, start, config), context)


def test_a_deployed_node_refuses_a_batch_norm_plan_before_any_work_unless_its_owner_allows(node):
    folder, _, context = node
    with pytest.raises(wire.WireError, match=r"batch norm.*allow-batch-norm=true"):
        _batch_norm_round(context)
    # Refused before the expert was asked or anything was kept: no answer, no state.
    assert not (folder / "calls.txt").exists() and not list(context.state.array_records)
    # A plan from before the setting names no normalization: batch norm, refused alike.
    plan = _plan(1, "consensus", 0, 2)
    legacy = dataclasses.replace(plan, model={k: v for k, v in plan.model.items() if k != "norm"})
    with pytest.raises(wire.WireError, match="allow-batch-norm"):
        client_app.check_normalization(legacy, context)
    for allowed in (True, "true", "True"):  # the node config's TOML boolean, or a string
        context.node_config["allow-batch-norm"] = allowed
        client_app.check_normalization(legacy, context)
    context.node_config["allow-batch-norm"] = "false"
    with pytest.raises(wire.WireError):
        client_app.check_normalization(legacy, context)
    # Its owner's choice: with allow-batch-norm the round runs and sends the running statistics.
    context.node_config["allow-batch-norm"] = True
    reply = _batch_norm_round(context)
    assert any("running_mean" in k for k in reply.content["arrays"])


def test_a_simulated_node_trains_the_normalization_its_spec_chose(node):
    _, _, context = node
    # A simulation's virtual node (partition-id) runs for the spec's owner, who chose batch norm.
    context.node_config["partition-id"] = 0
    reply = _batch_norm_round(context)
    assert any("running_mean" in k for k in reply.content["arrays"])


def test_seeds_differ_per_client_and_per_round():
    seeds = {client_seed(0, who, r) for who in ("a", "b") for r in range(1, 6)}
    assert len(seeds) == 10 and client_seed(0, "a", 1) == client_seed(0, "a", 1)


def test_a_node_without_a_spec_is_told_how_to_start(node):
    bare = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(Exception, match="this node has no spec"):
        client_app.local_expert(bare)
    relative = Context(
        run_id=1, node_id=7, node_config={"spec": "spec.toml"}, state=RecordDict(), run_config={}
    )
    with pytest.raises(Exception, match="relative path"):
        client_app.local_expert(relative)


def test_a_server_of_another_federation_format_is_refused_at_describe_with_both_formats(node):
    _, _, context = node
    with pytest.raises(
        wire.WireError,
        match=(
            f"the server speaks federation format {wire.FORMAT_VERSION + 1}, this client "
            f"format {wire.FORMAT_VERSION}: run matching protofuse versions"
        ),
    ):
        client_app.describe(_ask(**{"format-version": wire.FORMAT_VERSION + 1}), context)
    # A server from before the typed messages asks {"what": "describe"} and names no format.
    with pytest.raises(
        wire.WireError,
        match=(
            r"the server speaks the untyped federation protocol .* run matching protofuse "
            r"versions"
        ),
    ):
        client_app.describe(_ask(), context)


def test_an_untyped_round_configuration_from_an_old_server_is_refused_clearly(node):
    _, _, context = node
    legacy = ConfigRecord(
        {
            "round": 1,
            "phase": "consensus",
            "phase-round": 0,
            "phase-rounds": 2,
            "vocabulary": VOCAB,
            "model": json.dumps(
                {"x_dim": 16, "feat_dim": 8, "encoder": "mlp", "image_shape": None}
            ),
            "training": TrainingSettings().model_dump_json(),
            "federation": FederationSettings().model_dump_json(),
            "server-round": 1,
        }
    )
    with pytest.raises(
        wire.WireError,
        match=(
            r"^RoundPlan: the server sent the untyped round configuration .* this client "
            r"speaks federation format 1: run matching protofuse versions"
        ),
    ):
        client_app.train(_instruction(1, "consensus", 0, 2, _initial(), config=legacy), context)
    with pytest.raises(wire.WireError, match=r"^RoundPlan: missing"):
        client_app.train(
            _instruction(
                1, "consensus", 0, 2, _initial(), config=ConfigRecord({"server-round": 1})
            ),
            context,
        )


def test_a_round_plan_of_another_format_is_refused_naming_both_formats(node):
    from protofuse.v1 import federation_pb2

    _, _, context = node
    msg = federation_pb2.RoundPlan()
    msg.ParseFromString(wire.encode_round_plan(_plan(1, "consensus", 0, 2)))
    msg.format_version = wire.FORMAT_VERSION + 1
    config = ConfigRecord({"round-plan": msg.SerializeToString(), "server-round": 1})
    with pytest.raises(
        wire.WireError,
        match=(
            "^RoundPlan.format_version: the server speaks federation format "
            f"{wire.FORMAT_VERSION + 1}, this client format {wire.FORMAT_VERSION}"
        ),
    ):
        client_app.train(_instruction(1, "consensus", 0, 2, _initial(), config=config), context)


def _recover_query_mean(sent: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> np.ndarray:
    """A curious server's estimate of the mean of a client's queries from its reply, as good as
    any attacker of this kind gets: every 1-D array of the first hidden layer's width is read as
    a running average of that layer's pre-activations ``W x + b`` (momentum 0.1, from the value
    the server sent, after any number of steps), solved for ``x`` through the returned ``W, b``
    by least squares. Every candidate is returned: the test keeps the one closest to the truth,
    which no real attacker could pick, so the attack is scored at its best."""
    w, b = got["encoder.mlp.net.0.weight"], got["encoder.mlp.net.0.bias"]  # (H, d), (H,)
    out = []
    for name, r in got.items():
        if r.shape != b.shape or name == "encoder.mlp.net.0.bias":
            continue
        r0 = sent[name]
        for steps in range(1, 41):
            kept = 0.9**steps
            mean = (r - kept * r0) / (1 - kept)  # the average of the batch means
            out.append(np.linalg.lstsq(w, mean - b, rcond=None)[0])
    return np.array(out)  # (candidates, d)


def _best(candidates: np.ndarray, truth: np.ndarray) -> float:
    return min(float(np.linalg.norm(c - truth)) for c in candidates) if len(candidates) else np.inf


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_curious_server_recovers_the_query_mean_only_from_batch_norm_statistics(node, norm):
    _, x, context = node
    import torch

    if norm == "batch":  # a node that accepted batch norm, as every node did before the setting
        context.node_config["allow-batch-norm"] = True
    torch.manual_seed(0)
    start = shared_arrays(
        DiscriminativePrototypes(DiscriminativeConfig(16, len(VOCAB), 1, 8, "mlp", None, norm=norm))
    )
    plan = _plan(1, "consensus", 0, 2)
    plan = dataclasses.replace(plan, model={**plan.model, "norm": norm})
    config = ConfigRecord({"round-plan": wire.encode_round_plan(plan), "server-round": 1})
    reply = client_app.app(_instruction(1, "consensus", 0, 2, start, config), context)
    got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    truth = x.mean(0)
    lo, hi = float(x.min()), float(x.max())  # the value range the client declares
    guess = np.linalg.norm(np.full_like(truth, (lo + hi) / 2) - truth)  # knowing nothing else
    error = _best(_recover_query_mean(start, got), truth)
    print(f"{norm}: attack error {error:.3f}, data-free guess {guess:.3f}")
    if norm == "batch":
        assert error < 0.1 * guess  # the running mean gives the client's query mean away
    else:
        assert not [k for k in got if "running" in k or got[k].dtype.kind != "f"]
        assert error > 0.5 * guess  # nothing in the reply does


def test_a_plan_naming_networks_other_than_the_weights_sent_is_refused_before_allocating(node):
    """A server's config is built on the meta device and compared with the shared arrays first:
    a feature size of 10**9 (4 GB a row) or a config that does not build is refused by name."""
    _, _, context = node
    start = _initial()
    plan = _plan(1, "consensus", 0, 2)
    for model, why in (
        ({**plan.model, "feat_dim": 10**9}, "do not fit the shared weights"),
        ({**plan.model, "norm": "bogus"}, "unknown normalization"),
        ({**plan.model, "layers": 3}, "layers"),
        ({**plan.model, "encoder": "conv"}, "image"),
    ):
        bad = dataclasses.replace(plan, model=model)
        config = ConfigRecord({"round-plan": wire.encode_round_plan(bad), "server-round": 1})
        with pytest.raises(wire.WireError, match=f"RoundPlan.model_json: .*{why}"):
            client_app.app(_instruction(1, "consensus", 0, 2, start, config), context)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["x_dim", "feat_dim", "encoder", "image_shape", "norm", "extra"]),
        st.one_of(
            st.integers(-2, 10**12),
            st.sampled_from(["mlp", "conv", "layer", "batch", "", "bogus"]),
            st.none(),
            st.lists(st.integers(-1, 40), max_size=4),
        ),
        max_size=4,
    )
)
def test_any_networks_config_a_server_sends_builds_the_weights_sent_or_is_refused(changes):
    plan = _plan(1, "consensus", 0, 2)
    plan = dataclasses.replace(plan, model={**plan.model, **changes})
    start = _initial()
    try:
        model = plan_networks(plan, len(VOCAB), start)
    except wire.WireError as err:
        assert str(err).startswith("RoundPlan.model_json: ")
        return
    got = shared_arrays(model)
    assert got.keys() == start.keys()
    assert all(np.array_equal(got[k], start[k]) for k in start)
