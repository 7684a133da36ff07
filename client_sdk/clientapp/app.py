"""The Flower ClientApp that runs next to one private expert.

Where its expert comes from:
- deployment (``protofuse client`` or ``flower-supernode --node-config``): node config
  ``spec`` (absolute path of a spec naming the expert) and ``expert`` (its name; optional when
  the spec lists one expert), optionally ``cache-dir`` for the cached answers and
  ``allow-batch-norm=true`` to train a plan with batch norm (refused otherwise: its running
  statistics describe the queries);
- simulation: the run config's ``spec`` and the virtual node's ``partition-id``, which picks the
  spec's expert of that index. Answers are cached beside the spec (``.protofuse-cache``) unless
  the node config names a ``cache-dir``.

Messages (protos/protofuse/v1/federation.proto, as bytes inside Flower's records):
- ``query`` (``describe``): replies ``describe``, a ConfigRecord whose ``node-description`` is the
  encoded ``NodeDescription`` (the expert's pseudonym, labels, input width, query count and the
  queries' overall [min, max]), so the server can issue the vocabulary before the first round. A
  server of another federation format (or one from before the typed messages) is refused here,
  with both formats named;
- ``train``: the ``config`` ConfigRecord's ``round-plan`` is the encoded ``RoundPlan``; one round
  of ``local_training.run_round``. The reply holds the shared weights (``arrays``), ``metrics``
  (``num-examples``, ``loss``) and ``fusion``, a ConfigRecord with the encoded
  prototype-distribution message and imitator statistics; with peer review (the plan's
  federation settings), also ``rows`` (its expert's own view of its labels' rows, ``ExpertRows``)
  and, when the config brought a ``peer-review`` (``PeerReview``: other clients' views, without
  names), ``reviews`` (``ReviewScores``). The queries, the expert's answers and the black box
  itself never leave this process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from protofuse.input_checks import input_range
from protofuse.protocol import federation as wire
from protofuse.protocol import review as peer
from protofuse.spec import SpecError, load_spec

from ..collect import cached_answers, load_array
from .local_training import LocalExpert, RoundPlan, run_round
from .secure_aggregation import secure_aggregation_mod

# A round under secure aggregation goes through Flower's SecAgg+ mod; every other message straight
# to the handlers below.
app = ClientApp(mods=[secure_aggregation_mod])

_EXPERTS: dict[
    tuple[str, str, str], LocalExpert
] = {}  # one load per process (simulation actors live long)


# Where the typed messages travel in Flower's records (the names are the protocol's).
DESCRIBE, NODE_DESCRIPTION, ROUND_PLAN = (
    wire.DESCRIBE,
    wire.NODE_DESCRIPTION_KEY,
    wire.ROUND_PLAN_KEY,
)
# The keys of the untyped round configuration of protofuse before RoundPlan.
_LEGACY_PLAN_KEYS = ("round", "phase", "vocabulary", "training")


@app.query()
def describe(message: Message, context: Context) -> Message:
    check_server_format(message.content.config_records.get(wire.ASK_RECORD))
    expert = local_expert(context)
    # The queries' overall min and max (two numbers) let the bank warn when new inputs are scaled
    # unlike them; nothing else about the queries leaves the client.
    lo, hi = input_range(expert.x)
    description = wire.NodeDescription(
        expert.pseudonym,
        expert.labels,
        int(expert.x.shape[1]),
        int(expert.n_queries),
        (lo, hi),
    )
    reply = ConfigRecord({NODE_DESCRIPTION: wire.encode_node_description(description)})
    return Message(RecordDict({DESCRIBE: reply}), reply_to=message)


def check_server_format(ask: ConfigRecord | None) -> None:
    """Refuse, before any work, a server that speaks another federation format: its ``describe``
    query names its format (a server from before the typed messages names none)."""
    version = ask.get(wire.FORMAT_VERSION_KEY) if ask is not None else None
    if version is None:
        raise wire.WireError(
            "describe: the server speaks the untyped federation protocol of protofuse before "
            f"format 1 (its query names no format), this client format {wire.FORMAT_VERSION}: run "
            "matching protofuse versions"
        )
    if version != wire.FORMAT_VERSION:
        # ``!s``: the value as the server sent it, whatever its type (bytes shown as b'...').
        raise wire.WireError(
            f"describe: the server speaks federation format {version!s}, this client format "
            f"{wire.FORMAT_VERSION}: run matching protofuse versions"
        )


@app.train()
def train(message: Message, context: Context) -> Message:
    plan = round_plan(message.content.config_records["config"])
    check_normalization(plan, context)
    torch.set_num_threads(plan.training.threads)
    expert = local_expert(context)
    shared = {k: v.numpy() for k, v in message.content.array_records["arrays"].items()}
    result = run_round(
        expert, plan, shared, _kept(context), _peer_review(message.content.config_records["config"])
    )
    _keep(context, result.state)
    arrays = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in (result.shared or {}).items()}
    )
    metrics = MetricRecord(
        {
            "num-examples": int(result.n_examples),
            "loss": float(result.loss if result.loss is not None else 0.0),
        }
    )
    fusion = ConfigRecord(
        {
            "distribution": wire.encode_distribution(result.distribution),
            "stats": wire.encode_stats(result.stats),
        }
    )
    if result.view is not None:
        fusion[peer.EXPERT_ROWS_KEY] = peer.encode_expert_rows(result.view)
    if result.reviews is not None:
        fusion[peer.REVIEW_SCORES_KEY] = peer.encode_review_scores(result.reviews)
    return Message(
        RecordDict({"arrays": arrays, "metrics": metrics, "fusion": fusion}), reply_to=message
    )


def round_plan(config: ConfigRecord) -> RoundPlan:
    """Decode the server's plan of this round (every field validated, the settings like a spec's
    tables); a WireError names the field, or says the server speaks another format."""
    if ROUND_PLAN not in config:
        if any(key in config for key in _LEGACY_PLAN_KEYS):
            raise wire.WireError(
                "RoundPlan: the server sent the untyped round configuration of protofuse before "
                f"format 1 (keys {sorted(config.keys())}), this client speaks federation format "
                f"{wire.FORMAT_VERSION}: run matching protofuse versions"
            )
        raise wire.WireError(
            f"RoundPlan: missing; the server's train message has no {ROUND_PLAN!r} in its config "
            f"(keys {sorted(config.keys())}); run matching protofuse versions"
        )
    value = config[ROUND_PLAN]
    if not isinstance(value, bytes):
        raise wire.WireError(
            f"RoundPlan: {ROUND_PLAN!r} holds a {type(value).__name__}, not the encoded message; "
            "run matching protofuse versions"
        )
    return wire.decode_round_plan(value)


def _peer_review(config: ConfigRecord) -> peer.PeerReview | None:
    """Other clients' views to score this round, if the server sent any (validated)."""
    value = config.get(peer.PEER_REVIEW_KEY)
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise wire.WireError(
            f"PeerReview: {peer.PEER_REVIEW_KEY!r} holds a {type(value).__name__}, not the "
            "encoded message; run matching protofuse versions"
        )
    return peer.decode_peer_review(value)


