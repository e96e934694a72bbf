"""A read of whole events relayed in one piece (its plain chunks as the upstream's bytes, the
rest looked at event by event), attacked from outside: whatever an upstream mixes into one
read, the client gets exactly what it gets when the same events come a byte at a time (where
nothing is ever relayed in one piece), and the usage row is the same."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient

from gateway.settings import ModelConfig, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    openai_client,
    provider_config,
    start_gateway,
    usage_rows,
)
from tests.test_attack_upstream import (
    KINDS,
    UPSTREAM_KEY,
    Answer,
    RawUpstream,
    Rig,
    chunk,
    http,
    one_byte_writes,
    sends,
    sse,
    until_close,
)

Build = Callable[[str, Answer], Awaitable[Rig]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    upstreams: list[RawUpstream] = []

    async def make(kind: str, answer: Answer) -> Rig:
        upstream = RawUpstream(answer)
        await upstream.start()
        upstreams.append(upstream)
        fields: dict[str, Any] = {"api_keys": (UPSTREAM_KEY,)}
        if kind == "azure":
            fields["api_version"] = "2024-10-21"
        base = f"http://127.0.0.1:{upstream.port}{KINDS[kind]}"
        provider = provider_config(kind, name="up", base_url=base, **fields)
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        gateway = await start_gateway(
            aiohttp_client, make_settings(providers=(provider,), models=(model,))
        )
        return Rig(gateway, await create_key(gateway), kind, upstream)

    yield make
    for upstream in upstreams:
        assert upstream.server is not None
        upstream.server.close()


def text(content: str, finish: str | None = None) -> bytes:
    """A legacy completions (`text_completion`) stream chunk."""
    reason = b"null" if finish is None else b'"%b"' % finish.encode()
    return (
        b'{"id":"c","object":"text_completion","created":1,"model":"m-1","choices":'
        b'[{"index":0,"text":"%b","logprobs":null,"finish_reason":%b}]}'
        % (content.encode(), reason)
    )


STOP = (
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}]}'
)
USAGE = (
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
)
USAGE_2 = USAGE.replace(b'"prompt_tokens":3', b'"prompt_tokens":7')
ERROR = b'{"error":{"message":"overloaded mid-stream","type":"server_error","code":null}}'
DONE = b"[DONE]"
NULL_USAGE = chunk("vllm")[:-1] + b',"usage":null}'
NULL_USAGE_STOP = STOP[:-1] + b',"usage":null}'


def raw(*events: bytes, sep: bytes = b"\n\n") -> bytes:
    return b"".join(event + sep for event in events)


# Each: the upstream's whole body. The reference is the same bytes a byte per read.
CHAT = {
    "usage-in-the-middle": sse(chunk("a"), USAGE, chunk("b"), STOP, DONE),
    "two-usage-chunks": sse(chunk("a"), STOP, USAGE, USAGE_2, DONE),
    "usage-first": sse(USAGE, chunk("a"), STOP, DONE),
    "error-first": sse(ERROR, chunk("a"), STOP, DONE),
    "error-in-the-middle": sse(chunk("a"), ERROR, chunk("b"), DONE),
    "error-last": sse(chunk("a"), chunk("b"), ERROR),
    "error-before-done": sse(chunk("a"), ERROR, DONE),
    "done-in-the-middle": sse(chunk("a"), STOP, DONE, chunk("late"), DONE),
    "done-twice": sse(chunk("a"), STOP, USAGE, DONE, DONE),
    "done-alone-in-its-read": sse(DONE),
    "comment-before-done": sse(chunk("a"), STOP, USAGE) + b": bye\n\n" + sse(DONE),
    "event-line-before-done": sse(chunk("a"), STOP) + b"event: end\ndata: [DONE]\n\n",
    "id-line-before-done": sse(chunk("a"), STOP) + b"id: 9\ndata: [DONE]\n\n",
    "crlf": raw(*(b"data: " + e for e in (chunk("a"), STOP, USAGE, DONE)), sep=b"\r\n\r\n"),
    "crlf-head-lf-tail": raw(b"data: " + chunk("a"), sep=b"\r\n\r\n") + sse(STOP, USAGE, DONE),
    "lf-head-crlf-done": sse(chunk("a"), STOP) + b"data: [DONE]\r\n\r\n",
    "cr-then-lf-before-done": sse(chunk("a"), STOP)[:-2] + b"\r\n\n" + sse(DONE),
    "done-text-in-a-string": sse(chunk("data: [DONE]"), chunk("\n\ndata: [DONE]\n\n"), STOP, DONE),
    "usage-text-in-a-string": sse(chunk('"usage":{"prompt_tokens":99}'), STOP, USAGE, DONE),
    "no-space-after-data": raw(b"data:" + chunk("a"), b"data:" + STOP, b"data:" + USAGE)
    + sse(DONE),
    "no-space-on-done": sse(chunk("a"), STOP, USAGE) + b"data:[DONE]\n\n",
    "multi-line-data": sse(chunk("a")) + b'data: {"id":"c",\ndata: "choices":[]}\n\n' + sse(DONE),
    "multi-line-usage": sse(chunk("a"), STOP)
    + b"data: "
    + USAGE.replace(b",", b",\ndata: ")
    + b"\n\n"
    + sse(DONE),
    "two-objects-in-one-event": sse(chunk("a"), chunk("b") + b"," + chunk("c"), STOP, DONE),
    "a-string-across-events": sse(chunk("a"), b'{"a":"', b'"},{}', STOP, DONE),
    "a-string-across-events-after-usage": sse(chunk("a"), USAGE, b'{"a":"', b'"},{}', DONE),
    "vllm-null-usage": sse(NULL_USAGE, NULL_USAGE, NULL_USAGE_STOP, USAGE, DONE),
    "nested-usage-key": sse(chunk("a")[:-1] + b',"x":{"usage":{"a":1}}}', STOP, USAGE, DONE),
    "error-null": sse(chunk("a")[:-1] + b',"error":null}', STOP, DONE),
    "blank-data-before-done": sse(chunk("a"), STOP, b"", DONE),
    "space-data-before-done": sse(chunk("a"), STOP, b" ", DONE),
    "trailing-space-on-done": sse(chunk("a"), STOP) + b"data: [DONE] \n\n",
    "no-done-after-stop": sse(chunk("a"), STOP, USAGE),
    "invalid-utf8-after-plain-chunks": sse(chunk("a"), chunk(b"\xff\xfeok"), STOP, USAGE, DONE),
    "blank-line-after-done": sse(chunk("a"), STOP, USAGE, DONE) + b"\n",
    "ping-after-done": sse(chunk("a"), STOP, DONE) + b": ping\n\n",
    "no-done-no-stop": sse(chunk("a"), USAGE),
    "key-echoed-after-plain-chunks": sse(chunk("a"), chunk(f"key {UPSTREAM_KEY}"), STOP, DONE),
    "key-echoed-in-the-usage-chunk": sse(
        chunk("a"), STOP, USAGE[:-1] + b',"k":"%b"}' % UPSTREAM_KEY.encode(), DONE
    ),
}

FILTER = (
    b'{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    b'[{"prompt_index":0,"content_filter_results":{}}]}'
)
AZURE = {
    "filter-first": sse(FILTER, chunk("a"), STOP, USAGE, DONE),
    "filter-after-chunks": sse(chunk("a"), FILTER, STOP, USAGE, DONE),
    "filter-then-error": sse(FILTER, chunk("a"), ERROR),
    "chunks-with-filter-results": sse(
        chunk("a")[:-2] + b',"content_filter_results":{}}]}', STOP, USAGE, DONE
    ),
}

COMPLETIONS = {
    "usage-then-done": sse(text("a"), text("b", "stop"), USAGE, DONE),
    "usage-in-the-middle": sse(text("a"), USAGE, text("b", "stop"), DONE),
    "error-in-the-middle": sse(text("a"), ERROR, text("b"), DONE),
    "done-in-the-middle": sse(text("a", "stop"), DONE, text("late"), DONE),
    "no-done": sse(text("a"), text("b", "stop"), USAGE),
}


async def stream(rig: Rig, path: str, body: dict[str, Any], wants_usage: bool) -> tuple[int, bytes]:
    if wants_usage:
        body = {**body, "stream_options": {"include_usage": True}}
    return await rig.post(path, body)


async def both_ways(
    build: Build,
    kind: str,
    upstream: bytes | tuple[bytes, ...],
    path: str,
    body: dict[str, Any],
    wants_usage: bool,
) -> tuple[tuple[int, bytes], dict[str, Any]]:
    """What the client gets and the usage row, with the upstream's body in one read (or in
    the reads `upstream` splits it into) and a byte per read: asserted the same, returned
    once."""
    if isinstance(upstream, tuple):
        whole = await build(kind, pieces(*upstream))
        upstream = b"".join(upstream)
    else:
        whole = await build(kind, sends(until_close(upstream)))
    apart = await build(kind, one_byte_writes(upstream))
    got = await stream(whole, path, body, wants_usage)
    expected = await stream(apart, path, body, wants_usage)
    assert got == expected
    row, expected_row = (await usage_rows(whole.gateway))[-1], (await usage_rows(apart.gateway))[-1]
    fields = ("status", "prompt_tokens", "completion_tokens", "estimated")
    assert {f: row[f] for f in fields} == {f: expected_row[f] for f in fields}
    return got, row


def check_framing(answer: tuple[int, bytes]) -> None:
    """One `data: [DONE]`, at the very end, unless the stream ended with an error event."""
    status, got = answer
    if status != 200:
        assert got.startswith(b'{"error":'), got  # failed before the stream started
        return
    assert got.count(b"data: [DONE]\n\n") <= 1
    if b"data: [DONE]\n\n" in got:
        assert got.endswith(b"data: [DONE]\n\n")
    else:
        assert got.endswith(b"\n\n") and b'"error"' in got.rsplit(b"data: ", 1)[-1], got


CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def chat_both_ways(
    build: Build, upstream: bytes | tuple[bytes, ...], wants_usage: bool = False
) -> tuple[tuple[int, bytes], dict[str, Any]]:
    """`both_ways` for a chat stream through the `openai` provider (most cases here)."""
    return await both_ways(
        build, "openai", upstream, "/v1/chat/completions", CHAT_BODY, wants_usage
    )


@pytest.mark.parametrize("wants_usage", [False, True], ids=["no-usage", "usage"])
@pytest.mark.parametrize("case", list(CHAT))
async def test_a_chat_read_reaches_the_client_as_it_would_event_by_event(
    build: Build, case: str, wants_usage: bool
) -> None:
    got, _ = await chat_both_ways(build, CHAT[case], wants_usage)
    check_framing(got)
    if not wants_usage:
        assert USAGE not in got[1]  # asked for by the gateway, not by the client


@pytest.mark.parametrize("wants_usage", [False, True], ids=["no-usage", "usage"])
@pytest.mark.parametrize("case", list(COMPLETIONS))
async def test_a_completions_read_reaches_the_client_as_it_would_event_by_event(
    build: Build, case: str, wants_usage: bool
) -> None:
    body = {"model": "m", "prompt": "hi", "stream": True}
    got, _ = await both_ways(
        build, "openai", COMPLETIONS[case], "/v1/completions", body, wants_usage
    )
    check_framing(got)


@pytest.mark.parametrize("wants_usage", [False, True], ids=["no-usage", "usage"])
@pytest.mark.parametrize("case", list(AZURE))
async def test_an_azure_read_reaches_the_client_as_it_would_event_by_event(
    build: Build, case: str, wants_usage: bool
) -> None:
    got, _ = await both_ways(
        build, "azure", AZURE[case], "/v1/chat/completions", CHAT_BODY, wants_usage
    )
    check_framing(got)
    assert b"prompt_filter_results" not in got[1]  # Azure's own chunk, for no OpenAI client


async def test_a_key_echoed_after_plain_chunks_of_a_read_is_redacted(build: Build) -> None:
    rig = await build("openai", sends(until_close(CHAT["key-echoed-after-plain-chunks"])))
    chunks = await rig.sdk(stream=True)
    assert [c.choices[0].delta.content for c in chunks] == ["a", "key [redacted]", None]


async def test_the_sdk_reads_a_read_with_its_usage_chunk_in_the_middle(build: Build) -> None:
    rig = await build("openai", sends(until_close(CHAT["usage-in-the-middle"])))
    async with openai_client(rig.gateway, rig.key) as client:
        chunks = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        got = [chunk async for chunk in chunks]
    assert [c.choices[0].delta.content for c in got if c.choices] == ["a", "b", None]
    assert [c.usage.prompt_tokens for c in got if c.usage] == [3]


async def test_megabytes_of_chunks_in_one_read_pass_byte_for_byte(build: Build) -> None:
    chunks = sse(*[chunk(f"token {i} ") for i in range(20_000)], STOP)  # about 3 MB
    rig = await build("openai", sends(until_close(chunks + sse(USAGE, DONE))))
    status, got = await rig.post("/v1/chat/completions", CHAT_BODY)
    assert status == 200
    assert got == chunks + sse(DONE)
    row = (await usage_rows(rig.gateway))[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (3, 2, 0)


async def test_an_sdk_raises_the_error_event_after_the_plain_chunks_of_its_read(
    build: Build,
) -> None:
    rig = await build("openai", sends(until_close(CHAT["error-in-the-middle"])))
    async with openai_client(rig.gateway, rig.key) as client:
        chunks = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        seen = []
        with pytest.raises(openai.APIError, match="overloaded mid-stream"):
            async for c in chunks:
                seen.append(c.choices[0].delta.content)
    assert seen == ["a"]


def pieces(*parts: bytes) -> Answer:
    """The body in these writes, each drained (with TCP_NODELAY: a read each, mostly)."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(http("200 OK", {"Content-Type": "text/event-stream", "Connection": "close"}))
        for part in parts:
            writer.write(part)
            await writer.drain()
        writer.close()

    return answer


