"""Server-sent events from an upstream: bytes in, the `data` of each complete event out.

One linear pass over what arrives, however the upstream splits it: each read is appended once,
the search for the end of an event resumes where the last one stopped, and a read is split
into its events by one C call. What carries no data (blank lines, comments, lone `event:` or
`id:` lines) costs no Python work per event where it can be skipped in C, so an upstream
cannot spend one byte to make the gateway spend a microsecond. An event larger than
`max_event_bytes` (its lines, without the blank line that ends it) raises `EventTooLarge`,
however it arrives: one that grows past it before it
ends (so a hostile upstream cannot make the gateway buffer an endless line), and one that
comes whole in a single read (aiohttp's `readany()` hands over all it holds at once). Only a
read longer than the limit can hold such an event, so only such a read has its events
measured. CR, LF and CRLF line ends are all accepted (a CR that ends one read may be the
first half of a CRLF split across reads, so it waits for the next one).

As the SSE standard says, a stream is UTF-8 text with invalid bytes read as U+FFFD, and an
event whose data is empty is not dispatched: what comes out is valid UTF-8, never empty.

On the stream path, `data.find(sub) >= 0` stands for `sub in data`: on Python 3.11, `in` on
bytes first tries its operand as an integer, and makes and drops a TypeError (about 2,000
instructions) before it searches.
"""

from __future__ import annotations

__all__ = [
    "DONE_EVENT",
    "EventTooLarge",
    "FrameDecoder",
    "Framed",
    "Last",
    "SSEDecoder",
    "data_event",
    "utf8",
]

from typing import Protocol


class EventTooLarge(Exception):
    """One upstream event exceeds the provider's `max_event_bytes`."""


DONE_EVENT = b"data: [DONE]\n\n"


class Framed(list[bytes]):
    """A batch of whole SSE events, already framed: runs of events as the upstream sent them,
    relayed as they are once checked (`StreamCheck.see_run`), not split and framed again.
    The upstream client yields one run (a read); what a provider relays may be that run's
    plain head followed by its other events framed again (`data_event`)."""

    __slots__ = ()

    def payloads(self) -> list[bytes]:
        """Its events' payloads, as `SSEDecoder` reads them (for a run that cannot pass)."""
        run = self[0] if len(self) == 1 else b"".join(self)
        return SSEDecoder(len(run)).feed(run)


class Last(Framed):
    """The last `Framed` batch of a stream (the upstream's `[DONE]` came with it), so the
    client's response can end in the same write as these events."""

    __slots__ = ()


def data_event(payload: bytes) -> bytes:
    """`payload` as one SSE event (a `data:` field per line of a multi-line payload)."""
    if payload.find(b"\n") >= 0:
        payload = payload.replace(b"\n", b"\ndata: ")
    return b"data: %b\n\n" % payload


class FrameDecoder(Protocol):
    """Splits an upstream stream into event payloads (SSE for every provider so far)."""

    def feed(self, piece: bytes) -> list[bytes]:
        """The payloads of the events `piece` completes (often none, often several).

        Raises:
            EventTooLarge: an event it completes, or the one being read, is over the limit.
        """
        ...

    def end(self) -> list[bytes]:
        """The payload of an event left unterminated when the stream ended, if any."""
        ...

    @property
    def held(self) -> int:
        """Bytes held of an event that has not ended yet."""
        ...

    def passes(self, piece: bytes) -> bool:
        """Whether `piece` may be whole `data:` events that could be relayed as they are:
        nothing is held before it, it starts a data line and ends an event, and it is no
        longer than the limit (so none of its events can be over it)."""
        ...

    def clear(self) -> None:
        """Drop what is held: the stream is over."""
        ...


def utf8(data: bytes) -> bytes:
    """`data` as valid UTF-8: invalid bytes become U+FFFD (as the SSE standard decodes)."""
    if data.isascii():
        return data
    try:
        data.decode()
    except UnicodeDecodeError:
        return data.decode(errors="replace").encode()
    return data


