"""Time as the outputs record it."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> str:
    """The time as markers and run summaries record it."""
    return datetime.now(UTC).isoformat(timespec="seconds")
