"""A Flower ServerApp for the secure-aggregation test: the fusion server's own, on a Grid that
writes down what every reply carried (``replies.json`` in the run folder): per reply, its message
type, each array record's arrays (dtype and shape) and each config record's keys with the type of
each value. The test copies this file beside a copy of protofuse's Flower app pyproject whose
``serverapp`` names it (tests/integration/test_simulation.py), so the product carries no test hook.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from protofuse_server.fusion.server_app import fuse, run_settings

app = ServerApp()


class RecordingGrid:
    def __init__(self, grid: Grid, path: Path) -> None:
        self._grid = grid
        self.path = path
        self.seen: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                continue
            self.seen.append(
                {
                    "type": reply.metadata.message_type,
                    "arrays": {
                        name: {k: [str(a.dtype), list(a.shape)] for k, a in record.items()}
                        for name, record in reply.content.array_records.items()
                    },
                    "configs": {
                        name: {k: type(v).__name__ for k, v in record.items()}
                        for name, record in reply.content.config_records.items()
                    },
                }
            )
        self.path.write_text(json.dumps(self.seen))
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec, out = run_settings(context.run_config)
    out.mkdir(parents=True, exist_ok=True)
    fuse(cast(Grid, RecordingGrid(grid, out / "replies.json")), spec, out)
