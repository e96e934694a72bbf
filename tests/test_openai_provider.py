"""The OpenAI-compatible provider end to end: gateway in front of an in-process fake upstream."""

from __future__ import annotations

import asyncio
import gc
import json
import types
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.failover import Exchange
from gateway.settings import ModelConfig, OpenAIConfig, Target
from gateway.state import PRICES_KEY, USAGE_KEY
from gateway.trace import RequestTrace
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    openai_client,
    sse_events,
    start_gateway,
    usage_rows,
)
from tests.fakes import FakeOpenAI, error_body
from tests.spec import validate_chat_chunk, validate_chat_completion, validate_error

UPSTREAM_KEY = "sk-upstream-secret"
CHAT = "/v1/chat/completions"


class Rig:
    """A fake upstream, the gateway in front of it, and a key allowed everything."""

    def __init__(self, fake: FakeOpenAI, gateway: TestClient[Any, Any], key: str) -> None:
        self.fake, self.gateway, self.key = fake, gateway, key

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return self.gateway.post(CHAT, json=body, headers=headers or self.headers)

    def last(self) -> dict[str, Any]:
        return self.fake.chat_requests[-1].json  # type: ignore[no-any-return]


async def make_rig(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    **provider: Any,
) -> Rig:
    fake = FakeOpenAI(api_key=UPSTREAM_KEY)
    await fake.start(aiohttp_server)
    provider.setdefault("base_url", fake.base_url)
    settings = make_settings(
        providers=(OpenAIConfig(name="up", api_keys=(UPSTREAM_KEY,), **provider),),
        models=(
            ModelConfig(
                name="gpt",
                targets=(Target(provider="up", model="gpt-4o-mini"),),
                input_price_per_mtok=1.0,
                output_price_per_mtok=2.0,
                max_tokens=77,
            ),
            ModelConfig(
                name="thinker", targets=(Target(provider="up", model="o3"),), reasoning=True
            ),
        ),
    )
    gateway = await start_gateway(aiohttp_client, settings)
    return Rig(fake, gateway, await create_key(gateway))


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    return await make_rig(aiohttp_server, aiohttp_client, make_settings)


@pytest.fixture
async def oai(rig: Rig) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(rig.gateway, rig.key) as client:
        yield client


HI = {"model": "gpt", "messages": [{"role": "user", "content": "hello world"}]}


# ---- what goes upstream ----------------------------------------------------------------------


async def test_request_is_forwarded_with_upstream_model_and_credentials(rig: Rig) -> None:
    body = {
        **HI,
        "temperature": 0.5,
        "x_vendor_extension": {"keep": [1, 2]},
        "seed": 7,
        "prediction": {"type": "content", "content": "hello"},
        "web_search_options": {},
        "audio": None,
        "metadata": {"team": "a"},
    }
    resp = await rig.post(body, headers={**rig.headers, "X-Request-ID": "trace-1"})
    assert resp.status == 200
    seen = rig.fake.chat_requests[-1]
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen.headers["x-request-id"] == "trace-1"
    assert seen.json["model"] == "gpt-4o-mini"
    assert seen.json["x_vendor_extension"] == {"keep": [1, 2]}
    assert seen.json["temperature"] == 0.5 and seen.json["seed"] == 7
    assert seen.json["prediction"] == {"type": "content", "content": "hello"}
    assert seen.json["audio"] is None and seen.json["metadata"] == {"team": "a"}
    assert seen.json["messages"] == HI["messages"]
    assert seen.json["max_tokens"] == 77  # the model's default fills a missing limit
    await rig.post({**HI, "max_completion_tokens": 5})
    assert "max_tokens" not in rig.last() and rig.last()["max_completion_tokens"] == 5


async def test_reasoning_fields_reach_reasoning_models(rig: Rig) -> None:
    resp = await rig.post({**HI, "model": "thinker", "reasoning_effort": "high"})
    assert resp.status == 200
    assert rig.last()["reasoning_effort"] == "high"
    resp = await rig.post({**HI, "reasoning_effort": "high"})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "reasoning_effort"


