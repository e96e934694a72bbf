"""The stream fast path of cut-key redaction (a7b4bcc): only the key, a JSON string that ends
with a piece of it, or an escape it could be spelled with leaves it.

Before a7b4bcc, any event (or read) holding the key's first START_CHARS bytes was decoded and
searched; since, only one where those bytes begin the key whole, or a piece of it that a `"`
ends. These tests check that nothing the old rule redacted or held back goes out as it came
now: the old rule is kept here (`OldSecret`) and run against the new one on the same events,
and streams with the key cut over events go through a gateway in every framing a read can
take. The cases at the end leaked before and after a7b4bcc: the redactor followed a string's
path, not the text a client joins (`_secrets._strings`)."""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from gateway.providers._secrets import (
    MAX_OPEN,
    MAX_TEXTS,
    START_CHARS,
    Secret,
    StreamRedactor,
    redact,
)
from gateway.providers._sse import SSEDecoder
from tests.conftest import NEVER_HANG
from tests.fake_azure import FILTER_RESULTS, prompt_filter_chunk
from tests.test_attack_hostile import cut, leaks, pieces_stream
from tests.test_attack_small import messages_text
from tests.test_attack_upstream import (
    ANTHROPIC_START,
    UPSTREAM_KEY,
    Answer,
    Build,
    anthropic_text,
    build,
    chunk,
    chunked,
    http,
    named_events,
    sends,
    sse,
    until_close,
    whole,
)
from tests.test_attack_wire import anthropic_message

__all__ = ["build"]  # the fixture, used by name


class OldSecret(Secret):
    """`Secret` with `absent` as it was before a7b4bcc: any occurrence of the key's first
    START_CHARS bytes (or an escape) leaves the fast path."""

    __slots__ = ()

    def absent(self, data: bytes) -> bool:
        if data.find(self.start) >= 0:
            return False
        return self.unescaped(data)


# Keys as a config may hold them (printable: `config._header_value` refuses control
# characters): the start repeated inside the key and overlapping itself, `/`, `"` and `\`
# (which JSON may or must escape), `_` and `-`, non-ASCII (a start that is half a character).
AWKWARD_KEYS = [
    UPSTREAM_KEY,
    "sksksk-sksk-0123456789abcdef",
    "aaaaaaaaaaaaaaaaaaaaaaaa",
    "abababababababababab-x",
    "sk-proj/0123_4567-89ab/cdef",
    'sk-"quoted"-0123456789ab',
    'a"a"a"a"a"a"a"a"a"a',
    "sk-back\\slash-0123456789",
    "sk_under_score-0123456789",
    "sk-\u00fcn\u00efcode-0123456789",
    "\u00e9\u00e9-0123456789abcdefghij",
    "\u20ac\u20ac-0123456789abcdefghij",
    's"k-0123456789abcdefgh',
    "AIzaSyA-0123456789_abcdefghijklmnop",
    "sk-ant-api03-aaaaaaaaaaaaaaaaaaa",
]


# --- JSON as an upstream may spell it ----------------------------------------------------------

_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _u(c: str, upper: bool) -> str:
    code = ord(c)
    if code > 0xFFFF:  # a surrogate pair
        code -= 0x10000
        return _u(chr(0xD800 + (code >> 10)), upper) + _u(chr(0xDC00 + (code & 0x3FF)), upper)
    text = f"\\u{code:04x}"
    return text.upper().replace("\\U", "\\u") if upper else text


def spell_string(text: str, rng: random.Random | None, escape: float = 0.0) -> str:
    """`text` as a JSON string: what must be escaped is (as `\\X` or `\\uXXXX`), anything
    else is with probability `escape` (`/` as `\\/` or `\\u002f`, others as `\\uXXXX`)."""
    out = []
    for c in text:
        must = c in _SHORT or ord(c) < 0x20
        if not must and (rng is None or rng.random() >= escape):
            out.append(c)
        elif c == "/" and rng is not None and rng.random() < 0.5:
            out.append("\\/")
        elif c in _SHORT and (rng is None or rng.random() < 0.5):
            out.append(_SHORT[c])
        else:
            out.append(_u(c, rng is not None and rng.random() < 0.5))
    return '"' + "".join(out) + '"'


def spell(value: Any, rng: random.Random, escape: float, space: str = "") -> str:
    """`value` as JSON, strings spelled by `spell_string`, `space` between tokens at random."""

    def ws() -> str:
        return rng.choice(["", "", space]) if space else ""

    if isinstance(value, str):
        return spell_string(value, rng, escape)
    if isinstance(value, dict):
        items = [
            f"{ws()}{spell_string(k, rng, escape)}{ws()}:{ws()}{spell(v, rng, escape, space)}{ws()}"
            for k, v in value.items()
        ]
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(ws() + spell(v, rng, escape, space) + ws() for v in value) + "]"
    return json.dumps(value)


def payload(value: Any, rng: random.Random, escape: float = 0.0, space: str = "") -> bytes:
    return spell(value, rng, escape, space).encode()


def delta(text: str) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }


def holds(data: bytes, key: str) -> bool:
    """Whether `data` holds `key` as it is, or JSON that a client reads with `key` in one of
    its strings (a name or a value)."""
    if data.find(key.encode()) >= 0:
        return True
    try:
        value = json.loads(data)
    except ValueError:
        return False
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            found.append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                found.append(k)
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(value)
    return any(key in s for s in found)


# --- Secret.absent: what must leave the fast path ------------------------------------------------


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_every_string_ending_with_a_piece_of_the_key_leaves_the_fast_path(key: str) -> None:
    """Each piece the redactor would hold back (START_CHARS characters up to all but one), in
    every spelling a JSON encoder may give it, as a value at any depth, alone or after text,
    followed by more events in the same read: `absent` is False."""
    secret, old = Secret(key), OldSecret(key)
    rng = random.Random(7)
    for size in range(START_CHARS, len(key)):
        piece = key[:size]
        for text in (piece, f"ask {piece}", f"{key[:START_CHARS]}{piece}", f"{piece[:-1]}{piece}"):
            for joined, value in ((True, delta(text)), (False, {"a": [1, {"b": text}]}),
                                  (False, {text: text})):  # fmt: skip
                for escape in (0.0, 0.0, 0.3, 1.0):
                    data = payload(value, rng, escape, " \n")
                    if joined:  # (only text a client joins is held back: `JOINED`)
                        assert StreamRedactor(old).batch([data]) != [data], data
                    assert not secret.absent(data), (size, data)
                    follow = data + b"\n\ndata: " + chunk("and more text")
                    assert not secret.absent(follow), follow


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_the_key_whole_anywhere_leaves_the_fast_path(key: str) -> None:
    secret = Secret(key)
    rng = random.Random(8)
    for text in (key, f"x{key}", f"{key}x", f"{key}{key[:START_CHARS]}", f"{key[:-1]}{key}"):
        for value in (delta(text), {text: 1}):
            for escape in (0.0, 0.3, 1.0):
                data = payload(value, rng, escape)
                assert not secret.absent(data), data
                assert holds(data, key) and not holds(redact(data, secret), key), data
    assert not secret.absent(b"data: " + key.encode() + b"\n\n")  # no JSON at all


