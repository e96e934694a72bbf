"""`/v1/messages` beyond the happy path: what the Anthropic pass-through keeps, the gateway's own
refusals in Anthropic's shape, the key headers Claude clients send, failover from an Anthropic
upstream to a translated one, and usage rows with prompt-cache tokens."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, RoutingSettings, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    provider_config,
    sdk_tls,
    start_gateway,
    usage_rows,
)
from tests.fake_anthropic import FakeAnthropic
from tests.fakes import FakeOpenAI
from tests.test_messages import HELLO, KEY, WEATHER, Rig, anthropic_client, build

MESSAGES = "/v1/messages"


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 50, "messages": HELLO} | extra


async def anthropic_error(resp: Any, status: int, kind: str) -> str:
    """The message of an Anthropic-shaped error (its shape checked)."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    err = await resp.json()
    assert set(err) == {"type", "error", "request_id"} and err["type"] == "error"
    assert err["error"]["type"] == kind and set(err["error"]) == {"type", "message"}
    assert err["request_id"] == resp.headers["x-request-id"]
    return str(err["error"]["message"])


@pytest.fixture
async def native(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> AsyncIterator[Rig]:
    built = await build(
        "anthropic",
        aiohttp_server,
        aiohttp_client,
        make_settings,
        input_price_per_mtok=1000.0,
        output_price_per_mtok=2000.0,
        cache_read_price_per_mtok=100.0,
        cache_write_price_per_mtok=1250.0,
    )
    async with built.client:
        yield built


async def test_pass_through_keeps_what_anthropic_needs(native: Rig) -> None:
    cached = {"type": "text", "text": "Long rules.", "cache_control": {"type": "ephemeral"}}
    headers = {
        "x-api-key": native.key,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "interleaved-thinking-2025-05-14,context-1m-2025-08-07",
    }
    sent = body(
        system=[cached],
        service_tier="auto",
        tools=[WEATHER | {"cache_control": {"type": "ephemeral"}}],
    )
    native.fake.script(cache_read_input_tokens=30, cache_creation_input_tokens=20, input_tokens=10)
    resp = await native.gateway.post(f"{MESSAGES}?beta=true", json=sent, headers=headers)
    assert resp.status == 200, await resp.text()
    reply = await resp.json()
    assert reply["usage"]["cache_read_input_tokens"] == 30  # the upstream's answer, untouched
    got = native.fake.messages_requests[-1]
    assert got.json == sent | {"model": "claude-sonnet-4-5"}  # every field, model rewritten
    assert got.headers["anthropic-beta"] == headers["anthropic-beta"]
    assert got.headers["anthropic-version"] == "2023-06-01"
    assert got.headers["x-api-key"] == KEY  # the upstream's key, never the client's
    row = (await usage_rows(native.gateway))[-1]
    assert (row["prompt_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]) == (
        60,
        30,
        20,
    )
    output = reply["usage"]["output_tokens"]
    assert row["cost_usd"] == pytest.approx(
        (10 * 1000 + 30 * 100 + 20 * 1250 + output * 2000) / 1e6
    )


async def test_streamed_pass_through_accounts_cache_tokens(native: Rig) -> None:
    native.fake.script(cache_read_input_tokens=7, cache_creation_input_tokens=3, input_tokens=5)
    async with native.client.messages.stream(**body()) as stream:
        final = await stream.get_final_message()
    assert final.usage.cache_read_input_tokens == 7
    row = (await usage_rows(native.gateway))[-1]
    assert (row["prompt_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]) == (15, 7, 3)
    assert row["completion_tokens"] == final.usage.output_tokens and row["estimated"] == 0


async def test_refusals_are_anthropic_shaped(native: Rig) -> None:
    gateway, headers = native.gateway, {"x-api-key": native.key}
    message = await anthropic_error(
        await gateway.post(MESSAGES, json=body()), 401, "authentication_error"
    )
    assert "x-api-key" in message
    bad = {"x-api-key": "sk-nope"}
    await anthropic_error(
        await gateway.post(MESSAGES, json=body(), headers=bad), 401, "authentication_error"
    )
    await anthropic_error(
        await gateway.post(MESSAGES, json=body(model="nope"), headers=headers),
        404,
        "not_found_error",
    )
    limited = {"x-api-key": await create_key(gateway, models=["other"])}
    await anthropic_error(
        await gateway.post(MESSAGES, json=body(), headers=limited), 403, "permission_error"
    )
    no_limit = {k: v for k, v in body().items() if k != "max_tokens"}
    message = await anthropic_error(
        await gateway.post(MESSAGES, json=no_limit, headers=headers), 400, "invalid_request_error"
    )
    assert "max_tokens" in message
    await anthropic_error(
        await gateway.post(MESSAGES, data=b"{nope", headers=headers), 400, "invalid_request_error"
    )
    await anthropic_error(
        await gateway.get(MESSAGES, headers=headers), 405, "invalid_request_error"
    )
    bad_beta = headers | {"anthropic-beta": "x\u00e9"}
    await anthropic_error(
        await gateway.post(MESSAGES, json=body(), headers=bad_beta), 400, "invalid_request_error"
    )
    assert native.fake.requests == []


async def test_limits_and_budgets_refuse_in_anthropics_shape(native: Rig) -> None:
    gateway = native.gateway
    slow = {"x-api-key": await create_key(gateway, rpm=1)}
    assert (await gateway.post(MESSAGES, json=body(), headers=slow)).status == 200
    resp = await gateway.post(MESSAGES, json=body(), headers=slow)
    await anthropic_error(resp, 429, "rate_limit_error")
    assert int(resp.headers["retry-after"]) >= 1
    broke = {"x-api-key": await create_key(gateway, budget_tokens=10, budget_period="day")}
    resp = await gateway.post(MESSAGES, json=body(max_tokens=500), headers=broke)
    await anthropic_error(resp, 429, "rate_limit_error")
    assert resp.headers["x-should-retry"] == "false"
    with pytest.raises(anthropic.RateLimitError):  # the SDK obeys x-should-retry: one try
        async with anthropic_client(gateway, broke["x-api-key"]) as client:
            await client.messages.create(**body(max_tokens=500))


async def test_upstream_credentials_refused_is_an_api_error(native: Rig) -> None:
    native.fake.api_key = "rotated"
    with pytest.raises(anthropic.InternalServerError) as err:
        await native.client.messages.create(**body())
    assert err.value.status_code == 500
    assert err.value.body["error"]["type"] == "api_error"  # type: ignore[index]


@pytest.mark.parametrize("header", ["x-api-key", "api-key", "authorization"])
async def test_every_key_header_works_on_every_model_route(
    gateway: TestClient[Any, Any], key: str, header: str
) -> None:
    value = f"Bearer {key}" if header == "authorization" else key
    calls = [
        ("/v1/messages", {"model": "demo", "max_tokens": 9, "messages": HELLO}),
        ("/v1/messages/count_tokens", {"model": "demo", "messages": HELLO}),
        ("/v1/chat/completions", {"model": "demo", "messages": HELLO}),
        ("/v1/embeddings", {"model": "demo", "input": "x"}),
        ("/v1/responses", {"model": "demo", "input": "x"}),
        ("/api/v1/chat", {"messages": HELLO}),
    ]
    for path, sent in calls:
        resp = await gateway.post(path, json=sent, headers={header: value})
        assert resp.status == 200, (path, await resp.text())
    assert (await gateway.get("/v1/models", headers={header: value})).status == 200
    bad = "Bearer sk-x" if header == "authorization" else "sk-x"
    wrong = await gateway.post("/v1/chat/completions", json=calls[2][1], headers={header: bad})
    assert wrong.status == 401 and (await wrong.json())["error"]["code"] == "invalid_api_key"


async def test_bearer_wins_over_other_key_headers(gateway: TestClient[Any, Any], key: str) -> None:
    sent = {"model": "demo", "messages": HELLO}
    both = {"Authorization": "Bearer sk-wrong", "x-api-key": key}
    assert (await gateway.post("/v1/chat/completions", json=sent, headers=both)).status == 401
    basic = {"Authorization": "Basic Zm9vOmJhcg==", "x-api-key": key}  # not a key: next header
    assert (await gateway.post("/v1/chat/completions", json=sent, headers=basic)).status == 200
    async with anthropic.AsyncAnthropic(
        base_url=str(gateway.make_url("")).rstrip("/"),
        auth_token=key,
        max_retries=0,
        http_client=anthropic.DefaultAsyncHttpxClient(verify=sdk_tls()),
    ) as client:  # ANTHROPIC_AUTH_TOKEN: a Bearer token
        reply = await client.messages.create(model="demo", max_tokens=20, messages=HELLO)  # type: ignore[arg-type]
    assert reply.content[0].text == "You said: hello there"  # type: ignore[union-attr]


async def test_fails_over_from_anthropic_to_a_translated_upstream(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    primary, backup = FakeAnthropic(api_key=KEY), FakeOpenAI()
    await primary.start(aiohttp_server)
    await backup.start(aiohttp_server)
    settings = make_settings(
        providers=(
            provider_config("anthropic", name="claude", base_url=primary.base_url, api_keys=(KEY,)),
            provider_config("openai", name="oai", base_url=backup.base_url),
        ),
        models=(
            ModelConfig(
                name="m",
                targets=(
                    Target(provider="claude", model="claude-sonnet-4-5"),
                    Target(provider="oai", model="gpt-4o-mini", priority=1),
                ),
            ),
        ),
        routing=RoutingSettings(max_attempts=2, backoff_initial=0.0),
    )
    gateway = await start_gateway(aiohttp_client, settings)
    primary.script(status=529, times=2)
    async with anthropic_client(gateway, await create_key(gateway)) as client:
        async with client.messages.stream(model="m", max_tokens=50, messages=HELLO) as stream:  # type: ignore[arg-type]
            final = await stream.get_final_message()
        assert final.content[0].text == "echo: hello there"  # type: ignore[union-attr]
        server_tool = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]
        primary.script(status=529, times=2)
        with pytest.raises(anthropic.OverloadedError):  # only Anthropic can run a server tool
            await client.messages.create(
                model="m",
                max_tokens=50,
                messages=HELLO,
                tools=server_tool,  # type: ignore[arg-type]
            )
    assert len(backup.chat_requests) == 1


async def test_what_only_anthropic_can_do_is_refused_when_translated(
    gateway: TestClient[Any, Any], key: str
) -> None:
    headers = {"x-api-key": key}
    cases = [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"top_k": 5}, "top_k"),
        (
            {"mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}]},
            "mcp_servers",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "search_result", "source": "s"}]}]},
            "messages[0].content[0].type",
        ),
    ]
    for extra, param in cases:
        resp = await gateway.post(
            MESSAGES,
            json={"model": "demo", "max_tokens": 9, "messages": HELLO} | extra,
            headers=headers,
        )
        message = await anthropic_error(resp, 400, "invalid_request_error")
        assert f"'{param}'" in message and "Anthropic provider" in message