async def test_provider_reasoning_patterns_cover_prefixed_ids(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings, reasoning_models=("o*",))
    ok = await rig.post({**HI, "model": "up/o4-mini", "reasoning_effort": "low"})
    assert ok.status == 200 and rig.last()["model"] == "o4-mini"
    refused = await rig.post({**HI, "model": "up/gpt-4.1", "reasoning_effort": "low"})
    assert refused.status == 400


async def test_stream_asks_upstream_for_usage_and_hides_it(rig: Rig) -> None:
    resp = await rig.post({**HI, "stream": True})
    events = sse_events(await resp.read())
    assert rig.last()["stream_options"] == {"include_usage": True}
    assert all(e["choices"] for e in events), "the usage-only chunk must be dropped"
    for event in events:
        validate_chat_chunk(event)
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["prompt_tokens"] > 0 and rows[-1]["completion_tokens"] == 3
    assert rows[-1]["estimated"] == 0


async def test_stream_with_null_stream_options(rig: Rig) -> None:
    resp = await rig.post({**HI, "stream": True, "stream_options": None})
    assert resp.status == 200
    assert all(e["choices"] for e in sse_events(await resp.read()))
    assert rig.last()["stream_options"] == {"include_usage": True}


async def test_stream_keeps_usage_chunk_when_asked(rig: Rig) -> None:
    resp = await rig.post(
        {
            **HI,
            "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False},
        }
    )
    events = sse_events(await resp.read())
    assert rig.last()["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


# ---- what comes back -------------------------------------------------------------------------


async def test_sdk_non_streaming_matches_spec(rig: Rig, oai: openai.AsyncOpenAI) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model="gpt", messages=[{"role": "user", "content": "hello world"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello world"
    assert raw.headers["x-request-id"].startswith("req_")
    validate_chat_completion(json.loads(raw.content))
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["provider"] == "up" and rows[-1]["upstream_model"] == "gpt-4o-mini"
    usage = completion.usage
    assert usage is not None
    expected = (usage.prompt_tokens * 1.0 + usage.completion_tokens * 2.0) / 1e6
    assert rows[-1]["cost_usd"] == pytest.approx(expected)


async def test_sdk_streaming_tools_and_json_mode(rig: Rig, oai: openai.AsyncOpenAI) -> None:
    tool: Any = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
            },
        },
    }
    async with oai.chat.completions.stream(
        model="gpt", messages=[{"role": "user", "content": "find"}], tools=[tool]
    ) as stream:
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"q": "Paris"}
    assert rig.last()["tools"] == [tool]
    await oai.chat.completions.create(
        model="gpt",
        messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_object"},
    )
    assert rig.last()["response_format"] == {"type": "json_object"}


async def test_first_chunk_arrives_before_the_upstream_finishes(rig: Rig) -> None:
    rest = asyncio.Event()
    rig.fake.always(hold=rest, hold_after=1)  # the upstream sends its first chunk, then waits
    async with rig.post({**HI, "stream": True}) as resp:
        assert resp.status == 200
        async with asyncio.timeout(NEVER_HANG):
            first = await resp.content.readuntil(b"\n\n")  # while the upstream still waits
        rest.set()
        events = sse_events(first + await resp.read())
    assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and len(events) > 1


async def test_long_sse_lines_are_relayed_intact(rig: Rig) -> None:
    word = "x" * (1024 * 1024)
    rig.fake.script(content=f"big {word}")
    events = sse_events(await (await rig.post({**HI, "stream": True})).read())
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == f"big {word}"