@pytest.mark.parametrize(
    "text",
    [
        "ask for a task.",  # the key's start inside words (not at a string's end)
        f"{UPSTREAM_KEY[:START_CHARS]}x and {UPSTREAM_KEY[:9]}!",  # a piece, then more text
        UPSTREAM_KEY[: START_CHARS - 1],  # a piece too short to be held
        f"{UPSTREAM_KEY[:-1]}X",  # all but the last character, then another
        f"{UPSTREAM_KEY[:9]} {UPSTREAM_KEY[9:]}",  # the key with a space in it
    ],
)
def test_text_that_only_looks_like_the_key_keeps_the_fast_path(text: str) -> None:
    """What a7b4bcc was for: the key's start in text is relayed without a decode (the old
    rule decoded all of these, and found nothing to do)."""
    data = chunk(text)
    assert Secret(UPSTREAM_KEY).absent(data)
    assert StreamRedactor(OldSecret(UPSTREAM_KEY)).batch([data]) == [data]


# --- The old rule and the new one, on the same random streams ----------------------------------


def random_text(rng: random.Random, key: str) -> str:
    parts = []
    for _ in range(rng.randint(0, 5)):
        r = rng.random()
        if r < 0.25:
            i = rng.randint(0, len(key))
            parts.append(key[i : rng.randint(i, len(key))])
        elif r < 0.5:
            parts.append(key[: rng.randint(0, len(key))])
        elif r < 0.6:
            parts.append(key[:START_CHARS])
        elif r < 0.7:
            parts.append(rng.choice(['"', "\\", "/", "\n", "\t", "\u00e9", "\u2028", "\U0001f600"]))
        elif r < 0.75:
            parts.append(key)
        else:
            parts.append("".join(rng.choice("abks-_/ ") for _ in range(rng.randint(0, 4))))
    return "".join(parts)


def random_event(rng: random.Random, key: str) -> bytes:
    text = random_text(rng, key)
    shape = rng.random()
    if shape < 0.55:
        value: Any = delta(text)
    elif shape < 0.65:
        value = {random_text(rng, key): text}
    elif shape < 0.75:
        value = {"choices": [{"index": 0, "delta": {}}]}
    elif shape < 0.9:
        value = {"a": [text, random_text(rng, key)], "b": {"c": random_text(rng, key), "d": 1}}
    else:
        return text.encode()  # not JSON
    return payload(value, rng, rng.choice([0.0, 0.0, 0.1, 0.5]), " \n\t")


def framed(rng: random.Random, payloads: list[bytes]) -> bytes:
    """`payloads` as SSE in one read: any line end, `data:` with or without its space, events
    split over several `data:` lines, other fields and comments between."""
    out = b""
    for i, data in enumerate(payloads):
        end = rng.choice([b"\n", b"\r\n", b"\r"])
        lines = []
        if rng.random() < 0.2:
            lines.append(rng.choice([b"event: x", b": ping", b"id: 1"]))
        for line in data.split(b"\n"):
            head = b"data: " if i == 0 or rng.random() < 0.5 or line[:1] == b" " else b"data:"
            lines.append(head + line)
        out += end.join(lines) + end + end
    return out


def test_the_new_rule_lets_out_only_what_the_old_one_did_nothing_to() -> None:
    """Random streams (keys with awkward characters, their pieces, quotes, escapes, names,
    multi-event batches, a key across events) through a redactor with each rule come out
    the same; an event the old rule redacted or held back is never `absent` now; and a read
    that is `absent` (the `_http` fast path relays it as it came) holds only events that are."""
    rng = random.Random(20261206)
    for _ in range(2500):
        key = rng.choice(AWKWARD_KEYS)
        secret, old = Secret(key), OldSecret(key)
        batches = [
            [random_event(rng, key) for _ in range(rng.randint(1, 3))]
            for _ in range(rng.randint(1, 5))
        ]
        outs = []
        for rule in (old, secret):
            redactor = StreamRedactor(rule)
            out = [p for batch in batches for p in redactor.batch(list(batch))]
            outs.append(out + redactor.flush())
        assert outs[0] == outs[1], (key, batches)
        for batch in batches:
            for data in batch:
                if StreamRedactor(old).batch([data]) != [data]:
                    assert not secret.absent(data), (key, data)
            read = framed(rng, batch)
            if secret.absent(read):
                events = SSEDecoder(len(read) + 1).feed(read + b"\n\n")
                assert all(secret.absent(e) for e in events), (key, read)


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_a_key_cut_anywhere_after_its_start_is_redacted_whatever_the_rule(key: str) -> None:
    """Every cut that leaves the key's first piece START_CHARS or more characters long, the
    other pieces of any size, one event per read or all in one: the joined text has
    `[redacted]` for the key, with either rule."""
    text = f"your key is {key}, ok?"
    at = text.index(key)
    for first in range(START_CHARS, len(key)):
        for size in (1, 3, len(key)):
            pieces = [text[: at + first], *cut(text[at + first :], size)]
            events = [chunk(p) for p in pieces]
            for rule in (Secret(key), OldSecret(key)):
                for batches in ([events], [[e] for e in events]):
                    redactor = StreamRedactor(rule)
                    out = [p for batch in batches for p in redactor.batch(batch)]
                    out += redactor.flush()
                    joined = "".join(json.loads(p)["choices"][0]["delta"]["content"] for p in out)
                    assert joined == "your key is [redacted], ok?", (first, size, joined)


# --- Through a gateway: every framing of a read -------------------------------------------------


