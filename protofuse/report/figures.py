"""The report's figures, each a function from what the run recorded to PNG bytes (matplotlib's
object API on the Agg canvas: no pyplot state, no display, safe in any thread).

Names in a figure (labels, experts' pseudonyms) come from outside: they are drawn as plain text
(``text.parse_math`` off, so a ``$`` never starts mathtext) and shortened to ``MAX_NAME``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from protofuse.records import ExpertRecord

from .history import History

MAX_NAME = 24  # characters of a name drawn in a figure
MAX_ANNOTATED = 60  # labels named on the prototype map; beyond, points only
MAX_OUTLINED = 12  # experts outlined on the prototype map; beyond, none (the table has them)
MAX_MATRIX = 80  # labels or experts in the coverage matrix; beyond, the first ones only
MAX_PHASES = 8  # phases drawn as lines of their own; the others share one
STYLE: dict[Any, Any] = {
    "text.parse_math": False,
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def short(name: str) -> str:
    """A name as a figure shows it: printable, at most ``MAX_NAME`` characters."""
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def curves(history: History) -> bytes | None:
    """Loss, imitation fidelity, agreement with the consensus and bytes per client against the
    round (or the loss against the epoch, for a central fit); None when no row measured any."""
    with mpl.rc_context(STYLE):
        rows = history.rows
        x = np.array([r.round for r in rows])
        series = [
            ("training loss", [r.loss for r in rows], None),
            ("imitation fidelity (agreement)", [r.fidelity for r in rows], (0, 1)),
            ("agreement with the consensus", [r.agreement for r in rows], (0, 1)),
            (
                "bytes sent per client (kB)",
                [None if r.bytes_per_client is None else r.bytes_per_client / 1e3 for r in rows],
                None,
            ),
        ]
        shown = [s for s in series if any(v is not None for v in s[1])]
        if not shown:
            return None
        fig = Figure(figsize=(10, 2.6 * ((len(shown) + 1) // 2)), layout="constrained")
        axes = fig.subplots((len(shown) + 1) // 2, 2 if len(shown) > 1 else 1, squeeze=False)
        phases = list(dict.fromkeys(r.phase for r in rows))
        if len(phases) > MAX_PHASES:  # a line each for the first ones, one for the rest
            kept = set(phases[: MAX_PHASES - 1])
            phases = [*phases[: MAX_PHASES - 1], "other phases"]
        else:
            kept = set(phases)
        phase = np.array([r.phase if r.phase in kept else "other phases" for r in rows])
        for ax, (title, values, limits) in zip(axes.flat, shown, strict=False):
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            for name in phases:  # one line per phase: a phase's rounds differ from another's
                ax.plot(x[phase == name], y[phase == name], marker="o", markersize=3, label=name)
            if len(phases) > 1:
                ax.legend(fontsize=7)
            ax.set_title(title)
            ax.set_xlabel(history.unit)
            if limits:
                ax.set_ylim(*limits)
        for ax in list(axes.flat)[len(shown) :]:
            ax.set_visible(False)
        return png(fig)


def trust(history: History, experts: Sequence[ExpertRecord]) -> bytes:
    """Each expert's trust against the round, beside its final trust and imitation fidelity."""
    with mpl.rc_context(STYLE):
        names = [e.name for e in experts]
        over_rounds = any(r.trust for r in history.rows)
        fig = Figure(figsize=(10 if over_rounds else 5, 3.4), layout="constrained")
        if not over_rounds:  # a central fit: its trust is set once, from the agreement
            _final_bars(fig.subplots(), experts)
            return png(fig)
        left, right = fig.subplots(1, 2, width_ratios=(3, 2))
        for name in names[:MAX_OUTLINED]:  # beyond, the bars on the right
            points = [(r.round, r.trust[name]) for r in history.rows if name in r.trust]
            if points:
                xs, ys = zip(*points, strict=True)
                left.plot(xs, ys, marker="o", markersize=2, label=short(name))
        left.set_title("trust against the round")
        left.set_xlabel("round")
        left.set_ylim(-0.05, max([1.05] + [max(r.trust.values(), default=0) for r in history.rows]))
        if left.lines:
            left.legend(fontsize=7, ncols=2)
        _final_bars(right, experts)
        return png(fig)


