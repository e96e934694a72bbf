"""The order of a Messages API stream's events, which every reader of one relies on.

The `anthropic` SDK indexes the blocks started so far and raises on an event before
`message_start`; the translation to chat keys its open blocks and tool-call slots by the same
indexes and its chunk writer by the one `message_start`. An upstream that breaks the order
(a delta for a block never started, a second `message_start` that would restart the tool-call
slots and merge two calls into one) is refused on both paths alike (`Order.allows`).
"""

from __future__ import annotations

__all__ = ["Order"]

_ORDERED = frozenset(
    {
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    }
)


class Order:
    """Where a stream is in the order the Messages API promises: one `message_start` first,
    blocks started at the next index, deltas and stops only for a block that was started."""

    __slots__ = ("blocks", "started")

    def __init__(self) -> None:
        self.started = False
        self.blocks = 0  # content blocks started so far

    def allows(self, kind: str, index: int | None) -> bool:
        if kind == "message_start":
            started, self.started = self.started, True
            return not started
        if kind == "ping" or kind not in _ORDERED:
            return True  # (an event type added after this was written: the SDK skips it)
        if not self.started:
            return False
        if kind == "content_block_start":
            if index != self.blocks:
                return False
            self.blocks += 1
        elif kind in ("content_block_delta", "content_block_stop"):
            return index is not None and 0 <= index < self.blocks
        return True