def crlf(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r\n")


def no_space(body: bytes) -> bytes:
    return body.replace(b"data: ", b"data:")


def pretty(body: bytes) -> bytes:
    """Each event's JSON spread over several `data:` lines (its tokens on lines of their own)."""
    out = []
    for event in body.split(b"\n\n"):
        lines: list[bytes] = []
        for line in event.split(b"\n"):
            if line.startswith(b"data: {"):
                data = json.dumps(json.loads(line[6:]), indent=1, ensure_ascii=False)
                lines.extend(b"data: " + part.encode() for part in data.split("\n"))
            else:
                lines.append(line)
        out.append(b"\n".join(lines))
    return b"\n\n".join(out)


FRAMINGS: dict[str, Callable[[bytes], bytes]] = {
    "lf": lambda body: body,
    "crlf": crlf,
    "no-space": no_space,
    "multi-line": pretty,
}


def paced(reads: Callable[[bytes], list[bytes]], body: bytes) -> Answer:
    """A chunked answer written as `reads(body)`, a pause after each (one read apiece)."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        head = {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"}
        writer.write(http("200 OK", head))
        for piece in reads(body):
            writer.write(chunked(piece))
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return answer


def per_event(body: bytes) -> list[bytes]:
    sep = b"\r\n\r\n" if body.find(b"\r\n\r\n") >= 0 else b"\n\n"
    return [event + sep for event in body.split(sep) if event]


async def joined_content(rig: Any, key: str, expected: str, where: Any) -> None:
    status, body = await rig.call(stream=True)
    assert status == 200, (where, body)
    assert not leaks(body, key[START_CHARS:]), (where, body)
    chunks = await rig.sdk(stream=True)
    assert isinstance(chunks, list), (where, chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected, (where, text)


def cut_key_answer(kind: str, text: str, at: int, current: list[tuple[int, str, str]]) -> Answer:
    """`text` cut `current[0]`'s way: its first piece ends `first` characters into the key
    (which starts `at`), the rest in pieces of 3; framed and read as `current[0]` says."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        first, framing, reads = current[0]
        pieces = [text[: at + first], *cut(text[at + first :], 3)]
        body = FRAMINGS[framing](pieces_stream(kind, pieces))
        if reads == "one":
            await sends(until_close(body))(request, writer)
        else:
            await paced(per_event, body)(request, writer)

    return answer


E2E_KEYS = [UPSTREAM_KEY, "sksksk-sksk-0123456789abcdef", "sk-proj/0123_4567-89ab/cdef"]


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_a_cut_key_is_redacted_through_the_gateway_in_every_framing(
    build: Build, kind: str
) -> None:
    """First pieces of START_CHARS, START_CHARS + 1, half the key and all but one character,
    in each line framing in turn, all events in one read or each in its own: the client
    joins `[redacted]`, and no piece past the key's start is in what it gets."""
    names = list(FRAMINGS)
    for k, key in enumerate(E2E_KEYS):
        text = f"your key is {key}, ok?"
        at = text.index(key)
        cases = [
            (first, names[(j + k) % len(names)], reads)
            for j, first in enumerate((START_CHARS, START_CHARS + 1, len(key) // 2, len(key) - 1))
            for reads in ("one", "each")
        ]
        current: list[tuple[int, str, str]] = []
        rig = await build(kind, cut_key_answer(kind, text, at, current), api_keys=(key,))
        for case in cases:
            current[:] = [case]
            await joined_content(rig, key, "your key is [redacted], ok?", (key, case))


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_a_cut_key_split_across_http_chunks_is_redacted(build: Build, kind: str) -> None:
    """The event with the key's first piece cut at each of its bytes across two HTTP chunks
    (so the read before it is no whole event, and the one after starts mid-event)."""
    key = UPSTREAM_KEY
    text = f"your key is {key}, ok?"
    at = text.index(key)
    body = pieces_stream(kind, [text[: at + 4], *cut(text[at + 4 :], 3)])
    piece = json.dumps(text[: at + 4])[1:-1].encode()
    start = body.index(piece) + len(piece) - 4
    cuts = list(range(start - 1, start + 6))  # around and inside `sk-u"`

    def two(data: bytes) -> list[bytes]:
        at = cuts[len(seen) // 2]  # (`joined_content` asks twice)
        seen.append(at)
        return [data[:at], data[at:]]

    seen: list[int] = []
    rig = await build(kind, paced(two, body))
    for where in cuts:
        await joined_content(rig, key, "your key is [redacted], ok?", where)


@pytest.mark.parametrize("reads", ["one", "each"])
@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_text_like_the_key_is_relayed_as_it_came(build: Build, kind: str, reads: str) -> None:
    """The key's start in text, never at the end of a string: nothing is held or rewritten
    (on the OpenAI path these reads go out as they came, without being split into events)."""
    pieces = [
        "ask for a task. ",
        f"{UPSTREAM_KEY[:8]}x or sk-other, ",
        f"a task; {UPSTREAM_KEY[:-1]}!",
        f" {UPSTREAM_KEY[:9]} {UPSTREAM_KEY[9:]}",
    ]
    body = pieces_stream(kind, pieces)
    answer = sends(until_close(body)) if reads == "one" else paced(per_event, body)
    rig = await build(kind, answer)
    await joined_content(rig, "x" * 40, "".join(pieces), (kind, reads))


@pytest.mark.parametrize("reads", ["one", "each"])
async def test_a_stream_with_text_like_the_key_is_never_decoded_for_it(
    build: Build, reads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `make bench` missed for a day: an `sk-` key and text with "ask" in it made every
    event of a stream decoded and searched (a streamed request 4.4 times as costly). On the
    OpenAI path no `StreamRedactor` is made for such a stream, and the client reads each
    event byte for byte as the upstream wrote it."""
    made: list[StreamRedactor] = []

    class Counted(StreamRedactor):
        def __init__(self, secret: Secret) -> None:
            super().__init__(secret)
            made.append(self)

    monkeypatch.setattr("gateway.providers._http.StreamRedactor", Counted)
    pieces = ["ask for a task. ", f"{UPSTREAM_KEY[:8]}x, sk-other; ", f"{UPSTREAM_KEY[:-1]}!"]
    body = pieces_stream("openai", pieces)
    rig = await build(
        "openai", sends(until_close(body)) if reads == "one" else paced(per_event, body)
    )
    status, got = await rig.call(stream=True)
    assert status == 200, got
    sent = [line for line in body.split(b"\n") if line.startswith(b"data: {")]
    relayed = [line for line in got.split(b"\n") if line.startswith(b"data: {")]
    assert relayed == sent
    assert made == []


# --- Where a client joins text the redactor did not follow (older than a7b4bcc) ------------------


STOP = (
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}]}'
)


def client_joins(chunks: Any) -> str:
    """The text a client joins for choice 0, by each choice's `index` (as SDKs do)."""
    return "".join(
        choice.delta.content or "" for c in chunks for choice in c.choices if choice.index == 0
    )


async def test_a_key_continued_in_another_position_of_choices_is_redacted(build: Build) -> None:
    """The key's first piece in `choices[0]`, its rest in `choices[1]` with `"index": 0`:
    the redactor followed list positions, a client follows `index`."""
    rest = (
        b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
        b'[{"index":1,"delta":{"content":"x"},"finish_reason":null},'
        b'{"index":0,"delta":{"content":"%b"},"finish_reason":null}]}'
    ) % UPSTREAM_KEY[5:].encode()
    events = sse(chunk("your key is "), chunk(UPSTREAM_KEY[:5]), rest, STOP, b"[DONE]")
    rig = await build("openai", sends(until_close(events)))
    assert client_joins(await rig.sdk(stream=True)) == "your key is [redacted]"


async def test_a_key_cut_over_two_parts_of_one_gemini_event_is_redacted(build: Build) -> None:
    """Gemini: one event whose parts are `sk-up` and the rest; each part becomes a content
    delta of its own, which the client joins (the redactor only looked for the rest in the
    events after the one it held)."""
    parts = [{"text": "your key is "}, {"text": UPSTREAM_KEY[:5]}, {"text": UPSTREAM_KEY[5:]}]
    candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP"}
    usage = {"promptTokenCount": 1, "candidatesTokenCount": 2, "totalTokenCount": 3}
    events = sse(json.dumps({"candidates": [candidate], "usageMetadata": usage}).encode())
    rig = await build("gemini", sends(until_close(events)))
    assert client_joins(await rig.sdk(stream=True)) == "your key is [redacted]"


async def test_a_key_begun_in_an_anthropic_block_start_is_redacted(build: Build) -> None:
    """Anthropic: a text block that starts with text (`content_block_start`'s own `text`,
    relayed as content) ending with `sk-up`, its deltas going on with the rest."""
    start = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": "your key is " + UPSTREAM_KEY[:5]},
    }
    events = [
        ANTHROPIC_START,
        start,
        *(anthropic_text(p) for p in cut(UPSTREAM_KEY[5:], 3)),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 2},
        },
        {"type": "message_stop"},
    ]
    rig = await build("anthropic", sends(until_close(named_events(events))))
    assert client_joins(await rig.sdk(stream=True)) == "your key is [redacted]"


# --- Every text a client joins, followed on its own: random streams of three formats --------

FUZZ_KEYS = [
    UPSTREAM_KEY,
    "sk-ant-api03-Zx9_Qw8-Lp7",
    "AIzaSyD-0aB1cD2eF3gH4iJ5kL6",
    "sk-proj-ABsk9x0123456789zzzz",  # its start again inside it
    "abab5f0c3e9d2b47a1b6c8e0f2a4d6c8",  # hex, and "ab" twice at its start
]


def fuzz_text(rng: random.Random, key: str) -> str:
    """Words, the key whole now and then, and decoys: its start, pieces of it, "task"."""
    words = ["hi ", "task ", "ask ", "data ", "\u00e9t\u00e9 ", '"q" ', "\\ ", "\n"]
    decoys = [key[:START_CHARS], key[: len(key) // 2], key[:-1], key[:START_CHARS] + " "]
    parts = []
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        parts.append(
            key if roll < 0.15 else rng.choice(decoys) if roll < 0.35 else rng.choice(words)
        )
    return "".join(parts)


def fuzz_cuts(rng: random.Random, text: str, key: str) -> list[str]:
    """`text` in pieces at random places, but never one that leaves a key's first piece
    shorter than START_CHARS (a cut the redactor does not follow, by design)."""
    starts = {i for i in range(len(text)) if text.startswith(key, i)}
    cuts = sorted(
        at
        for at in rng.sample(range(1, max(2, len(text))), min(len(text) - 1, rng.randint(0, 12)))
        if not any(0 < at - s < START_CHARS for s in starts)
    )
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def openai_events(rng: random.Random, pieces: dict[int, list[str]], key: str) -> list[bytes]:
    """Chat chunks; each may carry the next piece of several choices, in any list order, choice
    0 now and then without its `index` (a client reads it as `choices[0]`), and fields no
    client joins: a top-level `index`, a fingerprint ending with the key's start, a number
    msgspec cannot hold as a float."""
    left = {i: list(p) for i, p in pieces.items()}
    events = []
    while any(left.values()):
        ready = [i for i in left if left[i] and rng.random() < 0.7] or [
            next(i for i in left if left[i])
        ]
        rng.shuffle(ready)
        choices: list[dict[str, Any]] = []
        for i in ready:
            choice: dict[str, Any] = {"delta": {"content": left[i].pop(0)}, "finish_reason": None}
            if i or rng.random() < 0.7:
                choice["index"] = i
            choices.append(choice)
        chunk: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "choices": choices}
        if rng.random() < 0.2:
            chunk["index"] = rng.randint(0, 3)
        if rng.random() < 0.3:
            chunk["system_fingerprint"] = "fp_4f0c3d" + key[:START_CHARS]
        event = json.dumps(chunk).encode()
        events.append(event[:-1] + b',"x":1e400}' if rng.random() < 0.1 else event)
    return events


THOUGHTS = ["hmm ", "so: ", "ask "]


def gemini_events(rng: random.Random, pieces: dict[int, list[str]], key: str) -> list[bytes]:
    """Gemini chunks; a candidate's next pieces come as one or more parts of an event, thought
    parts between them (a chat client's `reasoning_content`: another text), candidate 0 now
    and then without its `index` (Gemini's default)."""
    left = {i: list(p) for i, p in pieces.items()}
    decoys = [*THOUGHTS, key[:START_CHARS], key[:5]]
    events = []
    while any(left.values()):
        candidates = []
        for i in left:
            if left[i] and rng.random() < 0.7:
                take = rng.randint(1, 3)
                parts: list[dict[str, Any]] = []
                for t in left[i][:take]:
                    if rng.random() < 0.25:
                        parts.append({"text": rng.choice(decoys), "thought": True})
                    parts.append({"text": t})
                del left[i][:take]
                candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}}
                if i or rng.random() < 0.7:
                    candidate["index"] = i
                candidates.append(candidate)
        if candidates:
            events.append(json.dumps({"candidates": candidates}).encode())
    return events


def anthropic_events(rng: random.Random, pieces: dict[int, list[str]], key: str) -> list[bytes]:
    """Anthropic block events, one block after another as Anthropic sends them: each block's
    first piece in its `content_block_start`, the rest in text deltas, pings between."""
    events: list[dict[str, Any]] = []
    for i in sorted(pieces):
        first, *rest = pieces[i]
        block = {"type": "text", "text": first}
        events.append({"type": "content_block_start", "index": i, "content_block": block})
        for text in rest:
            delta = {"type": "text_delta", "text": text}
            events.append({"type": "content_block_delta", "index": i, "delta": delta})
            if rng.random() < 0.2:
                events.append({"type": "ping"})
        events.append({"type": "content_block_stop", "index": i})
    return [json.dumps(e).encode() for e in events]


def joined(kind: str, payloads: list[bytes]) -> dict[int, str]:
    """Each text as a client joins it: by choice index (no index: 0), by candidate index (its
    thought parts apart, under -1 - index), all blocks."""
    texts: dict[int, str] = {}
    for payload in payloads:
        event = json.loads(payload)
        if kind == "openai":
            for choice in event["choices"]:
                i = choice.get("index", 0)
                texts[i] = texts.get(i, "") + choice["delta"]["content"]
        elif kind == "gemini":
            for candidate in event["candidates"]:
                i = candidate.get("index", 0)
                for part in candidate["content"]["parts"]:
                    at = -1 - i if part.get("thought") else i
                    texts[at] = texts.get(at, "") + part["text"]
        elif event["type"] in ("content_block_start", "content_block_delta"):
            # A message's text blocks are one text to a client (a chat translation's content)
            block = event.get("content_block") or event["delta"]
            texts[0] = texts.get(0, "") + block["text"]
    return texts


MAKERS = {"openai": openai_events, "gemini": gemini_events, "anthropic": anthropic_events}


def only_key_material_changed(came: str, got: str, key: str) -> bool:
    """Whether `got` is `came` with some pieces of the key (the key's start, as the first piece
    of one, ends in `[redacted]`; other characters of the key, removed) and nothing else
    changed: the only rewrites the redactor makes."""
    marker = "[redacted]"

    @functools.cache
    def fits(i: int, j: int) -> bool:
        if i == len(came):
            return j == len(got)
        if j < len(got) and came[i] == got[j] and fits(i + 1, j + 1):
            return True
        for k in range(i + 1, len(came) + 1):  # came[i:k] is key characters, removed
            if came[i:k] not in key:
                break
            if fits(k, j):
                return True
            if came[i:k] == key[: k - i] and got.startswith(marker, j) and fits(k, j + len(marker)):
                return True
        return False

    return fits(0, 0)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_every_text_a_client_joins_has_each_key_redacted(kind: str) -> None:
    """Random streams of one to three texts (choices, candidates, blocks), each with the key
    whole now and then and decoys of its start, cut anywhere (but a first piece shorter than
    START_CHARS), carried by events in any order and list position, read in batches of any
    size: no text the client joins holds the key, and each is the text with every key as
    `[redacted]`, or, where pieces of the key spelled it across texts, with those pieces
    rewritten and nothing else changed."""
    rng = random.Random(20261206 + len(kind))
    for _ in range(1500):
        key = rng.choice(FUZZ_KEYS)
        texts = {i: fuzz_text(rng, key) for i in rng.sample(range(4), rng.randint(1, 3))}
        pieces = {i: fuzz_cuts(rng, text, key) for i, text in texts.items()}
        events = MAKERS[kind](rng, pieces, key)
        redactor = StreamRedactor(Secret(key))
        out: list[bytes] = []
        at = 0
        while at < len(events):
            size = rng.randint(1, 4)
            out += redactor.batch(events[at : at + size])
            at += size
        out += redactor.flush()
        if kind == "anthropic":
            texts = {0: "".join(texts[i] for i in sorted(texts))}
        came = joined(kind, events)
        assert came == {**{i: t for i, t in texts.items() if t}, **came}  # (the fuzz's own)
        got = joined(kind, out)
        assert got.keys() == came.keys()
        for i, text in came.items():
            assert key not in got[i], (key, pieces)
            if got[i] != text.replace(key, "[redacted]"):
                # Pieces of the key spelled it across texts (a decoy of its start in one, the
                # rest in another): redacted too, and nothing else is changed.
                assert only_key_material_changed(text, got[i], key), (key, text, got[i])


def test_an_event_of_any_depth_or_width_costs_a_walk_of_its_size() -> None:
    """The walk over an event's strings was recursive, and built every string's path anew:
    900 levels of lists raised RecursionError out of the stream, and a string on each of 400
    levels took 10 ms. Deeper than MAX_DEPTH, nothing is followed; the event goes out."""
    secret = Secret(UPSTREAM_KEY)
    for depth in (900, 5000):
        deep = b'{"a":' + b"[" * depth + b'"x %b"' % UPSTREAM_KEY[:5].encode() + b"]" * depth + b"}"
        redactor = StreamRedactor(secret)
        assert redactor.batch([deep]) + redactor.flush() == [deep]
    wide = b'{"a":' + b'["sk",' * 5000 + b'"x"' + b"]" * 5000 + b"}"
    redactor = StreamRedactor(secret)
    assert redactor.batch([wide]) + redactor.flush() == [wide]


def test_the_starts_followed_at_once_are_bounded() -> None:
    """An event whose every choice ends with the key's start opens at most MAX_OPEN starts."""
    choices = [
        {"index": i, "delta": {"content": UPSTREAM_KEY[:4]}, "finish_reason": None}
        for i in range(MAX_OPEN * 4)
    ]
    event = json.dumps({"choices": choices}).encode()
    redactor = StreamRedactor(Secret(UPSTREAM_KEY))
    assert redactor.batch([event]) == []
    assert len(redactor.starts) == MAX_OPEN
    assert redactor.flush() == [event]


async def test_a_decoy_in_another_choice_does_not_hide_the_key(build: Build) -> None:
    """Choice 1 ends with the key's start (and never goes on with it) while choice 0 spells
    the key over three chunks: the redactor followed one text at a time, the decoy's."""

    def two(first: str, second: str) -> bytes:
        choices = [
            {"index": 1, "delta": {"content": second}, "finish_reason": None},
            {"index": 0, "delta": {"content": first}, "finish_reason": None},
        ]
        return json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                           "model": "m-1", "choices": choices}).encode()  # fmt: skip

    events = sse(
        two("your key is ", "a decoy: " + UPSTREAM_KEY[:4]),
        two(UPSTREAM_KEY[:6], ""),
        two(UPSTREAM_KEY[6:12], ""),
        two(UPSTREAM_KEY[12:] + ".", "and no more"),
        STOP,
        b"[DONE]",
    )
    rig = await build("openai", sends(until_close(events)))
    chunks = await rig.sdk(stream=True)
    assert client_joins(chunks) == "your key is [redacted]."
    second = "".join(ch.delta.content or "" for c in chunks for ch in c.choices if ch.index == 1)
    assert second == "a decoy: " + UPSTREAM_KEY[:4] + "and no more"


