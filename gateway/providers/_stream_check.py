"""An OpenAI stream is checked as it is relayed: every event a JSON object, and an answer that
finished before the stream ended, so a stream cut short ends with an error event instead of
looking complete. A run of plain chunks is checked at once (`see_run`: one short decode per
event), for relaying it as the upstream sent it.
"""

from __future__ import annotations

from typing import NoReturn

import msgspec

from gateway.errors import UpstreamConnectionError, UpstreamError

__all__ = ["StreamCheck"]


class _Object(msgspec.Struct):
    """Any JSON object: decoding one checks the JSON and skips every value unread."""


_EVENT = msgspec.json.Decoder(_Object)


class _RunChoice(msgspec.Struct, gc=False):
    """A choice has finished when its finish_reason is a non-empty string; any other form
    (`""`, `0`, `true`, an object, a finish_reason elsewhere in the chunk) is no finish, read
    the same by `see` and `see_run`, so that a stream cut short is one whatever the reads."""

    finish_reason: str | None = None
    index: object = None  # (not validated: a choice of any index shape is still checked)


class _RunChunk(msgspec.Struct, gc=False):
    """What a relayed chunk is checked for; the rest is skipped unread. (Not tracked by the
    garbage collector: what JSON decodes to holds no reference cycle.)"""

    choices: list[_RunChoice] = []
    usage: object = None
    error: object = None


_RUN_CHUNK = msgspec.json.Decoder(_RunChunk)
_SEPARATOR = b"\n\ndata: "


class StreamCheck:
    """What an OpenAI chat stream must be before it is relayed as complete: every event a JSON
    object, and a `finish_reason` (or `data: [DONE]`) before it ends, so that a stream cut
    short ends with an error event instead of looking finished."""

    __slots__ = ("_choices", "_finished", "_unindexed", "finished", "provider")

    def __init__(self, provider: str, choices: int = 1) -> None:
        """`choices`: how many the answer has (`n`, for each prompt of a completion): each
        must finish before a close without `[DONE]` counts as the end."""
        self.provider = provider
        self.finished = False
        self._choices = choices
        self._finished: set[int] = set()  # the indexes that finished
        self._unindexed = 0  # finishes of choices without an integer index

    def _finish(self, choice: _RunChoice) -> bool:
        """A choice finished; whether every one has. With one choice, any finish ends the
        answer. With more, each `index` from 0 to `choices` - 1 counts once (a finish repeated
        for one choice, or for an index the answer has not, does not end it); a choice without
        an integer index cannot be told from another, so each of its finishes counts."""
        if self._choices == 1:
            self.finished = True
            return True
        index = choice.index
        if type(index) is int:
            if 0 <= index < self._choices:
                self._finished.add(index)
        else:
            self._unindexed += 1
        self.finished = len(self._finished) + self._unindexed >= self._choices
        return self.finished

    def see(self, data: bytes) -> bool:
        """Check one event; False for a blank one (a keep-alive, not for the client).

        Raises:
            UpstreamError: the event is not a JSON object.
        """
        if not data or data.isspace():
            return False
        try:
            chunk = _RUN_CHUNK.decode(data)
        except msgspec.ValidationError:
            chunk = None  # a JSON object maybe, but not chunk-shaped: checked, not finished
            self._check(data)
        except (msgspec.MsgspecError, RecursionError):
            self._refuse()
        if chunk is not None and not self.finished:
            for choice in chunk.choices:
                if choice.finish_reason and self._finish(choice):
                    break
        return True

    def _check(self, data: bytes) -> None:
        try:
            _EVENT.decode(data)
        except (msgspec.MsgspecError, RecursionError):
            self._refuse()

    def _refuse(self) -> NoReturn:
        raise UpstreamError(
            f"The upstream provider '{self.provider}' sent a stream event that is not "
            "a JSON object."
        ) from None

    def see_run(self, events: bytes) -> tuple[int, int]:
        """Check a run of SSE events (from `data: ` to a blank line) at once, for
        relaying its plain chunks as they are, each one `data:` line holding one JSON object
        with no usage and no error: how many of them lead the run and where they end
        (`(0, 0)` when none does; the caller splits the rest and looks at each event with
        `see`, which refuses what is not a JSON object). An upstream sends its usage chunk
        last, often in the read of its last chunks: those still pass.

        Each event is decoded on its own, into a struct of what is looked at (the rest is
        checked and skipped unread): one JSON object per event is then what the client's SSE
        parser will read, which no decode of the events joined together can prove (an event
        that opens an array the next one closes is valid JSON joined). A line break other than the
        separators (a comment, a second data line, an object over several lines) or a CR
        makes the run not plain: JSON would read through what an SSE client splits.
        """
        body = events[6:-2]
        # `find`, not `in`: on bytes, `in` first tries its operand as an integer (a TypeError
        # made and dropped, about 2,000 instructions on Python 3.11).
        if body.find(b"\r") >= 0:
            return 0, 0
        if body.find(b"\n") < 0:  # one event of one line: a read of a streaming answer, mostly
            return self._see_one(body, len(events))
        datas = body.split(_SEPARATOR)
        # No line break but the separators': none in any data (`count` on the run would look
        # at each byte in a Python-level loop, about 27,000 instructions for 6 KB; a join and
        # a memchr about a tenth of that).
        if b"".join(datas).find(b"\n") >= 0:
            return 0, 0
        finished = self.finished
        plain = 0
        for data in datas:
            try:
                chunk = _RUN_CHUNK.decode(data)
            except (msgspec.MsgspecError, RecursionError):
                break
            if chunk.usage is not None or chunk.error is not None:
                break
            if not finished:
                for choice in chunk.choices:
                    if choice.finish_reason and self._finish(choice):
                        finished = True
                        break
            plain += 1
        if plain == len(datas):
            return plain, len(events)
        # Each event is its data and 8 bytes: "data: " and the blank line.
        return plain, sum([len(data) for data in datas[:plain]]) + 8 * plain

    def _see_one(self, body: bytes, size: int) -> tuple[int, int]:
        """`see_run` for a run of one event, without the split and the loop."""
        try:
            chunk = _RUN_CHUNK.decode(body)
        except (msgspec.MsgspecError, RecursionError):
            return 0, 0
        if chunk.usage is not None or chunk.error is not None:
            return 0, 0
        if not self.finished:
            for choice in chunk.choices:
                if choice.finish_reason and self._finish(choice):
                    break
        return 1, size

    def end(self) -> None:
        """The upstream closed the stream without `[DONE]`.

        Raises:
            UpstreamConnectionError: a choice had not finished: the answer was cut short.
        """
        if not self.finished:
            raise UpstreamConnectionError(
                f"The upstream provider '{self.provider}' ended the stream before the answer "
                "was complete (no finish_reason and no [DONE])."
            )
