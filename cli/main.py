"""The ``protofuse`` command: fit a bank, adapt it to a new task, predict. A thin layer over the
SDK and the bank; every user error ends as one clear line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from protofuse import __version__

# SpecError, ArtifactError and ExpertOutputError are ValueErrors; OSError covers unreadable or
# unwritable paths (missing, a folder where a file belongs, permissions).
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch  # after argument parsing, so --help stays instant

    torch.set_num_threads(args.threads or 1)
    try:
        _require_extra(args)
        return args.run(args)
    except USER_ERRORS as err:
        print(f"protofuse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        # The command's side is not installed: one line naming its extra, no traceback.
        extra, modules = EXTRAS.get(args.command, ("", ()))
        if (err.name or "").split(".")[0] not in modules:
            raise
        line = f"{err.name} is not installed; pip install 'protofuse[{extra}]'"
        print(f"protofuse {args.command}: error: {line}", file=sys.stderr)
        return 2


# The commands whose side is an extra (README "Install"): the extra, and the modules it brings
# that the command needs. Flower runs as processes (`client` execs a SuperNode, `simulate` runs
# Ray through Flower), so they are looked for before the command starts.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "client": ("client", ("flwr",)),
    "simulate": ("simulation", ("flwr", "ray")),
    "serve": ("server", ("grpc", "grpc_health", "grpc_reflection")),
    "health": ("client", ("grpc", "grpc_health")),
    "adapt": ("client", ("grpc", "grpc_health")),  # with --server only
    "report": ("report", ("matplotlib",)),
    "export": ("onnx", ("onnx", "onnxscript", "onnxruntime")),
}


def _require_extra(args: argparse.Namespace) -> None:
    """ModuleNotFoundError when a module the command's extra brings is not installed."""
    import importlib.util

    if args.command == "adapt" and not args.server:
        return
    for module in EXTRAS.get(args.command, ("", ()))[1]:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="protofuse",
        description=(
            "Fuse black-box experts into a bank of task-agnostic prototypes, and build models "
            "for new tasks from a few labeled examples."
        ),
    )
    p.add_argument("--version", action="version", version=f"protofuse {__version__}")
    p.add_argument(
        "--threads",
        type=int,
        help=(
            "torch threads (default: the spec's [training] threads for fit, else 1: fastest on "
            "small shared machines)"
        ),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser(
        "fit",
        help="train a bank centrally on the experts listed in a spec",
        description=(
            "Query every expert of SPEC on its queries, train the shared prototypes on the "
            "pooled triples, and write the bank to RUN_DIR."
        ),
    )
    fit.add_argument(
        "spec",
        type=Path,
        help="federation spec (TOML): [[experts]] with name, predict, labels, queries",
    )
    fit.add_argument("--out", type=Path, required=True, help="folder to write the bank to")
    _add_no_report(fit)
    fit.set_defaults(run=_fit)

    adapt = sub.add_parser(
        "adapt",
        help="fit a model for a new task from a support set",
        description=(
            "Fit a new task's distribution over the bank's prototypes from a few labeled "
            "examples: locally from a bank folder, or through an adaptation service with "
            "--server (the model comes back signed and is verified)."
        ),
    )
    adapt.add_argument(
        "bank",
        type=Path,
        nargs="?",
        help=(
            "bank folder written by `protofuse fit`, or a federation's run folder (omit with "
            "--server)"
        ),
    )
    adapt.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="adapt through this adaptation service (`protofuse serve`) instead of a local bank",
    )
    adapt.add_argument(
        "--certs",
        type=Path,
        help=(
            "with --server: folder with ca.crt, client.crt, client.key and signing.pub (as "
            "`protofuse certs init` writes)"
        ),
    )
    adapt.add_argument(
        "--insecure",
        action="store_true",
        help="with --server: no TLS (a service on a trusted host started with --insecure)",
    )
    adapt.add_argument(
        "--unsigned-ok",
        action="store_true",
        help=(
            "with --server: accept a model that is not signed by the server's key (not recommended)"
        ),
    )
    adapt.add_argument(
        "--signing-key",
        type=Path,
        help="without --server: sign the model with this Ed25519 key (signing.key)",
    )
    adapt.add_argument(
        "--support",
        type=Path,
        required=True,
        help=".npz with x (n, d) floats and y (n,) label names as strings",
    )
    adapt.add_argument(
        "--out", type=Path, required=True, help="folder to write the adapted model to"
    )
    adapt.add_argument("--seed", type=int, default=0, help="seed of the adaptation's random draws")
    adapt.add_argument(
        "--onnx",
        type=Path,
        metavar="REPO",
        help=(
            "with --server: also write the service's signed ONNX export of the model into this "
            "model repository (REPO/NAME/VERSION/model.onnx, as `protofuse export` writes; "
            "verified like the model)"
        ),
    )
    adapt.add_argument(
        "--onnx-name", default="model", help="with --onnx: the model's name (default: model)"
    )
    adapt.add_argument(
        "--onnx-version", type=int, default=1, help="with --onnx: its version (default: 1)"
    )
    adapt.add_argument(
        "--recompose",
        choices=["gaussian", "mixture"],
        help="generative family: form of q*(w) (default: the bank's setting)",
    )
    adapt.add_argument(
        "--form",
        choices=["conditional", "joint"],
        help="generative family: prediction form (default: the bank's setting)",
    )
    adapt.add_argument(
        "--prior-strength",
        type=float,
        help="discriminative family: pull of the bank's prototypes (default: the bank's setting)",
    )
    adapt.set_defaults(run=_adapt)

    predict = sub.add_parser(
        "predict",
        help="class probabilities of an adapted model",
        description="Run an adapted model locally on inputs; writes proba (n, K) and classes (K,).",
    )
    predict.add_argument(
        "model", type=Path, help="adapted model folder written by `protofuse adapt`"
    )
    predict.add_argument("--inputs", type=Path, required=True, help=".npy array (n, d) of inputs")
    predict.add_argument(
        "--out", type=Path, required=True, help=".npz to write proba and classes to"
    )
    _add_trust_flags(predict)
    predict.set_defaults(run=_predict)

    sim = sub.add_parser(
        "simulate",
        help="run the federation of a spec on Flower's simulation engine",
        description=(
            "Run the spec's federation on Flower's simulation engine: the same ServerApp and "
            "ClientApp as a deployment, one virtual client per expert. Writes the run folder "
            "(bank/, store/, rounds.json), which adapt, predict and info accept like fit's "
            "output. Only the discriminative family federates."
        ),
    )
    sim.add_argument(
        "spec",
        type=Path,
        help=(
            "federation spec (TOML), the same format as fit's; [federation] sets rounds, local "
            "epochs, aggregation"
        ),
    )
    sim.add_argument(
        "--out",
        type=Path,
        required=True,
        help="run folder; a run interrupted there resumes from its last checkpoint",
    )
    sim.add_argument(
        "--rounds", type=int, help="training rounds (default: the spec's [federation] rounds, 40)"
    )
    sim.add_argument(
        "--verbose", action="store_true", help="show all of Flower's log, not only the rounds"
    )
    _add_no_report(sim)
    sim.set_defaults(run=_simulate)

    client = sub.add_parser(
        "client",
        help="run a client (Flower SuperNode) for one expert of a spec",
        description=(
            "Start a Flower SuperNode whose ClientApp serves one expert of SPEC: the expert "
            "answers its queries once (cached), then each round the node trains the shared "
            "model locally and sends only the shared weights and its expert's two messages."
        ),
    )
    client.add_argument(
        "spec",
        type=Path,
        help="spec naming the expert (import path or [experts.endpoint]) and its queries",
    )
    client.add_argument(
        "--expert", help="the expert's name in the spec (default: the spec's only expert)"
    )
    client.add_argument(
        "--superlink", required=True, help="the SuperLink's Fleet address, host:port"
    )
    client.add_argument(
        "--port",
        type=int,
        default=9094,
        help="this SuperNode's runtime API port on 127.0.0.1 (give each node on one host its own)",
    )
    client.add_argument(
        "--cache-dir",
        type=Path,
        help="where the expert's answers are cached (default: .protofuse-cache beside the spec)",
    )
    client.add_argument(
        "--root-certificates", type=Path, help="CA certificate of the SuperLink (TLS)"
    )
    client.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS (testing only: traffic and weights travel in clear)",
    )
    client.add_argument(
        "--auth-supernode-private-key",
        type=Path,
        help="this node's private key when the SuperLink authenticates SuperNodes",
    )
    client.add_argument(
        "--allow-batch-norm",
        action="store_true",
        help=(
            "train plans whose networks use batch norm (refused by default: its running "
            "statistics would send the mean and variance of this node's queries each round)"
        ),
    )
    client.add_argument(
        "--require-secure-aggregation",
        action="store_true",
        help=(
            "refuse any round that would send this node's weights outside Flower's SecAgg+ (the "
            'server must run [privacy] mode = "secagg")'
        ),
    )
    client.set_defaults(run=_client)

    serve = sub.add_parser(
        "serve",
        help="run the adaptation service (gRPC) beside a bank",
        description=(
            "Serve protofuse.v1.Fusion (Adapt, GetBank, ListExperts), the gRPC health service "
            "and reflection. A new bank version written to the folder is served without a "
            "restart; every adapted model is signed. Callers authenticate with mutual TLS."
        ),
    )
    serve.add_argument(
        "bank",
        type=Path,
        help="bank folder, or a federation's run folder (its bank/ may appear later)",
    )
    serve.add_argument(
        "--address",
        default="127.0.0.1:50051",
        help="host:port to listen on (default 127.0.0.1:50051; 0.0.0.0:50051 in a container)",
    )
    serve.add_argument(
        "--certs",
        type=Path,
        help=(
            "folder from `protofuse certs init`: server.crt/.key (TLS), ca.crt (callers' CA), "
            "signing.key"
        ),
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no caller authentication (tests on a trusted host only; logs a warning)",
    )
    serve.add_argument(
        "--signing-key",
        type=Path,
        help="Ed25519 key to sign models with (default: signing.key in --certs)",
    )
    serve.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help=(
            "serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP: bind it to an "
            "internal network; default: no metrics)"
        ),
    )
    from protofuse_server.service.settings import ServiceSettings

    for name, fld in ServiceSettings.model_fields.items():
        default = fld.default if fld.default_factory is None else "number of CPUs"
        parse = fld.annotation  # int or float: the type parses the flag's text
        if not isinstance(parse, type):
            raise TypeError(f"ServiceSettings.{name}: no type to parse its flag with")
        serve.add_argument(
            f"--{name.replace('_', '-')}",
            type=parse,
            help=f"{fld.description} (default {default})",
        )
    serve.set_defaults(run=_serve)

    health = sub.add_parser(
        "health",
        help="ask an adaptation service whether it is serving",
        description="Standard gRPC health check; exit status 0 when SERVING.",
    )
    health.add_argument("address", help="host:port of the service")
    health.add_argument("--certs", type=Path, help="folder with ca.crt, client.crt, client.key")
    health.add_argument("--insecure", action="store_true", help="the service runs without TLS")
    health.add_argument(
        "--service",
        default="",
        help="a service name (protofuse.v1.Fusion: is a bank loaded?); default: the whole server",
    )
    health.set_defaults(run=_health)

    certs = sub.add_parser(
        "certs",
        help="create the deployment's CA, certificates and keys",
        description="Certificates and keys for a deployment.",
    )
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = certs_sub.add_parser(
        "init",
        help="create a CA, server and client certificates, SuperNode keys and the signing key",
        description=(
            "Create ca.crt/.key, server.crt/.key, client.crt/.key, "
            "supernodes/node-<i>.key/.pub (EC P-384, OpenSSH) and signing.key/.pub (Ed25519) "
            "in OUT. Refuses a folder that already has a CA."
        ),
    )
    init.add_argument("--out", type=Path, required=True, help="folder to create them in")
    init.add_argument(
        "--names",
        nargs="*",
        default=[],
        help=(
            "extra DNS names or IP addresses for the server certificate (localhost, 127.0.0.1, "
            "superlink, proxy and service are always in)"
        ),
    )
    init.add_argument(
        "--supernodes",
        type=int,
        default=3,
        help="SuperNode key pairs to create (default 3; more later with `protofuse certs node`)",
    )
    init.set_defaults(run=_certs_init)
    node = certs_sub.add_parser(
        "node",
        help="create one more SuperNode key pair",
        description=(
            "Create NAME.key and NAME.pub in OUT/supernodes; register NAME.pub with `flwr "
            "supernode register`."
        ),
    )
    node.add_argument("--out", type=Path, required=True, help="the certificates folder")
    node.add_argument("--name", required=True, help="the key's file name, e.g. org-7")
    node.set_defaults(run=_certs_node)

    export = sub.add_parser(
        "export",
        help="write an adapted model as ONNX for any inference server (Triton, KServe)",
        description=(
            "Write an adapted model into a model repository as Triton and KServe read it: "
            "OUT/NAME/config.pbtxt, OUT/NAME/labels.txt and OUT/NAME/VERSION/model.onnx (input "
            "'input' (n, d) float32, output 'proba' (n, K)). onnxruntime's output is checked "
            "against the model's own predict_proba before anything is written. Needs the onnx "
            "extra; the discriminative family only."
        ),
    )
    export.add_argument("model", type=Path, help="adapted model folder (`protofuse adapt`)")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="(default: onnx)")
    export.add_argument("--out", type=Path, required=True, help="the model repository folder")
    export.add_argument("--name", required=True, help="the model's name in the repository")
    export.add_argument(
        "--model-version", type=int, default=1, help="its version folder (default: 1)"
    )
    _add_trust_flags(export)
    export.add_argument(
        "--signing-key",
        type=Path,
        help="sign the exported files with this Ed25519 key (signature.json in the version folder)",
    )
    export.set_defaults(run=_export)

    serve_models = sub.add_parser(
        "serve-models",
        help="serve adapted models over the Open Inference Protocol (KServe v2 REST)",
        description=(
            "Serve every adapted model folder under ROOT (each folder a model, or numbered "
            "version folders of one) over the Open Inference Protocol v2 REST API: health, "
            "model metadata and infer, as Triton, KServe and MLServer answer them."
        ),
    )
    serve_models.add_argument("root", type=Path, help="folder of adapted model folders")
    serve_models.add_argument(
        "--address", default="127.0.0.1:8080", help="HOST:PORT to listen on (default: %(default)s)"
    )
    _add_trust_flags(serve_models)
    serve_models.add_argument(
        "--max-rows", type=int, default=10_000, help="inputs per request (default: %(default)s)"
    )
    serve_models.add_argument(
        "--max-body-bytes",
        type=int,
        default=8 << 20,
        help="a request's size, refused before it is read (default: %(default)s)",
    )
    serve_models.set_defaults(run=_serve_models)

    report = sub.add_parser(
        "report",
        help="write a run's report: one HTML page with its curves, experts and prototypes",
        description=(
            "Write one self-contained HTML page about a run (a federation's run folder or fit's "
            "output): loss, fidelity, agreement and bytes against the round, each expert's trust "
            "and fidelity, the label x expert coverage, the prototype rows on a plane and, with "
            "--eval, new-task accuracy against k. Needs the report extra (matplotlib)."
        ),
    )
    report.add_argument(
        "run_dir", type=Path, metavar="RUN", help="run folder (simulate's --out) or fit's --out"
    )
    report.add_argument("--out", type=Path, help="HTML file to write (default: RUN/report.html)")
    report.add_argument(
        "--eval",
        type=Path,
        metavar="NPZ",
        help=(
            "evaluation set, an .npz with x (n, d) and y (n,) label names as adapt's --support: "
            "adds accuracy against k on random 5-way tasks"
        ),
    )
    report.add_argument(
        "--shots",
        type=int,
        nargs="+",
        default=[1, 5, 10],
        metavar="K",
        help="with --eval: examples per label to adapt on (default: 1 5 10)",
    )
    report.add_argument(
        "--episodes", type=int, default=10, help="with --eval: tasks per k (default: 10)"
    )
    _add_tensorboard(report)
    report.set_defaults(run=_report)

    info = sub.add_parser(
        "info",
        help="describe a bank: experts, labels, fidelity",
        description="Print a bank's family, vocabulary and one row per expert.",
    )
    info.add_argument("bank", type=Path)
    info.set_defaults(run=_info)
    return p


