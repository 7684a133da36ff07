"""The Flower processes protofuse starts: SuperLink, SuperNode and the Flower CLI, from this
install's executables, quiet and offline.

Used by both sides: the client command (``protofuse client`` execs a SuperNode), the simulation
(a SuperLink in simulation mode) and the tests that run real deployments on one host. Nothing
here imports Flower: it starts Flower's executables as processes.
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
from pathlib import Path

# Quiet, offline Flower: no telemetry, no update check, no dependency installation per run.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


class FlowerProcessError(RuntimeError):
    """A Flower process did not start or did not answer; its log file says why."""


def flower_bin(name: str) -> str:
    """A Flower executable beside this Python (a venv's bin/), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def flower_env(home: Path) -> dict[str, str]:
    """Flower's processes start each other by name (flower-superexec, flwr-simulation...): the
    folder of this Python's executables goes first on PATH, so they come from this install."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "PATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_superlink(
    home: Path,
    port: int,
    simulation: bool,
    log_file: Path,
    extra: list[str] | None = None,
    certs: Path | None = None,
) -> subprocess.Popen:
    """A SuperLink on 127.0.0.1:port (its own process group, so it and its children stop together).

    With ``certs`` (a ``protofuse certs init`` folder) it serves TLS and authenticates SuperNodes;
    without, it runs insecure (simulation, tests on one host)."""
    security = (
        [
            "--ssl-ca-certfile",
            str(certs / "ca.crt"),
            "--ssl-certfile",
            str(certs / "server.crt"),
            "--ssl-keyfile",
            str(certs / "server.key"),
            "--enable-supernode-auth",
        ]
        if certs
        else ["--insecure"]
    )
    cmd = [
        flower_bin("flower-superlink"),
        *security,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        *(["--simulation"] if simulation else []),
        *(extra or []),
    ]
    with open(log_file, "ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    tls = ssl.create_default_context(cafile=str(certs / "ca.crt")) if certs else None
    url = f"{'https' if certs else 'http'}://localhost:{port}/health"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerProcessError(
                f"flower-superlink exited with status {proc.returncode}; see {log_file}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1, context=tls) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop(proc)
    raise FlowerProcessError(
        f"flower-superlink did not answer on 127.0.0.1:{port} within 60 s; see {log_file}"
    )


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


def write_connection(
    home: Path, name: str, port: int, root_certificates: Path | None = None
) -> None:
    """The Flower CLI's connection to a SuperLink on 127.0.0.1 (TLS when given the CA)."""
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = '
        f'"127.0.0.1:{port}"\n{security}\n'
    )
