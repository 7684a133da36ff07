"""A run's report: one self-contained HTML page beside the run (``protofuse report RUN``; written
by ``protofuse fit`` and ``simulate`` when they finish).

It shows how the run went (loss, imitation fidelity, agreement and bytes against the round; each
expert's trust and fidelity), what the bank holds (which expert covers which label, the prototype
rows on a plane) and, given an evaluation set, what it is for: new-task accuracy against k.
Needs the ``report`` extra (matplotlib): ``pip install "protofuse[report]"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from protofuse.bank import Bank, load_bank
from protofuse.io import atomic_write_bytes

from . import figures
from .evaluation import Accuracy, accuracy_against_k
from .history import History, read_history
from .page import Section, render

REPORT_FILE = "report.html"

__all__ = ["REPORT_FILE", "Accuracy", "accuracy_against_k", "write_report"]


def write_report(
    run: str | Path,
    out: str | Path | None = None,
    evaluation: tuple[np.ndarray, np.ndarray] | None = None,
    shots: Sequence[int] = (1, 5, 10),
    episodes: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the report of ``run`` (a federation's run folder or ``protofuse fit``'s output) to
    ``out`` (default ``RUN/report.html``) and return its path. ``evaluation`` (x, y label
    names) adds accuracy against each k of ``shots`` over ``episodes`` 5-way tasks."""
    run = Path(run)
    bank = load_bank(run)
    history = read_history(run)
    accuracy = (
        accuracy_against_k(bank, *evaluation, shots=shots, episodes=episodes, progress=progress)
        if evaluation is not None
        else None
    )
    sections = [
        _summary(bank, history),
        _training(history),
        _experts(bank, history),
        _coverage(bank),
        _prototype_map(bank),
        _new_tasks(accuracy),
    ]
    html = render(
        f"protofuse run report: {run.resolve().name}",
        f"bank {bank.version} ({bank.family}) in {run}; written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        sections,
    )
    target = Path(out) if out is not None else run / REPORT_FILE
    atomic_write_bytes(target, html.encode("utf-8"))
    return target


def _summary(bank: Bank, history: History) -> Section:
    fed = bank.meta.federation
    facts = [
        ("family", bank.family),
        ("bank version", bank.version),
        ("labels", str(len(bank.label_names))),
        ("experts", str(len(bank.experts))),
    ]
    if fed is not None:
        facts += [
            ("trained by", f"a federation, {fed.rounds} rounds"),
            ("aggregation", f"{fed.settings.aggregation}, combine {fed.settings.combine}"),
            ("privacy", fed.privacy.mode),
        ]
        if fed.epsilon is not None:
            facts.append(("epsilon (per client, whole run)", f"{fed.epsilon:.3g}"))
    else:
        epochs = len(history.rows) if history.unit == "epoch" else 0
        facts.append(("trained by", "protofuse fit" + (f", {epochs} epochs" if epochs else "")))
    return Section("Run", table=(("", "value"), facts))


def _training(history: History) -> Section:
    if not history.rows:
        return Section(
            "Training",
            notes=["This run recorded no history (no rounds.json or training.json beside it)."],
        )
    caption = (
        "Per round: the clients' mean training loss, the imitation fidelity (how often the "
        "bank's imitation of an expert picks the expert's answer on held-out queries), the "
        "agreement with the consensus the clients reported and the bytes each client sent; one "
        "line per phase of the schedule. A gap: a round that did not measure it."
        if history.unit == "round"
        else "Per epoch: the mean training loss (it steps up where the consensus term joins "
        "the imitation loss, in the second half)."
    )
    drawn = figures.curves(history)
    if drawn is None:
        return Section("Training", notes=["The run's history holds no measurement to draw."])
    return Section("Training", figures=[(drawn, caption)])


def _experts(bank: Bank, history: History) -> Section:
    def shown(value: float, measured: bool = True) -> str:
        return f"{value:.3f}" if measured and np.isfinite(value) else "-"

    rows = [
        (
            e.name,
            " ".join(e.labels),
            str(e.n_queries) if e.n_queries else "-",
            shown(e.fidelity.agreement, e.fidelity.n > 0),
            shown(e.fidelity.kl, e.fidelity.n > 0),
            shown(e.consensus),
            f"{e.weight:.2f}",
        )
        for e in bank.experts
    ]
    header = ("expert", "labels", "queries", "fidelity", "KL (nats)", "consensus", "trust")
    return Section(
        "Experts",
        table=(header, rows),
        figures=[
            (
                figures.trust(history, bank.experts),
                "Each expert's trust (its weight in the bank) and imitation fidelity; over the "
                "rounds, where the run recorded them.",
            )
        ],
    )


def _coverage(bank: Bank) -> Section:
    notes = []
    if len(bank.label_names) > figures.MAX_MATRIX or len(bank.experts) > figures.MAX_MATRIX:
        notes.append(f"The first {figures.MAX_MATRIX} labels and experts are shown.")
    return Section(
        "Coverage",
        figures=[
            (
                figures.coverage(bank.label_names, bank.experts),
                "A filled cell: the expert answers for the label. A label with one expert rests "
                "on that expert alone.",
            )
        ],
        notes=notes,
    )


def _prototype_map(bank: Bank) -> Section:
    rows = getattr(bank.model, "prototypes", None)
    if rows is None:  # the generative family keeps no row per label
        return Section(
            "Prototype map", notes=[f"The {bank.family} family keeps no prototype row per label."]
        )
    return Section(
        "Prototype map",
        figures=[
            (
                figures.prototype_map(rows.detach().cpu().numpy(), bank.label_names, bank.experts),
                "Each label's prototype row on the rows' two principal axes; an outline joins "
                "the labels of one expert. Labels a new task tells apart easily sit far apart.",
            )
        ],
    )


def _new_tasks(accuracy: Accuracy | None) -> Section:
    if accuracy is None:
        return Section(
            "New tasks",
            notes=[
                "No evaluation set: `protofuse report RUN --eval test.npz` (x, y as for adapt's "
                "--support) measures new-task accuracy against k."
            ],
        )
    rows = [
        (str(k), f"{100 * mean:.1f}", f"{100 * std:.1f}")
        for k, (mean, std) in sorted(accuracy.by_k.items())
    ]
    return Section(
        "New tasks",
        paragraphs=[
            f"{accuracy.episodes} random {accuracy.ways}-way tasks of the evaluation set, the "
            "same for every k: the bank adapted to k examples of each label, scored on others."
        ],
        table=(("k", "accuracy (%)", "std over tasks"), rows),
        figures=[(figures.accuracy_against_k(accuracy.by_k, accuracy.ways), "Accuracy against k.")],
    )
