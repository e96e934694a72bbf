"""Prices: config first, then the genai-prices database; USD budgets refuse unpriced models
(`<provider>/<model>` ids included); every usage row with a price records its cost, with cached
input, cache writes and reasoning at their own prices."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from genai_prices import data_snapshot, wait_prices_updated_async
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.prices import FREE, Price, PriceBook, Rates, Usage, load_database
from gateway.settings import (
    AnthropicConfig,
    ConfigError,
    DemoConfig,
    ModelConfig,
    OpenAIConfig,
    PriceSettings,
    Settings,
    Target,
)
from gateway.state import PRICES_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    refusal_counts,
    start_gateway,
    usage_rows,
)
from tests.fake_anthropic import FakeAnthropic
from tests.fakes import completion

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def openai_up(name: str = "up", **fields: Any) -> OpenAIConfig:
    return OpenAIConfig(name=name, base_url="http://127.0.0.1:9/v1", **fields)


# ---- the price book ----------------------------------------------------------------------------


def test_config_prices_win_over_the_database() -> None:
    lookups: list[tuple[str, str]] = []

    def lookup(provider: str, model: str) -> Price | None:
        lookups.append((provider, model))
        return Price(Rates(1, 2, 1, 1, 2), source="genai-prices")

    priced = ModelConfig(
        name="m",
        targets=(Target(provider="up", model="gpt-4o-mini"),),
        input_price_per_mtok=3.0,
        output_price_per_mtok=4.0,
        cache_read_price_per_mtok=0.5,
    )
    settings = Settings(providers=(openai_up(),), models=(priced,))
    book = PriceBook(lookup)
    price = book.price(priced, settings.providers[0], "gpt-4o-mini")
    assert price is not None and price.source == "config"
    assert price.base == Rates(
        input=3,
        output=4,
        cached_input=0.5,
        cache_write=3,
        reasoning=4,
        audio_input=3,
        audio_output=4,
        image_output=4,
        web_search=0.03,  # (none set: prices.UNKNOWN_SEARCH_PRICE)
        cache_write_1h=3,
        cached_audio_input=0.5,
    )
    assert lookups == []


def test_database_prices_are_looked_up_once_per_upstream_model_with_a_bound() -> None:
    lookups: list[str] = []

    def lookup(provider: str, model: str) -> Price | None:
        lookups.append(model)
        return None

    settings = Settings(providers=(openai_up(),))
    book = PriceBook(lookup)
    provider = settings.providers[0]
    for _ in range(3):
        model = ModelConfig(name="up/x", targets=(Target(provider="up", model="x"),))
        assert book.price(model, provider, "x") is None
    assert lookups == ["x"]
    for i in range(5000):  # ids a client chooses: the cache stays bounded
        book.price(model, provider, f"x{i}")
    assert len(book._found) <= 4096


def test_the_bundled_database_knows_the_big_providers() -> None:
    lookup, _, ids = load_database()
    assert {"openai", "anthropic", "google", "azure"} <= ids
    mini = lookup("openai", "gpt-4o-mini")
    assert mini is not None and mini.source == "genai-prices"
    assert (mini.base.input, mini.base.output, mini.base.cached_input) == (0.15, 0.6, 0.075)
    sonnet = lookup("anthropic", "claude-sonnet-4-5")
    assert sonnet is not None and sonnet.base.cache_write > sonnet.base.input
    assert sonnet.rates(300_000).input > sonnet.rates(1000).input  # the long-context tier
    assert lookup("openai", "no-such-model-anywhere") is None
    assert lookup("no-such-provider", "gpt-4o-mini") is None


def test_free_and_none_pricing() -> None:
    settings = Settings(
        providers=(openai_up("local", pricing="free"), openai_up("own", pricing="none"))
    )
    book = PriceBook(lambda p, m: pytest.fail("no lookup"))
    model = ModelConfig(name="x", targets=(Target(provider="local", model="x"),))
    assert book.price(model, settings.providers[0], "x") is FREE
    assert book.price(model, settings.providers[1], "x") is None
    assert book.pricing_id(DemoConfig(name="demo")) == "free"


def test_costs_count_cached_input_cache_writes_reasoning_and_tiers() -> None:
    price = Price(
        Rates(input=2, output=10, cached_input=0.5, cache_write=2.5, reasoning=20),
        tiers=((200_000, Rates(4, 20, 1, 5, 40)),),
    )
    usage = Usage(prompt=1000, completion=500, cached=400, cache_write=100, reasoning=200)
    expected = (500 * 2 + 400 * 0.5 + 100 * 2.5 + 300 * 10 + 200 * 20) / 1e6
    assert price.cost(usage) == pytest.approx(expected)
    assert price.cost(Usage(300_000, 0)) == pytest.approx(300_000 * 4 / 1e6)


# ---- end to end ---------------------------------------------------------------------------------

Reply = Callable[[dict[str, Any]], dict[str, Any]]


async def billing_upstream(aiohttp_server: AiohttpServer, usage: dict[str, Any]) -> str:
    """An OpenAI-compatible upstream whose every answer reports `usage`."""

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(completion(usage, body["model"]))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1"))


USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 500,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 400},
    "completion_tokens_details": {"reasoning_tokens": 200},
}


@pytest.fixture
async def priced(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> TestClient[Any, Any]:
    url = await billing_upstream(aiohttp_server, USAGE)
    settings = make_settings(
        providers=(OpenAIConfig(name="fake-openai", base_url=url),),
        models=(
            ModelConfig(
                name="m-openai",
                targets=(Target(provider="fake-openai", model="gpt-4o-mini"),),
                input_price_per_mtok=0.15,
                output_price_per_mtok=0.60,
            ),
        ),
    )
    return await start_gateway(aiohttp_client, settings)


async def test_prefixed_ids_cost_what_the_database_says(priced: TestClient[Any, Any]) -> None:
    secret = await create_key(priced)
    body = {"model": "fake-openai/gpt-4o-mini", "messages": HI}
    async with priced.post(CHAT, json=body, headers=auth(secret)) as resp:
        assert resp.status == 200
    (row,) = await usage_rows(priced)
    # gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output (reasoning at the output price)
    assert row["cost_usd"] == pytest.approx((600 * 0.15 + 400 * 0.075 + 500 * 0.60) / 1e6)


async def test_a_usd_budget_cannot_be_bypassed_with_a_prefixed_id(
    priced: TestClient[Any, Any],
) -> None:
    """The issue's report: 429 on the configured model, 200 on the same upstream by prefix."""
    secret = await create_key(priced, budget_usd=0.00005, budget_period="total")
    statuses = {}
    for model in ("m-openai", "fake-openai/gpt-4o-mini"):
        async with priced.post(
            CHAT, json={"model": model, "messages": HI, "max_tokens": 500}, headers=auth(secret)
        ) as resp:
            statuses[model] = resp.status
    assert statuses == {"m-openai": 429, "fake-openai/gpt-4o-mini": 429}