class SSEDecoder:
    """The `data` of each SSE event; comments (`: ping`), `event:`, `id:` and `retry:` are
    skipped, and several `data:` lines of one event are joined with newlines."""

    __slots__ = ("_buf", "_limit", "_scan", "_tail")

    def __init__(self, max_event_bytes: int) -> None:
        self._limit = max_event_bytes
        self._buf = bytearray()  # the unfinished event, line ends already normalised
        self._scan = 0  # where the search for "\n\n" resumes in _buf
        # Line ends held back from the last read: a CR (maybe half a CRLF), or the LF that
        # ends an event at the limit (maybe half its blank line: `_hold`).
        self._tail = b""

    def feed(self, piece: bytes) -> list[bytes]:
        if self._tail:
            piece = self._tail + piece
            self._tail = b""
        if piece.find(b"\r") >= 0:
            if piece.endswith(b"\r"):
                piece = piece[:-1]
                self._tail = b"\r"
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf
        if buf:
            buf += piece
            if buf.find(b"\n\n", self._scan) < 0:
                self._hold()
                return []
            data = bytes(buf)  # the event is complete: copied once, then split
            buf.clear()
        else:
            data = piece  # the common case: parse the read itself
        events = data.split(b"\n\n")
        rest = events.pop()
        if len(data) > self._limit and max(map(len, events), default=0) > self._limit:
            raise EventTooLarge(f"an event is larger than {self._limit} bytes")
        if rest:
            buf += rest
        self._hold()
        first = data.find(b"data:")
        if not events or first < 0:
            return []  # e.g. a run of blank lines or pings: nothing to dispatch
        if first:  # the events before the first data line (a flood of pings) are skipped in C
            events = events[data.count(b"\n\n", 0, first) :]
        return _payloads(events, data.isascii())

    @property
    def held(self) -> int:
        return len(self._buf)

    def passes(self, piece: bytes) -> bool:
        return (
            not self._buf
            and not self._tail
            and len(piece) <= self._limit
            and piece[:6] == b"data: "
            and piece[-2:] == b"\n\n"
        )

    def clear(self) -> None:
        self._buf.clear()
        self._tail = b""

    def _hold(self) -> None:
        """Check the unfinished event against the limit; resume its search at its end.

        An event's size is that of its lines, without the blank line that ends it (as a whole
        read measures it). The line end an unfinished event at the limit ends with may be the
        first half of that blank line (a read may end between the two): it is held back with
        `_tail`, not in the buffer, so an event at the limit passes however it is split, and
        what is held (`held`, counted against `max_buffered_bytes`) is never over the limit."""
        buf = self._buf
        held = len(buf)
        if held > self._limit:
            if held > self._limit + 1 or buf[-1] != 0x0A:
                raise EventTooLarge(f"an event is larger than {self._limit} bytes")
            del buf[-1]
            self._tail = b"\n" + self._tail
            held -= 1
        # A "\n" at the very end may be the first half of the next event's separator.
        self._scan = max(0, held - 1)

    def end(self) -> list[bytes]:
        tail = bytes(self._buf).strip()
        self._buf.clear()
        return _payloads([tail], tail.isascii()) if b"data:" in tail else []


def _payloads(events: list[bytes], ascii_only: bool) -> list[bytes]:
    out: list[bytes] = []
    for event in filter(None, events):  # empty: a run of blank lines, skipped in C
        if event.find(b"\n") >= 0:
            payload = _event_data(event)
        elif event.startswith(b"data: "):
            payload = event[6:]  # the common case: one data line
        elif event.startswith(b"data:"):
            payload = event[5:]
        else:
            continue  # a comment or another field alone: no event
        if payload:
            out.append(payload if ascii_only else utf8(payload))
    return out


def _event_data(event: bytes) -> bytes:
    lines = [
        line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(lines)