HEAD, TAIL = UPSTREAM_KEY[:5], UPSTREAM_KEY[5:]  # "sk-up", "stream-0123456789abcdefghij"
USAGE = {"promptTokenCount": 1, "candidatesTokenCount": 2, "totalTokenCount": 3}


def through(events: list[bytes], key: str = UPSTREAM_KEY) -> list[bytes]:
    redactor = StreamRedactor(Secret(key))
    out: list[bytes] = []
    for event in events:
        out += redactor.batch([event])
    return out + redactor.flush()


def anthropic_two_blocks(first: str, second: str) -> bytes:
    def block(i: int, text: str) -> list[dict[str, Any]]:
        return [
            {
                "type": "content_block_start",
                "index": i,
                "content_block": {"type": "text", "text": ""},
            },
            {
                "type": "content_block_delta",
                "index": i,
                "delta": {"type": "text_delta", "text": text},
            },
            {"type": "content_block_stop", "index": i},
        ]

    end = [
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 2}},
        {"type": "message_stop"},
    ]  # fmt: skip
    return named_events([ANTHROPIC_START, *block(0, first), *block(1, second), *end])


# --- Texts as clients join them: found by attacking the redactor of 329ac74 -----------------


async def test_anthropic_key_cut_across_two_text_blocks_translated_to_chat(build: Build) -> None:
    """Two text blocks become one `content` for a chat client (and one text for the anthropic
    SDK's `get_final_text`): the redactor follows each block on its own."""
    rig = await build("anthropic", sends(until_close(anthropic_two_blocks("key " + HEAD, TAIL))))
    assert client_joins(await rig.sdk(stream=True)) == "key [redacted]"


