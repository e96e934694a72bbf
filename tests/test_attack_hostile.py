"""A hostile upstream and a hostile client: the upstream key echoed JSON-escaped or split
across reads, a compressed request body that inflates far past `max_body_bytes`, and a client
guessing admin keys."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.brake import LIMIT, AdminBrake, counted_as
from gateway.providers._secrets import (
    MAX_HELD,
    MAX_HELD_BYTES,
    START_CHARS,
    Secret,
    StreamRedactor,
    clean,
)
from gateway.state import ADMIN_BRAKE_KEY
from tests.conftest import MakeSettings, create_key, raw_request, start_gateway
from tests.test_attack_upstream import (
    ANTHROPIC_START,
    ANTHROPIC_TEXT_START,
    KINDS,
    UPSTREAM_KEY,
    Answer,
    Build,
    anthropic_text,
    build,
    chunk,
    http,
    named_events,
    peak_growth,
    sends,
    sse,
    until_close,
    whole,
)

__all__ = ["build"]  # the fixture, used by name

CHAT = "/v1/chat/completions"

# --- The upstream key, echoed in a spelling JSON reads back as the key ---------------------

SLASHED_KEY = "sk-proj/0123456789abcdefghij"  # "\/" is how PHP's json_encode writes its slash


def escape_all(key: str) -> bytes:
    return "".join(f"\\u{ord(c):04X}" for c in key).encode()


SPELLINGS: dict[str, tuple[str, Callable[[str], bytes]]] = {
    "first-char-u-escaped": (UPSTREAM_KEY, lambda k: b"\\u%04x" % ord(k[0]) + k[1:].encode()),
    "one-inner-char-u-escaped": (
        UPSTREAM_KEY,
        lambda k: k[:9].encode() + b"\\u%04x" % ord(k[9]) + k[10:].encode(),
    ),
    "every-char-u-escaped-upper-hex": (UPSTREAM_KEY, escape_all),
    "slash-escaped": (SLASHED_KEY, lambda k: k.replace("/", "\\/").encode()),
}


def leaks(body: bytes, key: str) -> bool:
    """Whether `body` holds `key` as it is, or in a JSON document (a whole body, or an SSE
    event's data) that a client decodes to text holding it."""
    if body.find(key.encode()) >= 0:
        return True
    docs = [body, *(line[5:] for line in body.split(b"\n") if line.startswith(b"data:"))]
    for doc in docs:
        try:
            value = json.loads(doc)
        except ValueError:
            continue
        if key in json.dumps(value, ensure_ascii=False):
            return True
    return False


def spelled(text: bytes, key: str, spelling: Callable[[str], bytes]) -> bytes:
    return text.replace(key.encode(), spelling(key))


def error_answer(key: str, spelling: Callable[[str], bytes]) -> Answer:
    message = f"Invalid request from key {key} (account acme-prod)"
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
    body = spelled(body, key, spelling)
    head = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    return sends(http("400 Bad Request", head, body))


def text_stream(kind: str, text: str) -> bytes:
    """A whole stream of `kind` whose one text delta is `text`."""
    if kind == "anthropic":
        return named_events(
            [
                ANTHROPIC_START,
                ANTHROPIC_TEXT_START,
                anthropic_text(text),
                {"type": "content_block_stop", "index": 0},
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 2},
                },
                {"type": "message_stop"},
            ]
        )
    if kind == "gemini":
        candidate = {
            "content": {"role": "model", "parts": [{"text": text}]},
            "finishReason": "STOP",
        }
        usage = {"promptTokenCount": 1, "candidatesTokenCount": 2, "totalTokenCount": 3}
        return sse(json.dumps({"candidates": [candidate], "usageMetadata": usage}).encode())
    stop = (
        b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
        b'[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    )
    return sse(chunk(text), stop, b"[DONE]")


COMPLETION = (
    b'{"id":"c","object":"chat.completion","created":1,"model":"m-1","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"your key is %b"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
async def test_a_key_echoed_escaped_in_an_answer_is_redacted(build: Build, spelling: str) -> None:
    key, spell = SPELLINGS[spelling]
    rig = await build("openai", sends(whole(COMPLETION % spell(key))), api_keys=(key,))
    status, body = await rig.call(stream=False)
    assert status == 200 and not leaks(body, key), body
    completion = await rig.sdk(stream=False)
    assert completion.choices[0].message.content == "your key is [redacted]"


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_key_echoed_escaped_in_an_error_body_is_redacted(
    build: Build, kind: str, spelling: str
) -> None:
    key, spell = SPELLINGS[spelling]
    rig = await build(kind, error_answer(key, spell), api_keys=(key,))
    status, body = await rig.call(stream=False)
    assert status == 400 and not leaks(body, key), body
    assert b"[redacted]" in body and b"acme-prod" in body  # the client's fault: relayed


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_a_key_echoed_escaped_in_a_stream_is_redacted(
    build: Build, kind: str, spelling: str
) -> None:
    key, spell = SPELLINGS[spelling]
    events = spelled(text_stream(kind, f"your key is {key}"), key, spell)
    rig = await build(kind, sends(until_close(events)), api_keys=(key,))
    status, body = await rig.call(stream=True)
    assert status == 200 and not leaks(body, key), body
    chunks = await rig.sdk(stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "your key is [redacted]"


def in_two_chunks(data: bytes, cuts: Iterator[int]) -> Answer:
    """A chunked stream answer: `data` in two HTTP chunks, each a write of its own, cut at
    the next of `cuts` (each request its own cut, on one gateway)."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        at = next(cuts)
        head = {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"}
        writer.write(http("200 OK", head))
        for piece in (data[:at], data[at:]):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return answer


@pytest.mark.parametrize("spelling", ["as-is", "every-char-u-escaped-upper-hex", "slash-escaped"])
@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_a_key_split_across_two_stream_chunks_never_reaches_the_client(
    build: Build, kind: str, spelling: str
) -> None:
    # Split at every byte of the key's spelling, including inside an escape (`\u00|73`).
    key, spell = SPELLINGS.get(spelling, (UPSTREAM_KEY, lambda k: k.encode()))
    written = spell(key)
    events = spelled(text_stream(kind, f"your key is {key}"), key, spell)
    start = events.index(written)
    cuts = range(start + 1, start + len(written))
    rig = await build(kind, in_two_chunks(events, iter(cuts)), api_keys=(key,))
    for at in cuts:
        status, body = await rig.call(stream=True)
        assert status == 200 and not leaks(body, key), (at, body)
        assert b"[redacted]" in body


# --- A compressed request body: a bomb -------------------------------------------------------

MiB = 1024 * 1024


@functools.cache
def zeros_bomb(encoding: str) -> bytes:
    """100 MiB of zeros, compressed (about 100 kB of gzip)."""
    wbits = {"gzip": 31, "deflate": 15}[encoding]
    squeeze = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(MiB)
    return b"".join([*(squeeze.compress(block) for _ in range(100)), squeeze.flush()])


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_request_bomb_is_a_413_in_little_memory(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, encoding: str
) -> None:
    limit = 4 * MiB
    gw = await start_gateway(aiohttp_client, make_settings(max_body_bytes=limit))
    secret = await create_key(gw)
    bomb = zeros_bomb(encoding)
    assert len(bomb) < MiB
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: application/json\r\nContent-Encoding: {encoding}\r\n"
        f"Content-Length: {len(bomb)}\r\n\r\n"
    ).encode()

    async def send() -> Any:
        return await raw_request(gw, head + bomb)

    reply, growth = await peak_growth(send())
    assert reply.status == 413
    error = reply.json()["error"]
    assert error["code"] == "request_too_large" and str(limit) in error["message"]
    assert growth < limit + MiB, f"{growth / MiB:.1f} MiB"


def deflated(data: bytes, wbits: int) -> bytes:
    squeeze = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return squeeze.compress(data) + squeeze.flush()


CHAT_BODY = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
CODED = {  # what a client may send: (Content-Encoding, the body as sent)
    "gzip": ("gzip", deflated(CHAT_BODY.encode(), 31)),
    "x-gzip": ("x-gzip", deflated(CHAT_BODY.encode(), 31)),
    "deflate-zlib": ("deflate", deflated(CHAT_BODY.encode(), 15)),
    "deflate-raw": ("deflate", deflated(CHAT_BODY.encode(), -15)),
    "gzip-two-members": (
        "GZip",
        deflated(CHAT_BODY[:20].encode(), 31) + deflated(CHAT_BODY[20:].encode(), 31),
    ),
    "identity": ("identity", CHAT_BODY.encode()),
}


@pytest.mark.parametrize("case", list(CODED))
async def test_a_compressed_request_body_is_read(
    gateway: TestClient[Any, Any], key: str, case: str
) -> None:
    coding, body = CODED[case]
    headers = {"Authorization": f"Bearer {key}", "Content-Encoding": coding}
    headers["Content-Type"] = "application/json"
    async with gateway.post(CHAT, data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["object"] == "chat.completion"


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip", "compress"])
async def test_a_content_encoding_the_gateway_cannot_bound_is_a_415(
    gateway: TestClient[Any, Any], key: str, coding: str
) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Encoding": coding}
    async with gateway.post(CHAT, data=b"\x00" * 100, headers=headers) as resp:
        assert resp.status == 415
        error = (await resp.json())["error"]
        assert error["code"] == "unsupported_content_encoding" and "gzip" in error["message"]
        assert error["type"] == "invalid_request_error"


# --- Guessing the admin key ------------------------------------------------------------------

ADMIN = "admin-key-0123456789abcdef"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def admin_gw(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> TestClient[Any, Any]:
    return await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN))


async def status_from(
    gw: TestClient[Any, Any], source: str, key: str | None, path: str = "/admin/keys"
) -> tuple[int, dict[str, str], Any]:
    """GET `path` over a connection from the address `source` (any of 127.0.0.0/8)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"http://{gw.host}:{gw.port}{path}"
        async with session.get(url, headers=bearer(key) if key else {}) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def test_an_address_guessing_admin_keys_is_locked_out_and_no_other_is(
    admin_gw: TestClient[Any, Any],
) -> None:
    brake = admin_gw.app[ADMIN_BRAKE_KEY]
    now = [1000.0]
    brake._clock = lambda: now[0]
    for i in range(brake.limit - 1):
        status, _, _ = await status_from(admin_gw, "127.0.0.1", f"guess-{i:020d}")
        assert status == 401
    assert (await status_from(admin_gw, "127.0.0.1", ADMIN))[0] == 200  # not yet locked
    for i in range(brake.limit):
        assert (await status_from(admin_gw, "127.0.0.1", f"guess-{i:020d}"))[0] == 401
    # Locked: even the right key is refused from there, and so is /metrics' admin check.
    status, headers, body = await status_from(admin_gw, "127.0.0.1", ADMIN)
    assert status == 429 and int(headers["Retry-After"]) == round(brake.lockout)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "admin_key_attempts" and ADMIN not in json.dumps(body)
    assert (await status_from(admin_gw, "127.0.0.1", ADMIN, "/metrics"))[0] == 429
    # Another address is never slowed, right key or wrong.
    assert (await status_from(admin_gw, "127.0.0.2", ADMIN))[0] == 200
    assert (await status_from(admin_gw, "127.0.0.2", "guess-elsewhere-000000"))[0] == 401
    # The lock-out ends.
    now[0] += brake.lockout
    assert (await status_from(admin_gw, "127.0.0.1", ADMIN))[0] == 200


async def test_requests_without_a_key_lock_nobody_out(admin_gw: TestClient[Any, Any]) -> None:
    for _ in range(3 * LIMIT):
        assert (await status_from(admin_gw, "127.0.0.1", None))[0] == 401
    assert (await status_from(admin_gw, "127.0.0.1", ADMIN))[0] == 200


async def test_virtual_keys_do_not_touch_the_admin_brake(admin_gw: TestClient[Any, Any]) -> None:
    # A wrong virtual key is a 401 of the model API, not an admin guess.
    for i in range(2 * LIMIT):
        async with admin_gw.post(CHAT, json={}, headers=bearer(f"sk-kiosk-wrong{i}")) as resp:
            assert resp.status == 401
    assert len(admin_gw.app[ADMIN_BRAKE_KEY]) == 0


def test_the_brake_forgets_the_oldest_address_past_its_bound() -> None:
    brake = AdminBrake(max_addresses=100)
    for i in range(100_000):
        brake.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(brake) == 100
    for _ in range(LIMIT):
        brake.failed("192.0.2.1")
    assert brake.locked_for("192.0.2.1") > 0 and len(brake) == 100
    assert brake.locked_for("10.0.0.0") == 0  # forgotten long ago


def test_wrong_keys_spread_over_more_than_a_window_do_not_lock() -> None:
    now = [0.0]
    brake = AdminBrake(limit=3, window=60.0, clock=lambda: now[0])
    for _ in range(5):
        assert not brake.failed("192.0.2.1")
        now[0] += 31.0
    assert brake.locked_for("192.0.2.1") == 0


async def test_a_lock_out_outlives_a_flood_of_other_addresses(
    admin_gw: TestClient[Any, Any],
) -> None:
    """More addresses than the brake remembers, each sending a wrong key, do not evict a
    live lock-out: the addresses merely counting are forgotten first."""
    brake = admin_gw.app[ADMIN_BRAKE_KEY]
    brake.max_addresses = 4
    for i in range(LIMIT):
        assert (await status_from(admin_gw, "127.0.0.1", f"guess-{i:020d}"))[0] == 401
    for n in range(2, 2 + 3 * brake.max_addresses):  # each evicts an older counting address
        assert (await status_from(admin_gw, f"127.0.1.{n}", "guess-elsewhere-000000"))[0] == 401
    assert len(brake) <= brake.max_addresses
    status, _, body = await status_from(admin_gw, "127.0.0.1", ADMIN)
    assert status == 429 and body["error"]["code"] == "admin_key_attempts"
    assert (await status_from(admin_gw, "127.0.0.2", ADMIN))[0] == 200  # never tracked


async def test_a_brake_full_of_lock_outs_fails_closed_for_new_addresses(
    admin_gw: TestClient[Any, Any],
) -> None:
    """Every slot a live lock-out: an address the brake cannot track is refused, right key or
    wrong (it learns nothing), until the lock-out that ends first frees a slot."""
    brake = admin_gw.app[ADMIN_BRAKE_KEY]
    now = [1000.0]
    brake._clock = lambda: now[0]
    brake.max_addresses = 2
    for source in ("127.0.0.1", "127.0.0.2"):
        for i in range(LIMIT):
            assert (await status_from(admin_gw, source, f"guess-{i:020d}"))[0] == 401
        now[0] += 10.0
    for key in ("guess-elsewhere-000000", ADMIN):
        status, headers, body = await status_from(admin_gw, "127.0.0.3", key)
        assert status == 429 and body["error"]["code"] == "admin_key_attempts"
        assert int(headers["Retry-After"]) == round(brake.lockout - 20.0)  # the first ends
    assert len(brake) == 2
    now[0] = 1000.0 + brake.lockout  # the first lock-out ends: a slot is free again
    assert (await status_from(admin_gw, "127.0.0.3", ADMIN))[0] == 200
    assert (await status_from(admin_gw, "127.0.0.2", ADMIN))[0] == 429  # still locked
    assert (await status_from(admin_gw, "127.0.0.1", ADMIN))[0] == 200


def test_the_brake_stays_bounded_under_lock_outs_from_many_addresses() -> None:
    now = [0.0]
    brake = AdminBrake(max_addresses=100, clock=lambda: now[0])
    for i in range(100_000):
        address = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
        for _ in range(LIMIT):
            brake.failed(address)
        assert len(brake) <= 100
        now[0] += 0.01
    # Past every lock-out, the table takes new addresses again.
    now[0] += brake.lockout
    assert brake.locked_for("192.0.2.1") == 0
    for _ in range(LIMIT):
        brake.failed("192.0.2.1")
    assert brake.locked_for("192.0.2.1") > 0 and len(brake) <= 100


# --- The upstream key cut into pieces over several events ------------------------------------


def pieces_stream(kind: str, pieces: list[str]) -> bytes:
    """A whole stream of `kind` with one text delta per piece."""
    if kind == "anthropic":
        stop = [
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 2},
            },
            {"type": "message_stop"},
        ]
        texts = [anthropic_text(p) for p in pieces]
        return named_events([ANTHROPIC_START, ANTHROPIC_TEXT_START, *texts, *stop])
    if kind == "gemini":
        events = []
        for i, piece in enumerate(pieces):
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": piece}]}}
            event: dict[str, Any] = {"candidates": [candidate]}
            if i == len(pieces) - 1:
                candidate["finishReason"] = "STOP"
                event["usageMetadata"] = {
                    "promptTokenCount": 1,
                    "candidatesTokenCount": 2,
                    "totalTokenCount": 3,
                }
            events.append(json.dumps(event).encode())
        return sse(*events)
    stop = (
        b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
        b'[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    )
    return sse(*(chunk(p) for p in pieces), stop, b"[DONE]")


def cut(text: str, size: int, at: int = 0) -> list[str]:
    """`text` in pieces of `size` characters, the first cut `at` characters in."""
    head = [text[:at]] if at else []
    return head + [text[i : i + size] for i in range(at, len(text), size)]


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_a_key_cut_over_stream_events_is_redacted_in_what_the_client_joins(
    build: Build, kind: str
) -> None:
    text = f"your key is {UPSTREAM_KEY}, ok?"
    start = text.index(UPSTREAM_KEY)
    # Each cut leaves the key's first piece at least START_CHARS long (a shorter one is not
    # caught: docs/providers.md).
    for size, at in [(3, start), (3, start - 1), (5, start - 3), (4, start - 2), (2, 0)]:
        events = pieces_stream(kind, cut(text, size, at))
        rig = await build(kind, sends(until_close(events)))
        status, body = await rig.call(stream=True)
        assert status == 200, body
        chunks = await rig.sdk(stream=True)
        joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert joined == "your key is [redacted], ok?", (size, at, joined)
        assert not leaks(body, UPSTREAM_KEY[START_CHARS:]), body


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_text_that_merely_starts_like_the_key_is_relayed_as_it_came(
    build: Build, kind: str
) -> None:
    text = f"ask {UPSTREAM_KEY[:8]} or sk-other-words, a task"
    rig = await build(kind, sends(until_close(pieces_stream(kind, cut(text, 3)))))
    chunks = await rig.sdk(stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_what_waits_for_a_key_to_complete_is_bounded() -> None:
    """An event ending with the key's start, then events without text: held back at most
    MAX_HELD events (or MAX_HELD_BYTES), then let out as they came."""
    redactor = StreamRedactor(Secret(UPSTREAM_KEY))
    assert redactor.batch([chunk(UPSTREAM_KEY[:3])]) == []
    neutral = b'{"choices":[{"index":0,"delta":{}}]}'
    out: list[bytes] = []
    for _ in range(MAX_HELD):  # the key's first piece and these are MAX_HELD + 1 events
        out += redactor.batch([neutral])
    assert out == [chunk(UPSTREAM_KEY[:3]), *[neutral] * MAX_HELD]
    assert redactor.batch([chunk("x" * 10) + b" " * MAX_HELD_BYTES]) != []  # nothing held
    assert redactor.batch([chunk(UPSTREAM_KEY[:3])]) == []
    big = b'{"choices":[],"pad":"%b"}' % (b"x" * MAX_HELD_BYTES)
    assert redactor.batch([big]) == [chunk(UPSTREAM_KEY[:3]), big]


def test_only_text_that_could_hold_a_piece_of_the_key_leaves_the_fast_path() -> None:
    """A read is relayed as it came (no decode, no `StreamRedactor`) unless it holds the key,
    a JSON string that ends with the key's first START_CHARS or more characters, or an escape:
    the key's first characters inside a word ("ask", "task" for an `sk-` key) are ordinary
    text, and a stream of them costs what any other does."""
    secret = Secret(UPSTREAM_KEY)
    start = UPSTREAM_KEY[:START_CHARS]
    ordinary = [
        chunk(f"a{start}ed twice"),
        chunk(f"{start}{start} {UPSTREAM_KEY[:6]}x."),
        chunk(UPSTREAM_KEY[: START_CHARS - 1]),
    ]
    for data in ordinary:
        assert secret.absent(data), data
        assert clean([data], secret)
    suspect = [
        chunk(UPSTREAM_KEY),
        chunk(f"{UPSTREAM_KEY} and more"),
        chunk(f"a{start}"),
        chunk(f"the key: {UPSTREAM_KEY[:9]}"),
        chunk(f"{start}{UPSTREAM_KEY[:5]}"),  # the key's start again inside its own piece
        chunk(UPSTREAM_KEY[:-1]),
        chunk("caf\\u00e9"),
        b'{"' + UPSTREAM_KEY[:4].encode() + b'":1}',  # (a name, not text: held, harmless)
    ]
    for data in suspect:
        assert not secret.absent(data), data
        assert not clean([data], secret)


def test_an_ipv6_guesser_counts_as_its_64_block() -> None:
    """More than 10,000 addresses rotated the wrong-key counts out of the table: one IPv6
    host is given a /64, 2^64 addresses to rotate through. They count as one address."""
    brake = AdminBrake(limit=3, max_addresses=100)
    for host in range(1, 200):  # a new address for every guess, as a rotating guesser
        brake.failed(f"2001:db8:1:2::{host:x}")
    assert brake.locked_for("2001:db8:1:2:ffff::1") > 0 and len(brake) == 1
    assert brake.locked_for("2001:db8:1:3::1") == 0  # the next /64: another network
    for _ in range(3):
        brake.failed("::ffff:192.0.2.7")
    assert brake.locked_for("192.0.2.7") > 0  # an IPv4-mapped address is its IPv4 address
    assert brake.locked_for("fe80::1%eth0") == 0 and brake.locked_for("not an address") == 0


def test_a_right_key_elsewhere_in_the_64_does_not_let_a_guesser_off() -> None:
    """Since IPv6 counts as its /64, a right key from any host of it (a monitor polling the
    admin API) forgot the block's wrong keys: a guesser beside it sent 9 per poll, never
    locked out (helper-75). A right key forgets only a single host's wrong keys."""
    now = [0.0]
    brake = AdminBrake(clock=lambda: now[0])
    guesser, monitor = "2001:db8:1:2::bad", "2001:db8:1:2::100"
    locked = False
    for _ in range(5):
        for _ in range(9):
            locked |= brake.failed(guesser)
            now[0] += 1.0
        brake.passed(monitor)  # the monitor's poll, with the right key
    assert locked and brake.locked_for(guesser) > 0
    brake = AdminBrake()
    for _ in range(9):
        brake.failed("::ffff:192.0.2.7")
    brake.passed("192.0.2.7")  # one host, however spelled: forgotten
    assert not brake.failed("::ffff:192.0.2.7")


@pytest.mark.parametrize(
    ("guesser", "victim", "counted"),
    [
        ("64:ff9b::cb00:7107", "64:ff9b::c633:6401", "203.0.113.7"),  # NAT64
        ("::ffff:0:cb00:7107", "::1", "203.0.113.7"),  # SIIT
        ("::203.0.113.7", "::1", "203.0.113.7"),  # IPv4-compatible
        ("2002:cb00:7107::1", "2002:c633:6401::1", "203.0.113.7"),  # 6to4
        ("fe80::1%eth0", "fe80::2%eth0", "fe80::1%eth0"),  # link-local: each host
    ],
)
def test_an_ipv4_host_carried_in_ipv6_counts_as_itself(
    guesser: str, victim: str, counted: str
) -> None:
    """Addresses that carry an IPv4 host (NAT64, SIIT, IPv4-compatible) all fell in one /64,
    so one IPv4 guesser behind NAT64 locked every IPv4 client out, and `::/64` held the
    loopback `::1` too (helper-75). They count as their IPv4 address; link-local ones as
    themselves."""
    assert counted_as(guesser) == counted
    brake = AdminBrake()
    for _ in range(10):
        brake.failed(guesser)
    assert brake.locked_for(guesser) > 0
    assert brake.locked_for(victim) == 0, f"{guesser}'s guesses locked out {victim}"


def test_local_use_nat64_and_6to4_count_as_their_ipv4_host_or_site() -> None:
    """NAT64's local-use prefix (64:ff9b:1::/48, RFC 8215) fell to the /64 rule, which holds
    only the first 16 bits of the IPv4 address there: a guesser at 203.0.113.7 locked out
    203.0.5.9. And a right key from one host of a 6to4 site (65,536 /64s, one IPv4 string)
    forgot a guesser's wrong keys elsewhere in it (helper-76)."""

    def local_nat64(v4: str) -> str:  # (RFC 6052's /48 layout)
        b = ipaddress.IPv4Address(v4).packed
        return str(
            ipaddress.IPv6Address(bytes.fromhex("0064ff9b0001") + b[:2] + b"\0" + b[2:] + bytes(5))
        )

    guesser, victim = local_nat64("203.0.113.7"), local_nat64("203.0.5.9")
    assert counted_as(guesser) == "203.0.113.7"
    brake = AdminBrake()
    for _ in range(10):
        brake.failed(guesser)
    assert brake.locked_for(guesser) > 0 and brake.locked_for(victim) == 0
    now = [0.0]
    brake = AdminBrake(clock=lambda: now[0])
    locked = False
    for _ in range(5):
        for _ in range(9):
            locked |= brake.failed("2002:cb00:7107:2::bad")
            now[0] += 1.0
        brake.passed("2002:cb00:7107:1::100")  # a monitor of the same 6to4 site
    assert locked
