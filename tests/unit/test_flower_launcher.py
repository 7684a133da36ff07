"""The Flower process launcher both sides use (protofuse.flower.launcher), and what the
simulation refuses before it starts anything."""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from protofuse.flower.launcher import (
    FLOWER_ENV,
    flower_bin,
    flower_env,
    free_port,
    stop,
    write_connection,
)
from protofuse.flower.simulation import app_dir, simulate
from protofuse.spec import SpecError


def test_flower_executables_come_from_this_install():
    assert flower_bin("flower-superlink") == str(Path(sys.executable).parent / "flower-superlink")
    assert (
        flower_bin("no-such-executable-here") == "no-such-executable-here"
    )  # left to PATH, which fails clearly


def test_flower_runs_quiet_offline_and_from_this_install(tmp_path):
    env = flower_env(tmp_path)
    assert {k: env[k] for k in FLOWER_ENV} == FLOWER_ENV
    assert env["FLWR_HOME"] == str(tmp_path)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_a_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("ca", [None, Path("/pki/ca.crt")])
def test_the_connection_file_is_flower_cli_toml(tmp_path, ca):
    write_connection(tmp_path, "sim", 9093, ca)
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == "sim"
    conn = config["superlink"]["sim"]
    assert conn["address"] == "127.0.0.1:9093"
    assert conn == {
        "address": "127.0.0.1:9093",
        **({"root-certificates": str(ca)} if ca else {"insecure": True}),
    }


def test_stop_ends_the_whole_process_group():
    # a shell that ignores SIGTERM, with a child: both must be gone after stop()
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & wait"], start_new_session=True)
    stop(proc, grace=0.5)
    assert proc.poll() is not None
    assert _living_in_group(proc.pid) == []  # the shell and its child, both gone
    stop(proc)  # a stopped process: nothing to do, no error


def test_the_flower_app_names_both_sides_components():
    app = tomllib.loads((app_dir() / "pyproject.toml").read_text())
    components = app["tool"]["flwr"]["app"]["components"]
    assert components["serverapp"].startswith("protofuse_server.fusion.")
    assert components["clientapp"].startswith("client_sdk.clientapp.")


def test_simulate_refuses_a_family_that_does_not_federate_before_starting_anything(tmp_path):
    (tmp_path / "spec.toml").write_text(
        '[model]\nfamily = "generative"\n\n[[experts]]\nname = "a"\npredict = "m:f"\nlabels = '
        '["0", "1"]\nqueries = "q.npy"\n'
    )
    with pytest.raises(SpecError, match="protofuse fit"):
        simulate(tmp_path / "spec.toml", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _living_in_group(pgid: int) -> list[int]:
    """PIDs of the process group that are still running (zombies waiting for init are dead)."""
    living = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone while we looked
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            living.append(int(stat.parent.name))
    return living
