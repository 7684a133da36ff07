"""Secure aggregation (``[privacy] mode = "secagg"``): each training round through Flower's SecAgg+,
so the server learns the sum of the clients' changes and never one client's.

Flower 1.42's ``SecAggPlusWorkflow`` runs only with a ``LegacyContext`` and the legacy strategy
API, one round at a time; our strategy speaks the Message API. ``SecureRounds`` is the Grid our
strategy runs on: a round that sends weights back (``secure_next``) goes through the workflow
instead of one send-and-receive. The workflow's stages are Flower's own (keys, shares, masked
vectors, unmasking, dropouts); we give it:

- our train messages as each node's instructions (in place of legacy ``FitIns``), so the clients'
  handler sees the round exactly as in a plain round (Flower's ``secaggplus_mod`` runs it);
- a check of every masked vector before it is summed: its shapes must be the round's layout
  (``protofuse.protocol.secure_sum``) and its plain-text report (prototype-distribution message,
  imitator statistics) must decode for the node that sent it; a reply that fails counts as a
  dropout (its masks are removed, its vector is not in the sum) and is struck as in a plain round;
- a legacy strategy that keeps the mean Flower unmasks (``last_mean``).

Our strategy then reads the step from that mean (``secure_sum.step``), with each row's count of
coverers taken from who replied and what each declared. Which clients replied, their reports and
their imitation heads stay in plain text (docs/threat-model.md).
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
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from protofuse.protocol import secure_sum

# Flower's error code for a reply the server application refuses (flwr.common.constant.ErrorCode
# has no such code for a server-side refusal; any non-zero code makes the workflow drop it).
REFUSED = 1

# A reply's content before it is summed: raise (WireError, ValueError...) to refuse it.
ReplyCheck = Callable[[int, RecordDict], None]


class SecureAggregationHalted(RuntimeError):
    """SecAgg+ stopped the round: too few clients answered one of its stages."""


class SecureRounds:
    """A Grid (every other call goes to ``grid``) whose next train round, when ``secure_next``
    is set, runs through SecAgg+; ``last_mean`` holds the mean Flower unmasked."""

    def __init__(
        self, grid: Grid, threshold: float, timeout: float, check: ReplyCheck | None = None
    ) -> None:
        self._grid = grid
        self.threshold = threshold
        self.timeout = timeout
        self.check = check
        self.secure_next = False
        self.last_mean: list[np.ndarray] | None = None

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
        vectors and plain-text reports), the unmasked mean in ``last_mean``."""
        self.last_mean = None
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
        checked = _CheckedGrid(self._grid, shapes, self.check)
        workflow = _Workflow(
            contents,
            num_shares=1.0,  # every client holds a share of every other's keys
            reconstruction_threshold=self.threshold,
            max_weight=1.0,  # every protofuse client states weight 1 (secure_sum's canary)
            clipping_range=secure_sum.CLIP_RANGE,
            quantization_range=secure_sum.QUANTIZATION_RANGE,
            timeout=self.timeout,
        )
        workflow(cast(Grid, checked), context)
        if legacy.mean is None:
            raise SecureAggregationHalted(
                "secure aggregation halted: too few clients answered one of SecAgg+'s stages to "
                f"unmask the sum (privacy.secagg_threshold = {self.threshold} of each client's "
                "key holders are needed; see the warnings above)"
            )
        self.last_mean = legacy.mean
        return [checked.summed[n] for n in legacy.summed if n in checked.summed]


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
    """The grid the workflow talks through: masked vectors of the wrong shapes, or whose report
    does not decode, are turned into error replies (dropouts) before Flower sums them."""

    def __init__(self, grid: Grid, shapes: list[tuple[int, ...]], check: ReplyCheck | None):
        self._grid = grid
        self.shapes = shapes
        self.check = check
        self.summed: dict[int, Message] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = list(self._grid.send_and_receive(list(sent.values()), timeout=timeout))
        out = []
        for reply in replies:
            configs = (
                None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
            )
            if configs is None or Key.MASKED_PARAMETERS not in configs:
                out.append(reply)  # another stage: Flower checks its own
                continue
            node = reply.metadata.src_node_id
            try:
                self._check_vector(configs[Key.MASKED_PARAMETERS])
                if self.check is not None:
                    self.check(node, reply.content)
            except (ValueError, TypeError, KeyError) as err:
                log(WARNING, "secure aggregation: node %s's masked vector refused: %s", node, err)
                out.append(Message(Error(REFUSED, f"refused: {err}"), reply_to=sent[node]))
                continue
            self.summed[node] = reply
            out.append(reply)
        return out

    def _check_vector(self, value: Any) -> None:
        if not isinstance(value, list) or not all(isinstance(b, bytes) for b in value):
            raise TypeError("the masked vector is not a list of arrays")
        if len(value) != len(self.shapes) + 1:  # Flower prepends the stated weight
            raise ValueError(
                f"{len(value)} masked arrays, the round's layout has {len(self.shapes) + 1}"
            )
        for i, (raw, shape) in enumerate(zip(value[1:], self.shapes, strict=True)):
            array = bytes_to_ndarray(raw)
            if array.shape != shape or not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"masked array {i}: {array.dtype} {array.shape}, expected {shape}")


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
