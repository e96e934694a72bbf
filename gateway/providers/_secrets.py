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
escape) is decoded, to see whether one of its text strings ends with the start of the key.
Only then is the event held back, with the following ones, until later text strings go on to
complete the key (the pieces are rewritten: `[redacted]` where it began, empty strings after)
or do not within `QUIET_EVENTS` events (they go out as they came). The pieces are looked for
in every text string that follows, whatever else comes between: a client joins its text from
some of them (a choice's deltas by index or by place, a candidate's parts, an Anthropic
message's blocks), and which ones differs from client to client; pieces of the key are
redacted wherever they spell it. A stream whose events never hold the key's start costs what
it did.
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
# Starts of the key followed at once (a string that ends like the key's start opens one), and
# the events each may wait for its next piece: one that does not go on within them is not the
# key being written out (a stream is held back by at most that many events for it).
MAX_OPEN = 32
QUIET_EVENTS = 16
# Text strings of one event looked at (a chunk has one for each choice, a few more with tool
# calls or parts): what a hostile event of many can cost is bounded (about 1 ms an event).
MAX_TEXTS = 128
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

# Where a client joins text from the strings of many events: a chat delta's `content`,
# `refusal`, reasoning (`reasoning_content`, `reasoning`) and a tool call's `arguments`, a
# completion's and a Gemini part's `text`, an Anthropic block's `text`, `thinking` and
# `partial_json`, a Responses API event's `delta`, an audio `transcript`, a logprob's `token`
# (a client with `logprobs` joins them too). Other strings (ids,
# names, roles, a filter's `severity`) are never joined: a key cut over them reaches no client
# whole, and one that merely ends like the key's start holds nothing back.
JOINED = frozenset(
    {
        "content",
        "refusal",
        "reasoning_content",
        "reasoning",
        "arguments",
        "text",
        "thinking",
        "partial_json",
        "delta",
        "transcript",
        "token",
    }
)

# How deep in an event a string is looked at: text a client joins is at most a few levels down
# (a tool call's arguments: `choices[0].delta.tool_calls[0].function.arguments`); deeper
# strings (a nested tool input, or a hostile event thousands of levels deep) are not, and the
# walk's cost stays linear in the event's size.
MAX_DEPTH = 16

# Numbers as they were written (a float out of range, `1e400`, is no failure to decode: the
# client's JSON parser reads it), and written again the same way in an event that is rewritten.
_DECODER = msgspec.json.Decoder(float_hook=Decimal)
_ENCODER = msgspec.json.Encoder(decimal_format="number")


# Top-level fields that say which text of an answer an event's string goes on (Anthropic's
# block, the Responses API's output item, content part and summary).
_PLACES = ("index", "output_index", "content_index", "summary_index")


def _texts(value: Any, most: int) -> list[tuple[_Path, Any, str]]:
    """The non-empty strings of a decoded event a client may join text from (`JOINED`), down
    to `MAX_DEPTH`, in the order of the event's text, each with its path and its place: the
    path with each object's `type` and each list element's own `index` and `thought` for its
    position (a choice, a candidate, a tool call by its index, a candidate's parts as one),
    under the event's type and top-level places (`_PLACES`), as they were sent. Strings at the
    same place in two events are the same text to any client: one that does not go on with a
    key there breaks it off. The first `most` only; not recursive: no depth of JSON can make
    it raise."""
    top: tuple[Any, ...] = ()
    if isinstance(value, dict):
        top = tuple(_hashable(value.get(f)) for f in ("type", *_PLACES))
    found: list[tuple[_Path, Any, str]] = []
    stack: list[tuple[Any, _Path, tuple[Any, ...]]] = [(value, (), top)]
    while stack and len(found) < most:
        node, path, place = stack.pop()
        if isinstance(node, dict):
            if len(path) < MAX_DEPTH:
                for k, v in reversed(node.items()):
                    if isinstance(v, str):
                        if v and k in JOINED:
                            stack.append((v, (*path, k), (*place, k)))
                    elif isinstance(v, dict):  # (with its type: a text delta's text is not
                        kind = _hashable(v.get("type"))  # an input_json_delta's)
                        stack.append((v, (*path, k), (*place, k, kind)))
                    else:
                        stack.append((v, (*path, k), (*place, k)))
        elif isinstance(node, list):
            if len(path) < MAX_DEPTH:
                for i in range(len(node) - 1, -1, -1):
                    v = node[i]
                    if isinstance(v, dict):  # (by its index, not its place in the list)
                        at = ("#", _hashable(v.get("index")), _hashable(v.get("thought")))
                        stack.append((v, (*path, i), (*place, at)))
                    elif not isinstance(v, str):  # (a list's strings: no text, no key)
                        stack.append((v, (*path, i), (*place, i)))
        elif isinstance(node, str) and path:  # (an event that is a string: nothing to edit)
            found.append((path, place, node))
    return found


def _hashable(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | Decimal) else repr(value)


def _get(value: Any, path: _Path) -> Any:
    for step in path:
        value = value[step]
    return value


def _put(value: Any, path: _Path, text: str) -> None:
    _get(value, path[:-1])[path[-1]] = text


class _Held:
    """An event held back: its bytes as they came, its decoded JSON, and the edits of the
    strings in it that hold pieces of a completed key (it then goes out encoded again)."""

    __slots__ = ("edits", "payload", "seq", "value")

    def __init__(self, payload: bytes, value: Any, seq: int) -> None:
        self.payload = payload
        self.value = value
        self.seq = seq
        # path -> [the string as it came, key characters cut from its head, from its tail]
        self.edits: dict[_Path, list[Any]] = {}

    def edit(self, path: _Path, head: int = 0, tail: int = 0) -> None:
        """Cut `head` characters of the key from the start of the string at `path` (all of
        them: it is a piece inside the key) or `tail` from its end (`[redacted]` instead)."""
        edit = self.edits.get(path)
        if edit is None:
            edit = self.edits[path] = [_get(self.value, path), 0, 0]
        edit[1], edit[2] = max(edit[1], head), max(edit[2], tail)
        text, head, tail = edit
        if head + tail >= len(text):
            new = _REDACTED_TEXT if tail else ""
        else:
            new = text[head : len(text) - tail] + (_REDACTED_TEXT if tail else "")
        _put(self.value, path, new)

    def out(self) -> bytes:
        return _ENCODER.encode(self.value) if self.edits else self.payload


class _Start:
    """A place the key may begin: the strings that spell it so far (the first ends with
    `first` characters of the key, each other one is key characters only), how many
    characters they spell, the event it last went on in, and the place of its last piece."""

    __slots__ = ("across", "first", "last", "matched", "pieces", "place")

    def __init__(
        self,
        pieces: tuple[tuple[_Held, _Path], ...],
        first: int,
        matched: int,
        last: int,
        place: Any,
        across: bool = False,
    ) -> None:
        self.pieces = pieces
        self.first = first
        self.matched = matched
        self.last = last
        self.place = place  # where its last piece is (`_texts`)
        self.across = across  # its pieces are at more than one place


class StreamRedactor:
    """One stream's events with the key redacted in each (`redact`) and across events.

    An event one of whose text strings (`JOINED`) ends with the key's first `START_CHARS` or
    more characters is held back, with the events after it, while later text strings go on
    with the key, whatever strings come between them (another choice's text, a thought, a
    decoy), every place the key may begin followed at once. Complete, the pieces are
    rewritten: the first ends in `[redacted]`, the others lose their piece. A start that goes
    on in none of the next `QUIET_EVENTS` events is dropped, and events go out, in order, as
    soon as no start followed has a piece in them or before them. An event that is no JSON
    lets out what is held. Held back are at most `MAX_HELD` events and `MAX_HELD_BYTES` in all
    (past either, what is held goes out, keys completed in it rewritten, and nothing is
    followed); the stream's end lets out what is held (`flush`).
    """

    __slots__ = ("held", "secret", "seq", "size", "starts")

    def __init__(self, secret: Secret) -> None:
        self.secret = secret
        self.held: list[_Held] = []  # the events held back, in order
        self.starts: list[_Start] = []  # places the key may begin, followed
        self.size = 0  # bytes held
        self.seq = 0  # events seen

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
        self.held, self.starts, self.size = [], [], 0
        return out

    def _see(self, payload: bytes) -> list[bytes]:
        try:
            value = _DECODER.decode(payload)
        except (msgspec.MsgspecError, RecursionError):
            return [*self.flush(), payload]
        self.seq += 1
        event = _Held(payload, value, self.seq)
        for path, place, text in _texts(value, MAX_TEXTS):
            self._follow(event, path, place, text)
        self.starts = [s for s in self.starts if self.seq - s.last < QUIET_EVENTS]
        if not self.held and not self.starts:
            return [event.out()]
        self.held.append(event)
        self.size += len(payload)
        if len(self.held) > MAX_HELD or self.size > MAX_HELD_BYTES:
            return self.flush()
        return self._release()

    def _follow(self, event: _Held, path: _Path, place: Any, text: str) -> None:
        """One text string: it goes on with starts followed, completes some (their pieces are
        rewritten), or breaks off those whose last piece is at its place (the same text to any
        client); a start elsewhere stays, for strings after it. The key may begin at its end."""
        key = self.secret.key
        going_on: list[_Start] = []
        done: list[_Start] = []
        kept: list[_Start] = []
        head = text[0]
        for start in self.starts:
            if key[start.matched] == head:  # (most strings: not even the next character)
                rest = key[start.matched :]
                if rest.startswith(text) and text != rest:
                    pieces = (*start.pieces, (event, path))
                    across = start.across or start.place != place
                    matched = start.matched + len(text)
                    going_on.append(_Start(pieces, start.first, matched, self.seq, place, across))
                    if start.place != place or start.last == self.seq:
                        kept.append(start)  # (another text may go on with it instead)
                    continue
                if text.startswith(rest):
                    done.append(start)
                    continue
            if start.place != place or start.last == self.seq:
                kept.append(start)  # (another text; or this event's: a second candidate of
                # the same index, which a translation drops, or a Gemini part after it)
        if any(start.place == place for start in done):
            # The key completed in its own text: starts elsewhere (its copy in a logprob's
            # tokens, another choice) wait for their own text to complete them.
            kept += [start for start in done if start.place != place]
            done = [start for start in done if start.place == place]
        self.starts = kept
        if done:
            for start in done:
                first, *middle = start.pieces
                first[0].edit(first[1], tail=start.first)
                for held, at in middle:
                    held.edit(at, head=len(key))  # (all of it: a piece inside the key)
                event.edit(path, head=len(key) - start.matched)
        elif going_on:
            # Two ways to the same characters from the same start, ending at the same place,
            # go on and complete alike: one is kept.
            seen = {(id(s.pieces[0]), s.matched, s.place) for s in self.starts}
            for start in going_on:
                way = (id(start.pieces[0]), start.matched, start.place)
                if way not in seen and self._room(start):
                    seen.add(way)
                    self.starts.append(start)
        for size in _starts(text if not done else _get(event.value, path), self.secret):
            start = _Start(((event, path),), size, size, self.seq, place)
            if self._room(start):
                self.starts.append(start)

    def _room(self, new: _Start) -> bool:
        """Whether `new` may be followed now: with `MAX_OPEN` followed, one makes room for it,
        the one that went on longest ago (of those, the one that spells the fewest), unless
        that one went on in this event and spells more. A start whose pieces are at more than
        one place (a client that joins across texts: rarer) makes room first, and takes none
        from one that is not. A key being written goes on every few events: a flood of strings
        ending like the key's start, or of pieces that stopped, keeps none from being followed."""
        starts = self.starts
        if len(starts) < MAX_OPEN:
            return True
        stalest = -1
        best: tuple[bool, int, int] | None = None
        for i, old in enumerate(starts):
            # (across first, unless `new` is across: then only among those)
            if new.across and not old.across:
                continue
            rank = (not old.across, old.last, old.matched)
            if best is None or rank < best:
                stalest, best = i, rank
        if stalest < 0:
            return False
        old = starts[stalest]
        if old.across == new.across and old.last == self.seq and old.matched > new.matched:
            return False
        del starts[stalest]
        return True

    def _release(self) -> list[bytes]:
        """The events held before the first piece of any start still followed, in order."""
        first = min((s.pieces[0][0].seq for s in self.starts), default=self.seq + 1)
        held = self.held
        n = 0
        while n < len(held) and held[n].seq < first:
            n += 1
        if not n:
            return []
        out = [event.out() for event in held[:n]]
        self.size -= sum(len(event.payload) for event in held[:n])
        del held[:n]
        return out


def _starts(text: str, secret: Secret) -> list[int]:
    """Each number of the key's first characters `text` ends with (`START_CHARS` or more, not
    all of them: the whole key is redacted as it is), longest first."""
    sizes = secret.ends.get(text[-1]) if text else None
    if sizes is None:
        return []
    key = secret.key
    return [size for size in sizes if size <= len(text) and text.endswith(key[:size])]
