"""The upstream key an upstream quotes back, found and replaced in what reaches the client.

An upstream (or a proxy before it) that echoes the key it was sent would hand the gateway's
credential to every client. What it relays is mostly JSON, and JSON may spell any character
as `\\uXXXX` (either case of hex digit) and `/` as `\\/` (PHP's `json_encode` does), so the key
is searched for as it is and, where the text has such escapes at all, with any of its
characters escaped (the client's JSON parser would read either back as the key).

The common case costs a `find` for the key and one for `\\u` per answer or event: the
escape-aware search (a regular expression) only runs on text that has an escape the key could
be written with. Keys shorter than `MIN_SECRET_CHARS` are placeholders for keyless servers
("EMPTY", "ollama"), not secrets: replacing such a word wherever an answer says it would
corrupt the answer.

A key split across reads of a stream is whole again by the time an event is searched: a read
is only relayed without being split into events when it is whole events (`_sse.passes`).

A key cut into pieces over several events, which the client joins (content deltas), is caught
by `StreamRedactor`: an event is searched for the key's first `START_CHARS` characters
followed, within the key's length, by a `"` that ends a JSON string after a piece of the key
(a `find` for the start, and two more where it occurs: "ask" or "task" in a text with an
`sk-...` key is not a piece of it), and only an event that holds one (or an
escape) is decoded, to see whether one of its strings ends with the start of the key. Only
then is the event held back, with the following ones, until the key is complete (the pieces
are rewritten: `[redacted]` where it began, empty strings after) or is not (they go out as
they came). A stream whose events never hold the key's start costs what it did.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

__all__ = [
    "MIN_SECRET_CHARS",
    "REDACTED",
    "START_CHARS",
    "Secret",
    "StreamRedactor",
    "clean",
    "redact",
]

MIN_SECRET_CHARS = 16
REDACTED = b"[redacted]"
_REDACTED_TEXT = REDACTED.decode()
# The fewest characters of the key an event's text must end with to be held back: a piece
# shorter than this at the key's start is not caught (see `StreamRedactor`).
START_CHARS = 2
# Events held back at most while a key is being completed (a key's pieces and events between),
# and their bytes: past either, they go out as they came (a key's pieces are small events).
MAX_HELD = 256
MAX_HELD_BYTES = 1024 * 1024

# JSON's two-character escapes of characters a key could hold (header values are printable).
_SHORT = {'"': b'\\\\"', "\\": b"\\\\\\\\", "/": b"\\\\/"}


def _hex(code: int) -> bytes:
    return b"".join(
        b"[%b%b]" % (d.encode(), d.upper().encode()) if d.isalpha() else d.encode()
        for d in f"{code:04x}"
    )


def _char(c: str) -> bytes:
    alternatives = [re.escape(c.encode()), b"\\\\u" + _hex(ord(c))]
    if c in _SHORT:
        alternatives.append(_SHORT[c])
    return b"(?:%b)" % b"|".join(alternatives)


class Secret:
    """One upstream key, as it is and as a pattern for it with any character JSON-escaped."""

    __slots__ = ("escapes", "key", "pattern", "raw", "start")

    def __init__(self, key: str) -> None:
        self.key = key
        self.raw = key.encode()
        self.start = self.raw[:START_CHARS]
        self.pattern = re.compile(b"".join(_char(c) for c in key))
        # What text must hold for the key to be in it escaped (else the pattern never runs).
        self.escapes = (b"\\u", *(b"\\" + c.encode() for c in key if c in _SHORT))

    def absent(self, data: bytes) -> bool:
        """Whether `data` can be relayed as it is: neither the key, nor a JSON string that
        ends with the key's first `START_CHARS` or more characters (a piece another event
        completes), nor an escape it could be spelled with is in it."""
        start = self.start
        at = data.find(start)
        if at < 0:
            return self.unescaped(data)  # the common case: two `find`s
        raw = self.raw
        size = len(raw)
        while at >= 0:
            # The key whole, or a piece of it that a `"` ends: the first `"` after the start
            # is the one (a key with a `"` in it is spelled with `\"`, an escape).
            end = data.find(b'"', at + START_CHARS, at + size)
            if end >= 0:
                if data[at:end] == raw[: end - at]:
                    return False
            elif data[at : at + size] == raw:
                return False
            at = data.find(start, at + 1)
        return self.unescaped(data)

    def unescaped(self, data: bytes) -> bool:
        """Whether `data` holds no escape the key could be spelled with."""
        if data.find(b"\\") < 0:
            # No backslash, so no escape: one `memchr` (a search for two bytes, as `\\u`,
            # steps through the text a few bytes at a time: 5 us over a 6 KB read here).
            return True
        for escape in self.escapes:  # noqa: SIM110 (a loop, not a generator: once a read)
            if data.find(escape) >= 0:
                return False
        return True

    @classmethod
    def of(cls, key: str | None) -> Secret | None:
        return cls(key) if key is not None and len(key) >= MIN_SECRET_CHARS else None


def redact(data: bytes, secret: Secret | None) -> bytes:
    """`data` with the key, in any spelling JSON reads back as the key, as `[redacted]`."""
    # (`find` for `in`: see `_sse`)
    if secret is None:
        return data
    if data.find(secret.raw) >= 0:
        data = data.replace(secret.raw, REDACTED)
    if not secret.unescaped(data):
        return secret.pattern.sub(REDACTED, data)
    return data


def clean(batch: list[bytes], secret: Secret) -> bool:
    """Whether no payload of `batch` holds the key, a piece of it that ends a string, or an
    escape: nothing to redact, nothing to hold back (a stream's common case: no
    `StreamRedactor` is made for it)."""
    for payload in batch:  # noqa: SIM110 (a loop, not a generator: once a read)
        if not secret.absent(payload):
            return False
    return True


_Path = tuple[str | int, ...]


def _strings(value: Any, path: _Path = ()) -> list[tuple[_Path, str]]:
    """Every string in a decoded JSON value, with its path."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _strings(v, (*path, k))]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in _strings(v, (*path, i))]
    return []


