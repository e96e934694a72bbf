"""Server-sent events from an upstream: bytes in, the `data` of each complete event out.

One linear pass over what arrives, however the upstream splits it: each read is appended once,
the search for the end of an event resumes where the last one stopped, and consumed bytes are
dropped from the front of the buffer (amortised O(1) for a `bytearray`). An event that grows
past `max_event_bytes` before it ends raises `EventTooLarge`, so a hostile upstream cannot make
the gateway buffer an endless line. CR, LF and CRLF line ends are all accepted (a CR that ends
one read may be the first half of a CRLF split across reads, so it waits for the next one).
"""

from __future__ import annotations

__all__ = ["EventTooLarge", "FrameDecoder", "SSEDecoder"]

from typing import Protocol


class EventTooLarge(Exception):
    """One upstream event exceeds the provider's `max_event_bytes`."""


class FrameDecoder(Protocol):
    """Splits an upstream stream into event payloads (SSE for every provider so far)."""

    def feed(self, piece: bytes) -> list[bytes]:
        """The payloads of the events `piece` completes (often none, often several).

        Raises:
            EventTooLarge: the event being read grew past the limit.
        """
        ...

    def end(self) -> list[bytes]:
        """The payload of an event left unterminated when the stream ended, if any."""
        ...


class SSEDecoder:
    """The `data` of each SSE event; comments (`: ping`), `event:`, `id:` and `retry:` are
    skipped, and several `data:` lines of one event are joined with newlines."""

    __slots__ = ("_buf", "_cr", "_limit", "_scan")

    def __init__(self, max_event_bytes: int) -> None:
        self._limit = max_event_bytes
        self._buf = bytearray()  # the unfinished event(s), line ends already normalised
        self._scan = 0  # where the search for "\n\n" resumes in _buf
        self._cr = False  # the last read ended with a CR, held back

    def feed(self, piece: bytes) -> list[bytes]:
        if self._cr:
            piece = b"\r" + piece
            self._cr = False
        if b"\r" in piece:
            if piece.endswith(b"\r"):
                piece = piece[:-1]
                self._cr = True
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf
        if buf:
            buf += piece
            data: bytes | bytearray = buf
            scan = self._scan
        else:
            data, scan = piece, 0  # the common case: parse the read itself, copy nothing
        out: list[bytes] = []
        start = 0
        while (end := data.find(b"\n\n", scan)) >= 0:
            payload = _event_data(bytes(data[start:end]))
            if payload is not None:
                out.append(payload)
            start = scan = end + 2
        rest = len(data) - start
        if rest > self._limit:
            raise EventTooLarge(f"an event is larger than {self._limit} bytes")
        if data is buf:
            del buf[:start]
        elif rest:
            buf += data[start:]
        # A "\n" at the very end may be the first half of the next event's separator.
        self._scan = max(0, len(buf) - 1)
        return out

    def end(self) -> list[bytes]:
        tail = bytes(self._buf).strip()
        self._buf.clear()
        if not tail:
            return []
        payload = _event_data(tail)
        return [payload] if payload is not None else []


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the common case: one data line
    lines = [
        line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None
