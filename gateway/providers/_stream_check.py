"""An OpenAI stream is checked as it is relayed: every event a JSON object, and an answer that
finished before the stream ended, so a stream cut short ends with an error event instead of
looking complete. A run of plain chunks is checked at once (`see_run`: one decode, and one more
for a run of several events), for relaying it as the upstream sent it.
"""

from __future__ import annotations

import msgspec

from gateway.errors import UpstreamConnectionError, UpstreamError

__all__ = ["StreamCheck"]


class _Object(msgspec.Struct):
    """Any JSON object: decoding one checks the JSON and skips every value unread."""


# A finish_reason with a value, as servers write it; inside a JSON string every quote is
# escaped, so in an event that is valid JSON these bytes can only be the key itself.
_FINISHED = (b'"finish_reason":"', b'"finish_reason": "')


_EVENT = msgspec.json.Decoder(_Object)


class _RunChoice(msgspec.Struct):
    finish_reason: object = None


class _RunChunk(msgspec.Struct):
    """What a relayed chunk is checked for; the rest is skipped unread."""

    choices: list[_RunChoice] = []
    usage: object = None
    error: object = None


_RUN = msgspec.json.Decoder(list[_RunChunk])
_ONE = msgspec.json.Decoder(_RunChunk)
_RAWS = msgspec.json.Decoder(list[msgspec.Raw])


def _one_each(elements: list[msgspec.Raw], events: int) -> bool:
    """Whether a run's elements are one per event: as many, and none across a separator."""
    return len(elements) == events and b"\n" not in b"".join(elements)


class StreamCheck:
    """What an OpenAI chat stream must be before it is relayed as complete: every event a JSON
    object, and a `finish_reason` (or `data: [DONE]`) before it ends, so that a stream cut
    short ends with an error event instead of looking finished."""

    __slots__ = ("finished", "provider")

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.finished = False

    def see(self, data: bytes) -> bool:
        """Check one event; False for a blank one (a keep-alive, not for the client).

        Raises:
            UpstreamError: the event is not a JSON object.
        """
        if not data or data.isspace():
            return False
        try:
            _EVENT.decode(data)
        except (msgspec.MsgspecError, RecursionError):
            raise UpstreamError(
                f"The upstream provider '{self.provider}' sent a stream event that is not "
                "a JSON object."
            ) from None
        if not self.finished and (_FINISHED[0] in data or _FINISHED[1] in data):
            self.finished = True
        return True

    def see_run(self, events: bytes) -> tuple[int, int]:
        """Check a run of SSE events (from `data: ` to a blank line) at once, for
        relaying its plain chunks as they are, each one `data:` line holding one JSON object
        with no usage and no error: how many of them lead the run and where they end
        (`(0, 0)` when none does or the run is not all JSON objects; the caller splits the
        rest and looks at each event with `see`). An upstream sends its usage chunk last,
        often in the read of its last chunks: those still pass.

        With each separator turned into a line break and a comma they make a JSON array. A
        line break left in it (a comment, a second data line, an object over several lines) or
        a CR is refused: JSON would read through what an SSE client splits. A JSON string
        cannot hold a line break, so none runs from one event into the next; an event that is
        several objects ("{},{}") gives more elements than events; and of several events, each
        element must be one event's (none holds a separator's line break, a second decode that
        only splits): an event that opens an array the next one closes ("{"a":[1", "2]},{}") is
        not two objects to the client.
        """
        body = events[6:-2]
        if b"\r" in body:
            return 0, 0
        if b"\n" not in body:  # one event of one line: a read of a streaming answer, mostly
            return self._see_one(body, len(events))
        joined = body.replace(b"\n\ndata: ", b"\n,")
        count = (len(body) - len(joined)) // 6 + 1  # each separator is 6 bytes shorter
        if joined.count(b"\n") != count - 1:
            return 0, 0
        array = b"[%b]" % joined
        try:
            if count > 1 and not _one_each(_RAWS.decode(array), count):
                return 0, 0
            chunks = _RUN.decode(array)
        except (msgspec.MsgspecError, RecursionError):
            return 0, 0
        if len(chunks) != count:
            return 0, 0
        finished = self.finished
        plain = 0
        for chunk in chunks:
            if chunk.usage is not None or chunk.error is not None:
                break
            if not finished:
                finished = any(choice.finish_reason for choice in chunk.choices)
            plain += 1
        self.finished = finished
        if plain == count:
            return count, len(events)
        end = 0
        for _ in range(plain):  # past the separator after each plain event
            end = events.index(b"\n\ndata: ", end) + 2
        return plain, end

    def _see_one(self, body: bytes, size: int) -> tuple[int, int]:
        """`see_run` for a run of one event: its JSON decoded as one object, no list."""
        try:
            chunk = _ONE.decode(body)
        except (msgspec.MsgspecError, RecursionError):
            return 0, 0
        if chunk.usage is not None or chunk.error is not None:
            return 0, 0
        if not self.finished:
            self.finished = any(choice.finish_reason for choice in chunk.choices)
        return 1, size

    def end(self) -> None:
        """The upstream closed the stream without `[DONE]`.

        Raises:
            UpstreamConnectionError: no choice had finished: the answer was cut short.
        """
        if not self.finished:
            raise UpstreamConnectionError(
                f"The upstream provider '{self.provider}' ended the stream before the answer "
                "was complete (no finish_reason and no [DONE])."
            )
