"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def in_a_run():
    """Flower stamps every Message with the run of the process that makes it: pose as run 1."""
    from flwr.supercore.task_identity import TaskIdentity

    before = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before
