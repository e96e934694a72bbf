"""`POST /v1/embeddings` on every provider type, driven with the official `openai` client.

OpenAI-compatible and Azure upstreams get the request as it is; Gemini gets it translated to
`batchEmbedContents`; the demo model answers offline; Anthropic, which has no embeddings API,
is a 400. Every answer is validated against OpenAI's `CreateEmbeddingResponse` schema, in both
encodings (the SDK asks for base64 unless told otherwise, and decodes it itself).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, RoutingSettings, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    openai_client,
    provider_config,
    refusal_counts,
    start_gateway,
    usage_rows,
)
from tests.fake_anthropic import FakeAnthropic
from tests.fake_azure import FakeAzure
from tests.fake_endpoints import vector
from tests.fake_gemini import FakeGemini
from tests.fakes import FakeOpenAI
from tests.rigs import UPSTREAM_KEY, fake_for, model_on, serve
from tests.spec import floats_of, validate_embeddings, validate_error

KINDS = ("openai", "azure", "gemini", "demo")
UPSTREAM = {
    "openai": "text-embedding-3-small",
    "azure": "text-embedding-3-small",  # a deployment name
    "gemini": "gemini-embedding-001",
    "demo": "demo",
}
NATIVE = {"openai": 1536, "azure": 1536, "gemini": 3072, "demo": 1536}
Fake = FakeOpenAI | FakeAzure | FakeGemini


@dataclass
class Rig:
    kind: str
    fake: Fake | None
    gateway: TestClient[Any, Any]
    client: openai.AsyncOpenAI

    def upstream_bodies(self) -> list[Any]:
        if self.fake is None:
            return []
        if isinstance(self.fake, FakeGemini):
            return [r.json for r in self.fake.embed_requests]
        return [r.json for r in self.fake.embeddings_requests]


async def _rig(
    kind: str,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> Rig:
    fake: Fake | None = None
    if kind == "azure":
        fake = FakeAzure(api_key=UPSTREAM_KEY, deployments=("text-embedding-3-small",))
    elif kind != "demo":
        fake = fake_for(kind)  # type: ignore[assignment]
    target = "demo" if fake is None else "up"
    model = model_on("emb", target, UPSTREAM[kind], input_price_per_mtok=1000.0, embeddings=True)
    gateway, key = await serve(kind, fake, aiohttp_server, aiohttp_client, make_settings, model)
    return Rig(kind, fake, gateway, openai_client(gateway, key))


@pytest.fixture(params=KINDS)
async def rig(
    request: pytest.FixtureRequest,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> AsyncIterator[Rig]:
    built = await _rig(request.param, aiohttp_server, aiohttp_client, make_settings)
    async with built.client:
        yield built


def norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


async def test_float_and_base64_answers(rig: Rig) -> None:
    texts = ["hello world", "goodbye"]
    raw = await rig.client.embeddings.with_raw_response.create(
        model="emb", input=texts, encoding_format="float"
    )
    body = raw.http_response.json()
    validate_embeddings(body)
    floats = [item["embedding"] for item in body["data"]]
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(isinstance(v, float) for v in floats[0]) and len(floats[0]) == NATIVE[rig.kind]
    assert body["object"] == "list" and body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    if rig.kind in ("openai", "azure", "gemini"):  # the upstream's vectors, untouched
        assert floats[0] == pytest.approx(vector("hello world", NATIVE[rig.kind]), abs=1e-7)

    raw = await rig.client.embeddings.with_raw_response.create(model="emb", input=texts)
    encoded = raw.http_response.json()
    validate_embeddings(encoded)
    assert all(isinstance(item["embedding"], str) for item in encoded["data"])
    decoded = raw.parse()  # the SDK asked for base64 and decodes it: the same vectors
    for got, want in zip(decoded.data, floats, strict=True):
        assert got.embedding == pytest.approx(want, rel=1e-6, abs=1e-7)
        assert floats_of(encoded["data"][got.index]["embedding"]) == got.embedding
    if rig.kind in ("openai", "azure"):
        assert rig.upstream_bodies()[-1]["encoding_format"] == "base64"  # passed through


async def test_one_string_and_dimensions(rig: Rig) -> None:
    reply = await rig.client.embeddings.create(model="emb", input="hello", dimensions=8)
    assert len(reply.data) == 1 and len(reply.data[0].embedding) == 8
    if rig.kind == "gemini":
        sent = rig.upstream_bodies()[-1]["requests"]
        assert sent == [
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": "hello"}]},
                "outputDimensionality": 8,
            }
        ]
    elif rig.kind != "demo":
        assert rig.upstream_bodies()[-1] == {
            "model": "text-embedding-3-small",
            "input": "hello",
            "dimensions": 8,
            "encoding_format": "base64",
        }
    if rig.kind == "demo":
        assert norm(reply.data[0].embedding) == pytest.approx(1.0)


async def test_token_inputs(rig: Rig) -> None:
    one = rig.client.embeddings.create(model="emb", input=[15339, 1917])
    many = rig.client.embeddings.create(model="emb", input=[[15339, 1917], [12345]])
    if rig.kind == "gemini":  # Gemini embeds text only
        for request in (one, many):
            with pytest.raises(openai.BadRequestError) as err:
                await request
            assert err.value.body["param"] == "input"  # type: ignore[index]
            assert "token ids" in err.value.message
        assert rig.upstream_bodies() == []
        return
    assert len((await one).data) == 1
    reply = await many
    assert [d.index for d in reply.data] == [0, 1]
    assert reply.usage.prompt_tokens == 3


async def test_usage_row_prices_the_input(rig: Rig) -> None:
    reply = await rig.client.embeddings.create(model="emb", input="one two three")
    row = (await usage_rows(rig.gateway))[-1]
    assert row["endpoint"] == "/v1/embeddings" and row["status"] == 200
    assert row["prompt_tokens"] == reply.usage.prompt_tokens and row["completion_tokens"] == 0
    assert row["cost_usd"] == pytest.approx(reply.usage.prompt_tokens * 1000.0 / 1_000_000)
    # Gemini reports no usage for embeddings: the row says the count is the gateway's own.
    assert row["estimated"] == (rig.kind in ("gemini",))


@pytest.fixture
async def demo(gateway: TestClient[Any, Any], key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(gateway, key) as client:
        yield client


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": ["a", 1]}, "input"),
        ({"input": [[1], []]}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": [-1]}, "input[0]"),
        ({"input": {"text": "a"}}, "input"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": 3073}, "dimensions"),
        ({"input": "word " * 7000}, "input"),  # over 8192 tokens in one input
        ({"input": [[1] * 8000] * 38}, "input"),  # over 300,000 in the request
        ({}, "input"),
    ],
)
async def test_bad_requests_name_the_field(
    gateway: TestClient[Any, Any], key: str, fields: dict[str, Any], param: str
) -> None:
    resp = await gateway.post(
        "/v1/embeddings",
        json={"model": "demo"} | fields,
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status == 400, await resp.text()
    body = await resp.json()
    validate_error(body)
    assert body["error"]["param"] == param


async def test_demo_vectors_are_stable_and_share_words(demo: openai.AsyncOpenAI) -> None:
    texts = ["cats and dogs", "dogs and cats play", "quantum physics", "cats and dogs"]
    reply = await demo.embeddings.create(model="demo", input=texts)
    a, b, c, again = (d.embedding for d in reply.data)

    def cosine(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True))

    assert again == a and len(a) == 1536
    assert cosine(a, b) > 0.5 > cosine(a, c)
    (punctuation,) = (await demo.embeddings.create(model="demo", input="!!!")).data
    assert norm(punctuation.embedding) == pytest.approx(1.0)


async def test_models_list_says_which_models_embed(rig: Rig) -> None:
    models = {m.id: m for m in (await rig.client.models.list()).data}
    assert models["emb"].model_extra == {"embeddings": True}
    assert models["demo"].model_extra == {"embeddings": True}


async def test_anthropic_models_are_refused_with_a_clear_400(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    await fake.start(aiohttp_server)
    settings = make_settings(
        providers=(
            provider_config(
                "anthropic", name="claude", base_url=fake.base_url, api_keys=(UPSTREAM_KEY,)
            ),
        ),
    )
    gateway = await start_gateway(aiohttp_client, settings)
    async with openai_client(gateway, await create_key(gateway)) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.embeddings.create(model="claude/claude-sonnet-4-5", input="hi")
        assert err.value.body == {  # type: ignore[comparison-overlap]
            "message": "The model 'claude/claude-sonnet-4-5' is served by anthropic providers, "
            "which have no /v1/embeddings API.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "unsupported_model",
        }
    assert fake.requests == []
    # Refused before any upstream call: counted, not written as a usage row (issue #11).
    assert [status for _, status in await refusal_counts(gateway)] == [400]


async def test_fails_over_to_another_provider_type(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    primary, backup = FakeOpenAI(), FakeGemini(api_key=UPSTREAM_KEY)
    await primary.start(aiohttp_server)
    await backup.start(aiohttp_server)
    primary.script(status=503)
    settings = make_settings(
        providers=(
            provider_config("openai", name="oai", base_url=primary.base_url),
            provider_config(
                "gemini", name="gem", base_url=backup.base_url, api_keys=(UPSTREAM_KEY,)
            ),
        ),
        models=(
            ModelConfig(
                name="emb",
                targets=(
                    Target(provider="oai", model="text-embedding-3-small"),
                    Target(provider="gem", model="gemini-embedding-001", priority=1),
                ),
            ),
        ),
        routing=RoutingSettings(max_attempts=2, backoff_initial=0.0),
    )
    gateway = await start_gateway(aiohttp_client, settings)
    async with openai_client(gateway, await create_key(gateway)) as client:
        raw = await client.embeddings.with_raw_response.create(
            model="emb", input="hi", dimensions=4
        )
    assert raw.headers["x-gateway-provider"] == "gem"
    assert len(raw.parse().data[0].embedding) == 4
    assert len(primary.embeddings_requests) == 1 and len(backup.embed_requests) == 1


async def test_gemini_takes_at_most_100_inputs_a_call(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    fake = FakeGemini(api_key=UPSTREAM_KEY)
    await fake.start(aiohttp_server)
    settings = make_settings(
        providers=(
            provider_config("gemini", name="gem", base_url=fake.base_url, api_keys=(UPSTREAM_KEY,)),
        )
    )
    gateway = await start_gateway(aiohttp_client, settings)
    texts = [f"text {i}" for i in range(150)]
    async with openai_client(gateway, await create_key(gateway)) as client:
        reply = await client.embeddings.create(
            model="gem/gemini-embedding-001", input=texts, dimensions=2, encoding_format="float"
        )
    assert [len(r.json["requests"]) for r in fake.embed_requests] == [100, 50]
    assert [d.index for d in reply.data] == list(range(150))
    first = vector("text 149", 3072)[:2]  # Gemini's shortened vector, scaled to unit length
    assert reply.data[149].embedding == pytest.approx([v / norm(first) for v in first], abs=1e-7)


@pytest.mark.parametrize("kind", ["openai", "azure", "gemini"])
async def test_upstream_errors_map_as_for_chat(
    kind: str,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> None:
    rig = await _rig(kind, aiohttp_server, aiohttp_client, make_settings)
    assert rig.fake is not None
    async with rig.client:
        rig.fake.script(status=400)
        with pytest.raises(openai.BadRequestError):
            await rig.client.embeddings.create(model="emb", input="hi")
        rig.fake.script(status=429, headers={"retry-after": "7"})  # (the account cools down)
        with pytest.raises(openai.RateLimitError) as err:
            await rig.client.embeddings.create(model="emb", input="hi")
    assert err.value.response.headers["retry-after"] == "7"
    validate_error(err.value.response.json())
