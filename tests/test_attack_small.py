"""Attacks on three small changes: the CLI's key options checked as the admin API checks a
body (`gateway.keybody`), an answer without any choice on `/v1/messages` and `/v1/responses`
(whole or streamed: the start is held until the first choice), and a `[DONE]` ending a Gemini
stream. What holds is pinned here; what broke has its test next to the fix's."""

from __future__ import annotations

import asyncio
import itertools
import types
from typing import Any

import anthropic
import openai
import pytest

from gateway import timeparse
from tests.conftest import NEVER_HANG, openai_client, usage_rows
from tests.test_attack_upstream import Build, build, chunked, http, sends, sse, until_close
from tests.test_attack_upstream2 import messages_stream
from tests.test_attack_wire import chat_chunk, gemini_chunk
from tests.test_cli import Run, run

__all__ = ["build", "run"]  # the fixtures, used here by name

HI: Any = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
EMPTY = chat_chunk(choices=[])
TEXT = chat_chunk(choices=[{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}])
STOP = chat_chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
SSE_HEAD = http("200 OK", {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})


async def responses_text(rig: Any) -> str:
    async with openai_client(rig.gateway, rig.key) as client:
        events = await client.responses.create(model="m", input="hi", stream=True)
        kinds = [event async for event in events]
    done = kinds[-1]
    assert done.type == "response.completed", [e.type for e in kinds]
    return str(done.response.output_text)


async def messages_text(rig: Any) -> str:
    message = await messages_stream(rig)
    return "".join(block.text for block in message.content if block.type == "text")


# --- Streams whose first chunks have no choice ----------------------------------------------


