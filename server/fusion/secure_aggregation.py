"""Secure aggregation (``[privacy] mode = "secagg"``): each training round through Flower's SecAgg+,
so the server learns the sum of the clients' changes and never one client's.

Flower 1.42's ``SecAggPlusWorkflow`` runs only with a ``LegacyContext`` and the legacy strategy
API, one round at a time; our strategy speaks the Message API. ``SecureRounds`` is the Grid our
strategy runs on: a round that sends weights back (``secure_next``) goes through the workflow
instead of one send-and-receive. The workflow's stages are Flower's own (keys, shares, masked
vectors, unmasking, dropouts); we give it:

- our train messages as each node's instructions (in place of legacy ``FitIns``), so the clients'
  handler sees the round exactly as in a plain round (Flower's ``secaggplus_mod`` runs it);
- a check of every reply of every stage before Flower reads it (the types, lengths and node ids
  its stage needs; a masked vector's shapes, dtype and range against the round's layout,
  ``protofuse.protocol.secure_sum``): a malformed reply becomes an error reply (a dropout) and
  its sender is struck (``on_refused``), so one client cannot crash the round;
- a legacy strategy that keeps the mean Flower unmasks (``last_mean``).

Our strategy then reads the step from that mean (``secure_sum.step``), with each row's count of
coverers taken from the clients whose vectors are in the sum (``summed``) and what each declared.
A round SecAgg+ cannot finish (too few clients, or a stage that fails: forged key shares cannot be
told from honest ones before they are combined) is ``halted``: it moves nothing, and the strategy
stops the federation after ``[federation] max_strikes`` such rounds in a row. Which clients
replied, their reports and their imitation heads stay in plain text (docs/threat-model.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, FitRes, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from protofuse.protocol import secure_sum

# Flower's error code for a reply the server application refuses (flwr.common.constant.ErrorCode
# has no such code for a server-side refusal; any non-zero code makes the workflow drop it).
REFUSED = 1

# Called with a node whose reply to a SecAgg+ stage was refused, and why.
Refused = Callable[[int, str], None]
MIN_CLIENTS = 3  # with 2, each could subtract its own change from the sum: nothing is hidden


class SecureRounds:
    """A Grid (every other call goes to ``grid``) whose next train round, when ``secure_next``
    is set, runs through SecAgg+; ``last_mean`` holds the mean Flower unmasked."""

    def __init__(
        self, grid: Grid, threshold: float, timeout: float, on_refused: Refused | None = None
    ) -> None:
        self._grid = grid
        self.threshold = threshold
        self.timeout = timeout
        self.on_refused = on_refused
        self.secure_next = False
        self.last_mean: list[np.ndarray] | None = None
        self.summed: list[int] = []  # the nodes whose vectors are in last_mean
        self.halted: str | None = None  # why the last round moved nothing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        train = all(m.metadata.message_type == MessageType.TRAIN for m in messages)
        if not (self.secure_next and train and messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        self.secure_next = False
        return self._secure_round(messages)

    def _secure_round(self, messages: list[Message]) -> list[Message]:
        """One round through SecAgg+: the replies whose vectors are in the sum (their masked
        vectors and plain-text reports), the unmasked mean in ``last_mean``; or, if the round
        could not finish, no replies and the reason in ``halted``."""
        self.last_mean, self.summed, self.halted = None, [], None
        if len(messages) < MIN_CLIENTS:
            self.halted = (
                f"{len(messages)} clients in the round, fewer than the {MIN_CLIENTS} secure "
                "aggregation needs to hide one client's change"
            )
            return []
        contents = {m.metadata.dst_node_id: m.content for m in messages}
        shapes = secure_sum.layout(
            {k: v.numpy() for k, v in messages[0].content.array_records["arrays"].items()}
        )
        legacy = _KeepMean(self._grid, sorted(contents))
        context = LegacyContext(
            Context(
                run_id=self._grid.run.run_id,
                node_id=0,
                node_config={},
                state=RecordDict(),
                run_config={},
            ),
            strategy=legacy,
        )
        round_id = messages[0].metadata.group_id or "0"
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: int(round_id) if round_id.isdigit() else 0}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        checked = _CheckedGrid(self._grid, set(contents), shapes, self.on_refused)
        workflow = _Workflow(
            contents,
            num_shares=1.0,  # every client holds a share of every other's keys
            reconstruction_threshold=self.threshold,
            max_weight=1.0,  # every protofuse client states weight 1 (secure_sum's canary)
            clipping_range=secure_sum.CLIP_RANGE,
            quantization_range=secure_sum.QUANTIZATION_RANGE,
            timeout=self.timeout,
        )
        try:
            workflow(cast(Grid, checked), context)
        except Exception as err:  # e.g. forged key shares that do not combine
            log(WARNING, "secure aggregation: the round failed: %r", err)
            self.halted = f"SecAgg+ failed ({type(err).__name__}: {err})"
            return []
        if legacy.mean is None:
            self.halted = (
                "too few clients answered one of SecAgg+'s stages to unmask the sum "
                f"(privacy.secagg_threshold = {self.threshold} of each client's key holders are "
                "needed; see the warnings above)"
            )
            return []
        self.last_mean, self.summed = legacy.mean, legacy.summed
        return [checked.vectors[n] for n in legacy.summed if n in checked.vectors]


class _Workflow(SecAggPlusWorkflow):
    """Flower's workflow with our train messages as each node's instructions."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._contents = contents

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        # Flower built legacy FitIns records; the clients get our round's records instead, each
        # node its own RecordDict (the workflow adds the node's key shares to it; the strategy's
        # messages share one).
        state.nid_to_fitins = {
            nid: RecordDict(dict(self._contents[nid].items())) for nid in state.nid_to_fitins
        }
        return bool(ok)


