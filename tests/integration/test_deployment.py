"""The deployment engine, for real: a flower-superlink and three SuperNodes started with
``protofuse client`` on 127.0.0.1, each with its own expert and private query shard; the app
submitted with ``flwr run``; then a model for a new task adapted from the resulting bank.

Processes are started and stopped here by PID (process groups); FLWR_HOME is a temporary folder
and runtime dependency installation stays disabled.
"""

from __future__ import annotations

import subprocess

from bench.organizations import client_command, held_out_task
from protofuse.bank import load_bank
from protofuse.flower.launcher import (
    flower_bin,
    flower_env,
    free_port,
    start_superlink,
    stop,
    write_connection,
)
from protofuse.flower.simulation import app_dir


def test_three_supernodes_and_a_superlink_build_a_bank_that_adapts(folders):
    tmp, specs, server, splits = folders
    result, procs = _deploy(tmp, specs, f'spec="{server}" out="{tmp / "run"}"')
    assert (tmp / "run" / "bank" / "meta.json").exists(), (
        result.stdout[-4000:] + result.stderr[-2000:]
    )
    assert "round 11/11 weighted" in result.stdout
    leftovers = [p.pid for p in procs if p.poll() is None]
    assert not leftovers

    bank = load_bank(tmp / "run")
    assert sorted(e.name for e in bank.experts) == ["east", "north", "west"]
    assert sorted(bank.label_names) == sorted(str(d) for d in range(10))
    # The clients asked their black boxes once each, and cached the answers beside their specs.
    for spec in specs:
        assert len(list((spec.parent / ".protofuse-cache").glob("*.npy"))) == 1

    sx, sy, tx, ty = held_out_task(splits)
    model = bank.adapt(sx, sy)
    accuracy = float((model.predict(tx) == ty).mean())
    # A sanity bound (the benchmark measures accuracy): with layer norm, a federation\'s
    # default, this 10-round federation measured 0.86 (0.79 at 4 rounds).
    assert accuracy > 0.8, accuracy


def test_a_deployment_under_secure_aggregation_completes_with_nodes_that_require_it(folders):
    """[privacy] mode = "secagg" on the deployment engine: SecAgg+ over real SuperNodes whose
    owners refuse any round that would send their weights in the clear."""
    tmp, specs, server, _ = folders
    secure = tmp / "server-secagg.toml"
    secure.write_text(server.read_text() + '\n[privacy]\nmode = "secagg"\n')
    result, _ = _deploy(
        tmp,
        specs,
        f'spec="{secure}" out="{tmp / "run"}" rounds=3',
        ["--require-secure-aggregation"],
    )
    assert (tmp / "run" / "bank" / "meta.json").exists(), (
        result.stdout[-4000:] + result.stderr[-2000:]
    )
    assert "secure aggregation (Flower's SecAgg+)" in result.stdout
    assert "round 4/4 weighted" in result.stdout
    bank = load_bank(tmp / "run")
    assert bank.meta.federation.privacy.mode == "secagg"
    assert sorted(e.name for e in bank.experts) == ["east", "north", "west"]
    for i in range(len(specs)):  # no node had to refuse a round
        assert "requires secure aggregation" not in (tmp / f"client{i}.log").read_text()


def _deploy(
    tmp, specs, run_config: str, client_options: list[str] | None = None
) -> tuple[subprocess.CompletedProcess, list[subprocess.Popen]]:
    """A SuperLink and one SuperNode per spec (``protofuse client``), then ``flwr run`` with
    ``run_config``; every process stopped before it returns."""
    home = tmp / "flwr-home"
    port = free_port()
    write_connection(home, "deployment", port)
    env = flower_env(home)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_superlink(home, port, simulation=False, log_file=tmp / "superlink.log"))
        for i, spec in enumerate(specs):
            cmd = client_command(spec, port, free_port()) + (client_options or [])
            with open(tmp / f"client{i}.log", "wb") as log:  # the child keeps its own copy
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        result = subprocess.run(
            [
                flower_bin("flwr"),
                "run",
                str(app_dir()),
                "deployment",
                "--stream",
                "--run-config",
                run_config,
            ],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        for proc in reversed(procs):
            stop(proc)
    return result, procs
