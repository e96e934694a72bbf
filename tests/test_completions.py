"""`POST /v1/completions`, the legacy completions API, passed through to OpenAI-compatible and
Azure upstreams with the official `openai` client; other provider types get a clear 400."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from tests.conftest import (
    MakeSettings,
    create_key,
    openai_client,
    provider_config,
    sse_events,
    start_gateway,
    usage_rows,
)
from tests.fakes import FakeOpenAI
from tests.rigs import fake_for, model_on, serve
from tests.spec import validate_completion


@dataclass
class Rig:
    fake: FakeOpenAI
    gateway: TestClient[Any, Any]
    key: str
    client: openai.AsyncOpenAI


@pytest.fixture(params=["openai", "azure"])
async def rig(
    request: pytest.FixtureRequest,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> AsyncIterator[Rig]:
    kind: str = request.param
    fake = fake_for(kind)
    assert isinstance(fake, FakeOpenAI)
    model = model_on(
        "c",
        "up",
        "gpt-4o-mini",
        input_price_per_mtok=1000.0,
        output_price_per_mtok=2000.0,
        max_tokens=7,
    )
    gateway, key = await serve(kind, fake, aiohttp_server, aiohttp_client, make_settings, model)
    async with openai_client(gateway, key) as client:
        yield Rig(fake, gateway, key, client)


async def test_completion(rig: Rig) -> None:
    raw = await rig.client.completions.with_raw_response.create(
        model="c", prompt="say hi", max_tokens=5, extra_body={"suffix": None}
    )
    validate_completion(raw.http_response.json())
    reply = raw.parse()
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "echo: say hi"
    assert reply.choices[0].finish_reason == "stop"
    sent = rig.fake.completions_requests[-1].json
    assert sent == {"model": "gpt-4o-mini", "prompt": "say hi", "max_tokens": 5, "suffix": None}
    row = (await usage_rows(rig.gateway))[-1]
    assert row["endpoint"] == "/v1/completions" and row["status"] == 200
    assert reply.usage is not None
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert row["cost_usd"] == pytest.approx(
        (reply.usage.prompt_tokens * 1000 + reply.usage.completion_tokens * 2000) / 1e6
    )


async def test_model_limit_fills_a_missing_max_tokens(rig: Rig) -> None:
    reply = await rig.client.completions.create(
        model="c", prompt="one two three four five six seven"
    )
    assert rig.fake.completions_requests[-1].json["max_tokens"] == 7
    assert reply.choices[0].finish_reason == "length"
    await rig.client.completions.create(model="c", prompt=[1, 2, 3])  # token prompts pass


async def test_stream_drops_the_usage_chunk_it_asked_for(rig: Rig) -> None:
    headers = {"Authorization": f"Bearer {rig.key}"}
    body = {"model": "c", "prompt": "a b", "stream": True, "max_tokens": 9}
    async with rig.gateway.post("/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        events = sse_events(await resp.read())
    assert rig.fake.completions_requests[-1].json["stream_options"] == {"include_usage": True}
    assert all(e["choices"] and "usage" not in e for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == "echo: a b"
    validate_completion(events[-1])  # the last chunk has its finish_reason
    row = (await usage_rows(rig.gateway))[-1]
    assert row["stream"] == 1 and row["completion_tokens"] == 3 and row["estimated"] == 0


async def test_stream_with_usage_via_the_sdk(rig: Rig) -> None:
    stream = await rig.client.completions.create(
        model="c", prompt="a b", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: a b"


async def test_errors_before_and_during_the_stream(rig: Rig) -> None:
    rig.fake.script(status=400)
    with pytest.raises(openai.BadRequestError):
        await rig.client.completions.create(model="c", prompt="x")
    rig.fake.script(error_after=2)
    stream = await rig.client.completions.create(model="c", prompt="x y z", stream=True)
    seen = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            seen.append(chunk.choices[0].text)
    assert "".join(seen).startswith("echo:")


@pytest.mark.parametrize("model", ["demo", "claude/claude-sonnet-4-5", "gem/gemini-2.5-flash"])
async def test_other_provider_types_get_a_clear_400(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, model: str
) -> None:
    settings = make_settings(
        providers=(
            provider_config(
                "anthropic", name="claude", base_url="http://127.0.0.1:9", api_keys=("k",)
            ),
            provider_config("gemini", name="gem", base_url="http://127.0.0.1:9", api_keys=("k",)),
        )
    )
    gateway = await start_gateway(aiohttp_client, settings)
    async with openai_client(gateway, await create_key(gateway)) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model=model, prompt="x")
    kind = {"demo": "demo", "claude": "anthropic", "gem": "gemini"}[model.split("/")[0]]
    assert err.value.body == {  # type: ignore[comparison-overlap]
        "message": f"The model '{model}' is served by {kind} providers, which have no "
        "/v1/completions API.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "unsupported_model",
    }


async def test_bad_bodies(gateway: TestClient[Any, Any], key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    for body, param in [
        ({"model": "demo"}, "prompt"),
        ({"model": "demo", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "demo", "prompt": {"a": 1}}, "prompt"),
    ]:
        resp = await gateway.post("/v1/completions", data=json.dumps(body), headers=headers)
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == param


@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_a_counted_key_gets_the_providers_default_limit_when_it_sets_none(
    kind: str,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> None:
    """As for chat: a key with a budget or tokens per minute, whose request and model set no
    output limit, gets the provider's `default_max_tokens` sent upstream (what admission held);
    a limit of the request's own goes as it is, and a key without either sends none."""
    fake = fake_for(kind)
    assert isinstance(fake, FakeOpenAI)
    gateway, plain = await serve(
        kind,
        fake,
        aiohttp_server,
        aiohttp_client,
        make_settings,
        model_on("c", "up", "gpt-4o-mini"),
    )
    budgeted = await create_key(gateway, name="b", budget_tokens=100_000)
    per_minute = await create_key(gateway, name="t", tpm=100_000)

    async def sent(key: str, **fields: Any) -> dict[str, Any]:
        body = {"model": "c", "prompt": "say hi"} | fields
        headers = {"Authorization": f"Bearer {key}"}
        async with gateway.post("/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
        return fake.completions_requests[-1].json

    assert "max_tokens" not in await sent(plain)
    assert (await sent(budgeted))["max_tokens"] == 4096  # the provider's default_max_tokens
    assert (await sent(per_minute))["max_tokens"] == 4096
    assert (await sent(budgeted, max_tokens=None))["max_tokens"] == 4096
    assert (await sent(budgeted, max_tokens=5))["max_tokens"] == 5  # the client's, unchanged
    assert (await sent(per_minute, max_tokens=0))["max_tokens"] == 0
    assert (await sent(plain, max_tokens=9))["max_tokens"] == 9
