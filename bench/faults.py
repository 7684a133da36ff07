"""Faults in the real deployment: ``kill -9`` of each component at a chosen moment of a run,
dropouts, and a client joining mid-run, on the local-process deployment (a flower-superlink
with a SQLite state database, three SuperNodes started with ``protofuse client``, the fusion
ServerApp submitted with ``flwr run``, ``protofuse serve`` beside the run folder; insecure, on
127.0.0.1).

    python -m bench.faults --out bench-results/faults
    python -m bench.faults --scenarios serverapp supernode --rounds 6 --out /tmp/faults

Each scenario starts a fresh deployment of the three organizations of bench/organizations.py
(digits, a ring of three experts, each its own private query shard), injects its fault once the
store has checkpointed ``--at`` rounds, restarts what it killed the way an operator (or a
supervisor such as compose's ``restart: unless-stopped``) would, and records what came of it:
whether the run completed (resubmitting ``flwr run`` where the ServerApp died: the store resumes
after its last checkpoint), the rounds checkpointed, the experts recorded against those expected
(records lost), and whether the bank still adapts to a new task. Writes results.md (the fault
table) and results.json; each scenario's logs stay in its folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.datasets import Splits
from bench.demo import spec_entry
from bench.organizations import EXPERTS, REPO, client_command, held_out_task, make_folders
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

STORE_DB = Path("run") / "store" / "bank.sqlite"


@dataclass
class Deployment:
    """One scenario's processes and folders."""

    folder: Path
    rounds: int
    federation: str
    specs: list[Path] = field(default_factory=list)
    server: Path = Path()
    splits: Splits | None = None
    port: int = 0
    home: Path = Path()
    superlink: subprocess.Popen | None = None
    clients: dict[str, subprocess.Popen] = field(default_factory=dict)
    run: subprocess.Popen | None = None
    submissions: int = 0
    events: list[str] = field(default_factory=list)

    # -- processes ---------------------------------------------------------------------------
    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _, self.specs, self.server, self.splits = make_folders(
            self.folder, self.rounds, self.federation
        )
        self.home = self.folder / "flwr-home"
        self.port = free_port()
        write_connection(self.home, "deployment", self.port)
        self.start_superlink()
        for spec in self.specs:
            self.start_client(spec)
        self.submit()

    def start_superlink(self) -> None:
        self.superlink = start_superlink(
            self.home,
            self.port,
            simulation=False,
            log_file=self.folder / "superlink.log",
            extra=["--database", str(self.folder / "state.db")],
        )

    def start_client(self, spec: Path) -> None:
        name = spec.parent.name
        cmd = client_command(spec, self.port, free_port())
        with open(self.folder / f"client-{name}.log", "ab") as log:
            self.clients[name] = subprocess.Popen(
                cmd,
                env=flower_env(self.home),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def submit(self) -> None:
        """``flwr run`` of the fusion app (again, after the ServerApp died: it resumes)."""
        self.submissions += 1
        run_config = f'spec="{self.server}" out="{self.folder / "run"}"'
        with open(self.folder / f"flwr-run-{self.submissions}.log", "wb") as log:
            self.run = subprocess.Popen(
                [
                    flower_bin("flwr"),
                    "run",
                    str(app_dir()),
                    "deployment",
                    "--stream",
                    "--run-config",
                    run_config,
                ],
                env=flower_env(self.home),
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop_all(self) -> None:
        for proc in [self.run, *self.clients.values(), self.superlink]:
            if proc is not None:
                stop(proc, grace=5)

    # -- observation -------------------------------------------------------------------------
    def checkpointed(self) -> int:
        """The last round the store has checkpointed (0 before the first)."""
        db = self.folder / STORE_DB
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                row = con.execute("SELECT MAX(round) FROM history").fetchone()
        except sqlite3.Error:
            return 0
        return int(row[0] or 0)

    def wait_for_round(self, r: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.checkpointed() >= r:
                return True
            time.sleep(0.5)
        return False

    def finished(self) -> bool:
        return (self.folder / "run" / "bank" / "meta.json").exists() and (
            self.run is None or self.run.poll() is not None
        )

    def log_of_run(self) -> str:
        return "\n".join(
            (self.folder / f"flwr-run-{i}.log").read_text(errors="replace")
            for i in range(1, self.submissions + 1)
        )


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the process's whole group (a SuperNode with its ClientApp processes, the SuperLink
    with its SuperExec and ServerApp) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def pids_named(fragment: str) -> list[int]:
    """Processes whose command line holds ``fragment`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fragment in cmdline:
            found.append(int(entry.name))
    return found


# -- scenarios: (what is done once round `at` is checkpointed) -----------------------------------


def none(d: Deployment) -> str:
    return "nothing"


def supernode(d: Deployment) -> str:
    kill9(d.clients["east"])
    time.sleep(2)
    d.start_client(d.specs[1])
    return "kill -9 of east's SuperNode, restarted 2 s later"


def serverapp(d: Deployment) -> str:
    pids = pids_named("flwr-serverapp")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    if d.run is not None:
        d.run.wait(120)  # `flwr run --stream` ends with its run
    time.sleep(2)
    d.submit()
    return f"kill -9 of the ServerApp ({len(pids)} process), `flwr run` submitted again"


def superlink(d: Deployment) -> str:
    assert d.superlink is not None
    kill9(d.superlink)  # its process group: its SuperExec and the ServerApp it started
    for pid in pids_named("flwr-serverapp"):  # (only SuperLinks start ServerApps)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if d.run is not None:
        d.run.wait(120)
    time.sleep(2)
    d.start_superlink()
    d.submit()
    return (
        "kill -9 of the SuperLink (its SuperExec and ServerApp with it), restarted on its "
        "database, `flwr run` submitted again"
    )


def dropout(d: Deployment) -> str:
    kill9(d.clients["west"])
    return "kill -9 of west's SuperNode, not restarted (1 of 3 gone)"


def below_minimum(d: Deployment) -> str:
    kill9(d.clients["west"])
    kill9(d.clients["east"])
    return "kill -9 of west's and east's SuperNodes, not restarted (below min_replies)"


def join(d: Deployment) -> str:
    """A fourth organization joins with labels no one declared before."""
    org = d.folder / "south"
    org.mkdir(exist_ok=True)
    assert d.splits is not None
    queries = d.splits.queries.x
    rows = np.random.default_rng(1).permutation(len(queries))[:300]
    np.save(org / "queries.npy", queries[np.sort(rows)])
    # its expert's columns are digits 1, 5, 8, under names no one else uses
    line = (
        "import numpy as np  # noqa: E402\n"
        "class _Renamed:\n"
        "    def __init__(self, inner, names):\n"
        "        self.inner, self.classes_ = inner, np.array(names)\n"
        "    def predict_proba(self, x):\n"
        "        return self.inner.predict_proba(x)\n"
        "south = _Renamed(build_expert(ExpertRecipe('south', 'logreg', ('1', '5', '8')), _train,"
        " 0).expert, ['one', 'five', 'eight'])"
    )
    (org / "experts.py").write_text(
        EXPERTS.format(dataset="digits", lines="", repo=str(REPO), recipes=line)
    )
    (org / "spec.toml").write_text(
        spec_entry("south", "experts:south", ("one", "five", "eight"), "queries.npy")
    )
    d.specs.append(org / "spec.toml")
    d.start_client(org / "spec.toml")
    return "a fourth SuperNode joins with three new labels"


SCENARIOS: dict[str, tuple[Callable[[Deployment], str], str, list[str]]] = {
    # name: (fault, [federation] lines, experts expected in the bank)
    "none": (none, "min_clients = 3\n", ["east", "north", "west"]),
    "supernode": (supernode, "min_clients = 3\n", ["east", "north", "west"]),
    "serverapp": (serverapp, "min_clients = 3\n", ["east", "north", "west"]),
    "superlink": (superlink, "min_clients = 3\n", ["east", "north", "west"]),
    "dropout": (dropout, "min_clients = 3\nround_timeout = 300\n", ["east", "north", "west"]),
    "below-minimum": (
        below_minimum,
        "min_clients = 3\nround_timeout = 60\n",
        ["east", "north", "west"],
    ),
    "join": (join, "min_clients = 3\n", ["east", "north", "south", "west"]),
}


def run_scenario(name: str, folder: Path, rounds: int, at: int, timeout: float) -> dict:
    fault, federation, expected = SCENARIOS[name]
    shutil.rmtree(folder, ignore_errors=True)  # a scenario run again starts afresh
    d = Deployment(folder, rounds, federation)
    t0 = time.monotonic()
    outcome: dict = {"scenario": name, "rounds": rounds, "at": at}
    try:
        d.start()
        reached = d.wait_for_round(at, timeout)
        outcome["fault"] = fault(d) if reached else f"not injected: round {at} never checkpointed"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not d.finished():
            if d.run is not None and d.run.poll() is not None and not d.finished():
                break  # the run ended without a bank: stopped or failed
            time.sleep(1)
        outcome["seconds"] = time.monotonic() - t0
        outcome["checkpointed"] = d.checkpointed()
        outcome["completed"] = d.finished()
        log = d.log_of_run()
        outcome["stopped_with"] = next(
            (line.strip() for line in log.splitlines() if "fewer than the" in line), None
        )
    finally:
        d.stop_all()
    with sqlite3.connect(f"file:{folder / STORE_DB}?mode=ro", uri=True) as con:
        last = dict(con.execute("SELECT pseudonym, last_round FROM experts").fetchall())
    outcome["last_rounds"] = last  # the store's records: the round each expert last replied in
    if outcome["completed"]:
        bank = load_bank(folder / "run")
        present = sorted(e.name for e in bank.experts)
        outcome["experts"] = present
        outcome["records_lost"] = sorted(set(expected) - set(present))
        outcome["labels"] = len(bank.label_names)
        assert d.splits is not None
        sx, sy, tx, ty = held_out_task(d.splits)
        outcome["new_task_accuracy"] = float((bank.adapt(sx, sy).predict(tx) == ty).mean())
    else:
        outcome["experts"] = sorted(last)
        outcome["records_lost"] = sorted(set(expected) - set(last))
    return outcome


def service_scenario(folder: Path, run: Path) -> dict:
    """kill -9 of `protofuse serve` between two calls, restarted: the same bank, served again."""
    from client_sdk import FusionClient

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "protofuse_cli.main",
        "serve",
        str(run),
        "--address",
        f"127.0.0.1:{port}",
        "--insecure",
    ]

    def start() -> subprocess.Popen:
        with open(folder / "service.log", "ab") as log:
            return subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def serving(client: FusionClient, timeout: float = 60) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if client.health("protofuse.v1.Fusion") == "SERVING":
                    return time.monotonic() - t0
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not come back")

    from bench.datasets import load_dataset, make_splits

    sx, sy, _, _ = held_out_task(make_splits(load_dataset("digits"), 0))
    proc = start()
    try:
        with FusionClient(f"127.0.0.1:{port}", insecure=True, unsigned_ok=True) as client:
            serving(client)
            before = client.adapt(sx, sy).bank_meta["version"]
            kill9(proc)
            proc = start()
            back = serving(client)
            after = client.adapt(sx, sy).bank_meta["version"]
    finally:
        stop(proc)
    return {
        "scenario": "service",
        "fault": "kill -9 of `protofuse serve` between two Adapt calls, restarted",
        "completed": before == after,
        "seconds_to_serving": back,
        "records_lost": [],
    }


def report(rows: list[dict], rounds: int, at: int) -> str:
    lines = [
        "# Faults in the local-process deployment",
        "",
        f"Three organizations (digits), {rounds} training rounds plus the agreement round; each "
        f"fault injected once round {at} was checkpointed. `records lost`: experts expected in "
        "the bank and missing from it.",
        "",
        "| scenario | fault | outcome | rounds checkpointed | experts (last round) | records "
        "lost | new-task accuracy | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["scenario"] == "service":
            outcome = (
                f"same bank served again after {r['seconds_to_serving']:.1f} s"
                if r["completed"]
                else "a different bank"
            )
            lines.append(f"| service | {r['fault']} | {outcome} | | | none | | |")
            continue
        outcome = (
            "completed"
            if r["completed"]
            else f"stopped: {r['stopped_with']}"
            if r.get("stopped_with")
            else "did not complete"
        )
        experts = ", ".join(
            f"{n} ({r.get('last_rounds', {}).get(n, '?')})" for n in r.get("experts", [])
        )
        accuracy = f"{100 * r['new_task_accuracy']:.1f}%" if "new_task_accuracy" in r else ""
        lines.append(
            f"| {r['scenario']} | {r['fault']} | {outcome} | {r.get('checkpointed', '')} | "
            f"{experts} | {', '.join(r['records_lost']) or 'none'} | {accuracy} | "
            f"{r.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    p.add_argument(
        "--scenarios",
        nargs="+",
        default=[*SCENARIOS, "service"],
        choices=[*SCENARIOS, "service"],
    )
    p.add_argument("--rounds", type=int, default=6, help="training rounds of each run")
    p.add_argument("--at", type=int, default=2, help="inject once this round is checkpointed")
    p.add_argument("--timeout", type=float, default=900, help="seconds per scenario at most")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # Flower's processes run in other folders
    args.out.mkdir(parents=True, exist_ok=True)
    # Rows of earlier invocations into the same folder are kept; a scenario run again replaces
    # its row.
    previous = args.out / "results.json"
    rows = json.loads(previous.read_text()) if previous.exists() else []
    rows = [r for r in rows if r["scenario"] not in args.scenarios]
    for name in args.scenarios:
        print(f"{name} ...", file=sys.stderr, flush=True)
        if name == "service":
            run = args.out / "none" / "run"
            if not (run / "bank" / "meta.json").exists():
                rows.append(
                    run_scenario("none", args.out / "none", args.rounds, args.at, args.timeout)
                )
            rows.append(service_scenario(args.out, run))
        else:
            rows.append(run_scenario(name, args.out / name, args.rounds, args.at, args.timeout))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
        (args.out / "results.md").write_text(report(rows, args.rounds, args.at))
    print(report(rows, args.rounds, args.at))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