SPLITS = {
    "done-split": (sse(chunk("a"), STOP, USAGE) + b"data: [DO", b"NE]\n\n"),
    "done-split-after-its-line": (sse(chunk("a"), STOP) + b"data: [DONE]\n", b"\n"),
    "done-split-before-its-separator": (sse(chunk("a"), STOP)[:-1], b"\n" + sse(DONE)),
    "usage-split": (sse(chunk("a"), STOP) + b"data: " + USAGE[:20], USAGE[20:] + b"\n\n"),
    "cr-split-from-its-lf": (b"data: " + chunk("a") + b"\r", b"\n\r\n" + sse(STOP, DONE)),
    "reads-each-ending-in-the-usage": (sse(chunk("a"), USAGE), sse(STOP, USAGE_2, DONE)),
}


@pytest.mark.parametrize("case", list(SPLITS))
async def test_events_split_across_reads_reach_the_client_as_event_by_event(
    build: Build, case: str
) -> None:
    got, _ = await chat_both_ways(build, SPLITS[case])
    check_framing(got)


def chunked(body: bytes) -> bytes:
    """A 200 event stream in one HTTP chunk, the connection kept alive for the next request."""
    head = http("200 OK", {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})
    return head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)


def keep_alive(data: bytes) -> Answer:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()  # and the connection stays open for the next request

    return answer


async def test_many_streams_at_once_over_kept_alive_upstream_connections(build: Build) -> None:
    # Each answer a read of chunks, usage and [DONE], its HTTP end right behind: 100 streams
    # at once, then 100 more on the upstream connections the first ones left.
    body = CHAT["two-usage-chunks"]
    rig = await build("openai", keep_alive(chunked(body)))
    expected = sse(chunk("a"), STOP, DONE)
    for _ in range(2):
        answers = await asyncio.gather(
            *(rig.post("/v1/chat/completions", CHAT_BODY) for _ in range(100))
        )
        assert answers == [(200, expected)] * 100
    rows = await usage_rows(rig.gateway)
    assert {(r["status"], r["prompt_tokens"], r["estimated"]) for r in rows} == {(200, 7, 0)}
    assert len(rows) == 200
    assert len(rig.upstream.requests) == 200
