"""Shared by every tier: each test is marked with the tier of the folder it lives in (unit,
integration, deploy), so ``pytest -m unit`` is the fast tier; and the fixtures several tiers use."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "deploy")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(
                f"{item.nodeid}: tests live in one of tests/{{{','.join(TIERS)}}}/ (the folder is "
                "the tier)"
            )
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _flower_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower quiet and offline in every process a test starts: no telemetry, no update check,
    no per-run dependency installation (which would download a CUDA build of torch)."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture
def as_a_node():
    """Flower stamps every Message with the run and node of its process: pose as node 7 of run 1
    (tests that build a node's messages by hand)."""
    from flwr.supercore.task_identity import TaskIdentity

    before = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


@pytest.fixture
def folders(tmp_path: Path):
    """Three organizations' spec folders, each with its expert and its own shard of the queries
    (the deployment tests of the integration and deploy tiers)."""
    from bench.organizations import (
        make_folders,  # the benchmark's datasets: only the tests that use it pay
    )

    return make_folders(tmp_path)
