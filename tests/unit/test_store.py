"""The server's bank store: real SQLite files, real weight files, real SIGKILLs of a child process.

Run as a script (``python tests/unit/test_store.py FOLDER STAGE READY``) this file is the child of
the crash tests: it checkpoints round 1, then dies by SIGKILL at STAGE of checkpointing round 2.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protofuse.records import ExpertRecord, Fidelity
from protofuse_server.fusion import store
from protofuse_server.fusion.store import BankStore, Checkpoint, StoreError

RUN = "run-digits-seed0"
Inputs = tuple[dict[str, np.ndarray], list[str], list[ExpertRecord], dict[str, Any]]


def expert(name: str, labels: tuple[str, ...], last_round: int, **changes: Any) -> ExpertRecord:
    record = ExpertRecord(
        name=name,
        labels=labels,
        distribution=f"proto:{name}:{last_round}".encode() + bytes([0, 255]),  # opaque, binary-safe
        n_examples=100 + last_round,
        n_queries=32 * last_round,
        fidelity=Fidelity(0.875, 0.1 * last_round, 64),
        consensus=None,  # not measured: stored as NULL, read back as NaN, equal to itself
        weight=0.5,
        last_round=last_round,
    )
    return replace(record, **changes)


def round_inputs(round: int) -> Inputs:
    """Deterministic inputs of a round, the same in the test and in its child process."""
    rng = np.random.default_rng(round)
    arrays = {
        "prototypes": rng.standard_normal((512, 1024)).astype(
            np.float32
        ),  # 2 MB, like the real bank
        "label_index": np.arange(3 + round, dtype=np.int64),
        "scale": np.float32(round).reshape(()),
    }
    vocabulary = ["zero", "one", "two", "three", "four"][: 2 + round]
    if round == 1:
        experts = [expert("alice", ("zero", "one"), 1), expert("bob", ("two",), 1, consensus=0.25)]
    else:  # bob reports again with a new label; carol joins; alice is absent
        experts = [
            expert("bob", ("two", "three"), round, consensus=0.75, weight=0.9),
            expert("carol", ("zero",), round, weight=1.0),
        ]
    state = {
        "round": round,
        "schedule": {"position": round, "phases": ["fuse", "probe"]},
        "trust": {"bob": 0.5},
    }
    return arrays, vocabulary, experts, state


def merged_experts(*rounds: int) -> tuple[ExpertRecord, ...]:
    """What the store must hold after these rounds: the latest record of each pseudonym."""
    latest: dict[str, ExpertRecord] = {}
    for r in rounds:
        latest.update({e.name: e for e in round_inputs(r)[2]})
    return tuple(latest[k] for k in sorted(latest))


def assert_arrays_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(actual) == sorted(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype, name
        assert actual[name].shape == array.shape, name
        np.testing.assert_array_equal(actual[name], array)


def assert_round(checkpoint: Checkpoint | None, round: int, *merged: int) -> None:
    """The checkpoint is exactly round ``round``'s inputs, with experts merged over ``merged``."""
    assert checkpoint is not None
    arrays, vocabulary, _, state = round_inputs(round)
    assert checkpoint.round == round
    assert_arrays_equal(checkpoint.arrays, arrays)
    assert checkpoint.vocabulary == tuple(vocabulary)
    assert checkpoint.experts == merged_experts(*merged)
    assert checkpoint.state == state


def weight_files(folder: Path) -> set[str]:
    return {p.name for p in (folder / "weights").iterdir()}


# -- round trip -----------------------------------------------------------------------------------


def test_checkpoint_then_reopen_returns_identical_bank(tmp_path: Path) -> None:
    with BankStore(tmp_path, RUN) as bank:
        assert bank.latest() is None
        digest = bank.checkpoint(1, *round_inputs(1))
        assert bank.path == tmp_path / "bank.sqlite"
    with BankStore(tmp_path, RUN) as reopened:
        checkpoint = reopened.latest()
        assert_round(checkpoint, 1, 1)
        assert checkpoint.weights_digest == digest
        assert reopened.rounds() == [(1, digest)]
    stored = (tmp_path / "weights" / f"{digest}.npz").read_bytes()
    assert (
        hashlib.sha256(stored).hexdigest() == digest
    )  # content-addressed: the name is the file's hash


def test_the_file_is_a_wal_sqlite_database_with_a_schema_version(tmp_path: Path) -> None:
    BankStore(tmp_path, RUN).close()
    db = sqlite3.connect(tmp_path / "bank.sqlite")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
        assert db.execute("SELECT run_key FROM run").fetchone()[0] == RUN
    finally:
        db.close()