def check_normalization(plan: RoundPlan, context: Context) -> None:
    """Refuse, before any training, a plan whose networks keep batch-norm running statistics:
    they would travel in this node's update and describe its queries (docs/threat-model.md).
    Which networks to train is the server's choice, so the node owner decides whether to accept
    it (node config ``allow-batch-norm``). A simulation's virtual nodes follow its spec: their
    owner chose it."""
    norm = plan.model.get("norm", "batch")  # plans from before the setting meant batch norm
    if norm != "batch" or "partition-id" in context.node_config:
        return
    allowed = context.node_config.get("allow-batch-norm", False)
    if allowed is True or str(allowed).lower() == "true":
        return
    raise wire.WireError(
        "RoundPlan.model_json: the server asks for batch norm, whose running statistics would "
        "send the mean and variance of this node's queries to the server each round; ask the "
        'operator for [model] normalization = "layer" (or "auto"), or accept it on this node '
        "with --node-config 'allow-batch-norm=true' (protofuse client --allow-batch-norm)"
    )


def local_expert(context: Context) -> LocalExpert:
    """This node's expert and its answers (queried once, cached on disk)."""
    spec_path, name = _where(context)
    cache = str(context.node_config.get("cache-dir") or Path(spec_path).parent / ".protofuse-cache")
    spec = load_spec(spec_path)
    entry = spec.expert(name) if name else _only_or_partition(spec, context)
    key = (spec_path, entry.name, cache)  # virtual nodes of one simulation process share the cache
    if key not in _EXPERTS:
        x = load_array(spec.queries_path(entry), f"expert {entry.name!r}: queries", mmap=True)
        answers = cached_answers(spec, entry, x, Path(cache))
        _EXPERTS[key] = LocalExpert(entry.name, tuple(entry.labels), x, answers, len(x))
    return _EXPERTS[key]


def _where(context: Context) -> tuple[str, str]:
    # Only a simulation's virtual nodes (which have a partition-id) take their spec from the run
    # config; a deployed node's files are its owner's to name, never the server's.
    simulated = "partition-id" in context.node_config
    spec = context.node_config.get("spec") or (
        context.run_config.get("spec") if simulated else None
    )
    if not spec:
        raise SpecError(
            'this node has no spec: start it with --node-config \'spec="/abs/path/spec.toml" '
            'expert="NAME"\' (or `protofuse client`)'
        )
    if not os.path.isabs(str(spec)):
        raise SpecError(
            f"spec {spec!r} is a relative path; a ClientApp runs in another working folder, give "
            "an absolute path"
        )
    return str(spec), str(context.node_config.get("expert") or "")


def _only_or_partition(spec: Any, context: Context) -> Any:
    if "partition-id" in context.node_config:
        i = int(context.node_config["partition-id"])
        if not 0 <= i < len(spec.experts):
            raise SpecError(
                f"virtual node {i} has no expert: the spec lists {len(spec.experts)}; simulate "
                "with one node per expert"
            )
        return spec.experts[i]
    if len(spec.experts) != 1:
        raise SpecError(
            f"the spec lists {len(spec.experts)} experts; name this node's with --node-config "
            "'expert=\"NAME\"'"
        )
    return spec.experts[0]


def _kept(context: Context) -> dict[str, dict[str, np.ndarray]]:
    return {
        k: {n: a.numpy() for n, a in rec.items()} for k, rec in context.state.array_records.items()
    }


def _keep(context: Context, state: dict[str, dict[str, np.ndarray]]) -> None:
    for key, arrays in state.items():
        context.state[key] = ArrayRecord(
            {n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()}
        )
