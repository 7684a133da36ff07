"""What a run recorded as it went: a federation's ``rounds.json`` (one row per round, written by
the fusion server) or ``protofuse fit``'s ``training.json`` (one row per epoch).

Both files sit beside the bank and may come from anyone who hands over a run folder, so they are
read like an artifact's own files (a plain file within ``MAX_HISTORY_BYTES``, never through a
link or a pipe) and validated: every number finite and in its range, names and counts bounded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from protofuse import artifacts
from protofuse.settings import format_errors

ROUNDS_FILE = "rounds.json"  # a federation's run folder (server/fusion/server_app.py)
TRAINING_FILE = "training.json"  # `protofuse fit`'s output folder
MAX_ROWS = 100_000  # rounds or epochs in one history
MAX_CLIENTS = 10_000  # trust values in one round
M = TypeVar("M", bound=BaseModel)

Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# What a figure can draw: a loss of 1e308 passes "finite" and breaks the axes' arithmetic.
MAX_VALUE = 1e15
Finite = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_VALUE, le=MAX_VALUE)]


class Row(BaseModel):
    """One round of a federation (or one epoch of central training)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    round: int = Field(ge=0, le=10**9)
    phase: Annotated[str, StringConstraints(max_length=64)] = ""
    clients: int = Field(default=0, ge=0, le=10**9)
    loss: Finite | None = None  # mean training loss; None where nothing trained
    fidelity: Finite | None = Field(default=None, ge=0.0, le=1.0)  # imitation agreement
    agreement: Finite | None = Field(default=None, ge=0.0, le=1.0)  # with the consensus
    bytes_per_client: Finite | None = Field(default=None, ge=0.0)
    trust: dict[Name, Annotated[Finite, Field(ge=0.0)]] = Field(
        default_factory=dict, max_length=MAX_CLIENTS
    )


class _Rounds(BaseModel):
    model_config = ConfigDict(extra="ignore")
    rounds: list[Row] = Field(max_length=MAX_ROWS)


class _Epoch(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    epoch: int = Field(ge=0, le=10**9)
    loss: Finite


class _Epochs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: list[_Epoch] = Field(max_length=MAX_ROWS)


@dataclass(frozen=True)
class History:
    """The rows of a run, each a round (``unit`` "round") or an epoch ("epoch"); no rows where
    the run recorded none."""

    unit: Literal["round", "epoch"]
    rows: tuple[Row, ...]


def read_history(run: Path) -> History:
    """The history beside a run: ``rounds.json`` (a federation), else ``training.json``
    (``protofuse fit``), else an empty one. Raises ValueError naming the file and field."""
    rounds = artifacts.read_plain_file(
        run / ROUNDS_FILE, artifacts.MAX_HISTORY_BYTES, "MAX_HISTORY_BYTES"
    )
    if rounds is not None:
        parsed = _parse(rounds, _Rounds, run / ROUNDS_FILE)
        return History("round", tuple(parsed.rounds))
    epochs = artifacts.read_plain_file(
        run / TRAINING_FILE, artifacts.MAX_HISTORY_BYTES, "MAX_HISTORY_BYTES"
    )
    if epochs is not None:
        parsed_epochs = _parse(epochs, _Epochs, run / TRAINING_FILE)
        return History(
            "epoch",
            tuple(Row(round=e.epoch, phase="epoch", loss=e.loss) for e in parsed_epochs.epochs),
        )
    return History("round", ())


def training_record(losses: list[float]) -> bytes:
    """``training.json`` for ``protofuse fit``: the mean loss of each epoch (non-finite ones,
    a diverged epoch, left out: the file holds only numbers a reader can plot)."""
    epochs = [
        {"epoch": i + 1, "loss": float(loss)}
        for i, loss in enumerate(losses)
        if math.isfinite(loss)
    ]
    return json.dumps({"epochs": epochs}, indent=1).encode()


def _parse(data: bytes, model: type[M], path: Path) -> M:
    try:
        value: Any = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a JSON file ({str(err)[:200]})") from None
    try:
        return model.model_validate(value)
    except ValidationError as err:
        raise ValueError(
            f"{path}: malformed run history\n{format_errors(err)}\nre-create it with the run that "
            "wrote it, or delete it (the report then shows the bank alone)"
        ) from None