def test_equal_arrays_share_one_file(tmp_path: Path) -> None:
    arrays, vocabulary, experts, state = round_inputs(1)
    with BankStore(tmp_path, RUN, keep=1) as bank:
        first = bank.checkpoint(1, arrays, vocabulary, experts, state)
        second = bank.checkpoint(2, {k: v.copy() for k, v in arrays.items()}, vocabulary, [], state)
        assert first == second
        assert weight_files(tmp_path) == {f"{first}.npz"}  # collecting round 1 kept round 2's file
        assert_arrays_equal(bank.latest().arrays, arrays)


# -- experts --------------------------------------------------------------------------------------


def test_upsert_keeps_absent_experts_and_updates_present_ones(tmp_path: Path) -> None:
    with BankStore(tmp_path, RUN) as bank:
        bank.checkpoint(1, *round_inputs(1))
        bank.checkpoint(2, *round_inputs(2))
    with BankStore(tmp_path, RUN) as bank:
        alice, bob, carol = bank.experts()
        assert alice == round_inputs(1)[2][0]  # absent from round 2: untouched
        assert (bob.last_round, bob.labels, bob.weight, bob.consensus) == (
            2,
            ("two", "three"),
            0.9,
            0.75,
        )
        assert carol.last_round == 2
        assert bank.latest().experts == (alice, bob, carol)
        assert [(h.round, h.n_experts, h.n_known, h.vocabulary_size) for h in bank.history()] == [
            (1, 2, 2, 3),
            (2, 2, 3, 4),
        ]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"labels": ("zero", "nine")}, "outside the vocabulary"),
        ({"weight": 1.5}, "outside [0, 1]"),
        ({"fidelity": Fidelity(0.875, float("nan"), 64)}, "fidelity.kl is NaN"),
        ({"fidelity": Fidelity(float("nan"), 0.1, 64)}, "fidelity.agreement is NaN"),
        ({"consensus": float("inf")}, "consensus is not finite"),
        ({"weight": float("-inf")}, "weight is not finite"),
        ({"n_queries": -1}, "non-negative"),
        ({"n_examples": 2**64 - 1}, "more than a count can be"),
        ({"last_round": 5}, "after the checkpoint"),
    ],
)
def test_invalid_expert_is_refused_and_nothing_recorded(
    tmp_path: Path, change: dict[str, Any], words: str
) -> None:
    arrays, vocabulary, experts, state = round_inputs(1)
    with BankStore(tmp_path, RUN) as bank:
        with pytest.raises(StoreError, match="alice") as error:
            bank.checkpoint(
                1, arrays, vocabulary, [replace(expert("alice", ("zero",), 1), **change)], state
            )
        assert words in str(error.value)
        assert bank.latest() is None and bank.experts() == () and bank.history() == []
        bank.checkpoint(1, arrays, vocabulary, experts, state)  # the refusal left the store usable


def test_the_same_expert_twice_in_one_round_is_refused(tmp_path: Path) -> None:
    arrays, vocabulary, experts, state = round_inputs(1)
    with BankStore(tmp_path, RUN) as bank, pytest.raises(StoreError, match="twice"):
        bank.checkpoint(1, arrays, vocabulary, [experts[0], experts[0]], state)


# -- vocabulary and rounds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vocabulary",
    [
        ["one", "zero", "two", "three"],  # reordered
        ["zero", "one"],  # removed at the end
        ["zero", "two", "three"],  # removed in the middle
        ["zero", "one", "deux", "three"],  # renamed
    ],
)
def test_vocabulary_is_append_only(tmp_path: Path, vocabulary: list[str]) -> None:
    arrays, _, _, state = round_inputs(2)
    with BankStore(tmp_path, RUN) as bank:
        bank.checkpoint(1, *round_inputs(1))
        with pytest.raises(StoreError, match="append-only"):
            bank.checkpoint(2, arrays, vocabulary, [], state)
        assert bank.latest().vocabulary == ("zero", "one", "two")
        bank.checkpoint(
            2, arrays, ["zero", "one", "two", "three", "four"], [], state
        )  # extending works
        assert bank.latest().vocabulary == ("zero", "one", "two", "three", "four")


def test_vocabulary_with_a_duplicate_is_refused(tmp_path: Path) -> None:
    arrays, _, experts, state = round_inputs(1)
    with BankStore(tmp_path, RUN) as bank, pytest.raises(StoreError, match="more than once"):
        bank.checkpoint(1, arrays, ["zero", "one", "two", "one"], experts, state)


@pytest.mark.parametrize("round", [3, 2])
def test_round_must_increase(tmp_path: Path, round: int) -> None:
    arrays, vocabulary, experts, state = round_inputs(1)
    with BankStore(tmp_path, RUN) as bank:
        bank.checkpoint(3, arrays, vocabulary, experts, state)
        with pytest.raises(StoreError, match="not after the last checkpoint"):
            bank.checkpoint(round, arrays, vocabulary, experts, state)
        assert bank.rounds()[-1][0] == 3