# ---- upstream failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "headers", "want_status", "want_type"),
    [
        (400, error_body(400, "Bad messages", param="messages"), {}, 400, "invalid_request_error"),
        (404, None, {}, 404, "not_found_error"),
        (401, None, {}, 502, "upstream_error"),
        (403, None, {}, 502, "upstream_error"),
        (429, None, {"retry-after": "7"}, 429, "rate_limit_exceeded"),
        (
            429,
            error_body(429, "quota", type="insufficient_quota", code="insufficient_quota"),
            {},
            503,
            "upstream_error",
        ),
        (500, None, {}, 503, "upstream_error"),
        (503, None, {}, 503, "upstream_error"),
        (504, None, {}, 504, "upstream_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_errors_are_mapped(
    rig: Rig,
    status: int,
    error: dict[str, Any] | None,
    headers: dict[str, str],
    want_status: int,
    want_type: str,
    stream: bool,
) -> None:
    rig.fake.script(status=status, error=error, headers=headers)
    resp = await rig.post({**HI, "stream": stream})
    assert resp.status == want_status
    assert resp.content_type == "application/json"
    body = await resp.json()
    validate_error(body)
    assert body["error"]["type"] == want_type
    if status == 400:
        assert body["error"]["message"] == "Bad messages" and body["error"]["param"] == "messages"
    if status == 429 and want_status == 429:
        assert resp.headers["Retry-After"] == "7"
    assert UPSTREAM_KEY not in json.dumps(body)
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["status"] == want_status


async def test_upstream_auth_failure_is_never_a_client_401(
    rig: Rig, oai: openai.AsyncOpenAI
) -> None:
    rig.fake.script(status=401)
    with pytest.raises(openai.InternalServerError) as info:
        await oai.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    assert "credentials" in info.value.message


async def test_upstream_rate_limit_is_the_sdks_rate_limit_error(
    rig: Rig, oai: openai.AsyncOpenAI
) -> None:
    rig.fake.script(status=429, headers={"retry-after": "3"})
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "x"}])
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.code == "rate_limit_exceeded"


async def test_unreachable_upstream_is_502(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, unused_tcp_port: int
) -> None:
    settings = make_settings(
        providers=(OpenAIConfig(name="up", base_url=f"http://127.0.0.1:{unused_tcp_port}/v1"),)
    )
    gateway = await start_gateway(aiohttp_client, settings)
    key = await create_key(gateway)
    resp = await gateway.post(
        CHAT, json={**HI, "model": "up/x"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_connection_error"


async def test_slow_upstream_times_out_with_504(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings, read_timeout=0.2)
    rig.fake.always(hold=asyncio.Event())  # never answers: only the timeout can end a wait
    for stream in (False, True):
        resp = await rig.post({**HI, "stream": stream})
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_stream_dropped_mid_way_ends_with_an_error_event(
    rig: Rig, oai: openai.AsyncOpenAI
) -> None:
    rig.fake.script(drop_after=2)
    events = []
    with pytest.raises(openai.APIError, match="closed the connection"):
        stream = await oai.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "a b c d"}], stream=True
        )
        async for chunk in stream:
            events.append(chunk)
    assert len(events) == 2
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["status"] == 502 and rows[-1]["estimated"] == 1
    assert rows[-1]["completion_tokens"] == 2


async def test_upstream_error_event_mid_stream_is_relayed(rig: Rig) -> None:
    rig.fake.script(error_after=2)
    resp = await rig.post({**HI, "stream": True})
    body = await resp.read()
    blocks = [b for b in body.split(b"\n\n") if b]
    error = json.loads(blocks[-1][6:])
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert "mid-stream" in error["error"]["message"]
    assert len(blocks) == 3


async def test_client_disconnect_cancels_upstream_and_records_usage(rig: Rig) -> None:
    # The upstream sends two chunks, then waits for good: the client hangs up mid-stream.
    rig.fake.always(content=" ".join(["word"] * 50), hold=asyncio.Event(), hold_after=2)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            rig.gateway.make_url(CHAT), json={**HI, "stream": True}, headers=rig.headers
        )
        await resp.content.readuntil(b"\n\n")
        resp.close()  # hang up mid-stream
    async with asyncio.timeout(NEVER_HANG):
        await rig.fake.client_disconnected.wait()
        await app_of(rig.gateway)[USAGE_KEY].wait_recorded(1)
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["status"] == 499
    assert rows[-1]["stream"] == 1 and rows[-1]["estimated"] == 1


