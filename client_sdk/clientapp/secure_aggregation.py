"""Secure aggregation on the client (``[privacy] mode = "secagg"``): Flower's ``secaggplus_mod``
around protofuse's train handler.

A train message that carries SecAgg+'s stage goes through Flower's mod; in its masking stage the
mod runs our handler, and we hand it the round's change as the vector to mask
(``protofuse.protocol.secure_sum``) in place of the trained weights, which then never leave this
process: the mod sends only the masked vector and the handler's plain-text report (prototype
distribution, imitator statistics). Every other message goes to the handler as
it is. A node whose owner requires secure aggregation (node config
``require-secure-aggregation=true``) refuses a plain round that would send its weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from protofuse.protocol import federation as wire
from protofuse.protocol import secure_sum

Handler = Callable[[Message, Context], Message]


def secure_aggregation_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower's SecAgg+ client mod for rounds that ask for it; other messages pass through."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        reply = call_next(msg, context)
        _refuse_plain_weights(reply, context)
        return reply

    def masked_round(m: Message, c: Context) -> Message:
        return as_fit_result(m, call_next(m, c))

    return secaggplus_mod(msg, context, masked_round)


def as_fit_result(msg: Message, reply: Message) -> Message:
    """The handler's reply in the layout Flower's mod masks (a legacy FitRes): the change to the
    weights as the vector (weight 1), the plain-text report kept beside it."""
    if reply.has_error():
        return reply
    # The handler has validated the plan, and its report names this expert's labels.
    plan = wire.decode_round_plan(_bytes(msg.content.config_records["config"][wire.ROUND_PLAN_KEY]))
    fusion = reply.content.config_records["fusion"]
    labels = set(wire.decode_distribution(_bytes(fusion["distribution"])).label_names)
    sent = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    trained = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
    covers = np.array([1.0 if c in labels else 0.0 for c in plan.vocabulary])
    rowwise = plan.federation.aggregation == "rowwise"
    vector = secure_sum.masked_vector(sent, trained, covers, rowwise)
    fit = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(vector), 1, {})
    content: RecordDict = compat.fitres_to_recorddict(fit, keep_input=True)
    content["fusion"] = fusion  # the report travels; the metrics record stays on this node
    return Message(content, reply_to=msg)


def _refuse_plain_weights(reply: Message, context: Context) -> None:
    required = context.node_config.get("require-secure-aggregation", False)
    if not (required is True or str(required).lower() == "true") or reply.has_error():
        return
    if any(len(record) for record in reply.content.array_records.values()):
        raise wire.WireError(
            "this node requires secure aggregation (node config require-secure-aggregation) but "
            "the server asked for a plain round, which would send this node's weights in the "
            'clear; ask the operator for [privacy] mode = "secagg"'
        )


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise wire.WireError(f"expected an encoded message, got a {type(value).__name__}")
    return value