def test_another_run_key_is_refused(tmp_path: Path) -> None:
    BankStore(tmp_path, RUN).close()
    with pytest.raises(
        StoreError, match=f"holds run {RUN}, not run-other; use another --out folder"
    ):
        BankStore(tmp_path, "run-other")


def test_a_file_that_is_not_a_bank_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bank.sqlite").write_bytes(b"not a database, just bytes" * 100)
    with pytest.raises(StoreError, match=r"bank\.sqlite"):
        BankStore(tmp_path, RUN)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    BankStore(tmp_path, RUN).close()
    db = sqlite3.connect(tmp_path / "bank.sqlite")
    db.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="schema version"):
        BankStore(tmp_path, RUN)


def test_a_closed_store_says_so(tmp_path: Path) -> None:
    with BankStore(tmp_path, RUN) as bank:
        pass
    with pytest.raises(StoreError, match="closed"):
        bank.latest()


# -- weight files ---------------------------------------------------------------------------------


def test_a_corrupted_weight_file_is_detected(tmp_path: Path) -> None:
    with BankStore(tmp_path, RUN) as bank:
        digest = bank.checkpoint(1, *round_inputs(1))
    file = tmp_path / "weights" / f"{digest}.npz"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the prototypes: still a valid zip, wrong numbers
    file.write_bytes(bytes(data))
    with (
        BankStore(tmp_path, RUN) as bank,
        pytest.raises(StoreError, match=f"{digest}.npz.*do not match"),
    ):
        bank.latest()


def test_a_missing_weight_file_is_detected(tmp_path: Path) -> None:
    with BankStore(tmp_path, RUN) as bank:
        digest = bank.checkpoint(1, *round_inputs(1))
        (tmp_path / "weights" / f"{digest}.npz").unlink()
        with pytest.raises(StoreError, match="missing"):
            bank.latest()


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    _, vocabulary, experts, state = round_inputs(1)
    with BankStore(tmp_path, RUN) as bank, pytest.raises(StoreError, match="no pickle"):
        bank.checkpoint(1, {"bad": np.array([{"a": 1}], dtype=object)}, vocabulary, experts, state)


