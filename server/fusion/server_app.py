"""The Flower ServerApp of the fusion server.

Run config (``flwr run ... --run-config``; ``protofuse simulate`` fills it in):
- ``spec``: absolute path of a spec; the server reads its ``[data]``, ``[model]``, ``[training]``,
  ``[adapt]`` and ``[federation]`` tables (its ``[[experts]]`` are the clients' business);
- ``out``: absolute path of the run folder: ``store/`` (SQLite + weight files, checkpointed every
  round), ``rounds.json`` (per-round metrics) and, when the schedule is done, ``bank/`` and
  ``manifest.pb`` (the bank manifest: version, vocabulary, weights digest, experts); the run
  folder itself is accepted by ``protofuse adapt | predict | info`` and ``client_sdk.load_bank``
  as ``fit``'s output is;
- ``rounds`` (optional): overrides ``[federation] rounds``; ``min-clients`` (optional): clients
  to wait for before the first round.

A restarted run with the same settings resumes after the last checkpoint; every expert record
survives.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from protofuse.bank import RUN_BANK, RUN_MANIFEST, Bank, bank_meta
from protofuse.bank_meta import FederationRecord
from protofuse.families import Family, family

# Only the discriminative family federates (Family.federates): its split of shared and private
# weights is what the rounds exchange.
from protofuse.families.discriminative import config_for, load_shared, shared_arrays
from protofuse.io import atomic_write_bytes
from protofuse.model.discriminative import DiscriminativePrototypes
from protofuse.model.networks import image_size
from protofuse.privacy import DpPlan, plan_dp
from protofuse.protocol import federation as wire
from protofuse.records import NOT_MEASURED, ExpertRecord, Fidelity
from protofuse.spec import Spec, SpecError, load_spec

from ..metrics import ADDRESS_ENV, FusionMetrics, expose
from .aggregation import extend_rows, to_record
from .membership import Federation, describe_nodes
from .schedule import Schedule
from .secure_aggregation import SecureRounds
from .store import BankStore, Checkpoint, StoreError
from .strategy import FusionStrategy

app = ServerApp()

STORE = "store"


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec, out = run_settings(context.run_config)
    fuse(grid, spec, out)


def fuse(
    grid: Grid, spec: Spec, out: Path, on_replies: Callable[[int], None] | None = None
) -> Bank:
    """Run the whole schedule (resuming from the store if it holds a checkpoint); export the bank.

    ``on_replies(round)``: called in every round once the replies are in, before anything is
    merged or checkpointed (``FusionStrategy``); a test's own ServerApp passes one to kill the
    server mid-round."""
    impl = federating_family(spec)
    torch.set_num_threads(spec.training.threads)
    schedule = Schedule.from_settings(spec.federation, spec.training)
    dp_plan = plan_dp(spec.privacy, schedule.training_rounds) if spec.privacy.mode == "dp" else None
    if dp_plan is not None:
        log(INFO, "fusion: differential privacy: %s", dp_plan.describe())
    secure = (
        SecureRounds(grid, spec.privacy.secagg_threshold, spec.federation.round_timeout)
        if spec.privacy.mode == "secagg"
        else None
    )
    if secure is not None:
        log(INFO, "fusion: secure aggregation (Flower's SecAgg+): the server sees sums only")
    try:
        store = BankStore(out / STORE, run_key(spec), keep=spec.federation.keep_checkpoints)
    except StoreError as err:
        if "run key" not in str(err) and "holds run" not in str(err):
            raise
        raise SpecError(
            f"{err} (the settings that shape the bank, rounds included, differ from the run stored "
            f"in {out}; a run begun while batch norm was the default resumes with [model] "
            'normalization = "batch")'
        ) from None
    stack = ExitStack()  # the metrics exporter, for the run
    try:
        metrics = stack.enter_context(_metrics())
        last = store.latest()
        done = last.round if last else 0
        if last is not None and done >= schedule.total:  # finished: export again, no client needed
            model_config = last.state["model"]
        else:
            fed, arrays, model_config = _start(grid, spec, last)
            earlier = (
                list(last.state.get("rounds", [])) if last else []
            )  # metrics of the rounds before a resume
            strategy = FusionStrategy(
                fed,
                schedule,
                spec.training,
                spec.federation,
                model_config,
                lambda r, a, s: _checkpoint(store, r, a, s, model_config, earlier),
                round_offset=done,
                on_replies=on_replies,
                dp_plan=dp_plan,
                secure=secure,
                metrics=metrics,
            )
            log(
                INFO,
                "fusion: rounds %d..%d of %d (%d clients, %d labels)",
                done + 1,
                schedule.total,
                schedule.total,
                len(fed.nodes),
                len(fed.vocabulary),
            )
            strategy.start(
                cast(Grid, secure) if secure is not None else grid,
                to_record(arrays),
                num_rounds=schedule.total - done,
                timeout=spec.federation.round_timeout,
            )
        final = store.latest()
        if final is None:  # every round checkpoints: none means not one round completed
            raise RuntimeError(f"the federation ended with no checkpoint in {out / STORE}")
        history = [asdict(h) for h in store.history()]
    finally:
        stack.close()
        store.close()
    bank = export_bank(final, spec, model_config, dp_plan)
    bank.save(out / RUN_BANK)
    write_manifest(out, manifest_of(final, bank.version, impl, dp_plan is not None))
    _write_rounds(out / "rounds.json", history, final.state.get("rounds", []))
    log(INFO, "fusion: bank %s written to %s", bank.version, out)
    return bank


@contextmanager
def _metrics() -> Iterator[FusionMetrics | None]:
    """The round counters, served over HTTP for the run where the process's environment names an
    address (``PROTOFUSE_METRICS_ADDRESS``, e.g. 0.0.0.0:9465 in the fusion container)."""
    address = os.environ.get(ADDRESS_ENV)
    if not address:
        yield None
        return
    metrics = FusionMetrics.create()
    try:
        exporter = expose(metrics.registry, address)
    except (OSError, ValueError) as err:  # a run goes on without its metrics, never stops
        log(WARNING, "fusion: no metrics for this run: %s (%s)", err, ADDRESS_ENV)
        yield None
        return
    host = address.rpartition(":")[0]
    log(INFO, "fusion: metrics on http://%s:%s/metrics", host, exporter.server_address[1])
    try:
        yield metrics
    finally:
        exporter.shutdown()
        exporter.server_close()


def _write_rounds(path: Path, history: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> None:
    """Per-round metrics of every round (kept in the checkpoints, so a resume loses none)."""
    atomic_write_bytes(
        path, json.dumps({"history": history, "rounds": rounds}, indent=1, default=float).encode()
    )


def run_key(spec: Spec) -> str:
    """What a checkpoint must match to be resumed: every setting that shapes the bank."""
    settings = {
        k: getattr(spec, k).model_dump() for k in ("data", "model", "training", "federation")
    }
    settings["federation"].pop("round_timeout")
    settings["federation"].pop("min_clients")
    settings["federation"].pop("min_replies")
    settings["federation"].pop("keep_checkpoints")
    settings["training"].pop("threads")
    if spec.privacy.mode != "plain":  # plain runs keep the key they had before [privacy]
        settings["privacy"] = spec.privacy.model_dump()
    # The normalization the weights are built with, not the name it was asked by ("auto" is layer
    # norm in a federation). Batch norm leaves no key, as in runs begun before the setting
    # existed (batch norm then), so those still resume with normalization = "batch".
    norm = spec.model.resolved_normalization(federated=True)
    if norm == "batch":
        settings["model"].pop("normalization")
    else:
        settings["model"]["normalization"] = norm
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def federating_family(spec: Spec) -> Family[DiscriminativePrototypes]:
    """The spec's family from the registry, refused unless it federates (only the discriminative
    family does)."""
    impl = family(spec.model.family)
    if not impl.federates:
        raise SpecError(
            f"model.family = {impl.name!r} is not federated; use the discriminative family (or "
            f"`protofuse fit` for a central {impl.name} bank)"
        )
    return impl


def run_settings(cfg: Any) -> tuple[Spec, Path]:
    """The spec and the run folder that the run config names (see the module's docstring)."""
    for key in ("spec", "out"):
        if not cfg.get(key):
            raise SpecError(
                f'run config lacks {key!r}: run with --run-config \'spec="/abs/spec.toml" '
                'out="/abs/run"\''
            )
    spec = load_spec(str(cfg["spec"]), experts_required=False)
    fed = spec.federation.model_dump()
    if cfg.get("rounds"):
        fed["rounds"] = int(cfg["rounds"])
    if cfg.get("min-clients"):
        fed["min_clients"] = int(cfg["min-clients"])
    spec = spec.model_copy(update={"federation": type(spec.federation)(**fed)})
    return spec, Path(str(cfg["out"]))


def _start(
    grid: Grid, spec: Spec, last: Checkpoint | None
) -> tuple[Federation, dict[str, np.ndarray], dict[str, Any]]:
    """Wait for the clients, learn their labels, and build (or restore) the shared weights."""
    nodes = _wait_for_nodes(grid, spec.federation.min_clients or 2, spec.federation.round_timeout)
    described = describe_nodes(
        grid, nodes, spec.federation.round_timeout
    )  # the others are refused there, by name
    if not described:
        raise RuntimeError(
            "no node described its expert; see the warnings above and the clients' logs (are they "
            "the same protofuse version?)"
        )
    widths = [d.x_dim for d in described.values()]
    x_dim = max(set(widths), key=widths.count)  # nodes of another width are refused below, by name
    image_shape = spec.data.image_shape
    if image_shape is not None and image_size(image_shape) != x_dim:
        raise SpecError(
            f"data.image_shape {list(image_shape)} has {image_size(image_shape)} values per image "
            f"but the clients' inputs have {x_dim} features"
        )
    fed = Federation(
        list(last.vocabulary) if last else [],
        x_dim,
        max_labels=spec.federation.max_labels_per_client,
        max_vocabulary=spec.federation.max_vocabulary,
    )
    if last:
        fed.records = {e.name: e for e in last.experts}
        fed.trust = {k: float(v) for k, v in last.state.get("trust", {}).items()}
        fed.input_range = last.state.get("input_range")
        fed.evidence = {k: float(v) for k, v in last.state.get("evidence", {}).items()}
        fed.reviews = {k: float(v) for k, v in last.state.get("reviews", {}).items()}
        fed.strikes = {k: int(v) for k, v in last.state.get("strikes", {}).items()}
        fed.expelled = set(last.state.get("expelled", []))  # not re-admitted on resume
    for node_id in sorted(described, key=lambda n: described[n].pseudonym):
        try:
            fed.admit(node_id, described[node_id], set(nodes))
        except ValueError as err:  # one misconfigured client must not stop the others' federation
            log(WARNING, "refusing node %s: %s", node_id, err)
    if not fed.nodes:
        raise RuntimeError("every node was refused; see the warnings above")
    # federated=True: normalization "auto" is layer norm here, so the shared weights carry no
    # running statistic of a client's queries (docs/threat-model.md).
    config = config_for(x_dim, len(fed.vocabulary), 1, spec.model, image_shape, federated=True)
    model_config = {k: v for k, v in asdict(config).items() if k not in ("n_labels", "n_experts")}
    if last:
        arrays = last.arrays
        grown = len(fed.vocabulary) - len(last.vocabulary)
        arrays = (
            extend_rows(arrays, grown, spec.training.seed + len(fed.vocabulary))
            if grown
            else arrays
        )
    else:
        torch.manual_seed(spec.training.seed)
        arrays = shared_arrays(federating_family(spec).build(asdict(config)))
    return fed, arrays, model_config


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of the {n} clients connected within {timeout:.0f}s"
            )
        time.sleep(1.0)