def _at(value: Any, path: _Path) -> Any:
    for step in path:
        if isinstance(step, int):
            if not isinstance(value, list) or step >= len(value):
                return None
        elif not isinstance(value, dict):
            return None
        value = value.get(step) if isinstance(step, str) else value[step]
    return value


def _put(value: Any, path: _Path, text: str) -> None:
    for step in path[:-1]:
        value = value[step]
    value[path[-1]] = text


class StreamRedactor:
    """One stream's events with the key redacted in each (`redact`) and across events.

    An event one of whose strings ends with the key's first `START_CHARS` or more characters
    is held back, with the events after it, while the string at the same place in each (a
    choice's content, a block's text: what a client joins) goes on with the key. Complete,
    the pieces are rewritten: the first ends in `[redacted]`, the others lose their piece.
    Broken off (another string, an event that is no JSON), everything held goes out as it
    came. Events without a string at that place (a ping, a finish) are held meanwhile, at
    most `MAX_HELD` events and `MAX_HELD_BYTES` in all (past either, what is held goes out as
    it came); the stream's end lets out what is held (`flush`).
    """

    __slots__ = ("first", "held", "matched", "path", "secret", "size")

    def __init__(self, secret: Secret) -> None:
        self.secret = secret
        # The events held back: each payload, and its decoded JSON when it is a piece.
        self.held: list[tuple[bytes, Any]] = []
        self.path: _Path = ()
        self.matched = 0  # characters of the key the held pieces spell
        self.first = 0  # of them, those the first piece ends with
        self.size = 0  # bytes held

    def batch(self, batch: list[bytes]) -> list[bytes]:
        """What of `batch` goes out now (`batch` itself, in the common case)."""
        secret = self.secret
        out: list[bytes] | None = None
        for i, payload in enumerate(batch):
            if not self.held and secret.absent(payload):
                if out is not None:
                    out.append(payload)
                continue
            if out is None:
                out = batch[:i]
            out.extend(self._see(redact(payload, secret)))
        return batch if out is None else out

    def flush(self) -> list[bytes]:
        """Everything held, as it came (the stream ended)."""
        out = [payload for payload, _ in self.held]
        self.held, self.size = [], 0
        return out

    def _hold(self, payload: bytes, value: Any) -> list[bytes]:
        self.held.append((payload, value))
        self.size += len(payload)
        if len(self.held) > MAX_HELD or self.size > MAX_HELD_BYTES:
            return self.flush()
        return []

    def _see(self, payload: bytes) -> list[bytes]:
        try:
            value = msgspec.json.decode(payload)
        except (msgspec.MsgspecError, RecursionError):
            return [*self.flush(), payload]
        if not self.held:
            return self._begin(payload, value)
        text = _at(value, self.path)
        key = self.secret.key
        rest = key[self.matched :]
        if not isinstance(text, str) or not text:
            return self._hold(payload, None)
        if rest.startswith(text) and text != rest:
            self.matched += len(text)
            return self._hold(payload, value)
        if text.startswith(rest):
            return self._complete(value, text[len(rest) :])
        return [*self.flush(), *self._begin(payload, value)]

    def _begin(self, payload: bytes, value: Any) -> list[bytes]:
        key = self.secret.key
        for path, text in _strings(value):
            for size in range(min(len(text), len(key) - 1), START_CHARS - 1, -1):
                if text.endswith(key[:size]):
                    self.path, self.matched, self.first = path, size, size
                    return self._hold(payload, value)
        return [payload]

    def _complete(self, last: Any, remainder: str) -> list[bytes]:
        out: list[bytes] = []
        for i, (payload, value) in enumerate(self.held):
            if value is None:
                out.append(payload)
                continue
            if i == 0:  # (always a piece: the one that began the key)
                text = _at(value, self.path)
                _put(value, self.path, text[: len(text) - self.first] + _REDACTED_TEXT)
            else:
                _put(value, self.path, "")
            out.append(msgspec.json.encode(value))
        _put(last, self.path, remainder)
        self.held, self.size = [], 0
        return [*out, *self._begin(msgspec.json.encode(last), last)]
