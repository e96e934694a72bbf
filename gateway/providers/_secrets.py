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
they came). The pieces are followed in the text a client joins them into (`_strings`: a
choice by its `index`, a Gemini candidate's parts, an Anthropic block's start and deltas),
each text on its own. A stream whose events never hold the key's start costs what it did.
"""

from __future__ import annotations

import re
from decimal import Decimal
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
# Texts followed at once in the middle of the key (a stream's choices, blocks, parts): past
# it, a start in another text is not (what each costs, held, is bounded by these).
MAX_OPEN = 256

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

    __slots__ = ("ends", "escapes", "key", "pattern", "raw", "start")

    def __init__(self, key: str) -> None:
        self.key = key
        self.raw = key.encode()
        self.start = self.raw[:START_CHARS]
        self.pattern = re.compile(b"".join(_char(c) for c in key))
        # What text must hold for the key to be in it escaped (else the pattern never runs).
        self.escapes = (b"\\u", *(b"\\" + c.encode() for c in key if c in _SHORT))
        # The key's starts a string can end with, by their last character (longest first): a
        # string is only compared with those its own last character could end.
        ends: dict[str, list[int]] = {}
        for size in range(len(key) - 1, START_CHARS - 1, -1):
            ends.setdefault(key[size - 1], []).append(size)
        self.ends = {c: tuple(sizes) for c, sizes in ends.items()}

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
_Channel = tuple[Any, ...]

# The Responses API's events say which text their `delta` goes on with by these top-level
# fields: the output item, its content part, its reasoning summary.
_PLACES = ("output_index", "content_index", "summary_index")
# Anthropic's block events: a block's text begins in `content_block_start` and goes on in the
# `delta`s of `content_block_delta`; a client joins the text blocks of a message too (a chat
# translation into one `content`), so the block's `index` is no part of the text's place.
_BLOCK_EVENTS = ("content_block_start", "content_block_delta")

# How deep in an event a string is followed: text a client joins is at most a few levels down
# (a tool call's arguments: `choices[0].delta.tool_calls[0].function.arguments`); deeper
# strings (a nested tool input, or a hostile event thousands of levels deep) are not, and the
# walk's cost stays linear in the event's size.
MAX_DEPTH = 16

# Numbers as they were written (a float out of range, `1e400`, is no failure to decode: the
# client's JSON parser reads it), and written again the same way in an event that is rewritten.
_DECODER = msgspec.json.Decoder(float_hook=Decimal)
_ENCODER = msgspec.json.Encoder(decimal_format="number")


def _strings(value: Any) -> list[tuple[_Path, _Channel, str]]:
    """Every string in a decoded event down to `MAX_DEPTH`, in the order of its text, with its
    path and the text a client joins it to (its channel), the same for every string joined:

    - an element of a list by its `index` (a choice, a candidate, a tool call: clients join
      them by index, whatever their place in the list; no index reads as 0, as Gemini's
      default and a client's `choices[0]` do), a Gemini thought part apart from the others
      (it is `reasoning_content` to a chat client), the parts of a candidate as one text;
    - Anthropic's block start and deltas as one text (`_BLOCK_EVENTS`);
    - a Responses API event's `delta` under its output item, content part and summary.

    Not recursive: no depth of JSON can make it raise. A top-level string (an event that is a
    JSON string, no chunk) has no place to rewrite: left out."""
    top: list[Any] = []
    if isinstance(value, dict):
        kind = value.get("type")
        if type(kind) is str and kind.startswith("response."):
            top.extend(("@", f, value[f]) for f in _PLACES if type(value.get(f)) is int)
    found: list[tuple[_Path, _Channel, str]] = []
    stack: list[tuple[Any, _Path, _Channel]] = [(value, (), tuple(top))]
    while stack:
        node, path, channel = stack.pop()
        if isinstance(node, str):
            if path:
                found.append((path, channel, node))
        elif len(path) >= MAX_DEPTH:
            continue
        elif isinstance(node, dict):
            block = not path and node.get("type") in _BLOCK_EVENTS
            for k, v in reversed(node.items()):
                step = "block" if block and k in ("content_block", "delta") else k
                stack.append((v, (*path, k), (*channel, step)))
        elif isinstance(node, list):
            for i in range(len(node) - 1, -1, -1):
                v = node[i]
                at: Any = "*"
                if isinstance(v, dict):
                    place = v.get("index")
                    at = ("#", place if type(place) is int else 0, v.get("thought") is True)
                stack.append((v, (*path, i), (*channel, at)))
    return found


def _put(value: Any, path: _Path, text: str) -> None:
    for step in path[:-1]:
        value = value[step]
    value[path[-1]] = text


def _get(value: Any, path: _Path) -> Any:
    for step in path:
        value = value[step]
    return value


class _Held:
    """An event held back: its bytes as they came, its decoded JSON, and whether a key's
    pieces in it were rewritten (it then goes out encoded again)."""

    __slots__ = ("changed", "payload", "value")

    def __init__(self, payload: bytes, value: Any) -> None:
        self.payload = payload
        self.value = value
        self.changed = False

    def out(self) -> bytes:
        return _ENCODER.encode(self.value) if self.changed else self.payload


class _Text:
    """A text (a channel) in the middle of the key: its strings since the first piece of the
    earliest start still followed (event, path), and each start followed (the index of its
    first piece in `strings`, the key's characters that piece ends with, the characters the
    pieces spell so far). Several starts at once: a key whose start recurs in it (`sk-..sk..`)
    may begin at either."""

    __slots__ = ("starts", "strings")

    def __init__(self) -> None:
        self.strings: list[tuple[_Held, _Path]] = []
        self.starts: list[tuple[int, int, int]] = []


class StreamRedactor:
    """One stream's events with the key redacted in each (`redact`) and across events.

    An event one of whose strings ends with the key's first `START_CHARS` or more characters
    is held back, with the events after it, while the strings a client joins to that one (its
    text: `_strings`), in this event and the next, go on with the key. Each text is followed
    on its own, every start of the key in it, so a string like the key's start in another
    text (a decoy in a second choice) hides nothing. Complete, the pieces are rewritten: the
    first ends in `[redacted]`, the others lose their piece. Broken off (another string
    there), the pieces are left as they came. Events go out, in order, as soon as no text
    still followed has a piece in them or before them. An event that is no JSON lets out what
    is held. Held back are at most `MAX_HELD` events and `MAX_HELD_BYTES` in all (past
    either, what is held goes out, keys completed in it rewritten, and nothing is followed);
    the stream's end lets out what is held (`flush`).
    """

    __slots__ = ("held", "open", "secret", "size")

    def __init__(self, secret: Secret) -> None:
        self.secret = secret
        self.held: list[_Held] = []  # the events held back, in order
        self.open: dict[_Channel, _Text] = {}  # texts in the middle of the key
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
        """Everything held (the stream ended): keys completed in it rewritten, the rest as it
        came."""
        out = [event.out() for event in self.held]
        self.held, self.open, self.size = [], {}, 0
        return out

    def _see(self, payload: bytes) -> list[bytes]:
        try:
            value = _DECODER.decode(payload)
        except (msgspec.MsgspecError, RecursionError):
            return [*self.flush(), payload]
        event = _Held(payload, value)
        for path, channel, text in _strings(value):
            if text:
                self._follow(event, path, channel, text)
        if not self.held and not self.open:
            return [event.out()]
        self.held.append(event)
        self.size += len(payload)
        if len(self.held) > MAX_HELD or self.size > MAX_HELD_BYTES:
            return self.flush()
        return self._release()

    def _follow(self, event: _Held, path: _Path, channel: _Channel, text: str) -> None:
        """One string of `channel`: it goes on with the starts followed there, completes one
        (the pieces are rewritten), or breaks them off; and the key may start at its end."""
        key = self.secret.key
        opened = self.open
        followed = opened.get(channel)
        if followed is not None:
            going_on: list[tuple[int, int, int]] = []
            for start, first, matched in followed.starts:
                rest = key[matched:]
                if rest.startswith(text) and text != rest:
                    going_on.append((start, first, matched + len(text)))
                elif text.startswith(rest):
                    _rewrite([*followed.strings[start:], (event, path)], first, len(rest))
                    del opened[channel]
                    followed = None
                    text = _get(event.value, path)  # what follows the key: another may start
                    break
            if followed is not None:
                followed.strings.append((event, path))
                followed.starts = going_on
        sizes = _starts(text, self.secret)
        if sizes and (followed is not None or len(opened) < MAX_OPEN):
            if followed is None:
                followed = opened[channel] = _Text()
                followed.strings.append((event, path))
            at = len(followed.strings) - 1
            followed.starts.extend((at, size, size) for size in sizes)
        if followed is not None:
            if not followed.starts:
                del opened[channel]
            else:
                earliest = min(start for start, _, _ in followed.starts)
                if earliest:  # strings before every start followed: no longer needed
                    del followed.strings[:earliest]
                    followed.starts = [(s - earliest, f, m) for s, f, m in followed.starts]

    def _release(self) -> list[bytes]:
        """The events held before the first piece of any text still followed, in order."""
        needed = {id(text.strings[0][0]) for text in self.open.values()}
        held = self.held
        n = 0
        while n < len(held) and id(held[n]) not in needed:
            n += 1
        if not n:
            return []
        out = [event.out() for event in held[:n]]
        self.size -= sum(len(event.payload) for event in held[:n])
        del held[:n]
        return out


def _rewrite(pieces: list[tuple[_Held, _Path]], first: int, last: int) -> None:
    """A key completed over `pieces`: the first ends in `[redacted]` instead of the key's
    `first` characters, the last loses its `last` first ones, those between are emptied."""
    for i, (event, path) in enumerate(pieces):
        text = _get(event.value, path)
        if i == 0:
            text = text[: len(text) - first] + _REDACTED_TEXT
        elif i == len(pieces) - 1:
            text = text[last:]
        else:
            text = ""
        _put(event.value, path, text)
        event.changed = True


def _starts(text: str, secret: Secret) -> list[int]:
    """Each number of the key's first characters `text` ends with (`START_CHARS` or more, not
    all of them: the whole key is redacted as it is), longest first."""
    sizes = secret.ends.get(text[-1]) if text else None
    if sizes is None:
        return []
    key = secret.key
    return [size for size in sizes if size <= len(text) and text.endswith(key[:size])]