async def test_thousands_of_choiceless_chunks_before_the_first_choice(build: Build) -> None:
    body = sse(*[EMPTY] * 5000, TEXT, STOP, chat_chunk(choices=[], usage=USAGE), b"[DONE]")
    rig = await build("openai", sends(until_close(body)))
    assert await messages_text(rig) == "hi"
    assert await responses_text(rig) == "hi"
    rows = await usage_rows(rig.gateway)
    assert [(r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (200, 3, 1)
    ] * 2


NO_ANSWER = {
    "usage-chunk-then-close": sse(chat_chunk(choices=[], usage=USAGE)),
    "usage-chunk-and-done": sse(chat_chunk(choices=[], usage=USAGE), b"[DONE]"),
    "index-1-only": sse(
        chat_chunk(choices=[{"index": 1, "delta": {"content": "x"}, "finish_reason": "stop"}]),
        b"[DONE]",
    ),
    "choices-null": sse(chat_chunk(choices=None), b"[DONE]"),
    "cut-after-empty-chunks": sse(EMPTY, EMPTY),
}


async def responses_outcome(rig: Any) -> str:
    """How a streamed Responses request ended for the client: its status when it failed
    before the stream began, else the type of the stream's last event."""
    async with openai_client(rig.gateway, rig.key) as client:
        try:
            events = await client.responses.create(model="m", input="hi", stream=True)
            kinds = [e.type async for e in events]
        except openai.APIStatusError as failed:
            return str(failed.status_code)
    assert kinds[0] == "response.created", kinds
    return kinds[-1]


@pytest.mark.parametrize("stream", list(NO_ANSWER))
async def test_a_stream_that_never_has_a_choice_is_an_error_never_an_empty_success(
    build: Build, stream: str
) -> None:
    # An error status when it fails before anything went out (a malformed chunk; no chunk
    # but the usage chunk the client did not ask for; the end of a stream read at once), else
    # the stream's error event after the start (which goes out with the first chunk).
    rig = await build("openai", sends(until_close(NO_ANSWER[stream])))
    assert await responses_outcome(rig) in {"502", "error"}
    with pytest.raises(anthropic.APIStatusError) as failed:
        await messages_stream(rig)
    assert failed.value.body["type"] == "error"  # type: ignore[index]
    assert [r["status"] for r in await usage_rows(rig.gateway)] == [502, 500]


class Held:
    """An upstream that sends `head`, then choiceless chunks until told to stop or its
    client (the gateway) goes away: `sent` is set after the first few, `closed` once done."""

    def __init__(self, first: bytes = EMPTY) -> None:
        self.first = first
        self.sent = asyncio.Event()
        self.closed = asyncio.Event()
        self.release = asyncio.Event()
        self.count = 0

    async def __call__(self, request: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(SSE_HEAD + chunked(sse(self.first)))
            await writer.drain()
            while not self.release.is_set():
                writer.write(chunked(sse(EMPTY)))
                await writer.drain()
                self.count += 1
                if self.count == 20:
                    self.sent.set()
                await asyncio.sleep(0.005)
            writer.write(chunked(sse(TEXT, STOP, b"[DONE]")) + b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            writer.close()


@pytest.mark.parametrize(
    ("path", "start"), [("/v1/messages", b"message_start"), ("/v1/responses", b"response.created")]
)
async def test_the_start_goes_out_before_the_first_choice_and_a_hang_up_is_counted(
    build: Build, path: str, start: bytes
) -> None:
    # A choiceless first chunk (Azure's content filter results) and a model that thinks: the
    # client has its headers and the start at once (and pings after), not silence.
    upstream = Held()
    rig = await build("openai", upstream)
    body: Any = (
        {"model": "m", "max_tokens": 10, "messages": HI, "stream": True}
        if path == "/v1/messages"
        else {"model": "m", "input": "hi", "stream": True}
    )
    async with asyncio.timeout(NEVER_HANG):
        resp = await rig.gateway.post(
            path, json=body, headers={"Authorization": f"Bearer {rig.key}"}
        )
        assert resp.status == 200
        seen = b""
        while start not in seen:
            seen += await resp.content.readany()
        assert not upstream.release.is_set()  # no choice has come yet
        resp.close()  # the client hangs up
        await upstream.closed.wait()  # the gateway closed the upstream's connection
    # The row is written (estimated: the upstream never said its usage).
    rows = await usage_rows(rig.gateway)
    assert [(r["status"], r["estimated"]) for r in rows] == [(499, 1)]


@pytest.mark.parametrize(
    ("path", "start"), [("/v1/messages", b"message_start"), ("/v1/responses", b"response.created")]
)
async def test_a_first_chunk_with_a_choice_goes_out_at_once(
    build: Build, path: str, start: bytes
) -> None:
    # The held start costs a stream whose first chunk has its choice nothing: the start and
    # the first text are out while the upstream is still sending choiceless chunks.
    upstream = Held(first=TEXT)
    rig = await build("openai", upstream)
    body: Any = (
        {"model": "m", "max_tokens": 10, "messages": HI, "stream": True}
        if path == "/v1/messages"
        else {"model": "m", "input": "hi", "stream": True}
    )
    try:
        async with asyncio.timeout(NEVER_HANG):
            resp = await rig.gateway.post(
                path, json=body, headers={"Authorization": f"Bearer {rig.key}"}
            )
            assert resp.status == 200
            seen = b""
            while b'"hi"' not in seen:
                seen += await resp.content.readany()
            assert start in seen and not upstream.release.is_set()
            upstream.release.set()
            rest = await resp.read()
        assert (b"message_stop" if path == "/v1/messages" else b"response.completed") in rest
    finally:
        upstream.release.set()


# --- Gemini: a proxy's [DONE] ---------------------------------------------------------------

GEMINI_DONE = sse(gemini_chunk("hello", "STOP"), b"[DONE]")


class AfterDone:
    """A Gemini stream ended by `[DONE]`, then a body that never ends (a byte of junk every
    few milliseconds, until the gateway lets go of the connection): `closed` once it did."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.pieces = 0

    async def __call__(self, request: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(SSE_HEAD + chunked(GEMINI_DONE))
            await writer.drain()
            while self.pieces < 2000:  # (~10 s: far beyond the gateway's linger)
                await asyncio.sleep(0.005)
                writer.write(chunked(b": x\n\n"))
                await writer.drain()
                self.pieces += 1
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            writer.close()


@pytest.mark.parametrize("route", ["chat", "messages", "responses"])
async def test_gemini_bytes_after_done_are_not_read_for_ever(build: Build, route: str) -> None:
    upstream = AfterDone()
    rig = await build("gemini", upstream)
    async with asyncio.timeout(NEVER_HANG):
        if route == "chat":
            chunks = await rig.sdk(stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        elif route == "messages":
            text = await messages_text(rig)
        else:
            text = await responses_text(rig)
        assert text == "hello"
        await upstream.closed.wait()  # let go of (after the linger), not read to its end
    assert upstream.pieces < 2000
    assert [r["status"] for r in await usage_rows(rig.gateway)] == [200]


GEMINI_ODD = {
    "done-first": (sse(b"[DONE]", gemini_chunk("hello", "STOP")), None),
    "done-in-a-string": (sse(gemini_chunk("[DONE]", "STOP")), "[DONE]"),
    "done-before-finish": (sse(gemini_chunk("hel"), b"[DONE]", gemini_chunk("lo", "STOP")), None),
}


@pytest.mark.parametrize("case", list(GEMINI_ODD))
async def test_gemini_done_in_odd_places(build: Build, case: str) -> None:
    body, text = GEMINI_ODD[case]
    rig = await build("gemini", sends(until_close(body)))
    if text is not None:
        assert await messages_text(rig) == text
        assert await responses_text(rig) == text
        return
    with pytest.raises(anthropic.APIError):
        await messages_text(rig)
    with pytest.raises(openai.APIError):
        await responses_text(rig)
    chat = await rig.sdk(stream=True)
    assert isinstance(chat, openai.APIError), chat  # no finish before [DONE]: incomplete


# --- A `[DONE]` with more after it ---------------------------------------------------------

# The SDKs end a stream at any data that starts with `[DONE]` (openai-python:
# `sse.data.startswith("[DONE]")`); the gateway read `[DONE] ` as a chunk that is not JSON and
# ended a complete answer with an error.
DONE_SPELLINGS = {"trailing-space": b"[DONE] ", "trailing-tab": b"[DONE]\t", "more": b"[DONE]!"}


@pytest.mark.parametrize("done", list(DONE_SPELLINGS))
async def test_a_done_with_more_after_it_ends_an_openai_stream(build: Build, done: str) -> None:
    usage = chat_chunk(choices=[], usage=USAGE)
    rig = await build("openai", sends(until_close(sse(TEXT, STOP, usage, DONE_SPELLINGS[done]))))
    chunks = await rig.sdk(stream=True)
    assert not isinstance(chunks, Exception), chunks
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi"
    status, body = await rig.post(
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert status == 200 and body.endswith(b"data: " + STOP + b"\n\ndata: [DONE]\n\n"), body
    assert await messages_text(rig) == "hi"
    assert await responses_text(rig) == "hi"
    rows = await usage_rows(rig.gateway)
    assert [(r["status"], r["estimated"]) for r in rows] == [(200, 0)] * 4


@pytest.mark.parametrize("done", list(DONE_SPELLINGS))
async def test_a_done_with_more_after_it_ends_a_gemini_stream(build: Build, done: str) -> None:
    rig = await build(
        "gemini", sends(until_close(sse(gemini_chunk("hi", "STOP"), DONE_SPELLINGS[done])))
    )
    chunks = await rig.sdk(stream=True)
    assert not isinstance(chunks, Exception), chunks
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi"
    assert await messages_text(rig) == "hi"
    assert await responses_text(rig) == "hi"
    assert [r["status"] for r in await usage_rows(rig.gateway)] == [200] * 3


# --- The CLI's key options ------------------------------------------------------------------

NOT_UTF8 = "\udcff"  # what Python makes of a 0xff byte in argv (surrogateescape)


@pytest.mark.parametrize(
    "argv",
    [
        ("keys", "create", "--name", NOT_UTF8),
        ("keys", "create", "--name", "x", "--notes", "ab" + NOT_UTF8),
        ("keys", "create", "--name", "x", "--models", "a," + NOT_UTF8),
        ("keys", "update", "KEY", "--notes", NOT_UTF8),
        ("keys", "update", "KEY", "--group", NOT_UTF8),
        ("keys", "show", NOT_UTF8),
        ("keys", "revoke", NOT_UTF8),
        ("keys", "update", NOT_UTF8, "--rpm", "3"),
        ("usage", "--key", NOT_UTF8),
    ],
)
def test_cli_arguments_that_are_not_utf8_are_refused_without_a_traceback(
    run: Run, argv: tuple[str, ...]
) -> None:
    # A byte that is not UTF-8 on the command line (a Latin-1 terminal) reached SQLite as a
    # lone surrogate: UnicodeEncodeError, a traceback and status 1.
    key_id = run.json("keys", "create", "--name", "kept")["id"]
    status, out, err = run(*(key_id if a == "KEY" else a for a in argv))
    # (a key id: PostgreSQL's driver says it is a database error, status 1)
    assert (status, out) in ((2, ""), (1, "")), err
    assert err.startswith("gateway: "), err
    assert "Traceback" not in err
    if argv[1] in ("create", "update") and argv[2] != NOT_UTF8:
        assert "expected UTF-8 text" in err and f"Invalid {argv[-2]}" in err, err
    assert [k["name"] for k in run.json("keys", "list")] == ["kept"]


def test_cli_names_expires_when_the_expiry_passed_while_it_ran(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--expires` is read twice (by argparse, then as the API reads `expires_at`): an expiry
    # that passed in between was refused as "Invalid 'expires_at'", the API's name for it.
    ticks = itertools.count(1_800_000_000, 100)
    monkeypatch.setattr(timeparse, "time", types.SimpleNamespace(time=lambda: float(next(ticks))))
    status, out, err = run("keys", "create", "--name", "x", "--expires", "50s")
    assert (status, out) == (2, "")
    assert err.startswith("gateway: Invalid --expires: "), err
    assert "is not in the future" in err


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("--rpm", "١٢٣", 123),  # int() reads other scripts' digits, as the operator meant
        ("--rpm", "1_000", 1000),
        ("--rpm", " 5 ", 5),
        ("--budget-usd", "1e308", 1e308),
        ("--notes", "😀" * 2000, "😀" * 2000),  # characters, as the API counts them
    ],
)
def test_cli_numbers_and_text_an_operator_may_type(
    run: Run, option: str, value: str, shown: Any
) -> None:
    created = run.json("keys", "create", "--name", "x", option, value)
    assert created[option[2:].replace("-", "_")] == shown


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--rpm", "0x10"),
        ("--rpm", ""),
        ("--rpm", "1e3"),
        ("--budget-usd", "-0"),
        ("--budget-usd", "0x10"),
        ("--expires", "0d"),
        ("--expires", "9999-12-31T23:59:59.5"),
        ("--expires", "nan"),
    ],
)
def test_cli_refuses_at_parse_time(run: Run, option: str, value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        run("keys", "create", "--name", "x", option, value)
    assert exited.value.code == 2
    assert run.json("keys", "list") == []


def test_cli_counts_characters_of_notes_as_the_api_does(run: Run) -> None:
    status, out, err = run("keys", "create", "--name", "x", "--notes", "😀" * 2001)
    assert (status, out) == (2, "")
    assert err.startswith("gateway: Invalid --notes: Expected `str` of length <= 2000"), err