async def test_anthropic_key_cut_across_two_text_blocks_on_v1_messages(build: Build) -> None:
    rig = await build("anthropic", sends(until_close(anthropic_two_blocks("key " + HEAD, TAIL))))
    assert UPSTREAM_KEY not in await messages_text(rig)


def gemini(text: str, index: int | None, finish: str | None = None, thought: bool = False) -> bytes:
    part: dict[str, Any] = {"text": text}
    if thought:
        part["thought"] = True
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": [part]}}
    if index is not None:
        candidate["index"] = index
    event: dict[str, Any] = {"candidates": [candidate]}
    if finish:
        candidate["finishReason"] = finish
        event["usageMetadata"] = USAGE
    return json.dumps(event).encode()


async def test_gemini_candidate_index_given_then_omitted(build: Build) -> None:
    """Gemini's `index` defaults to 0 (wire.py), the redactor's channel does not: `("#", 0)`
    in one event, `"*"` in the next."""
    events = sse(gemini("key " + HEAD, 0), gemini(TAIL, None, "STOP"))
    rig = await build("gemini", sends(until_close(events)))
    assert client_joins(await rig.sdk(stream=True)) == "key [redacted]"


def chat(content: str, index: int | None = 0, **top: Any) -> bytes:
    choice: dict[str, Any] = {"delta": {"content": content}, "finish_reason": None}
    if index is not None:
        choice["index"] = index
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                       "model": "m-1", "choices": [choice], **top}).encode()  # fmt: skip