async def test_non_streaming_hang_up_cancels_upstream_and_records_an_estimate(rig: Rig) -> None:
    rig.fake.always(hold=asyncio.Event())  # the upstream is still thinking when the client goes
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(
            session.post(rig.gateway.make_url(CHAT), json=HI, headers=rig.headers)
        )
        await rig.fake.request_seen.wait()
        pending.cancel()  # the client gives up while the upstream is still thinking
    async with asyncio.timeout(NEVER_HANG):
        await rig.fake.client_disconnected.wait()
        await app_of(rig.gateway)[USAGE_KEY].wait_recorded(1)
    row = (await usage_rows(rig.gateway))[-1]
    assert (row["status"], row["estimated"]) == (499, 1)
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] == 0


async def test_a_request_without_limits_is_accounted_after_its_answer(rig: Rig) -> None:
    """A key without limits settles once its answer is out (`pipeline.finish`): its row still
    has the upstream's usage and its cost; and a settle that fails costs neither the row nor
    the log line."""
    async with rig.post(HI) as resp:
        assert resp.status == 200
        usage = (await resp.json())["usage"]
    await app_of(rig.gateway)[USAGE_KEY].wait_recorded(1)
    row = (await usage_rows(rig.gateway))[-1]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    expected = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    assert row["cost_usd"] == pytest.approx(expected) and row["estimated"] == 0

    prices = app_of(rig.gateway)[PRICES_KEY]

    def broken(*args: object) -> None:
        raise RuntimeError("price book broken")

    prices.price = broken  # type: ignore[method-assign]
    with capture_logs() as logs:
        async with rig.post(HI) as resp:
            assert resp.status == 200
        await app_of(rig.gateway)[USAGE_KEY].wait_recorded(2)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["settle_failed"]
    assert any(e["event"] == "request" and e.get("status") == 200 for e in logs)
    rows = await usage_rows(rig.gateway)
    assert len(rows) == 2 and rows[-1]["status"] == 200


async def test_a_request_leaves_no_reference_cycle(rig: Rig) -> None:
    """A request's objects go when it ends, not at the garbage collector's next pass: a cycle
    per request (its deferred settle held the request, which held its trace) made each one
    leave ~40 objects behind and cost about a fifth more CPU under load. Answered, streamed,
    translated (Responses, Messages), and with a settle that fails."""
    prices = app_of(rig.gateway)[PRICES_KEY]
    # Translated to a chat request, whose fields are then read off its struct.
    translated = [
        ("/v1/responses", {"model": "gpt", "input": "hello world"}),
        ("/v1/messages", {**HI, "max_tokens": 10}),
    ]

    async def requests() -> None:
        async with rig.post(HI) as resp:
            assert resp.status == 200
        async with rig.post({**HI, "stream": True}) as resp:
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        for path, body in translated:
            async with rig.gateway.post(path, json=body, headers=rig.headers) as resp:
                assert resp.status == 200, await resp.text()

    await requests()  # once before: what is made once (each type's decoder) is no garbage
    gc.collect()
    gc.disable()
    try:
        await requests()

        def broken(*args: object) -> None:
            raise RuntimeError("price book broken")

        prices.price = broken  # type: ignore[method-assign]
        with capture_logs():
            async with rig.post(HI) as resp:
                assert resp.status == 200
            await app_of(rig.gateway)[USAGE_KEY].wait_recorded(9)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [
            getattr(o, "__qualname__", type(o).__name__)
            for o in gc.garbage
            if isinstance(o, (RequestTrace, Exchange, web.Request, types.FunctionType))
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