class _CheckedGrid:
    """The grid the workflow talks through: every reply is checked against what its stage needs
    before Flower reads it; a malformed one becomes an error reply (Flower counts its sender as
    dropped) and is reported to ``on_refused``."""

    def __init__(
        self,
        grid: Grid,
        nodes: set[int],
        shapes: list[tuple[int, ...]],
        on_refused: Refused | None,
    ) -> None:
        self._grid = grid
        self.nodes = nodes
        self.shapes = shapes
        self.on_refused = on_refused
        self.vectors: dict[int, Message] = {}  # stage 2's well-formed replies, by node
        self._keys: set[bytes] = set()  # every public key received this round

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = {m.metadata.dst_node_id: m for m in messages}
        out = []
        for reply in self._grid.send_and_receive(list(sent.values()), timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in sent:
                continue  # not asked in this stage: never passed on
            if reply.has_error():
                out.append(reply)  # a dropout: Flower's protocol handles it
                continue
            stage = str(sent[node].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
            try:
                self._check(stage, reply.content)
            except Exception as err:  # any malformation, whatever the decoder raises
                log(WARNING, "secure aggregation: node %s's %s reply refused: %s", node, stage, err)
                if self.on_refused is not None:
                    self.on_refused(node, f"{stage}: {err}")
                out.append(Message(Error(REFUSED, f"refused: {err}"), reply_to=sent[node]))
                continue
            if stage == Stage.COLLECT_MASKED_VECTORS:
                self.vectors[node] = reply
            out.append(reply)
        return out

    def _check(self, stage: str, content: RecordDict) -> None:
        configs = content.config_records[RECORD_KEY_CONFIGS]
        if stage == Stage.SETUP:
            keys = [_typed(configs, k, bytes) for k in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2)]
            for key in keys:
                bytes_to_public_key(key)
            if len(set(keys) | self._keys) != len(self._keys) + 2:
                raise ValueError("a public key that is not new this round")
            self._keys |= set(keys)
        elif stage == Stage.SHARE_KEYS:
            dsts = _list_of(configs, Key.DESTINATION_LIST, int)
            _same_length(dsts, _list_of(configs, Key.CIPHERTEXT_LIST, bytes))
            self._known_once(dsts)
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            self._check_vector(configs[Key.MASKED_PARAMETERS])
            compat.recorddict_to_fitres(content, keep_input=True)  # Flower reads it next
        elif stage == Stage.UNMASK:
            nids = _list_of(configs, Key.NODE_ID_LIST, int)
            _same_length(nids, _list_of(configs, Key.SHARE_LIST, bytes))
            self._known_once(nids)

    def _known_once(self, nodes: list[int]) -> None:
        if len(set(nodes)) != len(nodes) or not set(nodes) <= self.nodes:
            raise ValueError("node ids repeated or outside the round")

    def _check_vector(self, value: Any) -> None:
        if not isinstance(value, list) or not all(isinstance(b, bytes) for b in value):
            raise TypeError("the masked vector is not a list of arrays")
        shapes = [(1,), *self.shapes]  # Flower prepends the stated weight
        if len(value) != len(shapes):
            raise ValueError(f"{len(value)} masked arrays, the round's layout has {len(shapes)}")
        for i, (raw, shape) in enumerate(zip(value, shapes, strict=True)):
            # Sized before it is decoded: int64 values plus numpy's header (at most 4 kB).
            if len(raw) > 8 * int(np.prod(shape)) + 4096:
                raise ValueError(f"masked array {i}: {len(raw)} bytes, more than {shape} holds")
            array = bytes_to_ndarray(raw)
            if array.shape != shape or array.dtype != np.int64:
                raise ValueError(f"masked array {i}: {array.dtype} {array.shape}, expected {shape}")
            if array.size and (array.min() < 0 or array.max() >= 2**32):
                raise ValueError(f"masked array {i}: values outside [0, 2**32)")


def _typed(configs: ConfigRecord, key: str, kind: type) -> Any:
    value = configs[key]
    if not isinstance(value, kind):
        raise TypeError(f"{key}: a {type(value).__name__}, not a {kind.__name__}")
    return value


def _list_of(configs: ConfigRecord, key: str, kind: type) -> list[Any]:
    value = _typed(configs, key, list)
    if not all(isinstance(v, kind) for v in value):
        raise TypeError(f"{key}: not a list of {kind.__name__}")
    return value


def _same_length(a: list[Any], b: list[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"lists of {len(a)} and {len(b)} entries")


class _KeepMean(Strategy):
    """The legacy strategy the workflow calls: it selects the round's nodes and keeps the mean
    that Flower unmasks (every reply's parameters are that mean)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._proxies = [GridClientProxy(n, grid, grid.run.run_id) for n in nodes]
        self.mean: list[np.ndarray] | None = None
        self.summed: list[int] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(p, FitIns(parameters, {})) for p in self._proxies]  # replaced by _Workflow

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.summed = sorted(p.node_id for p, _ in results)
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, *args: Any, **kwargs: Any) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, *args: Any, **kwargs: Any) -> None:
        return None