async def test_openai_choice_index_omitted_then_given(build: Build) -> None:
    """An OpenAI-compatible server that leaves `index` out of some chunks: a client
    (`choices[0]`) joins them; the redactor's channel differs (`"*"` / `("#", 0)`)."""
    events = sse(chat("key " + HEAD, None), chat(TAIL, 0), STOP, b"[DONE]")
    rig = await build("openai", sends(until_close(events)))
    chunks = await rig.sdk(stream=True)
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert joined == "key [redacted]"


async def test_openai_chunk_with_a_top_level_index_field(build: Build) -> None:
    """A top-level `index` (no chat client reads it) changes the channel of every string."""
    events = sse(chat("key " + HEAD, index=0), chat(TAIL, index=0, index_=1), STOP, b"[DONE]")
    events = events.replace(b'"index_"', b'"index"')
    rig = await build("openai", sends(until_close(events)))
    assert client_joins(await rig.sdk(stream=True)) == "key [redacted]"


async def test_gemini_thought_part_between_the_pieces(build: Build) -> None:
    """A thought (reasoning_content for the client) between two content pieces was a string
    of the same text: it broke the key off, though the content text goes on with it."""
    events = sse(gemini("key " + HEAD, 0), gemini("hmm", 0, thought=True), gemini(TAIL, 0, "STOP"))
    rig = await build("gemini", sends(until_close(events)))
    assert client_joins(await rig.sdk(stream=True)) == "key [redacted]"


async def test_a_number_msgspec_cannot_hold_as_a_float_lets_no_piece_out(build: Build) -> None:
    """`1e400` in the event with the key's rest: msgspec could not decode it as a float
    ("Number out of range"), so what was held went out as it came; the gateway's stream check
    relays the event and the SDK (`json.loads`: inf) reads it. Numbers are decoded as they are
    written now. (NaN and a lone surrogate are refused by the stream check.)"""
    events = sse(chat("key " + HEAD), chat(TAIL)[:-1] + b',"x":1e400}', STOP, b"[DONE]")
    rig = await build("openai", sends(until_close(events)))
    assert client_joins(await rig.sdk(stream=True)) == "key [redacted]"


def test_a_key_whose_start_recurs_in_it_is_followed_from_each_start() -> None:
    """Only the longest start of the key a string ends with was followed: a key whose start
    recurs in it ("sk" again) was missed when the text ended with the longer start."""
    key = "sk-proj-ABsk9x0123456789zzzz"  # "sk" at 0 and at 10
    events = [chat("key sk-proj-ABsk"), chat(key[2:])]  # joined: "...ABsk" + "-proj-ABsk9x..."
    joined = "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in through(events, key))
    assert key not in joined


HEX_KEY = "ab5f0c3e9d2b47a1b6c8e0f2a4d6c8e1"  # an Azure-style key: 32 hex digits


def fingerprinted(text: str) -> bytes:
    """A chunk as OpenAI and Azure send them: a `system_fingerprint` (hex) in every one; this
    one ends with the key's first two characters, as 1 in 256 deployments' do."""
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                       "model": "m-1", "system_fingerprint": "fp_4f0c3dab",
                       "choices": [{"index": 0, "delta": {"content": text},
                                    "finish_reason": None}]}).encode()  # fmt: skip


def test_a_string_repeated_in_every_event_ending_with_the_keys_start_holds_one_event_back() -> None:
    """Each event's fingerprint opens its text anew (the previous one broken off), so some
    text was always followed and nothing went out until MAX_HELD events were held: an event
    goes out once no text followed has a piece in it or before it."""
    redactor = StreamRedactor(Secret(HEX_KEY))
    outs = [redactor.batch([fingerprinted(f"word{i} ")]) for i in range(10)]
    assert sum(len(o) for o in outs) >= 9


async def test_a_stream_with_a_fingerprint_like_the_keys_start_is_not_buffered(
    build: Build,
) -> None:
    """Five chunks, then the model thinks: the client has the first before the rest comes."""
    release = asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        head = {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"}
        writer.write(http("200 OK", head))
        for i in range(5):
            writer.write(chunked(b"data: " + fingerprinted(f"word{i} ") + b"\n\n"))
            await writer.drain()
        await release.wait()  # the model thinks
        writer.write(chunked(sse(STOP, b"[DONE]")) + b"0\r\n\r\n")
        await writer.drain()

    rig = await build("openai", answer, api_keys=(HEX_KEY,))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    resp = await rig.gateway.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {rig.key}"}
    )
    async with asyncio.timeout(NEVER_HANG):  # (held back, it came only with the rest)
        first = await resp.content.readany()
    assert b"word0" in first
    release.set()
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")


