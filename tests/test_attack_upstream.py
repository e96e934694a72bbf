"""The one upstream client attacked from outside, byte by byte: a raw TCP upstream that
misbehaves below HTTP's level (floods, broken encodings, bad UTF-8, answers that are not JSON,
echoed secrets), the real gateway in front of it, and the official `openai` client, which must
always get a result or an `openai.APIError` it can handle, never a parse crash or a hang."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.http_writer import StreamWriter
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway import cli, intake
from gateway.providers import _sse
from gateway.settings import ModelConfig, RoutingSettings, Target
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    calls_in,
    create_key,
    free_port,
    openai_client,
    provider_config,
    start_gateway,
    usage_rows,
)

MiB = 1024 * 1024
UPSTREAM_KEY = "sk-upstream-0123456789abcdefghij"
# Base URL path per provider type; "responses" is an openai provider with `responses_api`.
KINDS = {"openai": "/v1", "responses": "/v1", "azure": "", "anthropic": "", "gemini": ""}
HI: Any = [{"role": "user", "content": "hi"}]

Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


def http(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A raw HTTP/1.1 response, exactly as given (no header is added)."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


def whole(body: bytes, content_type: str = "application/json", **headers: str) -> bytes:
    return http(
        "200 OK", {"Content-Type": content_type, **headers, "Content-Length": str(len(body))}, body
    )


def until_close(body: bytes, content_type: str = "text/event-stream") -> bytes:
    """A 200 whose body ends when the connection closes (no length, no chunks)."""
    return http("200 OK", {"Content-Type": content_type, "Connection": "close"}, body)


def sends(data: bytes) -> Answer:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()

    return answer


@dataclass
class RawUpstream:
    """An upstream below HTTP's level: each request (head and body) is read and recorded,
    then `answer` writes whatever bytes it likes, with TCP_NODELAY so writes go out as
    written."""

    answer: Answer
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line[15:])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    ),
                    0,
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.answer(request, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@dataclass
class Rig:
    gateway: TestClient[Any, Any]
    key: str
    kind: str
    upstream: RawUpstream

    def body(self, stream: bool) -> tuple[str, dict[str, Any]]:
        if self.kind == "responses":
            return "/v1/responses", {"model": "m", "input": "hi", "stream": stream}
        return "/v1/chat/completions", {"model": "m", "messages": HI, "stream": stream}

    async def call(self, *, stream: bool) -> tuple[int, bytes]:
        path, body = self.body(stream)
        return await self.post(path, body)

    async def call_with(self, word: bytes) -> tuple[int, bytes]:
        """A non-streaming chat request whose prompt is `word` (for upstreams that read it)."""
        messages = [{"role": "user", "content": word.decode()}]
        return await self.post("/v1/chat/completions", {"model": "m", "messages": messages})

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        resp = await self.gateway.post(
            path, json=body, headers={"Authorization": f"Bearer {self.key}"}
        )
        return resp.status, await resp.read()

    async def sdk_with(self, word: str) -> Any:
        """A streamed chat request through the SDK whose prompt is `word`."""
        messages: Any = [{"role": "user", "content": word}]
        async with openai_client(self.gateway, self.key) as client:
            chunks = await client.chat.completions.create(model="m", messages=messages, stream=True)
            return [chunk async for chunk in chunks]

    async def sdk(self, *, stream: bool) -> Any:
        """What the official client makes of the answer: chunks, a completion, or its error."""
        async with openai_client(self.gateway, self.key) as client:
            try:
                if self.kind == "responses":
                    if stream:
                        events = await client.responses.create(model="m", input="hi", stream=True)
                        return [event async for event in events]
                    return await client.responses.create(model="m", input="hi")
                if stream:
                    chunks = await client.chat.completions.create(
                        model="m", messages=HI, stream=True
                    )
                    return [chunk async for chunk in chunks]
                return await client.chat.completions.create(model="m", messages=HI)
            except openai.APIError as exc:
                return exc


Build = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    servers: list[asyncio.Server] = []

    async def make(
        kind: str, answer: Answer, server: Any = None, host: str = "127.0.0.1", **fields: Any
    ) -> Rig:
        server = server or {}
        upstream = RawUpstream(answer)
        await upstream.start()
        assert upstream.server is not None
        servers.append(upstream.server)
        base = f"http://{host}:{upstream.port}{KINDS[kind]}"
        config_kind = kind
        if kind == "responses":
            config_kind, fields = "openai", {**fields, "responses_api": True}
        if kind == "azure":
            fields = {"api_version": "2024-10-21", **fields}
        fields.setdefault("api_keys", (UPSTREAM_KEY,))
        provider = provider_config(config_kind, name="up", base_url=base, **fields)
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        settings = make_settings(providers=(provider,), models=(model,), **server)
        gateway = await start_gateway(aiohttp_client, settings)
        return Rig(gateway, await create_key(gateway), kind, upstream)

    yield make
    for server in servers:
        server.close()


def chunk(content: str | bytes) -> bytes:
    """An OpenAI chat.completion.chunk payload (bytes content is inserted as it is)."""
    text = content if isinstance(content, bytes) else json.dumps(content)[1:-1].encode()
    return (
        b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
        b'[{"index":0,"delta":{"content":"%b"},"finish_reason":null}]}' % text
    )


COMPLETION = (
    b'{"id":"c","object":"chat.completion","created":1,"model":"m-1","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"%b"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


def sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: %b\n\n" % p for p in payloads)


# --- SSE: floods, and events an SDK cannot parse ----------------------------------------------


@pytest.mark.parametrize("junk", [b"\n", b"\r\n", b": ping\n\n"], ids=["lf", "crlf", "pings"])
async def test_a_flood_before_the_first_event_costs_work_per_read(
    build: Build, junk: bytes
) -> None:
    # 8 MiB of blank lines (or pings) before the answer: once a microsecond of Python per
    # byte, enough for a few upstreams to starve every other client of the event loop.
    flood = junk * (8 * MiB // len(junk))
    body = flood + sse(chunk("hi"), b"[DONE]")
    rig = await build("openai", sends(until_close(body)))
    with calls_in(_sse) as work:
        chunks = await rig.sdk(stream=True)
    assert [c.choices[0].delta.content for c in chunks] == ["hi"]
    assert sum(work.values()) <= len(body) // 500, work.most_common(5)


@pytest.mark.parametrize("junk", [b"\n", b"\r\n", b": ping\n\n"], ids=["lf", "crlf", "pings"])
def test_a_flood_and_its_first_event_in_one_read_cost_work_per_read(junk: bytes) -> None:
    # The test above, whatever the reads: on a loaded machine the flood's last read held
    # 350 KB of pings and the first event, and each ping cost two `startswith`.
    flood = junk * (8 * MiB // len(junk))
    for events in ([chunk("hi")], [chunk("hi"), chunk("!")]):
        decoder = _sse.SSEDecoder(64 * 1024)
        with calls_in(_sse) as work:
            payloads = decoder.feed(flood + sse(*events))
        assert payloads == events
        assert sum(work.values()) <= 40, work.most_common(5)  # a few calls, not one a ping


BAD_EVENTS = {
    "not-json": b"hello",
    "nul-byte": chunk(b"a\x00b"),
    "array": b"[1,2]",
    "string": b'"str"',
    "truncated": chunk("x")[:40],
    "trailing-garbage": b'{"id": "c"} x',
}


@pytest.mark.parametrize("first", [True, False], ids=["first", "mid-stream"])
@pytest.mark.parametrize("bad", list(BAD_EVENTS))
@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_events_that_are_not_json_objects_are_errors_the_sdk_raises(
    build: Build, kind: str, bad: str, first: bool
) -> None:
    # Relayed as they were, each made the SDK raise json.JSONDecodeError (or yield a list).
    good = [] if first else [chunk("hi")]
    rig = await build(kind, sends(until_close(sse(*good, BAD_EVENTS[bad], b"[DONE]"))))
    result = await rig.sdk(stream=True)
    assert isinstance(result, openai.APIError), result
    assert "not a JSON object" in result.message
    if first:
        assert isinstance(result, openai.APIStatusError) and result.status_code == 503


RESPONSE_CREATED = {
    "type": "response.created",
    "sequence_number": 0,
    "response": {"id": "resp_1", "object": "response", "status": "in_progress", "output": []},
}


@pytest.mark.parametrize("bad", ["not-json", "nul-byte", "array", "truncated", "trailing-garbage"])
async def test_responses_events_that_are_not_json_objects_are_errors_the_sdk_raises(
    build: Build, bad: str
) -> None:
    events = named_events([RESPONSE_CREATED]) + b"event: x\ndata: %b\n\n" % BAD_EVENTS[bad]
    rig = await build("responses", sends(until_close(events)))
    result = await rig.sdk(stream=True)
    # The Responses API reports a failure mid-stream as an `error` event, as OpenAI does.
    assert [event.type for event in result] == ["response.created", "error"]
    assert "malformed" in result[-1].message


async def test_an_event_the_stream_ends_in_the_middle_of_is_an_error(build: Build) -> None:
    rig = await build("openai", sends(until_close(sse(chunk("hi")) + b"data: " + chunk("x")[:30])))
    status, body = await rig.call(stream=True)
    assert status == 200
    assert body.startswith(b"data: " + chunk("hi") + b"\n\n")
    assert b'"code":"upstream_error"' in body and b"not a JSON object" in body
    assert not body.endswith(b"data: [DONE]\n\n")


async def test_empty_data_events_are_not_relayed(build: Build) -> None:
    rig = await build(
        "openai", sends(until_close(b"data:\n\ndata: \n\n" + sse(chunk("hi"), b"[DONE]")))
    )
    chunks = await rig.sdk(stream=True)
    assert [c.choices[0].delta.content for c in chunks] == ["hi"]


@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_invalid_utf8_in_a_stream_reaches_the_sdk_as_replacement_characters(
    build: Build, kind: str
) -> None:
    # Relayed as it was, one bad byte made the SDK fail to decode the whole stream
    # (UnicodeDecodeError). The SSE standard reads invalid bytes as U+FFFD.
    events = sse(chunk("h\u00e9"), chunk(b"bad \xff\xfe byte"), chunk(b"half \xe2\x82"), b"[DONE]")
    rig = await build(kind, sends(until_close(events)))
    chunks = await rig.sdk(stream=True)
    assert [c.choices[0].delta.content for c in chunks] == [
        "h\u00e9",
        "bad \ufffd\ufffd byte",
        "half \ufffd",
    ]


# --- Whole answers: bad UTF-8, and answers that are not JSON objects --------------------------


@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_invalid_utf8_in_an_answer_reaches_the_sdk_as_replacement_characters(
    build: Build, kind: str
) -> None:
    rig = await build(kind, sends(whole(COMPLETION % b"bad \xff byte")))
    completion = await rig.sdk(stream=False)
    assert completion.choices[0].message.content == "bad \ufffd byte"


ANTHROPIC_TOOL_USE = (
    b'{"id":"msg_1","type":"message","role":"assistant","model":"m-1","content":[{"type":'
    b'"tool_use","id":"toolu_1","name":"f","input":{"city":"\xff\xfeParis"}}],"stop_reason":'
    b'"tool_use","stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}'
)
GEMINI_FUNCTION_CALL = (
    b'{"candidates":[{"content":{"role":"model","parts":[{"functionCall":{"name":"f","args":'
    b'{"city":"\xff\xfeParis"}}}]},"finishReason":"STOP"}],"usageMetadata":'
    b'{"promptTokenCount":1,"candidatesTokenCount":1,"totalTokenCount":2}}'
)


@pytest.mark.parametrize(
    ("kind", "answer"), [("anthropic", ANTHROPIC_TOOL_USE), ("gemini", GEMINI_FUNCTION_CALL)]
)
async def test_invalid_utf8_in_translated_tool_arguments_is_not_a_gateway_crash(
    build: Build, kind: str, answer: bytes
) -> None:
    # Tool arguments are kept as raw JSON and decoded to text late: one bad byte was an
    # unhandled UnicodeDecodeError, a 500 logged as a gateway bug.
    rig = await build(kind, sends(whole(answer)))
    completion = await rig.sdk(stream=False)
    call = completion.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "\ufffd\ufffdParis"}


NESTED = b"[" * 5000 + b"]" * 5000
DEEP = b'{"id":"c","x":%b}' % NESTED
DEEP_USAGE = b'{"choices":[],"usage":{"prompt_tokens":1,"x":%b}}' % NESTED
DEEP_ERROR = b'{"error":{"message":"m","x":%b}}' % NESTED


@pytest.mark.parametrize(
    ("kind", "stream", "answer"),
    [
        ("openai", False, sends(whole(DEEP))),
        ("openai", False, sends(whole(DEEP_USAGE))),
        ("openai", True, sends(until_close(sse(chunk("hi"), DEEP)))),
        ("openai", True, sends(until_close(sse(DEEP_USAGE)))),
        ("openai", True, sends(until_close(sse(DEEP_ERROR)))),
        ("azure", True, sends(until_close(sse(b'{"prompt_filter_results":' + DEEP[1:])))),
        ("responses", False, sends(whole(DEEP))),
        ("responses", True, sends(until_close(b"event: x\ndata: %b\n\n" % DEEP))),
        ("anthropic", True, sends(until_close(b"event: x\ndata: %b\n\n" % DEEP))),
        ("gemini", True, sends(until_close(sse(DEEP)))),
        ("gemini", True, sends(until_close(sse(DEEP_ERROR)))),
        ("openai", False, sends(whole(DEEP_ERROR).replace(b"200 OK", b"400 Bad Request"))),
        ("anthropic", False, sends(whole(DEEP_ERROR).replace(b"200 OK", b"500 Oops"))),
    ],
    ids=[
        "answer",
        "usage",
        "event",
        "usage-event",
        "error-event",
        "azure-filter-event",
        "responses-answer",
        "responses-event",
        "anthropic-event",
        "gemini-event",
        "gemini-error-event",
        "400-body",
        "500-body",
    ],
)
async def test_json_nested_too_deep_to_decode_is_malformed_not_a_gateway_crash(
    build: Build, kind: str, stream: bool, answer: Answer
) -> None:
    # msgspec raises RecursionError (not one of its own errors) past ~1000 levels; where only
    # its own were caught, the answer was an unhandled 500, logged as a gateway bug.
    rig = await build(kind, answer)
    with capture_logs() as logs:
        status, body = await rig.call(stream=stream)
    assert status in (200, 400, 502, 503), body
    assert b"The gateway failed" not in body
    assert not [e for e in logs if e["log_level"] == "error"], logs


async def test_a_messages_event_nested_too_deep_is_malformed_not_a_gateway_crash(
    build: Build,
) -> None:
    # The same, on the Messages API's pass-through to Anthropic (its events are relayed).
    start = b'{"type":"message_start","message":{"id":"m","x":%b}}' % NESTED
    rig = await build(
        "anthropic", sends(until_close(b"event: message_start\ndata: %b\n\n" % start))
    )
    body = {"model": "m", "max_tokens": 10, "messages": HI, "stream": True}
    headers = {"x-api-key": rig.key, "anthropic-version": "2023-06-01"}
    with capture_logs() as logs:
        resp = await rig.gateway.post("/v1/messages", json=body, headers=headers)
        answer = await resp.read()
    assert b"malformed stream event" in answer, answer
    assert not [e for e in logs if e["log_level"] == "error"], logs


@pytest.mark.parametrize("answer", [b"[1,2]", b'"str"', b"null", b"42", b"hello", b""])
@pytest.mark.parametrize("kind", ["openai", "azure", "responses"])
async def test_an_answer_that_is_not_a_json_object_is_a_502(
    build: Build, kind: str, answer: bytes
) -> None:
    # Relayed as they were, the SDK returned a list or a str where a completion belongs.
    rig = await build(kind, sends(whole(answer)))
    result = await rig.sdk(stream=False)
    assert isinstance(result, openai.APIStatusError), result
    assert (result.status_code, result.code) == (502, "upstream_bad_response")
    assert "with something that is not a" in result.message


# --- Secrets: an upstream that echoes the gateway's key ----------------------------------------

ECHO = f"Invalid request from key {UPSTREAM_KEY} (account acme-prod)"


def error_status_bytes(status: int) -> bytes:
    body = json.dumps({"error": {"message": ECHO, "type": "invalid_request_error"}}).encode()
    head = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    return http(f"{status} Oops", head, body)


def error_status(status: int) -> Answer:
    return sends(error_status_bytes(status))


def named_events(events: list[dict[str, Any]]) -> bytes:
    """Events with an `event:` line naming their type (Anthropic's and the Responses API's)."""
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events
    )


ANTHROPIC_START: dict[str, Any] = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m-1",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 0},
    },
}
ANTHROPIC_TEXT_START = {
    "type": "content_block_start",
    "index": 0,
    "content_block": {"type": "text", "text": ""},
}


def anthropic_text(text: str) -> dict[str, Any]:
    delta = {"type": "text_delta", "text": text}
    return {"type": "content_block_delta", "index": 0, "delta": delta}


def error_event(kind: str, after_content: bool) -> Answer:
    """A stream that fails with an error event whose message holds the key."""
    error: dict[str, Any]
    if kind == "anthropic":
        error = {"type": "error", "error": {"type": "api_error", "message": ECHO}}
        text = [ANTHROPIC_TEXT_START, anthropic_text("hi")]
        events: list[dict[str, Any]] = [ANTHROPIC_START, *(text if after_content else []), error]
        body = named_events(events)
    elif kind == "gemini":
        part = {"candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]}}]}
        error = {"error": {"code": 500, "message": ECHO, "status": "INTERNAL"}}
        body = sse(*[json.dumps(e).encode() for e in ([part] if after_content else []) + [error]])
    elif kind == "responses":
        created = {
            "type": "response.created",
            "sequence_number": 0,
            "response": {
                "id": "resp_1",
                "object": "response",
                "status": "in_progress",
                "output": [],
            },
        }
        delta = {
            "type": "response.output_text.delta",
            "sequence_number": 1,
            "item_id": "m",
            "output_index": 0,
            "content_index": 0,
            "delta": "hi",
        }
        error = {"type": "error", "sequence_number": 2, "code": "server_error", "message": ECHO}
        events = [created, *([delta] if after_content else []), error]
        body = named_events(events)
    else:
        error = {"error": {"message": ECHO, "type": "server_error"}}
        body = sse(*([chunk("hi")] if after_content else []), json.dumps(error).encode())
    return sends(until_close(body))


SECRET_ATTACKS = [
    "status-400",
    "status-404",
    "status-418",
    "status-500",
    "event-first",
    "event-after-content",
]


@pytest.mark.parametrize("attack", SECRET_ATTACKS)
@pytest.mark.parametrize("kind", list(KINDS))
async def test_an_upstream_never_makes_the_gateway_hand_out_its_key(
    build: Build, kind: str, attack: str
) -> None:
    # Client-caused errors keep the upstream's message, and server errors said what the
    # upstream said: an upstream (or a proxy in front of it) that quotes the key it was sent
    # gave the gateway's credential to every client. Nor may the key reach the logs.
    stream = attack.startswith("event")
    if stream:
        answer = error_event(kind, after_content=attack == "event-after-content")
    else:
        answer = error_status(int(attack.removeprefix("status-")))
    rig = await build(kind, answer)
    with capture_logs() as logs:
        status, body = await rig.call(stream=stream)
    assert status != 200 or b"error" in body
    assert UPSTREAM_KEY.encode() not in body
    assert UPSTREAM_KEY not in repr(logs)
    if attack in ("status-400", "status-404"):  # the client's fault: the message is relayed
        assert b"[redacted]" in body and b"acme-prod" in body


@pytest.mark.parametrize("stream", [False, True])
async def test_a_key_echoed_in_an_answer_is_redacted(build: Build, stream: bool) -> None:
    text = f"your key is {UPSTREAM_KEY}".encode()
    answer = until_close(sse(chunk(text), b"[DONE]")) if stream else whole(COMPLETION % text)
    rig = await build("openai", sends(answer))
    result = await rig.sdk(stream=stream)
    content = result[0].choices[0].delta.content if stream else result.choices[0].message.content
    assert content == "your key is [redacted]"


async def test_short_placeholder_keys_are_not_redacted(build: Build) -> None:
    # Keyless local servers take any key ("ollama", "EMPTY"): a word that short is no secret,
    # and replacing it in answers would corrupt them.
    rig = await build("openai", sends(whole(COMPLETION % b"EMPTY is empty")), api_keys=("EMPTY",))
    completion = await rig.sdk(stream=False)
    assert completion.choices[0].message.content == "EMPTY is empty"
    assert b"authorization: Bearer EMPTY\r\n" in rig.upstream.requests[0]


async def test_an_account_out_of_credit_is_the_gateways_problem_and_fails_over(
    build: Build,
) -> None:
    # OpenRouter and DeepSeek say 402 when the operator's balance is spent. It was relayed
    # as "answered HTTP 402: <the upstream's text about the operator's account>", a 502 that
    # was never retried, so the account's other keys were never tried.
    broke = f"Insufficient balance on account acme-prod ({UPSTREAM_KEY[:12]}...)"

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        if UPSTREAM_KEY.encode() in request:
            body = json.dumps({"error": {"message": broke, "code": "insufficient_balance"}})
            writer.write(http("402 Payment Required", {"Content-Length": str(len(body))}))
            writer.write(body.encode())
        else:
            writer.write(whole(COMPLETION % b"from the second account"))
        await writer.drain()

    second = "sk-second-account-0123456789"
    routing = RoutingSettings(max_attempts=2, backoff_initial=0)
    rig = await build("openai", answer, {"routing": routing}, api_keys=(UPSTREAM_KEY, second))
    completions = [await rig.sdk(stream=False) for _ in range(2)]
    assert [c.choices[0].message.content for c in completions] == ["from the second account"] * 2

    rig = await build("openai", answer)  # one account only: the client learns nothing of it
    status, body = await rig.call(stream=False)
    error = json.loads(body)["error"]
    assert (status, error["code"]) == (503, "upstream_quota_exhausted")
    assert "acme-prod" not in error["message"] and "402" in error["message"]


# --- HTTP that is not HTTP -----------------------------------------------------------------

GOOD = COMPLETION % b"hi"
NOT_HTTP = {
    "garbage": b"\x00\x01 SSH-2.0-OpenSSH\r\n\r\n",
    "header-too-long": http("200 OK", {"X-Big": "a" * 100_000, "Content-Length": "2"}, b"{}"),
    "too-many-headers": http("200 OK", {**{f"X-{i}": "a" for i in range(20_000)}}, b""),
    "bad-chunk": http("200 OK", {"Transfer-Encoding": "chunked"}, b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunked-and-length": http(
        "200 OK",
        {"Transfer-Encoding": "chunked", "Content-Length": "5"},
        b"5\r\nhello\r\n0\r\n\r\n",
    ),
    "two-lengths": http("200 OK", {"Content-Length": "2", "content-length": "3"}, b"{}"),
    "nul-in-a-header": http("200 OK", {"X-A": "a\x00b", "Content-Length": "2"}, b"{}"),
    "brotli": whole(b"\x1b\x03\x00\xf8", **{"Content-Encoding": "br"}),  # not asked for
    "zstd": whole(b"(\xb5/\xfd\x00X\x11\x00\x00{}", **{"Content-Encoding": "zstd"}),
    "bad-gzip": whole(b"\x1f\x8b\x08\x00not gzip at all", **{"Content-Encoding": "gzip"}),
    "bad-deflate": whole(b"\x78\x9cnot deflate", **{"Content-Encoding": "deflate"}),
    "switching-protocols": http(
        "101 Switching Protocols", {"Upgrade": "h2c", "Connection": "Upgrade"}
    ),
    "no-final-status": http("100 Continue", {}) + http("101 Switching Protocols", {}),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(NOT_HTTP))
async def test_an_answer_that_is_not_valid_http_is_a_bad_response(
    build: Build, case: str, stream: bool
) -> None:
    # These were reported as "Could not reach the upstream provider" (an answer arrived:
    # the operator looks for a network fault that is not there) or, for a 101, read as if
    # it were the answer.
    rig = await build("openai", sends(NOT_HTTP[case]))
    result = await rig.sdk(stream=stream)
    assert isinstance(result, openai.APIStatusError), result
    assert result.status_code == 502
    assert result.code == "upstream_bad_response", result.message
    assert "127.0.0.1" not in result.message


TRUNCATED = {
    "closed-in-the-head": b"HTTP/1.1 200 OK\r\nContent-Ty",
    "length-too-long": http("200 OK", {"Content-Length": "100000"}, GOOD),
    "chunk-cut": http("200 OK", {"Transfer-Encoding": "chunked"}, b"ff\r\n" + GOOD[:20]),
}


@pytest.mark.parametrize("case", list(TRUNCATED))
async def test_an_answer_cut_short_is_a_dropped_connection(build: Build, case: str) -> None:
    rig = await build("openai", sends(TRUNCATED[case]))
    result = await rig.sdk(stream=False)
    assert isinstance(result, openai.APIStatusError), result
    assert (result.status_code, result.code) == (502, "upstream_connection_error")
    assert "closed the connection" in result.message


# --- Slow upstreams ------------------------------------------------------------------------


@dataclass
class Trickle:
    """An answer that never ends: `head`, then `piece` every `every` seconds, until `most`
    pieces are out (then the connection closes, so a test always ends)."""

    head: bytes
    piece: bytes
    every: float = 0.05
    most: int = 25
    sent: int = 0

    async def __call__(self, request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(self.head)
        await writer.drain()
        while self.sent < self.most:
            await asyncio.sleep(self.every)
            writer.write(self.piece)
            await writer.drain()
            self.sent += 1
        writer.close()


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def test_a_trickled_answer_is_cut_at_total_timeout(build: Build) -> None:
    # One byte at a time keeps every read short, so only the whole-answer bound can end it.
    head = http("200 OK", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    trickle = Trickle(head + chunked(b'{"id": "'), chunked(b"x"))
    rig = await build("openai", trickle, read_timeout=60.0, total_timeout=0.2)
    status, body = await rig.call(stream=False)
    assert status == 504 and b"upstream_timeout" in body
    assert trickle.sent < trickle.most  # ended by the gateway, at ~4 of 25 pieces


SSE_HEAD = http("200 OK", {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})
SLOW_STARTS = {  # (what comes at once, what then trickles)
    "pings": (SSE_HEAD, chunked(b": ping\n\n")),
    "partial-event": (SSE_HEAD + chunked(b"data: {"), chunked(b" ")),
    "trickled-head": (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"),
}


@pytest.mark.parametrize(
    "first_byte_timeout",
    [0.2, None],  # None: first_byte_timeout defaults to read_timeout, pings or not
    ids=["first_byte_timeout", "default"],
)
@pytest.mark.parametrize("start", list(SLOW_STARTS))
async def test_a_stream_that_never_sends_its_first_event_is_a_timeout(
    build: Build, start: str, first_byte_timeout: float | None
) -> None:
    trickle = Trickle(*SLOW_STARTS[start])
    # No byte the upstream sends can stop the timer, so a loaded machine cannot fail this.
    fields = {"read_timeout": 0.2, "first_byte_timeout": first_byte_timeout}
    rig = await build("openai", trickle, **fields)
    status, body = await rig.call(stream=True)
    assert (status, trickle.sent < trickle.most) == (504, True), body


async def test_a_stream_that_stalls_mid_event_ends_with_an_error_event(build: Build) -> None:
    # After the first event, read_timeout bounds each silence: a stall in the middle of an
    # event ends the stream with an error event the SDK raises, not a hang.
    release = asyncio.Event()

    async def stall(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(until_close(sse(chunk("hi")) + b'data: {"id":'))
        await writer.drain()
        await release.wait()

    rig = await build("openai", stall, read_timeout=0.5)
    try:
        async with openai_client(rig.gateway, rig.key) as client:
            stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
            seen = []
            with pytest.raises(openai.APIError, match="did not answer in time"):
                async for event in stream:
                    seen.append(event.choices[0].delta.content)
        assert seen == ["hi"]
    finally:
        release.set()


async def test_a_stream_longer_than_read_timeout_lives_while_events_keep_coming(
    build: Build,
) -> None:
    # read_timeout bounds each silence, not the stream: 30 events 0.03 s apart (about 0.9 s)
    # pass a read_timeout of 0.3 s.
    events = Trickle(SSE_HEAD, chunked(sse(chunk("x"))), every=0.03, most=30)
    rig = await build("openai", events, read_timeout=0.3)
    status, body = await rig.call(stream=True)
    assert status == 200
    assert body.count(b'"content":"x"') == 30


async def test_a_stream_arms_no_timer_per_upstream_read(build: Build) -> None:
    # The upstream client's watchdog bounds each silence; aiohttp's sock_read timer (one
    # TimerHandle made and cancelled per read) is not used for streams.
    events = Trickle(SSE_HEAD, chunked(sse(chunk("x"))), every=0.002, most=100)
    rig = await build("openai", events, read_timeout=30.0)
    loop = asyncio.get_running_loop()
    armed: list[str] = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        task = asyncio.current_task()
        # The key cache's poll (every 0.1 s in tests) runs beside the stream, not for it.
        if task is None or task.get_name() != "key-cache-refresh":
            armed.append(getattr(callback, "__qualname__", repr(callback)))
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = counting  # type: ignore[method-assign]
    try:
        status, body = await rig.call(stream=True)
    finally:
        del loop.call_at
    assert status == 200 and body.count(b'"content":"x"') == 100
    # The fake upstream's own sleeps (one per event) are not the gateway's timers.
    gateway_timers = [name for name in armed if "_set_result_unless_cancelled" not in name]
    assert len(gateway_timers) < 10, gateway_timers


async def test_an_event_the_client_does_not_get_still_counts_as_the_upstream_answering(
    build: Build,
) -> None:
    # Azure's prompt filter results come first and are not relayed; the silence read_timeout
    # bounds starts from them (the upstream answered), not from the request: 0.6 s after the
    # filter event is within 1 s, though 1.2 s after the request is not.
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        await writer.drain()
        await asyncio.sleep(0.6)
        writer.write(chunked(sse(AZURE_FILTER)))
        await writer.drain()
        await asyncio.sleep(0.6)
        writer.write(chunked(sse(chunk("x"), b"[DONE]")) + chunked(b""))
        await writer.drain()

    rig = await build("azure", answer, first_byte_timeout=5.0, read_timeout=1.0)
    status, body = await rig.call(stream=True)
    assert status == 200, body
    assert b'"content":"x"' in body and body.endswith(b"data: [DONE]\n\n")


async def test_a_client_slow_to_take_the_upstream_s_unterminated_last_event_gets_it(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The upstream ends its stream with an event it never terminated (no blank line), which
    # is relayed once the connection closes. Writing it to a client that is slow to take it
    # is the client's pace, not the upstream's silence: read_timeout does not cut it.
    tail = chunk("TAIL").replace(b'"finish_reason":null', b'"finish_reason":"stop"')
    body = chunked(sse(chunk("a"))) + chunked(b"data: " + tail) + chunked(b"")
    rig = await build("openai", sends(SSE_HEAD + body), read_timeout=0.2)
    write = StreamWriter.write

    async def slow(self: StreamWriter, data: Any, *args: Any, **kwargs: Any) -> None:
        if b"TAIL" in bytes(data):
            await asyncio.sleep(0.6)  # three times read_timeout
        await write(self, data, *args, **kwargs)

    monkeypatch.setattr(StreamWriter, "write", slow)
    status, got = await rig.call(stream=True)
    assert status == 200
    assert b'"content":"TAIL"' in got and got.endswith(b"data: [DONE]\n\n"), got


AZURE_FILTER = (
    b'{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    b'[{"prompt_index":0,"content_filter_results":{}}]}'
)


# --- Memory: many requests at once --------------------------------------------------------


async def peak_growth(work: Awaitable[Any]) -> tuple[Any, int]:
    """`work`'s result and how far the process's traced memory rose above where it began."""
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        result = await work
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - base


@functools.cache
def bomb(stream: bool) -> bytes:
    """64 MiB of JSON or SSE in about 64 kB of gzip. Made on first use, not at import (the
    pair takes ~0.3 s, which every pytest-xdist worker paid while collecting)."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [squeeze.compress(b"data: " if stream else b'{"id": "')]
    parts += [squeeze.compress(b"x" * MiB) for _ in range(64)]
    return b"".join([*parts, squeeze.flush()])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_compressed_bomb_costs_little_beyond_the_limit(build: Build, stream: bool) -> None:
    # aiohttp inflated 1 MiB steps into a 2 MiB buffer (read_bufsize was 1 MiB), so a bomb
    # cost about twice the limit: 200 of them at once took the process to 1.3 GB of RSS.
    content_type = "text/event-stream" if stream else "application/json"
    answer = whole(bomb(stream), content_type, **{"Content-Encoding": "gzip"})
    rig = await build("openai", sends(answer), max_response_bytes=4 * MiB, max_event_bytes=4 * MiB)
    (status, body), growth = await peak_growth(rig.call(stream=stream))
    assert status == 502 and b"upstream_bad_response" in body
    assert growth < 4 * MiB + 2 * MiB, f"{growth / MiB:.1f} MiB"


