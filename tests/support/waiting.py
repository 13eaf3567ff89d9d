"""Waiting for something a test cannot be told about (a file, a process, a line of output)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, every: float = 0.02,
             said: Callable[[], str] | None = None) -> T:
    """Polls ``condition`` every ``every`` seconds until it gives something true, and returns that;
    fails naming ``what`` once ``timeout`` seconds have passed, with what ``said()`` gives then (the
    output of the process waited on)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f"; it said:\n{said()}" if said else ""))
        time.sleep(every)
    return value