def test_events_that_are_json_strings_do_not_raise() -> None:
    """An event that is a JSON string has the path `()`: `_put(value, (), ...)` indexed
    `path[-1]` (IndexError out of `batch()`; through the gateway, an unhandled_error 500)."""
    out = through([b'"key sk-up"', b'"stream-0123456789abcdefghij"'])
    assert UPSTREAM_KEY.encode() not in b"".join(out)


async def test_json_string_events_with_a_cut_key_are_no_gateway_crash(build: Build) -> None:
    events = sse(b'"key sk-up"', b'"stream-0123456789abcdefghij"', b"[DONE]")
    rig = await build("openai", sends(until_close(events)))
    status, body = await rig.call(stream=True)
    assert b"The gateway failed to process the request" not in body, (status, body)


def test_responses_summary_parts_are_texts_of_their_own() -> None:
    """`response.reasoning_summary_text.delta` events of one output item, interleaved by
    `summary_index`: they were one text, so summary 1's "other" broke summary 0's key off."""

    def summary(index: int, text: str) -> bytes:
        kind = "response.reasoning_summary_text.delta"
        event = {"type": kind, "output_index": 0, "summary_index": index, "delta": text}
        return json.dumps(event).encode()

    out = through([summary(0, "key " + HEAD), summary(1, "other"), summary(0, TAIL)])
    texts: dict[int, str] = {}
    for event in map(json.loads, out):
        texts[event["summary_index"]] = texts.get(event["summary_index"], "") + event["delta"]
    assert UPSTREAM_KEY not in texts[0], texts


# --- Round 2: texts joined differently by clients, and streams held back with no key ------


def test_a_float_choice_index_does_not_break_choice_0s_key_unit() -> None:
    """`"index": 1.0` is choice 1 to a client (1.0 == 1), and was choice 0 to the redactor
    (not an int): its text broke choice 0's key off. Texts are no longer told apart."""
    decoy = chat("zz", index=1).replace(b'"index": 1', b'"index": 1.0')
    out = through([chat("key " + HEAD), decoy, chat(TAIL)])
    text = "".join(
        c["delta"]["content"] for e in out for c in json.loads(e)["choices"] if c["index"] == 0
    )
    assert UPSTREAM_KEY not in text


async def test_a_float_choice_index_does_not_break_choice_0s_key(build: Build) -> None:
    decoy = chat("zz", index=1).replace(b'"index": 1', b'"index": 1.0')
    events = sse(chat("key " + HEAD), decoy, chat(TAIL), STOP, b"[DONE]")
    rig = await build("openai", sends(until_close(events)))
    assert UPSTREAM_KEY not in client_joins(await rig.sdk(stream=True))


def _gemini(*candidates: dict[str, Any]) -> bytes:
    return json.dumps({"candidates": list(candidates)}).encode()


def _cand(*parts: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"index": 0, "content": {"role": "model", "parts": list(parts)}}
    if finish:
        c["finishReason"] = finish
    return c


async def test_gemini_second_candidate_of_the_same_index_does_not_break_the_key(
    build: Build,
) -> None:
    """The Gemini translation drops a second candidate with the same index in a chunk
    ("one candidate per index"); the redactor read its text as the same text, and it broke
    the key off."""
    events = sse(
        _gemini(_cand({"text": "key " + HEAD})),
        _gemini(_cand({"text": TAIL[:5]}), _cand({"text": "zz"})),
        _gemini(_cand({"text": TAIL[5:]}, finish="STOP")),
    )
    rig = await build("gemini", sends(until_close(events)))
    assert UPSTREAM_KEY not in client_joins(await rig.sdk(stream=True))


async def test_gemini_part_with_an_index_field_does_not_hide_the_key(
    build: Build,
) -> None:
    """A part carrying an `index` (no Gemini field: the translation ignores it) was another
    text to the redactor: the key's rest in it was not followed."""
    events = sse(
        _gemini(_cand({"text": "key " + HEAD})),
        _gemini(_cand({"text": TAIL, "index": 3}, finish="STOP")),
    )
    rig = await build("gemini", sends(until_close(events)))
    assert UPSTREAM_KEY not in client_joins(await rig.sdk(stream=True))


def _anthropic_with_decoy() -> bytes:
    """A `text` in an `input_json_delta` (the SDK and the translation read only its
    `partial_json`) was the text blocks' text to the redactor: it broke the key off."""
    events = [
        ANTHROPIC_START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": "key " + HEAD}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": "", "text": "zz"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TAIL}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 2}},
        {"type": "message_stop"},
    ]  # fmt: skip
    return named_events(events)


async def test_anthropic_text_in_a_non_text_delta_does_not_break_the_key_chat(build: Build) -> None:
    rig = await build("anthropic", sends(until_close(_anthropic_with_decoy())))
    assert UPSTREAM_KEY not in client_joins(await rig.sdk(stream=True))


async def test_anthropic_text_in_a_non_text_delta_does_not_break_the_key_messages(
    build: Build,
) -> None:
    rig = await build("anthropic", sends(until_close(_anthropic_with_decoy())))
    assert UPSTREAM_KEY not in await messages_text(rig)


def test_many_decoy_choices_do_not_leave_choice_0_unfollowed() -> None:
    """Decoy choices ending with "sk", never going on, filled what was followed (256 of them):
    choice 0's start, later in the same event, was not followed. The start that went on
    longest ago makes room now; the text strings of one event looked at are bounded
    (MAX_TEXTS: past them, a start is not followed)."""
    choices = [{"index": i, "delta": {"content": "sk"}} for i in range(1, MAX_TEXTS)]
    choices.append({"index": 0, "delta": {"content": "key " + HEAD}})
    first = json.dumps({"choices": choices}).encode()
    out = through([first, chat(TAIL)])
    text = "".join(
        c["delta"]["content"] for e in out for c in json.loads(e)["choices"] if c["index"] == 0
    )
    assert text == "key [redacted]"


def _responses_delta(text: str, **places: int) -> dict[str, Any]:
    return {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
            "content_index": 0, "delta": text, **places}  # fmt: skip


def test_responses_delta_with_a_stray_place_field_does_not_hide_the_key() -> None:
    """An output_text delta carrying a `summary_index` (no field of that event: the SDK
    joins it by output_index and content_index) was another text to the redactor."""
    events = [_responses_delta("key " + HEAD), _responses_delta(TAIL, summary_index=0)]
    out = through([json.dumps(e).encode() for e in events])
    assert UPSTREAM_KEY not in "".join(json.loads(e)["delta"] for e in out)