async def test_a_usd_budget_refuses_models_without_a_price(priced: TestClient[Any, Any]) -> None:
    budgeted = await create_key(priced, budget_usd=5.0, budget_period="month")
    body = {"model": "fake-openai/my-local-finetune", "messages": HI}
    async with priced.post(CHAT, json=body, headers=auth(budgeted)) as resp:
        assert resp.status == 403
        error = (await resp.json())["error"]
    assert error["code"] == "model_price_unknown" and error["param"] == "model"
    assert "'fake-openai/my-local-finetune'" in error["message"]
    assert "input_price_per_mtok" in error["message"]
    assert list((await refusal_counts(priced)).values()) == [1]
    # Without a USD budget the model is served; its row has no cost to record.
    free = await create_key(priced)
    async with priced.post(CHAT, json=body, headers=auth(free)) as resp:
        assert resp.status == 200
    (row,) = await usage_rows(priced)
    assert row["cost_usd"] == 0.0


async def test_anthropic_cache_writes_are_priced(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    fake = FakeAnthropic()
    await fake.start(aiohttp_server)
    fake.always(input_tokens=100, output_tokens=10, cache_read_input_tokens=1000,
                cache_creation_input_tokens=2000)  # fmt: skip
    provider = AnthropicConfig(name="claude", base_url=fake.base_url, api_keys=("k",))
    gw = await start_gateway(aiohttp_client, make_settings(providers=(provider,)))
    secret = await create_key(gw)
    for stream in (False, True):
        body = {"model": "claude/claude-sonnet-4-5", "messages": HI, "stream": stream}
        async with gw.post(CHAT, json=body, headers=auth(secret)) as resp:
            assert resp.status == 200
            await resp.read()
    # claude-sonnet-4-5: $3 input, $0.30 cache read, $3.75 cache write, $15 output
    expected = (100 * 3 + 1000 * 0.30 + 2000 * 3.75 + 10 * 15) / 1e6
    assert [r["cost_usd"] for r in await usage_rows(gw)] == pytest.approx([expected] * 2)


async def test_an_unknown_pricing_id_stops_the_start(make_settings: MakeSettings) -> None:
    app = create_app(make_settings(providers=(openai_up(pricing="nobody"),)))
    runner = web.AppRunner(app)
    with pytest.raises(ConfigError, match=r"providers\.up\.pricing: 'nobody'"):
        await runner.setup()
    await app.cleanup()


def _price_data(**prices: Any) -> list[dict[str, Any]]:
    """A price list as genai-prices fetches it: OpenAI's gpt-4o-mini at `prices`."""
    return [
        {
            "id": "openai",
            "name": "OpenAI",
            "api_pattern": "x",
            "models": [{"id": "gpt-4o-mini", "match": {"equals": "gpt-4o-mini"}, "prices": prices}],
        }
    ]


async def test_prices_are_fetched_only_when_updates_are_on(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    fetched: list[str] = []
    data = _price_data(input_mtok=7, output_mtok=9)

    async def serve(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(text=json.dumps(data), content_type="application/json")

    app = web.Application()
    app.router.add_get("/data.json", serve)
    server = await aiohttp_server(app)
    url = str(server.make_url("/data.json"))

    off = await start_gateway(aiohttp_client, make_settings())
    assert fetched == []  # the default: offline
    await off.close()

    prices = PriceSettings(update=True, update_url=url, update_interval=3600)
    settings = make_settings(providers=(openai_up(),))
    settings = Settings(
        server=settings.server, providers=settings.providers, models=settings.models,
        prices=prices,
    )  # fmt: skip
    try:
        gw = await start_gateway(aiohttp_client, settings)
        assert await wait_prices_updated_async(NEVER_HANG)
        assert fetched == ["/data.json"]
        model = ModelConfig(
            name="up/gpt-4o-mini", targets=(Target(provider="up", model="gpt-4o-mini"),)
        )
        price = app_of(gw)[PRICES_KEY].price(model, settings.providers[1], "gpt-4o-mini")
        assert price is not None and (price.base.input, price.base.output) == (7, 9)
    finally:
        data_snapshot.set_custom_snapshot(None)  # genai-prices keeps fetched prices globally


@pytest.mark.parametrize(
    "prices",
    [
        {"input_mtok": -7, "output_mtok": 9},  # every request would give budgets money back
        {"input_mtok": 7, "output_mtok": 9, "cache_read_mtok": -1},
        {"input_mtok": "1e400", "output_mtok": 9},  # infinite: past a float
    ],
    ids=["negative", "negative-cache-read", "infinite"],
)
async def test_fetched_prices_below_zero_or_not_finite_are_refused(
    prices: dict[str, Any],
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> None:
    """The price data may come from the network (`[prices] update`): a model whose fetched
    price is negative or not a finite number has no price (a USD budget then refuses it),
    and the gateway says so."""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(_price_data(**prices)), content_type="application/json")

    app = web.Application()
    app.router.add_get("/data.json", serve)
    server = await aiohttp_server(app)
    settings = make_settings(providers=(openai_up(),))
    settings = Settings(
        server=settings.server, providers=settings.providers, models=settings.models,
        prices=PriceSettings(update=True, update_url=str(server.make_url("/data.json"))),
    )  # fmt: skip
    try:
        gw = await start_gateway(aiohttp_client, settings)
        assert await wait_prices_updated_async(NEVER_HANG)
        model = ModelConfig(
            name="up/gpt-4o-mini", targets=(Target(provider="up", model="gpt-4o-mini"),)
        )
        with capture_logs() as logs:
            price = app_of(gw)[PRICES_KEY].price(model, settings.providers[1], "gpt-4o-mini")
        assert price is None
        refused = [e for e in logs if e["event"] == "price_refused"]
        assert refused == [
            {"event": "price_refused", "log_level": "warning", "provider": "openai",
             "model": "gpt-4o-mini"}
        ]  # fmt: skip
    finally:
        data_snapshot.set_custom_snapshot(None)  # genai-prices keeps fetched prices globally
