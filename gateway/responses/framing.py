"""SSE framing of Responses API events: an `event:` line with the event's type, then its data.

One helper for the events the gateway builds (`gateway.responses.stream`) and the ones it
relays from a pass-through upstream (`gateway.providers.openai_responses`). It imports nothing
from the gateway, so providers can use it without an import cycle.
"""

from __future__ import annotations

__all__ = ["event_frame"]


def event_frame(name: bytes, data: bytes) -> bytes:
    """One framed event; a multi-line payload (pretty-printed JSON) gets a `data:` per line."""
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    return b"event: %s\ndata: %s\n\n" % (name, data)