@dataclass
class Gate:
    """Holds every answer until `count` requests have arrived, so they run at once."""

    count: int
    arrived: int = 0
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.count:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), NEVER_HANG)


def endless(gate: Gate, first: bytes, stream: bool) -> Answer:
    """After the gate opens: `first`, then `x` forever (until the gateway hangs up)."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        if b"small" in request:
            writer.write(whole(COMPLETION % (b"s" * 3 * MiB)))
            return
        await gate.wait()
        content_type = "text/event-stream" if stream else "application/json"
        writer.write(until_close(first, content_type))
        piece = b"x" * 65536
        for _ in range(64 * 16):
            writer.write(piece)
            await writer.drain()
        writer.close()

    return answer


@pytest.mark.parametrize("stream", [False, True])
async def test_a_providers_answers_in_memory_at_once_are_bounded(
    build: Build, stream: bool
) -> None:
    # Each answer was bounded, but not their sum: max_connections (100) answers of 64 MiB,
    # 6.4 GB, were the gateway's to hold for one hostile upstream, and the OOM killer would
    # take every client down with it.
    many = 12
    gate = Gate(many)
    limits = {"max_response_bytes": 4 * MiB, "max_event_bytes": 4 * MiB}
    first = b"data: " if stream else b'{"id": "'
    routing = RoutingSettings(max_attempts=1, failure_threshold=100)  # no breaker in the way
    answer = endless(gate, first, stream)
    rig = await build("openai", answer, {"routing": routing}, max_buffered_bytes=10 * MiB, **limits)
    calls = asyncio.gather(*[rig.call(stream=stream) for _ in range(many)])
    results, growth = await peak_growth(calls)
    assert growth < 10 * MiB + many * MiB, f"{growth / MiB:.1f} MiB"  # not 12 x 4 MiB
    errors = [json.loads(body)["error"] for _, body in results]
    busy = [e for e in errors if "max_buffered_bytes" in e["message"]]
    assert len(busy) >= many - 3, errors  # at most two answers fit at once, and one more
    assert {e["code"] for e in busy} == {"upstream_buffers_full"}
    assert {status for status, _ in results} <= {502, 503}
    # Every byte was given back: a 3 MiB answer still fits three times over.
    for _ in range(3):
        status, body = await rig.call_with(b"small")
        assert status == 200, body


# --- Redirects and other statuses ---------------------------------------------------------

ODD_REDIRECTS = {
    "300-no-location": http("300 Multiple Choices", {"Content-Length": "0"}),
    "304": http("304 Not Modified", {}),
    "305-use-proxy": http(
        "305 Use Proxy", {"Location": "http://127.0.0.1:9/", "Content-Length": "0"}
    ),
    "306": http("306 Switch Proxy", {"Content-Length": "0"}),
    "308-same-host-relative": http(
        "308 Permanent Redirect", {"Location": "/v1/steal", "Content-Length": "0"}
    ),
    "399": http("399 Unknown", {"Content-Length": "0"}),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(ODD_REDIRECTS))
@pytest.mark.parametrize("kind", list(KINDS))
async def test_no_3xx_is_followed_whatever_its_shape(
    build: Build, kind: str, case: str, stream: bool
) -> None:
    # Not even to the same host: the upstream sees one request, and the client a 502.
    rig = await build(kind, sends(ODD_REDIRECTS[case]))
    status, body = await rig.call(stream=stream)
    error = json.loads(body)["error"]
    assert (status, error["code"]) == (502, "upstream_bad_response")
    assert "redirect" in error["message"] and "steal" not in error["message"]
    assert len(rig.upstream.requests) == 1


def gzip(data: bytes) -> bytes:
    squeeze = zlib.compressobj(6, zlib.DEFLATED, 31)
    return squeeze.compress(data) + squeeze.flush()


def raw_deflate(data: bytes) -> bytes:
    squeeze = zlib.compressobj(6, zlib.DEFLATED, -15)
    return squeeze.compress(data) + squeeze.flush()


STREAM = sse(chunk("hel"), chunk("lo"), b"[DONE]")
UNUSUAL_BUT_VALID = {
    "100-continue-first": (False, http("100 Continue", {}) + whole(GOOD)),
    "103-early-hints-first": (
        False,
        http("103 Early Hints", {"Link": "</a>; rel=preload"}) + whole(GOOD),
    ),
    "deflate": (False, whole(zlib.compress(GOOD), **{"Content-Encoding": "deflate"})),
    "raw-deflate": (False, whole(raw_deflate(GOOD), **{"Content-Encoding": "deflate"})),
    "chunk-extensions-and-trailers": (
        False,
        http("200 OK", {"Transfer-Encoding": "chunked", "Trailer": "X-T"})
        + b"%x;ext=1\r\n%b\r\n0\r\nX-T: 1\r\n\r\n" % (len(GOOD), GOOD),
    ),
    "206-partial": (False, http("206 Partial Content", {"Content-Length": str(len(GOOD))}, GOOD)),
    "gzip-stream": (True, whole(gzip(STREAM), "text/event-stream", **{"Content-Encoding": "gzip"})),
    "cr-only-stream": (True, until_close(STREAM.replace(b"\n", b"\r"))),
    "crlf-stream": (True, until_close(STREAM.replace(b"\n", b"\r\n"))),
    "data-without-space": (True, until_close(STREAM.replace(b"data: ", b"data:"))),
    "multi-line-data": (
        True,
        until_close(STREAM.replace(b'"created":1,', b'"created":1,\ndata: ')),
    ),
}


@pytest.mark.parametrize("case", list(UNUSUAL_BUT_VALID))
async def test_unusual_but_valid_http_is_answered(build: Build, case: str) -> None:
    stream, answer = UNUSUAL_BUT_VALID[case]
    rig = await build("openai", sends(answer))
    result = await rig.sdk(stream=stream)
    if stream:
        assert "".join(c.choices[0].delta.content for c in result) == "hello"
    else:
        assert result.choices[0].message.content == "hi"


PLAIN = sse(chunk("h\u00e9l"), chunk("lo")) + sse(
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}]}'
)
USAGE = (
    b'{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
)


@pytest.mark.parametrize("whole_stream", [False, True], ids=["event-per-read", "one-read"])
@pytest.mark.parametrize("wants_usage", [False, True])
async def test_plain_chunks_reach_the_client_as_the_upstream_sent_them(
    build: Build, wants_usage: bool, whole_stream: bool
) -> None:
    # Pass-through: plain chunks go out byte for byte; the usage chunk the gateway asked
    # for is still counted, and dropped unless the client asked for it too. Whether the
    # upstream's events come a read each or all in one read (chunks, usage and [DONE]).
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(http("200 OK", {"Content-Type": "text/event-stream", "Connection": "close"}))
        parts = (*PLAIN.split(b"\n\n")[:-1], b"data: " + USAGE, b"data: [DONE]")
        if whole_stream:
            writer.write(b"".join(part + b"\n\n" for part in parts))
        else:
            for part in parts:
                writer.write(part + b"\n\n")
                await writer.drain()
        writer.close()

    rig = await build("openai", answer)
    path, body = rig.body(stream=True)
    if wants_usage:
        body["stream_options"] = {"include_usage": True}
    status, got = await rig.post(path, body)
    assert status == 200
    usage = sse(USAGE) if wants_usage else b""
    assert got == PLAIN + usage + b"data: [DONE]\n\n"
    row = (await usage_rows(rig.gateway))[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (3, 2, 0)


@pytest.mark.parametrize(
    "after",
    [sse(USAGE, b"[DONE]"), sse(b"[DONE]", chunk("late")), sse(b"[DONE]") + b": bye\n\n"],
    ids=["usage-then-done", "chunk-after-done", "comment-after-done"],
)
async def test_a_read_of_chunks_and_the_end_relays_the_chunks_and_ends_once(
    build: Build, after: bytes
) -> None:
    # Chunks, then what ends the stream, in one read: the chunks pass, nothing after
    # [DONE] reaches the client, and the client gets one [DONE].
    rig = await build("openai", sends(until_close(PLAIN + after)))
    path, body = rig.body(stream=True)
    status, got = await rig.post(path, body)
    assert status == 200
    assert got == PLAIN + b"data: [DONE]\n\n"


async def test_an_error_event_in_the_read_of_plain_chunks_ends_the_stream_after_them(
    build: Build,
) -> None:
    error = b'{"error":{"message":"overloaded mid-stream","type":"server_error"}}'
    rig = await build("openai", sends(until_close(sse(chunk("hel"), error, chunk("lo")))))
    path, body = rig.body(stream=True)
    status, got = await rig.post(path, body)
    assert status == 200
    events = got.split(b"\n\n")
    assert events[0] == sse(chunk("hel"))[:-2]  # as the upstream sent it
    assert b"overloaded mid-stream" in events[1] and events[2:] == [b""]  # then the end
    raised = await rig.sdk(stream=True)
    assert isinstance(raised, openai.APIError) and "overloaded mid-stream" in raised.message


def one_byte_writes(data: bytes) -> Answer:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(http("200 OK", {"Content-Type": "text/event-stream", "Connection": "close"}))
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()  # with TCP_NODELAY: a segment each, as far as the kernel goes
        writer.close()

    return answer


ANTHROPIC_STREAM = named_events(
    [
        ANTHROPIC_START,
        ANTHROPIC_TEXT_START,
        anthropic_text("h\u00e9llo"),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 2},
        },
        {"type": "message_stop"},
    ]
)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize(
    ("kind", "events", "text"),
    [("openai", STREAM, "hello"), ("anthropic", ANTHROPIC_STREAM, "h\u00e9llo")],
    ids=["openai", "anthropic"],
)
async def test_a_stream_written_a_byte_at_a_time_arrives_whole(
    build: Build, kind: str, events: bytes, text: str, newline: bytes
) -> None:
    rig = await build(kind, one_byte_writes(events.replace(b"\n", newline)))
    chunks = await rig.sdk(stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


# --- Client-chosen model ids in URLs -------------------------------------------------------

HOSTILE_IDS = [
    "..",
    "../../v1/files",
    "%2e%2e%2f",
    "a?key=x",
    "a#b",
    "a\r\nX-Evil: 1",
    "a b",
    "ünï",
    "//evil.example/x",
    "@evil.example",
]


@pytest.mark.parametrize("kind", ["gemini", "azure"])
async def test_a_client_chosen_model_id_stays_one_path_segment(build: Build, kind: str) -> None:
    # "<provider>/<model>" ids put the client's text into Gemini's and Azure's URLs.
    rig = await build(
        kind,
        sends(
            whole(b'{"error": {"message": "no such model"}}').replace(b"200 OK", b"404 Not Found")
        ),
    )
    rig.upstream.requests.clear()
    for model in HOSTILE_IDS:
        body = {"model": f"up/{model}", "messages": HI}
        status, _ = await rig.post("/v1/chat/completions", body)
        assert status == 404
    prefix = b"POST /v1beta/models/" if kind == "gemini" else b"POST /openai/deployments/"
    for request in rig.upstream.requests:
        line, *headers = request.split(b"\r\n\r\n")[0].split(b"\r\n")
        path = line.split(b" ")[1]
        assert line.startswith(prefix) and line.endswith(b" HTTP/1.1"), line
        rest = path.removeprefix(prefix[5:])
        # Google takes the method from the last ":"; a ":" in a model name is just invalid.
        split = rest.rpartition(b":") if kind == "gemini" else rest.partition(b"/")
        segment, action = split[0], split[2]
        assert b"/" not in segment and b"?" not in segment and b"#" not in segment, line
        assert action in (b"generateContent", b"chat/completions?api-version=2024-10-21"), line
        assert not any(h.lower().startswith(b"x-evil") for h in headers)
    # Azure answers ".." itself (it could only be resolved as a path), the rest reach it.
    assert len(rig.upstream.requests) == len(HOSTILE_IDS) - (kind == "azure")


# --- Many at once --------------------------------------------------------------------------


async def test_two_hundred_streams_against_a_misbehaving_upstream_all_end_cleanly(
    build: Build,
) -> None:
    many = 200
    gate = Gate(many)
    misbehaviours = [
        b"data: not json\n\n",  # malformed
        b"data: " + chunk(b"x") + b"\xff\xfe\n\n",  # not JSON after U+FFFD either
        b'data: {"id":',  # cut mid-event
        b"\n" * 100_000,  # a flood, then the end
    ]

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        if b"after" in request:
            writer.write(until_close(sse(chunk("fine"), b"[DONE]")))
            writer.close()
            return
        await gate.wait()
        which = misbehaviours[len(rig.upstream.requests) % len(misbehaviours)]
        writer.write(until_close(sse(chunk("hi")) + which))
        await writer.drain()
        writer.close()

    routing = RoutingSettings(max_attempts=1, failure_threshold=10_000)
    rig = await build("openai", answer, {"routing": routing}, max_connections=many)
    headers = {"Authorization": f"Bearer {rig.key}"}
    url = rig.gateway.make_url("/v1/chat/completions")
    body = {"model": "m", "messages": HI, "stream": True}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> bytes:
            async with session.post(url, json=body, headers=headers) as resp:
                assert resp.status == 200
                return await resp.read()

        bodies = await asyncio.gather(*[one() for _ in range(many)])
    for got in bodies:
        assert got.startswith(b"data: " + chunk("hi") + b"\n\n")
        last = got.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert last.startswith(b'data: {"error":') or last == b"data: [DONE]", got[-300:]
    # All ended, and the gateway is none the worse for it.
    chunks = await rig.sdk_with("after")
    assert [c.choices[0].delta.content for c in chunks] == ["fine"]


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (Linux's VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
        * 1024
    )


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
async def test_a_real_gateway_process_stays_small_under_a_storm_of_bombs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway serve` as a real process: 60 requests at once against gzip bombs, endless
    events and errors that quote the key. Its peak RSS stays near its limits (each request
    alone may hold 8 MiB, all together 32 MiB), and its log holds neither key."""
    many = 60
    gate = Gate(many)
    sse_bomb = whole(bomb(stream=True), "text/event-stream", **{"Content-Encoding": "gzip"})
    json_bomb = whole(bomb(stream=False), **{"Content-Encoding": "gzip"})

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        if b"warm-up" not in request:
            await gate.wait()
        turn = len(upstream.requests) % 3
        if b"warm-up" in request or turn == 0:
            writer.write(error_status_bytes(400))
        else:
            writer.write(sse_bomb if turn == 1 else json_bomb)
        await writer.drain()

    upstream = RawUpstream(answer)
    await upstream.start()
    port = free_port()
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{db}"\n\n[routing]\nmax_attempts = 1\nfailure_threshold = 1000\n\n'
        f'[[providers]]\nname = "up"\ntype = "openai"\napi_keys = ["{UPSTREAM_KEY}"]\n'
        f'base_url = "http://127.0.0.1:{upstream.port}/v1"\nmax_connections = {many}\n'
        f"max_response_bytes = {8 * MiB}\nmax_event_bytes = {8 * MiB}\n"
        f"max_buffered_bytes = {32 * MiB}\n"
    )
    assert (
        await asyncio.to_thread(
            cli.main, ["keys", "create", "--name", "t", "--db", str(db), "--json"]
        )
        == 0
    )
    secret = json.loads(capsys.readouterr().out)["key"]
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
            stdout=out, stderr=subprocess.PIPE,
        )  # fmt: skip
    try:
        async with asyncio.timeout(NEVER_HANG * 2):
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            headers = {"Authorization": f"Bearer {secret}"}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

                async def call(word: str, stream: bool) -> tuple[int, bytes]:
                    messages = [{"role": "user", "content": word}]
                    body = {"model": "up/x", "messages": messages, "stream": stream}
                    async with session.post(url, json=body, headers=headers) as resp:
                        return resp.status, await resp.read()

                assert (await call("warm-up", False))[0] == 400
                before = peak_rss(proc.pid)
                results = await asyncio.gather(*[call("go", i % 2 == 0) for i in range(many)])
                growth = peak_rss(proc.pid) - before
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        assert upstream.server is not None
        upstream.server.close()
    assert {status for status, _ in results} <= {400, 502, 503}
    assert all(UPSTREAM_KEY.encode() not in body for _, body in results)
    # Before: each bomb cost about twice its limit, and nothing bounded their sum (~900 MB).
    assert growth < 120 * MiB, f"{growth / MiB:.0f} MiB"  # measured: ~50 MiB
    logged = log.read_bytes()
    assert b'"status":400' in logged
    assert UPSTREAM_KEY.encode() not in logged and secret.encode() not in logged


