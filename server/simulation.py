"""``protofuse simulate``: the same ServerApp and ClientApp on Flower's simulation engine.

One virtual client per expert of the spec. The simulation runs the way Flower's own CLI runs
one (``flwr run APP CONNECTION``), against a SuperLink in simulation mode that this module starts
on a free port and stops by PID, with ``FLWR_HOME`` inside the run folder (nothing lands in
``~/.flwr``) and runtime dependency installation disabled (it would download a CUDA torch).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from protofuse.families import family
from protofuse.spec import SpecError, load_spec

# Quiet, offline Flower: no telemetry, no update check, no dependency installation per run.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


class SimulationError(RuntimeError):
    """The simulation stopped without a bank; what went wrong is in its log."""


def app_dir() -> Path:
    """The Flower app folder shipped with protofuse (its pyproject names our components)."""
    return Path(str(resources.files("protofuse_server") / "flwr_app"))


def flower_env(home: Path) -> dict[str, str]:
    """Flower's processes start each other by name (flower-superexec, flwr-simulation...): the
    folder of this Python's executables goes first on PATH, so they come from this install."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "PATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_superlink(home: Path, port: int, simulation: bool, log_file: Path, extra: list[str] | None = None, certs: Path | None = None) -> subprocess.Popen:
    """A SuperLink on 127.0.0.1:port (its own process group, so it and its children stop together).

    With ``certs`` (a ``protofuse certs init`` folder) it serves TLS and authenticates SuperNodes;
    without, it runs insecure (simulation, tests on one host)."""
    security = ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"] if certs else ["--insecure"]
    cmd = [flower_bin("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation", *(["--simulation"] if simulation else []), *(extra or [])]
    with open(log_file, "ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tls = ssl.create_default_context(cafile=str(certs / "ca.crt")) if certs else None
    url = f"{'https' if certs else 'http'}://localhost:{port}/health"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with status {proc.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=tls) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop(proc)
    raise SimulationError(f"flower-superlink did not answer on 127.0.0.1:{port} within 60 s; see {log_file}")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left; reaps the process."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def write_connection(home: Path, name: str, port: int, root_certificates: Path | None = None) -> None:
    """The Flower CLI's connection to a SuperLink on 127.0.0.1 (TLS when given the CA)."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n')


def simulate(spec_path: Path, out: Path, rounds: int | None = None, echo: Callable[[str], None] = print) -> Path:
    """Run a whole federation of the spec's experts on Flower's simulation engine; returns ``out``."""
    spec = load_spec(spec_path)
    impl = family(spec.model.family)
    if not impl.federates:
        raise SpecError(f"model.family = {impl.name!r} cannot be simulated: only the discriminative family federates (its generative counterpart is central only: `protofuse fit`)")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / ".flwr"
    port = free_port()
    write_connection(home, "protofuse-sim", port)
    link = start_superlink(home, port, simulation=True, log_file=out / "superlink.log")
    finished = False
    try:
        n = len(spec.experts)
        # The answers are cached beside the spec (as a deployed client caches them), not in the
        # run folder: a run folder is shared with whoever adapts from its bank.
        run_config = f'spec="{spec_path.resolve()}" out="{out}" min-clients={n}' + (f" rounds={rounds}" if rounds else "")
        threads = spec.training.threads
        cmd = [flower_bin("flwr"), "run", str(app_dir()), "protofuse-sim", "--stream", "--run-config", run_config,
               "--federation-config", f"num-supernodes={n} client-resources-num-cpus={threads} client-resources-num-gpus=0.0"]
        proc = subprocess.Popen(cmd, env=flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out, start_new_session=True)
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
        raise SimulationError(f"the simulation ended without a bank; see the log above and {out / 'superlink.log'}; run the same command again to resume from the last completed round")
    return out


def _run_finished(line: str) -> bool:
    return "fusion: bank" in line and "written to" in line


def flower_bin(name: str) -> str:
    """A Flower executable beside this Python (a venv's bin/), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)