def _final_bars(ax: Axes, experts: Sequence[ExpertRecord]) -> None:
    """Each expert's final trust and imitation fidelity (none where withheld, under DP)."""
    idx = np.arange(len(experts))
    agreement = [e.fidelity.agreement if e.fidelity.n > 0 else np.nan for e in experts]
    ax.barh(idx - 0.2, [e.weight for e in experts], height=0.4, label="trust")
    ax.barh(idx + 0.2, agreement, height=0.4, label="fidelity")
    ax.set_yticks(idx, [short(e.name) for e in experts], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_title("final trust and imitation fidelity")
    ax.legend(fontsize=7)


def coverage(labels: Sequence[str], experts: Sequence[ExpertRecord]) -> bytes:
    """The label x expert matrix: a cell is filled where the expert covers the label, shaded
    by the expert's trust."""
    with mpl.rc_context(STYLE | {"axes.grid": False}):
        rows, cols = list(labels)[:MAX_MATRIX], list(experts)[:MAX_MATRIX]
        index = {c: i for i, c in enumerate(rows)}
        matrix = np.full((len(rows), len(cols)), np.nan)
        for j, e in enumerate(cols):
            for c in e.labels:
                if c in index:
                    matrix[index[c], j] = e.weight
        fig = Figure(
            figsize=(max(4.0, 0.5 * len(cols) + 2), max(2.5, 0.22 * len(rows) + 1)),
            layout="constrained",
        )
        ax = fig.subplots()
        image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), [short(e.name) for e in cols], rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), [short(c) for c in rows], fontsize=7)
        ax.set_title("which expert covers which label (colour: the expert's trust)")
        fig.colorbar(image, ax=ax, label="trust")
        return png(fig)


def prototype_map(
    rows: np.ndarray, labels: Sequence[str], experts: Sequence[ExpertRecord]
) -> bytes:
    """The prototype rows (C, F) projected on their two principal axes, each label named and each
    expert's labels joined by an outline (its convex hull)."""
    with mpl.rc_context(STYLE):
        xy = principal_plane(rows)
        fig = Figure(figsize=(7.5, 6), layout="constrained")
        ax = fig.subplots()
        if len(experts) <= MAX_OUTLINED:
            index = {c: i for i, c in enumerate(labels)}
            for k, e in enumerate(experts):
                points = xy[[index[c] for c in e.labels if c in index]]
                hull = convex_hull(points)
                colour = f"C{k % 10}"
                closed = np.vstack([hull, hull[:1]])
                ax.plot(closed[:, 0], closed[:, 1], color=colour, alpha=0.7, label=short(e.name))
                ax.fill(hull[:, 0], hull[:, 1], color=colour, alpha=0.08)
            ax.legend(fontsize=7, loc="best")
        ax.scatter(xy[:, 0], xy[:, 1], color="black", s=14, zorder=3)
        if len(labels) <= MAX_ANNOTATED:
            for (px, py), name in zip(xy, labels, strict=True):
                ax.annotate(short(name), (px, py), xytext=(3, 3), textcoords="offset points")
        ax.set_title("prototype rows on their two principal axes")
        ax.set_xlabel("first principal axis")
        ax.set_ylabel("second principal axis")
        return png(fig)


def accuracy_against_k(results: dict[int, tuple[float, float]], ways: int) -> bytes:
    """Accuracy (mean, standard deviation over episodes) against the examples per label k."""
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(5.5, 3.6), layout="constrained")
        ax = fig.subplots()
        ks = sorted(results)
        ax.errorbar(
            ks,
            [100 * results[k][0] for k in ks],
            yerr=[100 * results[k][1] for k in ks],
            marker="o",
            capsize=3,
        )
        ax.set_xticks(ks)
        ax.set_xlabel("examples per label (k)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"new {ways}-way tasks from the bank")
        return png(fig)


def principal_plane(rows: np.ndarray) -> np.ndarray:
    """(C, F) -> (C, 2): the rows centred and projected on their first two principal axes (a
    missing axis, fewer than three rows or a flat bank, stays at zero)."""
    centred = rows.astype(np.float64) - rows.mean(axis=0, keepdims=True)
    out = np.zeros((len(rows), 2))
    if len(rows) < 2 or not np.any(centred):
        return out
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    out[:, : len(axes)] = centred @ axes.T
    return out


def convex_hull(points: np.ndarray) -> np.ndarray:
    """(n, 2) -> (h, 2): the convex hull's corners in order (Andrew's monotone chain); the points
    themselves where there are fewer than three."""
    unique = np.unique(points, axis=0)
    if len(unique) < 3:
        return unique

    def half(ordered: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for p in ordered:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(unique), half(unique[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))