def _tool_chunk(tool: dict[str, Any]) -> bytes:
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                       "model": "gpt-4o", "system_fingerprint": "fp_1",
                       "choices": [{"index": 0, "delta": {"tool_calls": [tool]},
                                    "finish_reason": None}]}).encode()  # fmt: skip


def _tool_call_stream() -> list[bytes]:
    start = {"index": 0, "id": "call_Xy12", "type": "function",
             "function": {"name": "create_task", "arguments": ""}}  # fmt: skip
    parts = ['{"', "title", '":"', "buy", " milk", '"}']
    return [_tool_chunk(start), *(_tool_chunk({"index": 0, "function": {"arguments": a}})
                                  for a in parts)]  # fmt: skip


def test_a_tool_named_like_the_keys_start_does_not_hold_its_call_back_unit() -> None:
    """A function named `create_task` (ends with "sk", an OpenAI key's start): its name is
    in the call's first chunk only, so that text stayed followed and every chunk after it was
    held, up to MAX_HELD or the stream's end. A name is no text a client joins (`JOINED`)."""
    redactor = StreamRedactor(Secret(UPSTREAM_KEY))
    released = sum(len(redactor.batch([event])) for event in _tool_call_stream())
    assert released >= 5


def _azure_stream(words: int) -> list[bytes]:
    results = [{"prompt_index": 0, "content_filter_results": FILTER_RESULTS}]
    first = prompt_filter_chunk(results)
    chunks = [json.dumps(first).encode()]
    for i in range(words):
        chunks.append(json.dumps({"choices": [{"content_filter_results": {},
                                               "delta": {"content": f"w{i} "},
                                               "finish_reason": None, "index": 0,
                                               "logprobs": None}],
                                  "created": 1, "id": "chatcmpl-1", "model": "gpt-4o",
                                  "object": "chat.completion.chunk",
                                  "system_fingerprint": "fp_1"}).encode())  # fmt: skip
    return chunks


AZURE_KEY = "fe5f0c3e9d2b47a1b6c8e0f2a4d6c8e1"  # 32 hex digits; 1 in 256 start "fe" ("safe")


def test_azure_prompt_filter_results_do_not_hold_the_stream_back_unit() -> None:
    """Azure's first chunk (`prompt_filter_results`, four `"severity": "safe"`) comes once:
    with a key starting "fe" its texts stayed followed and nothing went out for 256 events."""
    redactor = StreamRedactor(Secret(AZURE_KEY))
    released = sum(len(redactor.batch([event])) for event in _azure_stream(20))
    assert released >= 19


async def _first_read_before_the_rest(rig: Any, head: list[bytes], marker: bytes) -> None:
    release = asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(http("200 OK", {"Content-Type": "text/event-stream",
                                     "Transfer-Encoding": "chunked"}))  # fmt: skip
        for event in head:
            writer.write(chunked(b"data: " + event + b"\n\n"))
            await writer.drain()
        await release.wait()  # the model thinks
        writer.write(chunked(sse(STOP, b"[DONE]")) + b"0\r\n\r\n")
        await writer.drain()

    rig.upstream.answer = answer
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    resp = await rig.gateway.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {rig.key}"}
    )
    try:
        async with asyncio.timeout(2):
            got = b""
            while marker not in got:
                got += await resp.content.readany()
    finally:
        release.set()
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")


async def test_a_tool_named_like_the_keys_start_is_not_buffered(build: Build) -> None:
    rig = await build("openai", sends(b""))
    await _first_read_before_the_rest(rig, _tool_call_stream(), b"milk")


async def test_azure_prompt_filter_chunk_does_not_buffer_the_stream(build: Build) -> None:
    rig = await build("azure", sends(b""), api_keys=(AZURE_KEY,))
    await _first_read_before_the_rest(rig, _azure_stream(5), b"w4")


def test_a_word_ending_like_the_keys_start_holds_its_chunk_back_until_the_next() -> None:
    """ " ask", " task", " risk": with an `sk-` key, a chunk whose text ends so is held until the
    same choice's next chunk shows the key does not go on, and no longer (a start is kept past
    other texts' strings, but not past its own text's)."""
    redactor = StreamRedactor(Secret(UPSTREAM_KEY))
    words = [" I", " will", " ask", " you", " a", " task", " now"]
    outs = [redactor.batch([chat(w)]) for w in words]
    assert [len(o) for o in outs] == [1, 1, 0, 2, 1, 0, 2]
    assert redactor.flush() == []


async def test_a_key_cut_over_two_blocks_of_a_whole_translated_answer_is_redacted(
    build: Build,
) -> None:
    """A whole Anthropic answer with two text blocks, or a Gemini one with two parts, becomes one
    chat `content`: the key cut over them was whole only in what the translation made."""
    blocks = [{"type": "text", "text": "key " + HEAD}, {"type": "text", "text": TAIL}]
    rig = await build("anthropic", sends(whole(anthropic_message(content=blocks))))
    completion = await rig.sdk(stream=False)
    assert completion.choices[0].message.content == "key [redacted]"
    parts = [{"text": "key " + HEAD}, {"text": TAIL}]
    candidate = {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
    usage = {"promptTokenCount": 1, "candidatesTokenCount": 2, "totalTokenCount": 3}
    answer = json.dumps({"candidates": [candidate], "usageMetadata": usage}).encode()
    rig = await build("gemini", sends(whole(answer)))
    completion = await rig.sdk(stream=False)
    assert completion.choices[0].message.content == "key [redacted]"


def test_a_key_in_logprob_tokens_is_redacted_there_too() -> None:
    """With `logprobs`, a client can join each chunk's `logprobs.content[].token` as well as its
    content: the tokens spelled the key while the content had `[redacted]`."""
    tokens = [" Your", " key", " is", " sk", "-up", "stream", "-", "012", "345", "678", "9"]
    tokens += ["abcdef", "gh", "ij", "."]

    def logprob_chunk(token: str) -> bytes:
        logprobs = {"content": [{"token": token, "logprob": -0.1, "top_logprobs": []}]}
        choice = {"index": 0, "delta": {"content": token}, "logprobs": logprobs}
        return json.dumps(
            {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}
        ).encode()

    out = [json.loads(e) for e in through([logprob_chunk(t) for t in tokens])]
    content = "".join(o["choices"][0]["delta"]["content"] for o in out)
    joined_tokens = "".join(o["choices"][0]["logprobs"]["content"][0]["token"] for o in out)
    assert content == joined_tokens == " Your key is [redacted]."
