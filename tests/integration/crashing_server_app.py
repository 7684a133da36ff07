"""A Flower ServerApp for the resumption test: the fusion server's own, with a power cut.

It runs exactly ``protofuse_server.fusion.server_app``'s fusion and SIGKILLs its own process in
round ``KILL_IN_ROUND`` once the replies are in and before anything is merged or checkpointed
(``fuse``'s ``on_replies`` seam): no cleanup, as a power cut would leave the run. The test copies
this file beside a copy of protofuse's Flower app pyproject whose ``serverapp`` names it
(tests/integration/test_simulation.py), so the product carries no test hook.
"""

from __future__ import annotations

import os
import signal

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from protofuse_server.fusion.server_app import fuse, run_settings

KILL_IN_ROUND = 3  # the agreement round of a 4-round run: replies in, nothing merged

app = ServerApp()


def power_cut(round: int) -> None:
    if round == KILL_IN_ROUND:
        os.kill(os.getpid(), signal.SIGKILL)


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec, out = run_settings(context.run_config)
    fuse(grid, spec, out, on_replies=power_cut)
