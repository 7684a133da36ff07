"""Waiting for a real server, proxy or compose service to reach a state, without a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    interval: float = 0.2,
    retry_on: tuple[type[BaseException], ...] = (),
) -> bool:
    """Call ``check`` every ``interval`` seconds until it returns true (True) or ``timeout``
    seconds pass (False); exceptions of the ``retry_on`` types count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except retry_on:
            pass
        time.sleep(interval)
    return False
