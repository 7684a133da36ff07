"""A ClientApp whose named clients attack the federation (``python -m bench.hostile`` copies this
file into a copy of protofuse's Flower app). Every other client is protofuse's own.

Which client does what comes from the environment variable ``PROTOFUSE_BENCH_HOSTILE``, a JSON
object ``{pseudonym: {"attack": NAME, "labels": [...]}}`` (the bench sets it before the simulation
starts; Flower's processes inherit it). Attacks:

- ``scale``: its update (the change to the weights it was sent) multiplied by 1000;
- ``flip``: its update sign-flipped and doubled;
- ``noise``: Gaussian noise in place of its update, 10 times the update's spread;
- ``liar``: an honest update, but it claims 2**40 examples, 10**9 queries and perfect agreement;
- ``labelflip``: its expert's answers rotated among its labels (every answer names the wrong
  class), and it claims perfect agreement (its counts are honest: it is found by what it
  sends, not by a lie the server can check);
- ``phantom``: it declares ``labels`` (labels it has no expert for) besides its own, and answers
  them with zeros.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client_sdk.clientapp import app as honest
from client_sdk.clientapp.local_training import LocalExpert
from protofuse.protocol import federation as wire

ENV = "PROTOFUSE_BENCH_HOSTILE"
app = ClientApp()


def _plan() -> dict[str, dict[str, Any]]:
    return json.loads(os.environ.get(ENV, "{}"))


_honest_expert = honest.local_expert


def _attacked_expert(context: Context) -> LocalExpert:
    """The node's expert, with its answers rotated (labelflip) or padded with phantom labels."""
    expert = _honest_expert(context)
    attack = _plan().get(expert.pseudonym, {})
    if attack.get("attack") == "labelflip":
        return replace(expert, answers=np.roll(np.asarray(expert.answers), 1, axis=1))
    if attack.get("attack") == "phantom":
        extra = tuple(c for c in attack["labels"] if c not in expert.labels)
        padded = np.zeros((len(expert.answers), len(expert.labels) + len(extra)), np.float32)
        padded[:, : len(expert.labels)] = expert.answers
        return replace(expert, labels=expert.labels + extra, answers=padded)
    return expert


# Every virtual client of the simulation runs in this process: honest ones get their own expert.
honest.local_expert = _attacked_expert


@app.query()
def describe(message: Message, context: Context) -> Message:
    reply = honest.describe(message, context)
    expert = _attacked_expert(context)
    if _plan().get(expert.pseudonym, {}).get("attack") == "liar":
        record = reply.content.config_records[honest.DESCRIBE]
        d = wire.decode_node_description(record[honest.NODE_DESCRIPTION])
        record[honest.NODE_DESCRIPTION] = wire.encode_node_description(
            replace(d, n_queries=wire.MAX_QUERIES)
        )
    return reply


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = honest.train(message, context)
    expert = _attacked_expert(context)
    attack = _plan().get(expert.pseudonym, {}).get("attack")
    if attack in ("scale", "flip", "noise"):
        sent = {k: v.numpy() for k, v in message.content.array_records["arrays"].items()}
        got = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
        if got:  # the agreement round trains nothing
            reply.content["arrays"] = ArrayRecord(
                {
                    k: Array(np.ascontiguousarray(_attack(attack, sent[k], v)))
                    for k, v in got.items()
                }
            )
    if attack in ("liar", "labelflip"):
        fusion = reply.content.config_records["fusion"]
        stats = wire.decode_stats(fusion["stats"])
        lies = {"n_examples": 2**40, "n_queries": wire.MAX_QUERIES} if attack == "liar" else {}
        fusion["stats"] = wire.encode_stats(
            replace(
                stats,
                consensus_agreement=None if stats.consensus_agreement is None else 1.0,
                **lies,
            )
        )
    return reply


def _attack(attack: str, sent: np.ndarray, got: np.ndarray) -> np.ndarray:
    if not np.issubdtype(got.dtype, np.floating):
        return got
    delta = got.astype(np.float64) - sent
    if attack == "scale":
        out = sent + 1000.0 * delta
    elif attack == "flip":
        out = sent - 2.0 * delta
    else:
        rng = np.random.default_rng(abs(hash(float(delta.sum()))) % 2**32)
        out = sent + rng.normal(0.0, 10.0 * (float(delta.std()) + 1e-8), size=delta.shape)
    return np.clip(out, -3e38, 3e38).astype(got.dtype)
