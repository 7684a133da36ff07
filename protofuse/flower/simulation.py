"""``protofuse simulate``: the same ServerApp and ClientApp on Flower's simulation engine.

One virtual client per expert of the spec. The simulation runs the way Flower's own CLI runs
one (``flwr run APP CONNECTION``), against a SuperLink in simulation mode that this module starts
on a free port and stops by PID, with ``FLWR_HOME`` inside the run folder (nothing lands in
``~/.flwr``) and runtime dependency installation disabled (it would download a CUDA torch).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from protofuse.families import family
from protofuse.privacy import plan_dp
from protofuse.spec import SpecError, load_spec

from .launcher import (
    FlowerProcessError,
    flower_bin,
    flower_env,
    free_port,
    start_superlink,
    stop,
    write_connection,
)


class SimulationError(FlowerProcessError):
    """The simulation stopped without a bank; what went wrong is in its log."""


def app_dir() -> Path:
    """The Flower app folder shipped with protofuse (its pyproject names our components)."""
    return Path(str(resources.files("protofuse.flower") / "app"))


def simulate(
    spec_path: Path,
    out: Path,
    rounds: int | None = None,
    echo: Callable[[str], None] = print,
    app: Path | None = None,
) -> Path:
    """Run a whole federation of the spec's experts on Flower's simulation engine; returns ``out``.

    app: another Flower app folder to run instead of ``app_dir()`` (its pyproject names the
    components; the tests use one whose ServerApp wraps the fusion server's)."""
    spec = load_spec(spec_path)
    impl = family(spec.model.family)
    if not impl.federates:
        raise SpecError(
            f"model.family = {impl.name!r} cannot be simulated: only the discriminative family "
            "federates (its generative counterpart is central only: `protofuse fit`)"
        )
    if spec.privacy.mode == "dp":  # a budget the run would exceed is refused before it starts
        plan = plan_dp(spec.privacy, rounds or spec.federation.rounds)
        echo(f"fusion: differential privacy: {plan.describe()}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / ".flwr"
    port = free_port()
    write_connection(home, "protofuse-sim", port)
    try:
        link = start_superlink(home, port, simulation=True, log_file=out / "superlink.log")
    except FlowerProcessError as err:
        raise SimulationError(str(err)) from None
    finished = False
    try:
        n = len(spec.experts)
        # The answers are cached beside the spec (as a deployed client caches them), not in the
        # run folder: a run folder is shared with whoever adapts from its bank.
        run_config = f'spec="{spec_path.resolve()}" out="{out}" min-clients={n}' + (
            f" rounds={rounds}" if rounds else ""
        )
        threads = spec.training.threads
        cmd = [
            flower_bin("flwr"),
            "run",
            str(app or app_dir()),
            "protofuse-sim",
            "--stream",
            "--run-config",
            run_config,
            "--federation-config",
            f"num-supernodes={n} client-resources-num-cpus={threads} client-resources-num-gpus=0.0",
        ]
        proc = subprocess.Popen(
            cmd,
            env=flower_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=out,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                echo(line.rstrip())
                if _run_finished(line):
                    finished = True
                    break
        finally:
            stop(proc, grace=5.0)
            if proc.stdout is not None:
                proc.stdout.close()
    finally:
        stop(link)
    if not finished or not (out / "bank" / "meta.json").exists():
        raise SimulationError(
            f"the simulation ended without a bank; see the log above and {out / 'superlink.log'}; "
            "run the same command again to resume from the last completed round"
        )
    return out


def _run_finished(line: str) -> bool:
    return "fusion: bank" in line and "written to" in line
