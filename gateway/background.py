"""Background tasks and futures whose failure is reported elsewhere.

A task nobody awaits any more (its waiters hung up, or it was shielded and left) that ends
with an exception makes asyncio log "Task exception was never retrieved" when it is
collected. Where the error has already reached its waiters, or is logged by its owner, the
task is given `mark_seen` as a done callback.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["mark_seen"]


def mark_seen(future: asyncio.Future[Any]) -> None:
    """Mark `future`'s exception, if any, as retrieved (its waiters got it, or its owner
    logged it)."""
    if not future.cancelled():
        future.exception()