async def test_large_bodies_are_request_too_large(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gateway = await start_gateway(aiohttp_client, make_settings(max_body_bytes=1024))
    key = await create_key(gateway)
    sent = json.dumps(
        {"model": "demo", "max_tokens": 9, "messages": [{"role": "user", "content": "x" * 4096}]}
    )
    resp = await gateway.post(MESSAGES, data=sent, headers={"x-api-key": key})
    await anthropic_error(resp, 413, "request_too_large")


async def test_an_early_stream_error_is_still_a_status(native: Rig) -> None:
    native.fake.script(error_after=1)  # `error` right after message_start, as overload comes
    with pytest.raises(anthropic.OverloadedError):
        async with native.client.messages.stream(**body()) as stream:
            await stream.get_final_message()
    native.fake.script(drop_after=2)  # the connection drops before any content
    with pytest.raises(anthropic.InternalServerError) as err:
        await native.client.messages.create(**body(stream=True))
    assert err.value.status_code == 500
    native.fake.script(drop_after=5)  # ... and after some: the stream ends with an error event
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as failed:
        async with native.client.messages.stream(**body()) as stream:
            async for text in stream.text_stream:
                seen.append(text)
    assert seen and failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    rows = await usage_rows(native.gateway)
    assert [r["status"] for r in rows] == [529, 500, 500]


async def test_unbelievable_upstream_usage_is_estimated(native: Rig) -> None:
    native.fake.script(input_tokens=-5)
    reply = await native.client.messages.create(**body())
    assert reply.usage.input_tokens == -5  # relayed untouched: it is the upstream's answer
    native.fake.script(input_tokens=-5)
    async with native.client.messages.stream(**body()) as stream:
        await stream.get_final_message()
    rows = await usage_rows(native.gateway)
    assert [(r["estimated"], r["prompt_tokens"] > 0) for r in rows[-2:]] == [(1, True)] * 2