# --- A hostile client --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "responses"])
async def test_a_body_nested_just_deep_enough_is_a_400_not_a_gateway_crash(
    build: Build, kind: str
) -> None:
    # The handler decodes the body, and the pass-through decodes it again (for the fields it
    # forwards) from deeper in the stack, where fewer levels of nesting are left before
    # RecursionError: a body in between passed the first and crashed the second (a 500).
    response = b'{"id": "r", "object": "response", "status": "completed", "output": []}'
    rig = await build(kind, sends(whole(GOOD if kind == "openai" else response)))
    statuses = set()
    for depth in range(850, 1000, 3):
        nested = b"[" * depth + b"]" * depth
        if kind == "openai":
            body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x":%b}' % nested
            path = "/v1/chat/completions"
        else:
            body = b'{"model":"m","input":"hi","x":%b}' % nested
            path = "/v1/responses"
        headers = {"Authorization": f"Bearer {rig.key}", "Content-Type": "application/json"}
        resp = await rig.gateway.post(path, data=body, headers=headers)
        statuses.add(resp.status)
        if resp.status == 400:
            assert (await resp.json())["error"]["message"] == "Request body is nested too deeply."
    assert statuses == {200, 400}


# --- Connections: no silent queue ---------------------------------------------------------


def held_streams(opened: list[int], release: asyncio.Event) -> Answer:
    """Streams that send a first event at once, then stay open until `release` is set."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        opened.append(1)
        writer.write(SSE_HEAD + chunked(sse(chunk("hi"))))
        await writer.drain()
        await release.wait()
        writer.write(chunked(sse(b"[DONE]")) + b"0\r\n\r\n")
        writer.close()

    return answer


async def test_by_default_no_stream_waits_for_a_connection(build: Build) -> None:
    # 150 streams at once to one provider, each held open: all reach the upstream and get
    # their first event (a pool of 100 used to queue the last 50 silently).
    opened: list[int] = []
    release = asyncio.Event()
    rig = await build("openai", held_streams(opened, release))
    path, body = rig.body(stream=True)
    headers = {"Authorization": f"Bearer {rig.key}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = rig.gateway.make_url(path)

        async def first_event() -> tuple[aiohttp.ClientResponse, bytes]:
            resp = await session.post(url, json=body, headers=headers)
            return resp, await resp.content.readuntil(b"\n\n")

        try:
            async with asyncio.timeout(NEVER_HANG):
                started = await asyncio.gather(*[first_event() for _ in range(150)])
            assert len(opened) == 150
            assert all(resp.status == 200 and b"hi" in event for resp, event in started)
        finally:
            release.set()
        for resp, _ in started:
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")


async def test_a_set_connection_limit_bounds_the_wait_logs_counts_and_answers_503(
    build: Build,
) -> None:
    opened: list[int] = []
    release = asyncio.Event()
    server = {"admin_key": "admin-0123456789abcdef"}
    rig = await build(
        "openai", held_streams(opened, release), server, max_connections=2, pool_timeout=0.3
    )
    path, body = rig.body(stream=True)
    headers = {"Authorization": f"Bearer {rig.key}"}
    held = [await rig.gateway.post(path, json=body, headers=headers) for _ in range(2)]
    try:
        with capture_logs() as logs:
            status, answer = await rig.call(stream=True)  # a third: no connection within 0.3 s
        assert status == 503
        error = json.loads(answer)["error"]
        assert error["code"] == "upstream_pool_full" and "max_connections" in error["message"]
        assert [e["event"] for e in logs if e["event"].startswith("upstream_pool")] == [
            "upstream_pool_full"
        ]
        admin = {"Authorization": "Bearer admin-0123456789abcdef"}
        async with rig.gateway.get("/admin/stats", headers=admin) as resp:
            stats = (await resp.json())["providers"]["up"]
        assert stats | {"wait_seconds": 0} == {
            "max_connections": 2,
            "in_use": 2,
            "waiting": 0,
            "waited": 1,
            "wait_seconds": 0,
            "pool_timeouts": 1,
            "stream_timeouts": 0,
        }
        assert stats["wait_seconds"] >= 0.3
        async with rig.gateway.get("/admin/stats") as resp:
            assert resp.status == 401  # the admin key is needed
    finally:
        release.set()
    for resp in held:
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert len(opened) == 2


async def test_a_request_that_gets_a_connection_within_pool_timeout_is_served(
    build: Build,
) -> None:
    opened: list[int] = []
    release = asyncio.Event()
    server = {"admin_key": "admin-0123456789abcdef"}
    rig = await build("openai", held_streams(opened, release), server, max_connections=1)
    admin = {"Authorization": "Bearer admin-0123456789abcdef"}

    async def waiting() -> int:
        async with rig.gateway.get("/admin/stats", headers=admin) as resp:
            return int((await resp.json())["providers"]["up"]["waiting"])

    path, body = rig.body(stream=True)
    headers = {"Authorization": f"Bearer {rig.key}"}
    first = await rig.gateway.post(path, json=body, headers=headers)
    with capture_logs() as logs:
        second = asyncio.ensure_future(rig.call(stream=True))
        async with asyncio.timeout(NEVER_HANG):
            while not await waiting():  # noqa: ASYNC110 (the gate has no event: a counter)
                await asyncio.sleep(0.01)
        release.set()  # the first stream ends, and frees its connection for the second
        status, answer = await second
    assert status == 200 and answer.endswith(b"data: [DONE]\n\n")
    assert (await first.read()).endswith(b"data: [DONE]\n\n")
    waits = [e for e in logs if e["event"] == "upstream_pool_wait"]
    assert len(waits) == 1 and waits[0]["provider"] == "up"


async def test_a_client_that_hangs_up_gives_its_connection_back(build: Build) -> None:
    # max_connections = 1: were the slot of a stream whose client hung up kept, the
    # provider would answer nothing but 503s from then on.
    opened: list[int] = []
    release = asyncio.Event()
    server = {"admin_key": "admin-0123456789abcdef"}
    rig = await build(
        "openai", held_streams(opened, release), server, max_connections=1, pool_timeout=5.0
    )
    path, body = rig.body(stream=True)
    headers = {"Authorization": f"Bearer {rig.key}"}
    for _ in range(3):  # each hangs up after its first event, while the upstream holds on
        async with (
            aiohttp.ClientSession() as session,
            session.post(rig.gateway.make_url(path), json=body, headers=headers) as resp,
        ):
            assert resp.status == 200
            assert b"hi" in await resp.content.readuntil(b"\n\n")
    release.set()
    status, answer = await rig.call(stream=True)
    assert status == 200 and answer.endswith(b"data: [DONE]\n\n")
    admin = {"Authorization": "Bearer admin-0123456789abcdef"}
    async with rig.gateway.get("/admin/stats", headers=admin) as resp:
        stats = (await resp.json())["providers"]["up"]
    assert (stats["in_use"], stats["pool_timeouts"]) == (0, 0)


async def test_streams_the_watchdog_ends_are_counted(build: Build) -> None:
    server = {"admin_key": "admin-0123456789abcdef"}
    rig = await build("openai", Trickle(*SLOW_STARTS["pings"]), server, read_timeout=0.3)
    status, _ = await rig.call(stream=True)
    assert status == 504
    admin = {"Authorization": "Bearer admin-0123456789abcdef"}
    async with rig.gateway.get("/admin/stats", headers=admin) as resp:
        assert (await resp.json())["providers"]["up"]["stream_timeouts"] == 1


async def test_a_cookie_an_upstream_sets_is_never_sent_back(build: Build) -> None:
    # One session per provider serves every client: a cookie kept from one client's answer
    # would go out with the next client's request.
    answer = whole(COMPLETION % b"hi", **{"Set-Cookie": "session=client-a; Path=/"})
    rig = await build("openai", sends(answer), host="localhost")  # a name: IPs get no cookies
    for _ in range(2):
        status, _body = await rig.call(stream=False)
        assert status == 200
    assert len(rig.upstream.requests) == 2
    assert b"client-a" not in rig.upstream.requests[1]


async def test_a_request_whose_body_is_here_arms_no_timer_for_it(build: Build) -> None:
    # A body that came with its head (every small JSON request) needs no client_body_timeout:
    # asyncio.timeout costs ~11 us a request, for nothing to wait for.
    rig = await build("openai", sends(whole(COMPLETION % b"hi")))
    loop = asyncio.get_running_loop()
    armed: list[str] = []
    body_timer = asyncio.Event()
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        frame = sys._getframe(1)
        while frame is not None:  # the test's client and the fake upstream arm their own
            if frame.f_code is intake.read_body.__code__:
                armed.append(getattr(callback, "__qualname__", repr(callback)))
                body_timer.set()
            frame = frame.f_back  # type: ignore[assignment]
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = counting  # type: ignore[method-assign]
    try:
        status, _ = await rig.call(stream=False)
        assert status == 200 and armed == []
        # A body that is still on its way is waited for within client_body_timeout.
        reader, writer = await asyncio.open_connection(rig.gateway.host, rig.gateway.port)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nAuthorization: Bearer %b\r\nContent-Length: %d\r\n\r\n{"
            % (rig.key.encode(), len(body))
        )
        await writer.drain()
        async with asyncio.timeout(NEVER_HANG):
            await body_timer.wait()
        writer.write(body[1:].encode())
        assert b" 200 " in await reader.readline()
        writer.close()
    finally:
        del loop.call_at
    assert armed == ["Timeout._on_timeout"]
