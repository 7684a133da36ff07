"""Benchmark output: a markdown table (mean ± spread per cell), a JSON file of every episode,
and a plot of accuracy against shots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .baselines import CEILING


def _std(values: np.ndarray) -> float:
    """Sample standard deviation (ddof=1); NaN when there is a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def summarize(rows: list[dict]) -> list[dict]:
    """Per (dataset, ways, k, method): mean, std over episodes, std of the seed means, n."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["dataset"], r["ways"], r["k"], r["method"])].append(r)
    out = []
    for (dataset, ways, k, method), rs in sorted(cells.items()):
        acc = np.array([r["accuracy"] for r in rs])
        seeds = sorted({r["seed"] for r in rs})
        seed_means = [np.mean([r["accuracy"] for r in rs if r["seed"] == s]) for s in seeds]
        out.append(
            {
                "dataset": dataset,
                "ways": ways,
                "k": k,
                "method": method,
                "mean": float(acc.mean()),
                "std": _std(acc),
                "seed_std": _std(np.array(seed_means)),
                "min": float(acc.min()),
                "n": len(acc),
            }
        )
    return out


def paired_gaps(rows: list[dict], ours: str = "protofuse") -> list[dict]:
    """Paired over identical episodes: mean of (ours - method) and the fraction of episodes ours
    wins or ties."""
    by_ep: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        by_ep[(r["dataset"], r["seed"], r["ways"], r["task"], r["k"])][r["method"]] = r["accuracy"]
    gaps: dict[tuple, list[float]] = defaultdict(list)
    for (dataset, _, ways, _, k), accs in by_ep.items():
        if ours not in accs:
            continue
        for m, a in accs.items():
            if m != ours:
                gaps[(dataset, ways, k, m)].append(accs[ours] - a)
    return [
        {
            "dataset": d,
            "ways": w,
            "k": k,
            "method": m,
            "mean_gap": float(np.mean(g)),
            "stderr": _std(np.array(g)) / np.sqrt(len(g)),
            "win_or_tie": float(np.mean(np.array(g) >= 0)),
            "n": len(g),
        }
        for (d, w, k, m), g in sorted(gaps.items())
    ]


def markdown(summary: list[dict], what: str = "accuracy") -> str:
    """One table per (dataset, ways): methods as rows, k as columns, cells 'mean ± std'."""
    lines = []
    groups = sorted({(s["dataset"], s["ways"]) for s in summary})
    for dataset, ways in groups:
        cell = {
            (s["method"], s["k"]): s
            for s in summary
            if s["dataset"] == dataset and s["ways"] == ways
        }
        ks = sorted({k for _, k in cell})
        methods = sorted(
            {m for m, _ in cell},
            key=lambda m: -np.mean([cell[(m, k)]["mean"] for k in ks if (m, k) in cell]),
        )
        n = max(s["n"] for s in cell.values())
        lines += [
            f"### {dataset}, {ways}-way ({what} %, mean ± std over episodes; seed-mean std in "
            "brackets)",
            "",
            "| method | " + " | ".join(f"k = {k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for m in methods:
            vals = [_cell(cell[(m, k)], n) if (m, k) in cell else "" for k in ks]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        lines += [
            "",
            f"{n} episodes per cell unless marked (n = ...): those methods ran on a subset of the "
            "same episodes.",
            "",
        ]
    return "\n".join(lines)


def _cell(s: dict, n: int) -> str:
    text = f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} [{100 * s['seed_std']:.1f}]"
    return text if s["n"] == n else f"{text} (n = {s['n']})"


def gaps_markdown(gaps: list[dict], against: list[str]) -> str:
    """protofuse minus each method, paired over identical episodes: mean ± standard error,
    win-or-tie rate."""
    lines = [
        "### protofuse minus each method, paired over the same episodes (points; ± standard error; "
        "share of episodes won or tied)",
        "",
        "| dataset | ways | k | " + " | ".join(against) + " |",
        "|---|---|---|" + "---|" * len(against),
    ]
    cell = {(g["dataset"], g["ways"], g["k"], g["method"]): g for g in gaps}
    for d, w, k in sorted({(g["dataset"], g["ways"], g["k"]) for g in gaps}):
        vals = [
            f"{100 * cell[(d, w, k, m)]['mean_gap']:+.1f} ± "
            f"{100 * cell[(d, w, k, m)]['stderr']:.1f} "
            f"({100 * cell[(d, w, k, m)]['win_or_tie']:.0f}%)"
            if (d, w, k, m) in cell
            else ""
            for m in against
        ]
        lines.append(f"| {d} | {w} | {k} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(s["dataset"], s["ways"]) for s in summary})
    methods = sorted({s["method"] for s in summary})
    colour = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)} | {"protofuse": "black"}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4.5), squeeze=False)
    for ax, (dataset, ways) in zip(axes[0], groups, strict=True):
        cells = [s for s in summary if s["dataset"] == dataset and s["ways"] == ways]
        for method in sorted({s["method"] for s in cells}):
            pts = sorted((s["k"], s["mean"], s["std"]) for s in cells if s["method"] == method)
            ks, means, stds = (np.array(v) for v in zip(*pts, strict=True))
            style = "-o" if method.startswith("protofuse") else "--." if len(ks) > 1 else "x"
            ax.errorbar(
                ks,
                100 * means,
                yerr=100 * stds,
                fmt=style,
                capsize=2,
                color=colour[method],
                label=method,
                linewidth=2.5 if method == "protofuse" else 1,
            )
        ax.set(
            title=f"{dataset}, {ways}-way",
            xlabel="labeled examples per class (k)",
            ylabel="accuracy (%)",
            xticks=[1, 5, 10],
        )
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * ((len(labels) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out: Path,
    rows: list[dict],
    fidelity: list[dict],
    timings: list[dict],
    config: dict,
    recall_rows: list[dict] | None = None,
    recall_label: str | None = None,
) -> None:
    """results.json, results.md and the plot; ``recall_rows`` (accuracy on one label's test
    examples, e.g. the label hidden from every expert) get tables of their own."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    gaps = paired_gaps(rows)
    recall = summarize(recall_rows) if recall_rows else []
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": config,
                "summary": summary,
                "paired_gaps": gaps,
                "recall_summary": recall,
                "fidelity": fidelity,
                "timings": timings,
                "episodes": rows,
                "recall_episodes": recall_rows or [],
            },
            indent=1,
        )
    )
    fid_lines = [
        "### Imitation fidelity on held-out queries, consensus agreement and training weight (mean "
        "over seeds)",
        "",
        "| dataset | bank | expert | labels | agreement | KL (nats) | consensus | weight |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fcells: dict[tuple, list[dict]] = defaultdict(list)
    for f in fidelity:
        fcells[(f["dataset"], f["bank"], f["expert"], f["labels"])].append(f)
    for (d, bank, e, labels), fs in sorted(fcells.items()):
        mean = {
            key: np.mean([f[key] for f in fs]) for key in ("agreement", "kl", "consensus", "weight")
        }
        fid_lines.append(
            f"| {d} | {bank} | {e} | {labels} | {mean['agreement']:.3f} | {mean['kl']:.3f} | "
            f"{mean['consensus']:.3f} | {mean['weight']:.2f} |"
        )
    against = [
        m
        for m in (
            "protofuse zero-shot",
            "imitator (conv) + probe",
            "imitator (conv) + cosine NCM",
            "imitator (conv) zero-shot vote",
            "imitator (mlp) + probe",
            "imitator (mlp) + cosine NCM",
            "imitator (mlp, no augmentation) + probe",
            "imitator (mlp, feature dropout 0.5) + probe",
            "stacking (experts online)",
            "expert vote (experts online)",
            "scratch",
            "nearest class mean",
            "generative",
            "protofuse, no reweighting",
            "protofuse, no table augmentation",
            CEILING,
        )
        if any(g["method"] == m for g in gaps)
    ]
    text = markdown(summary) + "\n" + gaps_markdown(gaps, against) + "\n"
    if recall:
        text += markdown(recall, f"recall of label {recall_label} on its own test examples") + "\n"
    text += "\n".join(fid_lines) + "\n"
    (out / "results.md").write_text(text)
    plot(summary, out / "accuracy_vs_k.png")
    print(text)
