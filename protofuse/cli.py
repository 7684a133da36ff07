"""The ``protofuse`` command: fit a bank, adapt it to a new task, predict. A thin layer over the
SDK and the bank; every user error ends as one clear line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# SpecError, ArtifactError and ExpertOutputError are ValueErrors; OSError covers unreadable or
# unwritable paths (missing, a folder where a file belongs, permissions).
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch  # after argument parsing, so --help stays instant

    torch.set_num_threads(args.threads or 1)
    try:
        return args.run(args)
    except USER_ERRORS as err:
        print(f"protofuse {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="protofuse", description="Fuse black-box experts into a bank of task-agnostic prototypes, and build models for new tasks from a few labeled examples.")
    p.add_argument("--threads", type=int, help="torch threads (default: the spec's [training] threads for fit, else 1: fastest on small shared machines)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser("fit", help="train a bank centrally on the experts listed in a spec", description="Query every expert of SPEC on its queries, train the shared prototypes on the pooled triples, and write the bank to RUN_DIR.")
    fit.add_argument("spec", type=Path, help="federation spec (TOML): [[experts]] with name, predict, labels, queries")
    fit.add_argument("--out", type=Path, required=True, help="folder to write the bank to")
    fit.set_defaults(run=_fit)

    adapt = sub.add_parser("adapt", help="fit a model for a new task from a support set", description="Fit a new task's distribution over the bank's prototypes from a few labeled examples.")
    adapt.add_argument("bank", type=Path, help="bank folder written by `protofuse fit`")
    adapt.add_argument("--support", type=Path, required=True, help=".npz with x (n, d) floats and y (n,) label names as strings")
    adapt.add_argument("--out", type=Path, required=True, help="folder to write the adapted model to")
    adapt.add_argument("--seed", type=int, default=0, help="seed of the adaptation's random draws")
    adapt.add_argument("--recompose", choices=["gaussian", "mixture"], help="generative family: form of q*(w) (default: the bank's setting)")
    adapt.add_argument("--form", choices=["conditional", "joint"], help="generative family: prediction form (default: the bank's setting)")
    adapt.add_argument("--prior-strength", type=float, help="discriminative family: pull of the bank's prototypes (default: the bank's setting)")
    adapt.set_defaults(run=_adapt)

    predict = sub.add_parser("predict", help="class probabilities of an adapted model", description="Run an adapted model locally on inputs; writes proba (n, K) and classes (K,).")
    predict.add_argument("model", type=Path, help="adapted model folder written by `protofuse adapt`")
    predict.add_argument("--inputs", type=Path, required=True, help=".npy array (n, d) of inputs")
    predict.add_argument("--out", type=Path, required=True, help=".npz to write proba and classes to")
    predict.set_defaults(run=_predict)

    info = sub.add_parser("info", help="describe a bank: experts, labels, fidelity", description="Print a bank's family, vocabulary and one row per expert.")
    info.add_argument("bank", type=Path)
    info.set_defaults(run=_info)
    return p


def _fit(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from client_sdk.collect import collect_triples, likelihood_for
    from protofuse.bank import fit_bank
    from protofuse.spec import load_spec

    import torch

    spec = load_spec(args.spec)
    _check_out_folder(args.out)
    torch.set_num_threads(args.threads or spec.training.threads)
    t0 = time.perf_counter()
    triples = collect_triples(spec)
    print(f"queried {len(spec.experts)} experts on {len(triples.x)} inputs ({int(triples.mask.sum())} answers) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    with Progress(TextColumn("training {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs  loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(spec.model.family, total=None, loss=float("nan"))
        bank = fit_bank(triples, spec.model, spec.training, spec.adapt, spec.data.image_shape, likelihood_for(spec, triples), progress=lambda e, n, loss: bar.update(task, completed=e, total=n, loss=loss))
    version = bank.save(args.out)
    print(f"bank {version} written to {args.out} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    _print_experts(bank)
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from protofuse.bank import load_bank

    x, y = _load_support(args.support)
    _check_out_folder(args.out)
    bank = load_bank(args.bank)
    options = {k: v for k, v in {"recompose": args.recompose, "form": args.form, "prior_strength": args.prior_strength}.items() if v is not None}
    t0 = time.perf_counter()
    model = bank.adapt(x, y, seed=args.seed, **options)
    elapsed = time.perf_counter() - t0
    model.save(args.out)
    acc = float((model.predict(x) == np.asarray(y).astype(str)).mean())
    print(f"adapted {bank.family} bank {bank.version} to classes {model.classes_.tolist()} from {len(x)} examples in {elapsed:.2f}s (support accuracy {acc:.3f}); written to {args.out}", file=sys.stderr)
    if model.info.get("uncovered_labels"):
        print(f"labels covered by no expert, prototypes fitted from their examples alone: {model.info['uncovered_labels']}", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from client_sdk.collect import load_array
    from protofuse.adapted import load_adapted

    model = load_adapted(args.model)
    x = load_array(args.inputs, "--inputs")
    proba = model.predict_proba(x)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    with open(tmp, "wb") as f:  # a file object: numpy writes exactly this path, no added suffix
        np.savez(f, proba=proba, classes=model.classes_.astype(str))
    tmp.replace(args.out)
    print(f"wrote proba {proba.shape} and classes {model.classes_.tolist()} to {args.out}", file=sys.stderr)
    return 0


def _info(args: argparse.Namespace) -> int:
    from protofuse.bank import load_bank

    bank = load_bank(args.bank)
    print(f"{bank.family} bank {bank.version}: {len(bank.label_names)} labels {list(bank.label_names)}")
    _print_experts(bank)
    return 0


def _print_experts(bank) -> None:  # noqa: ANN001 - a Bank, imported lazily
    from rich.console import Console
    from rich.table import Table

    table = Table(title="experts (imitation fidelity on held-out queries)")
    for col in ("expert", "labels", "queries", "agreement", "KL (nats)", "consensus", "weight"):
        table.add_column(col)
    for e in bank.experts:
        table.add_row(e.name, " ".join(e.labels), str(e.n_queries), f"{e.fidelity.agreement:.3f}", f"{e.fidelity.kl:.3f}", f"{e.consensus:.3f}", f"{e.weight:.2f}")
    Console(stderr=True).print(table)


def _check_out_folder(path: Path) -> None:
    """Refuse an output path that cannot become a folder before any long work starts."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is an existing file; give a folder path")


def _load_support(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x (n, d) floats and y (n,) strings from a support .npz, with errors naming the field."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise ValueError(f"{path}: missing array(s) {missing}; save with numpy.savez(path, x=inputs, y=label_names)")
            x, y = npz["x"], npz["y"]
    except FileNotFoundError:
        raise ValueError(f"--support: file {path} not found") from None
    except ValueError as err:
        if "pickle" in str(err):
            raise ValueError(f"{path}: y is stored as Python objects; save label names as a string array, e.g. y=np.asarray(labels, dtype=str)") from None
        raise
    except Exception as err:  # zip/npz corruption surfaces as several exception types
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{path}: x has shape {x.shape} and dtype {x.dtype}, expected a 2-D float array (n, d)")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{path}: y has shape {y.shape}, expected ({len(x)},): one label per row of x")
    if not (np.issubdtype(y.dtype, np.str_) or np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"{path}: y has dtype {y.dtype}, expected label names as strings")
    return x, y.astype(str)


if __name__ == "__main__":
    raise SystemExit(main())
