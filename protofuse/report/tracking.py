"""A run in TensorBoard: ``protofuse report RUN --tensorboard DIR`` (and ``fit`` / ``simulate``
with ``--tensorboard DIR``) writes the run's settings, its per-round (or per-epoch) metrics and
the report's figures as TensorBoard event files under DIR/NAME, for researchers who compare runs
there. TensorBoard installs beside Flower 1.42 without a conflict (MLflow's full package clashed
with Flower's pins): the ``tracking`` extra, written through torch's own
``SummaryWriter``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from protofuse.bank import Bank, load_bank

from . import figures
from .history import History, read_history

SCALARS = ("loss", "fidelity", "agreement", "bytes_per_client", "clients")


def log_run(run: str | Path, logdir: str | Path, name: str | None = None) -> Path:
    """Write ``run``'s settings, metrics and figures to TensorBoard under ``logdir/name``
    (default: the run folder's name); returns that folder."""
    from matplotlib.image import imread
    from torch.utils.tensorboard import SummaryWriter

    run = Path(run)
    bank = load_bank(run)
    history = read_history(run)
    target = Path(logdir) / (name or run.resolve().name)
    experts = [e.name for e in bank.experts]
    with SummaryWriter(log_dir=str(target)) as writer:
        writer.add_text("settings", _settings_table(bank), 0)
        for row in history.rows:
            step = row.round
            for field in SCALARS:
                value = getattr(row, field)
                if value is not None:
                    writer.add_scalar(f"{history.unit}/{field}", float(value), step)
            for expert in experts:  # the bank's experts only: a file cannot add series
                if expert in row.trust:
                    writer.add_scalar(f"trust/{expert}", row.trust[expert], step)
        for tag, png in _figures(bank, history):
            writer.add_image(tag, imread(io.BytesIO(png), format="png"), 0, dataformats="HWC")
    return target


def _figures(bank: Bank, history: History) -> list[tuple[str, bytes]]:
    out = []
    drawn = figures.curves(history) if history.rows else None
    if drawn is not None:
        out.append(("report/curves", drawn))
    out.append(("report/trust", figures.trust(history, bank.experts)))
    out.append(("report/coverage", figures.coverage(bank.label_names, bank.experts)))
    rows = getattr(bank.model, "prototypes", None)
    if rows is not None:
        out.append(
            (
                "report/prototypes",
                figures.prototype_map(rows.detach().cpu().numpy(), bank.label_names, bank.experts),
            )
        )
    return out


def _settings_table(bank: Bank) -> str:
    """The bank's settings (and the federation's) as a Markdown table TensorBoard renders."""
    settings = {
        "family": bank.family,
        "version": bank.version,
        "labels": len(bank.label_names),
        "experts": ", ".join(e.name for e in bank.experts),
        **{f"{k}": v for k, v in bank.meta.settings.model_dump().items()},
    }
    fed = bank.meta.federation
    if fed is not None:
        settings["federation"] = fed.settings.model_dump()
        settings["privacy"] = fed.privacy.model_dump()
    lines = ["| setting | value |", "|---|---|"]
    for key, value in settings.items():
        text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict) else value
        lines.append(f"| {key} | {str(text).replace('|', '/')} |")
    return "\n".join(lines)


def scalars_of(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series written under ``logdir``, read back with TensorBoard's own reader:
    {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {
        tag: [(e.step, float(np.float32(e.value))) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }
