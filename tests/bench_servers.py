"""Subprocess entry points for `tests/bench.py`: a fake OpenAI/Anthropic upstream and a bare relay.

    python -m tests.bench_servers upstream --port 9001
    python -m tests.bench_servers relay --port 9002 --upstream http://127.0.0.1:9001

The upstream answers `POST /v1/chat/completions` from pre-encoded bytes, as fast as it can: a
`chat.completion` (~600 bytes, with usage), or with `"stream": true` twenty `chat.completion.chunk`
events (plus a usage chunk when `stream_options.include_usage` is true) and `data: [DONE]`. It
answers `POST /v1/messages` as Anthropic does, with the same text: a `message` (~400 bytes), or with
`"stream": true` Anthropic's `event:`/`data:` sequence (message_start, content_block_start, a ping,
one text_delta per word, content_block_stop, message_delta with usage, message_stop).

The relay is the floor any aiohttp gateway pays: read the client's body, POST it upstream through
one shared `ClientSession`, and hand the bytes back (whole for JSON, `iter_any()` chunks for SSE).
It parses nothing and checks nothing, runs on uvloop (as `gateway serve` does) and, like the
gateway, keeps no connection limit (nothing queues) and a listen backlog of 1024.

For `tests/bench_streams.py`, `slow` is the slow upstream of long streams (`tests/bench_slow.py`,
raw asyncio protocols): `--slow-chunks` chunks `--slow-interval` seconds apart, each chunk's
content the time it was sent, `t<unix seconds>`. The relay sends `/slow/v1/chat/completions` to
`--slow-upstream` and passes it through as the rest.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from tests.fakes import openai_usage

__all__ = [
    "STREAM_CONTENT_TYPE",
    "completion_body",
    "main",
    "message_body",
    "message_events",
    "stream_events",
]

STREAM_CONTENT_TYPE = "text/event-stream"
_CREATED = 1_767_225_600
_ID = "chatcmpl-BENCH0123456789abcdefghijklmn"
_MODEL = "bench-model-2025-01-01"
_FINGERPRINT = "fp_0123456789"
_MSG_ID = "msg_01BENCH0123456789abcdefgh"
_ANTHROPIC_MODEL = "claude-bench-2025-01-01"
_WORDS = (
    "Sure",
    "!",
    " Here",
    " is",
    " a",
    " short",
    " answer",
    " to",
    " your",
    " question",
    ":",
    " the",
    " gateway",
    " relays",
    " every",
    " token",
    " as",
    " it",
)
_TEXT = "".join(_WORDS)
_USAGE: dict[str, Any] = openai_usage(42, len(_WORDS))
_ANTHROPIC_USAGE: dict[str, Any] = {
    "input_tokens": 42,
    "output_tokens": len(_WORDS),
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "service_tier": "standard",
}


def completion_body() -> bytes:
    """The non-streaming answer, as OpenAI shapes it."""
    return msgspec.json.encode(
        {
            "id": _ID,
            "object": "chat.completion",
            "created": _CREATED,
            "model": _MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": _TEXT,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _USAGE,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
    )


def _chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": _ID,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": _MODEL,
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def stream_events(include_usage: bool) -> tuple[bytes, ...]:
    """Twenty chunk events (role, eighteen words, finish), optional usage chunk, then [DONE]."""
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}
    events = [_event({**_chunk({"role": "assistant", "content": ""}, None), **usage_field})]
    events += [_event({**_chunk({"content": w}, None), **usage_field}) for w in _WORDS]
    events.append(_event({**_chunk({}, "stop"), **usage_field}))
    if include_usage:
        usage_chunk = _chunk({}, None)
        usage_chunk["choices"] = []
        usage_chunk["usage"] = _USAGE
        events.append(_event(usage_chunk))
    events.append(b"data: [DONE]\n\n")
    return tuple(events)


def message_body() -> bytes:
    """The non-streaming answer, as Anthropic shapes it."""
    return msgspec.json.encode(
        {
            "id": _MSG_ID,
            "type": "message",
            "role": "assistant",
            "model": _ANTHROPIC_MODEL,
            "content": [{"type": "text", "text": _TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": _ANTHROPIC_USAGE,
        }
    )


def _anthropic_event(obj: dict[str, Any]) -> bytes:
    """One SSE frame as Anthropic writes it: `event: <type>` then `data: <json>`."""
    name: str = obj["type"]
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(obj) + b"\n\n"


def message_events() -> tuple[bytes, ...]:
    """Anthropic's stream: start, block start, ping, a text delta per word, stops and usage."""
    start_usage = {**_ANTHROPIC_USAGE, "output_tokens": 1}
    message: dict[str, Any] = {
        "id": _MSG_ID,
        "type": "message",
        "role": "assistant",
        "model": _ANTHROPIC_MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    block = {"type": "text", "text": ""}
    events = [
        _anthropic_event({"type": "message_start", "message": message}),
        _anthropic_event({"type": "content_block_start", "index": 0, "content_block": block}),
        b'event: ping\ndata: {"type": "ping"}\n\n',  # sic: the real API spaces this one
    ]
    events += [
        _anthropic_event(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": w},
            }
        )
        for w in _WORDS
    ]
    events += [
        _anthropic_event({"type": "content_block_stop", "index": 0}),
        _anthropic_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(_WORDS)},
            }
        ),
        _anthropic_event({"type": "message_stop"}),
    ]
    return tuple(events)


class _Request(msgspec.Struct):
    """The only fields the fake upstream looks at."""

    stream: bool | None = None
    stream_options: dict[str, object] | None = None


_DECODER = msgspec.json.Decoder(_Request)
_BODY = completion_body()
_EVENTS = {flag: stream_events(flag) for flag in (False, True)}
_MESSAGE_BODY = message_body()
_MESSAGE_EVENTS = message_events()
_SSE_HEADERS = {"Content-Type": STREAM_CONTENT_TYPE, "Cache-Control": "no-cache"}


async def _upstream_chat(request: web.Request) -> web.StreamResponse:
    req = _DECODER.decode(await request.read())
    if not req.stream:
        return web.Response(body=_BODY, content_type="application/json")
    include_usage = bool(req.stream_options and req.stream_options.get("include_usage"))
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    for event in _EVENTS[include_usage]:
        await resp.write(event)
    await resp.write_eof()
    return resp


async def _upstream_messages(request: web.Request) -> web.StreamResponse:
    req = _DECODER.decode(await request.read())
    if not req.stream:
        return web.Response(body=_MESSAGE_BODY, content_type="application/json")
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    for event in _MESSAGE_EVENTS:
        await resp.write(event)
    await resp.write_eof()
    return resp


def upstream_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _upstream_chat)
    app.router.add_post("/v1/messages", _upstream_messages)
    return app


_SESSION_KEY: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
_TARGET_KEY: web.AppKey[str] = web.AppKey("target", str)
_SLOW_KEY: web.AppKey[str] = web.AppKey("slow", str)
_UPSTREAM_HEADERS = {
    "Authorization": "Bearer sk-bench-upstream-0123456789",
    "Content-Type": "application/json",
}


async def _relay_chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[_SESSION_KEY]
    target = request.app[_SLOW_KEY if request.path.startswith("/slow/") else _TARGET_KEY]
    async with session.post(target, data=body, headers=_UPSTREAM_HEADERS) as upstream:
        if not upstream.headers.get("Content-Type", "").startswith(STREAM_CONTENT_TYPE):
            return web.Response(
                status=upstream.status, body=await upstream.read(), content_type="application/json"
            )
        resp = web.StreamResponse(status=upstream.status, headers=_SSE_HEADERS)
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def relay_app(upstream: str, slow_upstream: str | None = None) -> web.Application:
    app = web.Application()
    app[_TARGET_KEY] = upstream.rstrip("/") + "/v1/chat/completions"
    app[_SLOW_KEY] = (slow_upstream or upstream).rstrip("/") + "/slow/v1/chat/completions"

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # No limit, as the gateway's default `max_connections`: nothing queues.
        app[_SESSION_KEY] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[_SESSION_KEY].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", _relay_chat)
    app.router.add_post("/slow/v1/chat/completions", _relay_chat)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_servers")
    parser.add_argument("role", choices=("upstream", "relay", "slow"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", help="relay only: the upstream's base URL")
    parser.add_argument("--slow-upstream", help="relay only: the slow upstream's base URL")
    parser.add_argument("--slow-chunks", type=int, default=100, help="slow only")
    parser.add_argument("--slow-interval", type=float, default=0.1, help="slow only")
    args = parser.parse_args(argv)
    if args.role == "slow":
        from tests.bench_slow import serve

        loop = new_event_loop()
        serve_slow = serve(args.host, args.port, args.slow_chunks, args.slow_interval)
        try:
            loop.run_until_complete(serve_slow)
        except KeyboardInterrupt:  # pragma: no cover - how the bench stops it
            pass
        finally:
            loop.close()
        return
    if args.role == "relay":
        if not args.upstream:
            parser.error("relay needs --upstream")
        app = relay_app(args.upstream, args.slow_upstream)
    else:
        app = upstream_app()
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=1024,
        loop=new_event_loop(),
    )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's, as the gateway's (asyncio's where it is not installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


if __name__ == "__main__":
    main()