def _fit(args: argparse.Namespace) -> int:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from client_sdk.collect import collect_triples, likelihood_for
    from protofuse.bank import fit_bank
    from protofuse.io import atomic_write_bytes
    from protofuse.report.history import TRAINING_FILE, training_record
    from protofuse.spec import load_spec

    spec = load_spec(args.spec)
    _check_out_folder(args.out)
    torch.set_num_threads(args.threads or spec.training.threads)
    t0 = time.perf_counter()
    triples = collect_triples(spec)
    print(
        f"queried {len(spec.experts)} experts on {len(triples.x)} inputs "
        f"({int(triples.mask.sum())} answers) in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    _hint_image_shape(spec, triples.x)
    with Progress(
        TextColumn("training {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} epochs  loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(spec.model.family, total=None, loss=float("nan"))
        losses: list[float] = []

        def progress(epoch: int, epochs: int, loss: float) -> None:
            losses.append(loss)
            bar.update(task, completed=epoch, total=epochs, loss=loss)

        bank = fit_bank(
            triples,
            spec.model,
            spec.training,
            spec.adapt,
            spec.data.image_shape,
            likelihood_for(spec, triples),
            progress=progress,
        )
    version = bank.save(args.out)
    atomic_write_bytes(args.out / TRAINING_FILE, training_record(losses))
    print(
        f"bank {version} written to {args.out} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr
    )
    _print_experts(bank)
    _report_at_end(args, args.out)
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from protofuse.bank import load_bank

    if (args.bank is None) == (args.server is None):
        raise ValueError(
            "give a bank folder, or --server HOST:PORT for an adaptation service (not both)"
        )
    x, y = _load_support(args.support)
    _check_out_folder(args.out)
    options = {
        k: v
        for k, v in {
            "recompose": args.recompose,
            "form": args.form,
            "prior_strength": args.prior_strength,
        }.items()
        if v is not None
    }
    if args.onnx is not None and not args.server:
        raise ValueError(
            "--onnx asks the adaptation service (--server) for an export; for a model adapted "
            "here, run `protofuse export MODEL --out REPO --name NAME` afterwards"
        )
    if args.server:
        if args.signing_key:
            raise ValueError(
                "--signing-key signs models adapted here; the service signs its own (verify them "
                "with the certs folder's signing.pub)"
            )
        return _adapt_remote(args, x, y, options)
    bank = load_bank(args.bank)
    key = None
    if args.signing_key:
        from protofuse.signing import load_private_key

        key = load_private_key(args.signing_key)
    t0 = time.perf_counter()
    model = bank.adapt(x, y, seed=args.seed, **options)
    elapsed = time.perf_counter() - t0
    model.save(args.out, signing_key=key)
    acc = model.info["support_accuracy"]
    print(
        f"adapted {bank.family} bank {bank.version} to classes {model.classes_.tolist()} from "
        f"{len(x)} examples in {elapsed:.2f}s (support accuracy {acc:.3f}); written to {args.out}",
        file=sys.stderr,
    )
    if model.info.get("uncovered_labels"):
        print(
            "labels covered by no expert, prototypes fitted from their examples alone: "
            f"{model.info['uncovered_labels']}",
            file=sys.stderr,
        )
    return 0


def _adapt_remote(args: argparse.Namespace, x: np.ndarray, y: np.ndarray, options: dict) -> int:
    from client_sdk.fusion_client import FusionClient, FusionError

    t0 = time.perf_counter()
    try:
        with FusionClient(
            args.server, certs=args.certs, insecure=args.insecure, unsigned_ok=args.unsigned_ok
        ) as client:
            model = client.adapt(
                x,
                y,
                out=args.out,
                seed=args.seed,
                onnx=args.onnx,
                onnx_name=args.onnx_name,
                onnx_version=args.onnx_version,
                **options,
            )
    except FusionError as err:
        raise ValueError(f"{args.server}: {err}") from None
    print(
        f"adapted bank {model.bank_meta['version']} on {args.server} to classes "
        f"{model.classes_.tolist()} from {len(x)} examples in {time.perf_counter() - t0:.2f}s "
        f"({'signature verified' if not args.unsigned_ok else 'signature NOT verified'}); written "
        f"to {args.out}"
        + (
            f"; ONNX export in {args.onnx / args.onnx_name / str(args.onnx_version)}"
            if args.onnx is not None
            else ""
        ),
        file=sys.stderr,
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from client_sdk.collect import load_array
    from protofuse.adapted import load_adapted
    from protofuse.io import atomic_write_bytes, npz_bytes

    model = load_adapted(args.model, args.public_key, unsigned_ok=args.unsigned_ok)
    x = load_array(args.inputs, "--inputs")
    proba = model.predict_proba(x)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Exactly this path (np.savez would add .npz to a bare name), old file or new after a crash.
    atomic_write_bytes(args.out, npz_bytes({"proba": proba, "classes": model.classes_.astype(str)}))
    print(
        f"wrote proba {proba.shape} and classes {model.classes_.tolist()} to {args.out}",
        file=sys.stderr,
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from client_sdk.collect import load_array
    from protofuse.bank import load_bank
    from protofuse.flower.simulation import SimulationError, simulate
    from protofuse.spec import load_spec

    spec = load_spec(args.spec)
    first = spec.experts[0]
    _hint_image_shape(
        spec, load_array(spec.queries_path(first), f"expert {first.name!r}: queries", mmap=True)
    )
    t0 = time.perf_counter()

    def echo(line: str) -> None:  # the rounds, the bank and errors; everything with --verbose
        if (
            args.verbose
            or ("round " in line and "/" in line and "clients" in line)
            or "fusion:" in line
            or "ERROR" in line
            or "Error" in line
        ):
            print(line, file=sys.stderr, flush=True)

    try:
        out = simulate(args.spec, args.out, args.rounds, echo=echo)
    except SimulationError as err:  # the cause is in the log shown above; the run can be resumed
        print(f"protofuse simulate: {err}", file=sys.stderr)
        return 1
    bank = load_bank(out)
    print(
        f"federated bank {bank.version} in {out} ({time.perf_counter() - t0:.0f}s, "
        f"{bank.meta.federated_rounds} rounds)",
        file=sys.stderr,
    )
    _print_experts(bank)
    _report_at_end(args, out)
    return 0


def _client(args: argparse.Namespace) -> int:
    import os

    from client_sdk.collect import cached_answers, load_array
    from protofuse.flower.launcher import FLOWER_ENV, flower_bin
    from protofuse.spec import load_spec

    spec_path = args.spec.resolve()
    spec = load_spec(spec_path)
    entry = (
        spec.expert(args.expert)
        if args.expert
        else (spec.experts[0] if len(spec.experts) == 1 else None)
    )
    if entry is None:
        raise ValueError(
            f"the spec lists {len(spec.experts)} experts; name this client's with --expert"
        )
    if not (args.insecure or args.root_certificates):
        raise ValueError(
            "give --root-certificates CA.crt (TLS), or --insecure for a test on a trusted network"
        )
    cache = (args.cache_dir or spec_path.parent / ".protofuse-cache").resolve()
    # Ask the black box now: a broken expert fails here, with its name, before the node joins.
    x = load_array(spec.queries_path(entry), f"expert {entry.name!r}: queries", mmap=True)
    answers = cached_answers(spec, entry, x, cache)
    print(
        f"expert {entry.name!r}: {len(x)} queries answered ({answers.shape[1]} labels), cached in "
        f"{cache}",
        file=sys.stderr,
    )
    node_config = f'spec="{spec_path}" expert="{entry.name}" cache-dir="{cache}"'
    if args.allow_batch_norm:
        node_config += " allow-batch-norm=true"
    if args.require_secure_aggregation:
        node_config += " require-secure-aggregation=true"
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink",
        args.superlink,
        "--port",
        str(args.port),
        "--node-config",
        node_config,
    ]
    cmd += (
        ["--insecure"]
        if args.insecure
        else ["--root-certificates", str(args.root_certificates.resolve())]
    )
    if args.auth_supernode_private_key:
        cmd += ["--auth-supernode-private-key", str(args.auth_supernode_private_key.resolve())]
    if args.insecure:
        print("warning: --insecure: no TLS between this client and the SuperLink", file=sys.stderr)
    env = {**os.environ, **FLOWER_ENV}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(
        cmd[0], cmd, env
    )  # the SuperNode takes this process's place: signals reach it directly
    return 0  # not reached


def _serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from protofuse_server.service.server import Credentials, build_server
    from protofuse_server.service.settings import ServiceSettings

    if args.insecure == (args.certs is not None):
        raise ValueError(
            "give --certs DIR (TLS with client certificates), or --insecure for a test on a "
            "trusted host"
        )
    settings = ServiceSettings(
        **{
            k: getattr(args, k)
            for k in ServiceSettings.model_fields
            if getattr(args, k) is not None
        }
    )
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    credentials = Credentials.from_folder(args.certs) if args.certs else None
    metrics = None
    if args.metrics_address:
        from protofuse_server.metrics import ServiceMetrics, expose

        metrics = ServiceMetrics.create()
        exporter = expose(metrics.registry, args.metrics_address)
        print(
            f"metrics on http://{args.metrics_address.rpartition(':')[0]}:"
            f"{exporter.server_address[1]}/metrics",
            file=sys.stderr,
            flush=True,
        )
    server, port, served = build_server(
        args.bank, args.address, settings, credentials, args.signing_key, metrics
    )
    snapshot = served.get()
    host = args.address.rsplit(":", 1)[0]
    print(
        f"serving protofuse.v1.Fusion on {host}:{port} "
        f"({'TLS, client certificates required' if credentials else 'INSECURE'}); bank: "
        f"{snapshot.bank.version if snapshot else 'none yet, waiting for ' + str(served.bank_dir)}",
        file=sys.stderr,
        flush=True,
    )
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=5).wait()
    return 0


def _health(args: argparse.Namespace) -> int:
    from client_sdk.fusion_client import FusionClient, FusionError

    try:
        with FusionClient(
            args.address, certs=args.certs, insecure=args.insecure, unsigned_ok=True, timeout=5.0
        ) as client:
            status = client.health(args.service)
    except FusionError as err:
        print(f"protofuse health: {err}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _certs_init(args: argparse.Namespace) -> int:
    from protofuse_server.certs import init

    written = init(args.out, args.names, args.supernodes)
    print(
        f"wrote {len(written)} files to {args.out}: give organizations ca.crt and their "
        "supernodes/node-<i>.key; give adaptation callers ca.crt, client.crt, client.key and "
        "signing.pub; keep ca.key, server.key and signing.key on the server",
        file=sys.stderr,
    )
    return 0


def _certs_node(args: argparse.Namespace) -> int:
    from protofuse_server.certs import supernode_key

    key, pub = supernode_key(args.out / "supernodes", args.name)
    print(
        f"wrote {key} (give it to the organization) and {pub} (register it: flwr supernode "
        f"register {pub} <connection>)",
        file=sys.stderr,
    )
    return 0


def _add_trust_flags(parser: argparse.ArgumentParser) -> None:
    """--public-key and --unsigned-ok: how a command that loads adapted models trusts them."""
    parser.add_argument(
        "--public-key",
        type=Path,
        help=(
            "verify the model's signature with this key (the server's signing.pub); unsigned "
            "or altered models are refused"
        ),
    )
    parser.add_argument(
        "--unsigned-ok",
        action="store_true",
        help=(
            "load without a signature check (a model you adapted yourself); the checksum is "
            "still verified"
        ),
    )


def _trust(args: argparse.Namespace) -> None:
    if args.public_key is None and not args.unsigned_ok:
        raise ValueError(
            "give --public-key signing.pub (models from the adaptation service), or --unsigned-ok "
            "for models you adapted yourself"
        )


def _export(args: argparse.Namespace) -> int:
    from protofuse.adapted import load_adapted
    from protofuse.export import export_onnx

    _trust(args)
    model = load_adapted(args.model, args.public_key, unsigned_ok=args.unsigned_ok)
    key = None
    if args.signing_key:
        from protofuse.signing import load_private_key

        key = load_private_key(args.signing_key)
    done = export_onnx(model, args.out, args.name, args.model_version, key)
    print(
        f"exported {args.model} as {done.folder} (classes {model.classes_.tolist()}; "
        f"onnxruntime within {done.parity:.1e} of predict_proba; "
        f"{'signed' if key else 'unsigned'})",
        file=sys.stderr,
    )
    return 0


def _serve_models(args: argparse.Namespace) -> int:
    import signal
    import threading

    from protofuse.open_inference import Limits, serve

    _trust(args)
    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {args.address!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    if args.max_rows < 1 or args.max_body_bytes < 1:
        raise ValueError("--max-rows and --max-body-bytes: give positive numbers")
    server = serve(
        args.root,
        host,
        int(port),
        args.public_key,
        args.unsigned_ok,
        Limits(max_body_bytes=args.max_body_bytes, max_rows=args.max_rows),
    )
    models = {name: sorted(v, key=int) for name, v in server.repository.models.items()}
    print(
        f"serving {models} over the Open Inference Protocol on http://{host}:"
        f"{server.server_address[1]}/v2",
        file=sys.stderr,
        flush=True,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    server.server_close()
    return 0


def _add_no_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="do not write report.html beside the run at the end (`protofuse report` writes it)",
    )
    _add_tensorboard(parser)


def _add_tensorboard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensorboard",
        type=Path,
        metavar="DIR",
        help=(
            "also log the run (settings, per-round metrics, the report's figures) to TensorBoard "
            "under DIR/<run folder's name> (the tracking extra)"
        ),
    )


def _tensorboard(args: argparse.Namespace, run: Path) -> None:
    if args.tensorboard is None:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs tensorboard)

        from protofuse.report.tracking import log_run
    except ModuleNotFoundError as err:
        raise ValueError(
            f"--tensorboard: {err.name} is not installed; pip install 'protofuse[tracking]'"
        ) from None

    print(f"TensorBoard events written to {log_run(run, args.tensorboard)}", file=sys.stderr)


def _report_at_end(args: argparse.Namespace, run: Path) -> None:
    """fit and simulate end with the run's report, unless told not to; without the report extra
    they say how to get one (the run itself is done and kept)."""
    _tensorboard(args, run)
    if args.no_report:
        return
    try:
        from protofuse.report import write_report
    except ModuleNotFoundError as err:
        print(
            f"note: no report.html ({err.name} is not installed): pip install "
            '"protofuse[report]", then protofuse report ' + str(run),
            file=sys.stderr,
        )
        return
    print(f"report written to {write_report(run)}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from protofuse.report import write_report

    if any(k < 1 for k in args.shots):
        raise ValueError(f"--shots {args.shots}: every k must be at least 1")
    if args.episodes < 1:
        raise ValueError(f"--episodes {args.episodes}: give at least 1")
    evaluation = _load_support(args.eval, "--eval") if args.eval else None
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("evaluating new tasks", total=None, visible=evaluation is not None)
        out = write_report(
            args.run_dir,
            args.out,
            evaluation,
            shots=args.shots,
            episodes=args.episodes,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    print(f"report written to {out}", file=sys.stderr)
    _tensorboard(args, args.run_dir)
    return 0


def _info(args: argparse.Namespace) -> int:
    from protofuse.bank import load_bank

    bank = load_bank(args.bank)
    print(
        f"{bank.family} bank {bank.version}: {len(bank.label_names)} labels "
        f"{list(bank.label_names)}"
    )
    fed = bank.meta.federation
    if fed is not None:
        print(
            f"federated: {fed.rounds} rounds, {fed.settings.aggregation} aggregation, "
            f"{fed.settings.local_epochs} local epoch(s) per round"
        )
        if fed.privacy.mode == "dp":
            print(
                f"differential privacy: epsilon {fed.epsilon:.3g} at delta {fed.privacy.delta:.3g} "
                f"per client for the whole run (noise multiplier {fed.noise_multiplier:.4g}, "
                f"clip {fed.privacy.clip:.4g}); the experts' own measurements are withheld"
            )
        elif fed.privacy.mode == "secagg":
            print(
                "secure aggregation (Flower's SecAgg+): the server saw only sums of the clients' "
                "updates; every client weighed the same"
            )
        else:
            print("privacy: plain (no differential privacy)")
    _print_experts(bank)
    return 0


def _print_experts(bank) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="experts (imitation fidelity on held-out queries)")
    for col in ("expert", "labels", "queries", "agreement", "KL (nats)", "consensus", "weight"):
        table.add_column(col)

    def shown(value: float, measured: bool = True) -> str:  # "-": not measured or withheld (DP)
        return f"{value:.3f}" if measured and np.isfinite(value) else "-"

    for e in bank.experts:
        measured = e.fidelity.n > 0
        table.add_row(
            e.name,
            " ".join(e.labels),
            str(e.n_queries) if e.n_queries else "-",
            shown(e.fidelity.agreement, measured),
            shown(e.fidelity.kl, measured),
            shown(e.consensus),
            f"{e.weight:.2f}",
        )
    Console(stderr=True).print(table)


def _hint_image_shape(spec, x: np.ndarray) -> None:
    """Say so when tabular inputs look like flattened images (the weaker path, chosen silently)."""
    from protofuse.input_checks import image_hint

    hint = image_hint(x) if spec.data.image_shape is None else None
    if hint:
        print(f"note: {hint}", file=sys.stderr)


def _check_out_folder(path: Path) -> None:
    """Refuse an output path that cannot become a folder before any long work starts."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is an existing file; give a folder path")


def _load_support(path: Path, flag: str = "--support") -> tuple[np.ndarray, np.ndarray]:
    """x (n, d) floats and y (n,) strings from a support .npz, with errors naming the field."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise ValueError(
                    f"{path}: missing array(s) {missing}; save with numpy.savez(path, x=inputs, "
                    "y=label_names)"
                )
            x, y = npz["x"], npz["y"]
    except FileNotFoundError:
        raise ValueError(f"{flag}: file {path} not found") from None
    except ValueError as err:
        if "pickle" in str(err):
            raise ValueError(
                f"{path}: y is stored as Python objects; save label names as a string array, e.g. "
                "y=np.asarray(labels, dtype=str)"
            ) from None
        raise
    except Exception as err:  # zip/npz corruption surfaces as several exception types
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(
            f"{path}: x has shape {x.shape} and dtype {x.dtype}, expected a 2-D float array (n, d)"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(
            f"{path}: y has shape {y.shape}, expected ({len(x)},): one label per row of x"
        )
    if not (np.issubdtype(y.dtype, np.str_) or np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"{path}: y has dtype {y.dtype}, expected label names as strings")
    return x, y.astype(str)


if __name__ == "__main__":
    raise SystemExit(main())