def _checkpoint(
    store: BankStore,
    round: int,
    arrays: dict[str, np.ndarray],
    strategy: FusionStrategy,
    model_config: dict[str, Any],
    earlier: list[dict[str, Any]],
) -> None:
    fed = strategy.federation
    state = {
        "trust": fed.trust,
        "model": model_config,
        "rounds": earlier + strategy.history,
        "input_range": fed.input_range,
        "evidence": fed.evidence,
        "reviews": fed.reviews,
        "strikes": fed.strikes,
        "expelled": sorted(fed.expelled),
    }
    store.checkpoint(round, arrays, fed.vocabulary, list(fed.records.values()), state)


MANIFEST = RUN_MANIFEST


def manifest_of(
    ck: Checkpoint, version: str, impl: Family, private: bool = False
) -> wire.BankManifest:
    """The bank manifest published beside the exported bank (the BankManifest message of protos/):
    the checkpoint's expert records, without their distributions (those are in the bank); under
    DP (``private``), without anything a client measured on its own data (``released``)."""
    experts = tuple(
        # A KL computed in floating point can come out a hair below 0; the manifest wants >= 0.
        released(
            replace(
                e,
                fidelity=Fidelity(e.fidelity.agreement, max(e.fidelity.kl, 0.0), e.fidelity.n),
                distribution=b"",
            ),
            private,
        )
        for e in sorted(ck.experts, key=lambda e: e.name)
    )
    return wire.BankManifest(
        version, ck.round, ck.vocabulary, ck.weights_digest, impl.name, experts
    )