def test_old_weight_files_are_collected(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    digests = []
    with BankStore(folder, RUN, keep=2) as bank:
        for r in (1, 2, 3):
            arrays, _, _, state = round_inputs(r)
            digests.append(bank.checkpoint(r, arrays, round_inputs(1)[1], [], state))
        assert weight_files(folder) == {f"{d}.npz" for d in digests[1:]}
        # Leftovers of interrupted checkpoints go too; files the store did not name stay.
        (folder / "weights" / f"{'0' * 64}.npz").write_bytes(b"orphan")
        (folder / "weights" / ".tmp-abc.npz").write_bytes(b"half written")
        (folder / "weights" / "notes.txt").write_text("an operator's file")
        arrays, _, _, state = round_inputs(4)
        digests.append(bank.checkpoint(4, arrays, round_inputs(1)[1], [], state))
        assert weight_files(folder) == {f"{d}.npz" for d in digests[2:]} | {"notes.txt"}
        assert bank.rounds() == [(3, digests[2]), (4, digests[3])]
        assert [(h.round, h.weights_digest) for h in bank.history()] == list(
            zip([1, 2, 3, 4], digests, strict=True)
        )
        assert bank.latest().round == 4
        for key, value in round_inputs(3)[0].items():
            np.testing.assert_array_equal(bank.weights(3)[key], value)
        with pytest.raises(StoreError, match="no kept checkpoint of round 2"):
            bank.weights(2)


# -- crash safety ---------------------------------------------------------------------------------


def test_on_stage_sees_every_stage_of_a_checkpoint_in_order(tmp_path: Path) -> None:
    """The seam the crash tests kill at: the weight file is durable before the commit begins."""
    seen: list[tuple[str, set[str]]] = []
    with BankStore(
        tmp_path, RUN, on_stage=lambda at: seen.append((at, weight_files(tmp_path)))
    ) as bank:
        digest = bank.checkpoint(1, *round_inputs(1))
    stages = [at for at, _ in seen]
    assert stages == ["weights_temp", "weights_durable", "before_commit", "after_commit"]
    files = dict(seen)
    assert f"{digest}.npz" not in files["weights_temp"] and any(
        n.startswith(".tmp-") for n in files["weights_temp"]
    )
    assert files["weights_durable"] == {f"{digest}.npz"}


def run_child_until_killed(folder: Path, stage: str, tmp_path: Path) -> None:
    """Start the child, wait until it reaches ``stage`` of checkpointing round 2, SIGKILL it."""
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, __file__, str(folder), stage, str(ready)],
        cwd=tmp_path,  # the child finds protofuse_server as installed, not through the repository
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if child.poll() is not None:
                pytest.fail(
                    f"child exited with {child.returncode} before {stage}: "
                    f"{child.stderr.read().decode()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"child never reached {stage}")
            time.sleep(0.01)
        assert ready.read_text() == stage
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()


def child_main(folder: str, stage: str, ready: str) -> None:
    def hook(at: str) -> None:
        if at == stage:
            Path(f"{ready}.tmp").write_text(at)
            os.replace(f"{ready}.tmp", ready)  # the parent never reads a half-written signal
            time.sleep(600)  # killed here

    with BankStore(folder, RUN) as bank:
        bank.checkpoint(1, *round_inputs(1))
    bank = BankStore(
        folder, RUN, on_stage=hook
    )  # reopened, as a restarted server would: the seam for round 2 only
    bank.checkpoint(2, *round_inputs(2))
    sys.exit(f"stage {stage} never reached")


needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


@needs_sigkill
@pytest.mark.parametrize("stage", ["weights_temp", "weights_durable", "before_commit"])
def test_killed_before_commit_resumes_from_the_previous_checkpoint(
    tmp_path: Path, stage: str
) -> None:
    folder = tmp_path / "out"
    run_child_until_killed(folder, stage, tmp_path)
    new_digest = hashlib.sha256(store._encode_arrays(round_inputs(2)[0])).hexdigest()
    # Killed with round 2's weights on disk (durable or half-renamed), yet not committed:
    assert (f"{new_digest}.npz" in weight_files(folder)) == (stage != "weights_temp")
    assert any(n.startswith(".tmp-") for n in weight_files(folder)) == (stage == "weights_temp")

    with BankStore(folder, RUN) as bank:
        assert_round(bank.latest(), 1, 1)
        assert [r for r, _ in bank.rounds()] == [1]
        assert bank.checkpoint(2, *round_inputs(2)) == new_digest  # round 2 again, from scratch
    with BankStore(folder, RUN) as bank:
        assert_round(bank.latest(), 2, 1, 2)
        assert [h.round for h in bank.history()] == [1, 2]
        assert weight_files(folder) == {f"{d}.npz" for _, d in bank.rounds()}  # no leftovers


@needs_sigkill
def test_killed_after_commit_keeps_the_new_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    run_child_until_killed(folder, "after_commit", tmp_path)
    with BankStore(folder, RUN) as bank:
        assert_round(bank.latest(), 2, 1, 2)
        assert [r for r, _ in bank.rounds()] == [1, 2]
        arrays, vocabulary, _, state = round_inputs(3)
        bank.checkpoint(3, arrays, vocabulary, [], state)
        assert_round(bank.latest(), 3, 1, 2)


if __name__ == "__main__":
    child_main(*sys.argv[1:])


@pytest.mark.parametrize("bad", ["", 3])
def test_vocabulary_with_an_empty_or_non_string_name_is_refused(
    tmp_path: Path, bad: object
) -> None:
    arrays, _, _, state = round_inputs(1)
    with BankStore(tmp_path, RUN) as bank, pytest.raises(StoreError, match="non-empty strings"):
        bank.checkpoint(1, arrays, ["zero", bad, "two"], [], state)


def test_a_state_holding_nan_is_refused_not_written_as_non_standard_json(tmp_path: Path) -> None:
    arrays, vocabulary, experts, _ = round_inputs(1)
    with BankStore(tmp_path, RUN) as bank, pytest.raises(StoreError, match="not JSON-able"):
        bank.checkpoint(1, arrays, vocabulary, experts, {"loss": float("nan")})


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda a, v, e, s: (a, v, [*e, "carol"], s), "ExpertRecord records, got str"),
        (lambda a, v, e, s: ({}, v, e, s), "arrays is empty"),
        (lambda a, v, e, s: (a, v, e, [("round", 1)]), "state must be a dict, got list"),
    ],
)
def test_inputs_of_the_wrong_shape_are_refused_by_name(
    tmp_path: Path, call: Any, words: str
) -> None:
    with BankStore(tmp_path, RUN) as bank:
        with pytest.raises(StoreError) as error:
            bank.checkpoint(1, *call(*round_inputs(1)))
        assert words in str(error.value)
        assert bank.latest() is None


def test_the_largest_count_sqlite_holds_is_kept(tmp_path: Path) -> None:
    arrays, vocabulary, _, state = round_inputs(1)
    big = replace(expert("alice", ("zero",), 1), n_examples=2**63 - 1, n_queries=2**63 - 1)
    with BankStore(tmp_path, RUN) as bank:
        bank.checkpoint(1, arrays, vocabulary, [big], state)
        assert bank.experts()[0].n_examples == 2**63 - 1
