"""SSE framing of the event streams the gateway writes in another API's shape (Responses,
Messages): an `event:` line with the event's type, then its data; and the loop that turns chat
chunk batches into such events.

One helper for the events the gateway builds (`gateway.responses.stream`,
`gateway.messages.stream`) and the ones it relays from a pass-through upstream
(`gateway.providers.openai_responses`, `gateway.providers.anthropic.passthrough`). It imports
only the error tree, so providers can use it without an import cycle.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable

from gateway.errors import UpstreamError

__all__ = ["event_frame", "framed_batches"]


def event_frame(name: bytes, data: bytes) -> bytes:
    """One framed event; a multi-line payload (pretty-printed JSON) gets a `data:` per line."""
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    return b"event: %s\ndata: %s\n\n" % (name, data)


async def framed_batches(
    chunks: AsyncIterator[list[bytes]],
    feed: Callable[[bytes], None],
    take: Callable[[], list[bytes]],
) -> AsyncGenerator[list[bytes], None]:
    """Feed each chunk of each batch to a converter; yield what it framed, a batch at a time.

    Raises:
        UpstreamError: a chunk could not be converted (what came before it is yielded first).
    """
    async for batch in chunks:
        failure: UpstreamError | None = None
        try:
            for data in batch:
                feed(data)
        except UpstreamError as exc:
            failure = exc  # what came before it still goes out
        frames = take()
        if frames:
            yield frames
        if failure is not None:
            raise failure