def write_manifest(out: Path, manifest: wire.BankManifest) -> None:
    """Atomically: a reader sees the old manifest or the new one."""
    atomic_write_bytes(out / MANIFEST, wire.encode_manifest(manifest))


def released(record: ExpertRecord, private: bool) -> ExpertRecord:
    """An expert's record as a bank or manifest publishes it. Under DP only what the client
    declared to join stays (its pseudonym and labels): its fidelity, agreement, trust and counts
    were measured on its own queries and are not covered by the noise, so they are left out
    (fidelity on 0 queries, consensus not measured, weight 1, no counts)."""
    if not private:
        return record
    return replace(
        record,
        fidelity=Fidelity(0.0, 0.0, 0),
        n_queries=0,
        consensus=NOT_MEASURED,
        weight=1.0,
        n_examples=0,
        distribution=b"",
    )


def export_bank(
    ck: Checkpoint, spec: Spec, model_config: dict[str, Any], dp_plan: DpPlan | None = None
) -> Bank:
    """The run's bank in the format ``protofuse fit`` writes: shared weights plus each expert's
    imitation head (from its prototype-distribution message) and record. Under DP the heads stay
    at their initial values and the records hold only what each client declared (``released``):
    the weights alone carry the noise that protects a client."""
    impl = federating_family(spec)
    experts = sorted(ck.experts, key=lambda e: e.name)
    config = {**model_config, "n_labels": len(ck.vocabulary), "n_experts": len(experts)}
    model = impl.build(config)
    load_shared(model, ck.arrays)
    vocab = {c: i for i, c in enumerate(ck.vocabulary)}
    private = dp_plan is not None
    with torch.no_grad():
        if private:  # no client's head: a neutral one (temperature 1, no label bias) for each
            model.expert_log_temp.zero_()
            model.expert_bias.zero_()
        for e, record in enumerate([] if private else experts):
            head = wire.decode_distribution(record.distribution).head
            if not isinstance(head, wire.DiscriminativeHead):
                raise ValueError(
                    f"expert {record.name!r}: the store holds a {type(head).__name__}, not the "
                    f"imitation head of the {impl.name} family; the store belongs to another run"
                )
            model.expert_log_temp[e] = head.log_temperature
            model.expert_bias[e, [vocab[c] for c in record.labels]] = torch.tensor(
                head.label_bias, dtype=torch.float32
            )
    # The bank keeps each expert's head in its weights: its records drop the encoded distribution.
    records = [released(replace(record, distribution=b""), private) for record in experts]
    image_shape = tuple(spec.data.image_shape) if spec.data.image_shape else None
    federation = FederationRecord(
        rounds=ck.round,
        weights_digest=ck.weights_digest,
        settings=spec.federation,
        privacy=spec.privacy,
        noise_multiplier=dp_plan.noise_multiplier if dp_plan else None,
        epsilon=dp_plan.epsilon if dp_plan else None,
    )
    meta = bank_meta(
        impl.name,
        config,
        ck.vocabulary,
        image_shape,
        "gaussian",
        spec.model,
        spec.training,
        spec.adapt,
        # The clients' value ranges are their own measurements: not released under DP.
        input_range=None if private else (ck.state.get("input_range") or None),
        federation=federation,
    )
    return Bank(model.eval(), meta, records)
