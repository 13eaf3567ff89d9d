"""Waiting for something a test cannot be told about (a file, a process, a line of output)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, every: float = 0.02) -> T:
    """Polls ``condition`` every ``every`` seconds until it gives something true, and returns that;
    fails naming ``what`` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(every)
    return value
