"""`GET /metrics`: scraped after real requests through the gateway (the demo provider, and
fake upstreams that fail, retry, fail over and trip breakers), parsed with prometheus_client's
own parser, checked for the figures an operator reads."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics, outcome, render
from gateway.settings import (
    MetricsSettings,
    ModelConfig,
    OpenAIConfig,
    RoutingSettings,
    Settings,
    Target,
)
from gateway.state import KEYS_KEY, METRICS_KEY, USAGE_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    openai_client,
    start_gateway,
    usage_rows,
)
from tests.fakes import FakeOpenAI

ADMIN = "admin-secret"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
CHAT = "/v1/chat/completions"
HI = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}]}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def with_metrics(settings: Settings, **fields: Any) -> Settings:
    return msgspec.structs.replace(settings, metrics=MetricsSettings(**fields))


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, metric: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (0 when there is none: a counter not yet
    touched has no series)."""
    return samples.get((metric, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


async def scrape(client: TestClient[Any, Any], headers: dict[str, str] | None = None) -> Samples:
    resp = await client.get("/metrics", headers=AS_ADMIN if headers is None else headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(await resp.text())


async def chat(client: TestClient[Any, Any], key: str, body: Any = None) -> int:
    resp = await client.post(CHAT, json=body or HI, headers={"Authorization": f"Bearer {key}"})
    await resp.read()
    return resp.status


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> TestClient[Any, Any]:
    return await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN))


async def test_requests_tokens_cost_and_latency_after_real_requests(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, database: str
) -> None:
    """On either backend (SQLite, then a real PostgreSQL)."""
    gw = await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN, database=database))
    key = await create_key(gw, name="team-a")
    async with openai_client(gw, key) as oai:
        await oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "a"}])
        stream = await oai.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "tell me more"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _ in stream:
            pass
        await oai.embeddings.create(model="demo", input="hello")
    rows = await usage_rows(gw)
    m = await scrape(gw)
    chat_ok = {"endpoint": CHAT, "model": "demo", "provider": "demo"}
    assert value(m, "tokenkiosk_requests_total", **chat_ok, status="200") == 2
    assert value(m, "tokenkiosk_request_duration_seconds_count", **chat_ok) == 2
    assert value(m, "tokenkiosk_request_duration_seconds_sum", **chat_ok) > 0
    # Time to first token: streams only (a whole answer's is its latency).
    assert (
        value(m, "tokenkiosk_time_to_first_token_seconds_count", model="demo", provider="demo") == 1
    )
    embeddings = {"endpoint": "/v1/embeddings", "model": "demo", "provider": "demo"}
    assert value(m, "tokenkiosk_requests_total", **embeddings, status="200") == 1
    # The same tokens the usage rows hold, by model and by key.
    prompt = sum(r["prompt_tokens"] for r in rows)
    completion = sum(r["completion_tokens"] for r in rows)
    assert prompt > 0 and completion > 0
    assert value(m, "tokenkiosk_tokens_total", model="demo", type="input") == prompt
    assert value(m, "tokenkiosk_tokens_total", model="demo", type="output") == completion
    key_id = rows[0]["key_id"]
    assert value(m, "tokenkiosk_key_tokens_total", key=key_id, type="input") == prompt
    assert value(m, "tokenkiosk_key_tokens_total", key=key_id, type="output") == completion
    assert value(m, "tokenkiosk_key_info", key=key_id, name="team-a") == 1
    # Nothing is open or waiting once the requests are done and the rows written.
    assert value(m, "tokenkiosk_open_streams") == 0
    assert value(m, "tokenkiosk_usage_rows_pending") == 0
    assert value(m, "tokenkiosk_requests_in_flight") == 1  # the scrape itself


async def test_cost_in_usd_by_model_and_key(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    priced = ModelConfig(
        name="priced",
        targets=(Target(provider="demo", model="demo"),),
        input_price_per_mtok=1_000_000.0,  # a dollar a token: the cost is the token count
        output_price_per_mtok=2_000_000.0,
    )
    gw = await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN, models=(priced,)))
    key = await create_key(gw)
    assert await chat(gw, key, {**HI, "model": "priced"}) == 200
    [row] = await usage_rows(gw)
    m = await scrape(gw)
    cost = row["prompt_tokens"] * 1.0 + row["completion_tokens"] * 2.0
    assert row["cost_usd"] == pytest.approx(cost)
    assert value(m, "tokenkiosk_cost_usd_total", model="priced") == pytest.approx(cost)
    assert value(m, "tokenkiosk_key_cost_usd_total", key=row["key_id"]) == pytest.approx(cost)


async def test_an_open_stream_is_counted_while_it_lasts(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, make_settings: MakeSettings
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    settings = make_settings(
        admin_key=ADMIN,
        providers=(OpenAIConfig(name="up", base_url=fake.base_url, api_keys=("k",)),),
        models=(ModelConfig(name="m", targets=(Target(provider="up", model="x"),)),),
    )
    gw = await start_gateway(aiohttp_client, settings)
    key = await create_key(gw, name="one-at-a-time", max_concurrency=1)
    rest = asyncio.Event()
    fake.script(content="one two three", hold=rest, hold_after=1)
    resp = await gw.post(
        CHAT,
        json={**HI, "model": "m", "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status == 200
    await resp.content.readline()  # the first event is here: the stream is open
    assert value(await scrape(gw), "tokenkiosk_open_streams") == 1
    assert await chat(gw, key, {**HI, "model": "m"}) == 429  # its one slot is taken
    m = await scrape(gw)
    assert value(m, "tokenkiosk_refusals_total", key=key_id(gw, "one-at-a-time"),
                 reason="concurrency") == 1  # fmt: skip
    assert value(m, "tokenkiosk_requests_in_flight") == 2  # the stream and the scrape
    rest.set()
    await resp.read()
    m = await scrape(gw)
    assert value(m, "tokenkiosk_open_streams") == 0
    assert value(m, "tokenkiosk_time_to_first_token_seconds_count", model="m", provider="up") == 1


async def test_a_client_hanging_up_mid_stream_counts_as_499(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, make_settings: MakeSettings
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    settings = make_settings(
        admin_key=ADMIN,
        providers=(OpenAIConfig(name="up", base_url=fake.base_url, api_keys=("k",)),),
        models=(ModelConfig(name="m", targets=(Target(provider="up", model="x"),)),),
    )
    gw = await start_gateway(aiohttp_client, settings)
    key = await create_key(gw)
    fake.script(content="one two three four", hold=asyncio.Event(), hold_after=1)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gw.make_url(CHAT),
            json={**HI, "model": "m", "stream": True},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        resp.close()  # hang up mid-stream
    async with asyncio.timeout(NEVER_HANG):
        await fake.client_disconnected.wait()
        await app_of(gw)[USAGE_KEY].wait_recorded(1)
    [row] = await usage_rows(gw)
    m = await scrape(gw)
    assert row["status"] == 499
    gone = {"endpoint": CHAT, "model": "m", "provider": "up", "status": "499"}
    assert value(m, "tokenkiosk_requests_total", **gone) == 1
    assert value(m, "tokenkiosk_open_streams") == 0
    # The attempt itself succeeded (its first event came); the estimate of what was used counts.
    assert value(m, "tokenkiosk_upstream_attempts_total", provider="up", account="0",
                 outcome="success") == 1  # fmt: skip
    assert value(m, "tokenkiosk_tokens_total", model="m", type="input") == row["prompt_tokens"]


async def test_needs_the_admin_key_unless_public(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}):
        resp = await gw.get("/metrics", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "authentication_error"
    key = await create_key(gw)  # a virtual key is not the admin key
    assert (await gw.get("/metrics", headers={"Authorization": f"Bearer {key}"})).status == 401
    # Without an admin key, as the admin API: no such route.
    closed = await start_gateway(aiohttp_client, make_settings())
    resp = await closed.get("/metrics")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    # Public: anyone may scrape.
    public = await start_gateway(aiohttp_client, with_metrics(make_settings(), public=True))
    assert value(await scrape(public, {}), "tokenkiosk_open_streams") == 0
    # Off: no route, and requests update nothing.
    off = await start_gateway(
        aiohttp_client, with_metrics(make_settings(admin_key=ADMIN), enabled=False)
    )
    assert METRICS_KEY not in app_of(off)
    assert await chat(off, await create_key(off)) == 200
    assert (await off.get("/metrics", headers=AS_ADMIN)).status == 404


async def test_labels_stay_bounded(gw: TestClient[Any, Any]) -> None:
    """No request ids, no raw paths: routes by pattern, unknown paths as `other`."""
    key = await create_key(gw)
    auth = {"Authorization": f"Bearer {key}"}
    for i in range(5):
        assert (await gw.get(f"/no/such/path/{i}")).status == 404
        assert (await gw.get(f"/v1/models/demo-{i}", headers=auth)).status == 404
        assert (await gw.get(f"/v1/responses/resp_{i}", headers=auth)).status == 404
    resp = await gw.get("/metrics", headers=AS_ADMIN)
    text = await resp.text()
    assert "req_" not in text and "resp_" not in text and "demo-1" not in text
    m = parse(text)
    unknown = {"endpoint": "other", "model": "", "provider": "", "status": "404"}
    assert value(m, "tokenkiosk_requests_total", **unknown) == 5
    by_pattern = {"endpoint": "/v1/models/{model}", "model": "", "provider": "", "status": "404"}
    assert value(m, "tokenkiosk_requests_total", **by_pattern) == 5
    endpoints = {s["endpoint"] for s in series(m, "tokenkiosk_requests_total")}
    assert endpoints == {"other", "/v1/models/{model}", "/v1/responses/{response_id}"}


async def test_per_key_series_are_capped_or_off(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    capped = with_metrics(make_settings(admin_key=ADMIN), max_keys=2, max_models=1)
    gw = await start_gateway(aiohttp_client, capped)
    keys = [await create_key(gw, name=f"k{i}") for i in range(4)]
    for key in keys:
        assert await chat(gw, key) == 200
    # Model ids past the cap (`<provider>/<model>` ids clients chose) count as other; a
    # configured model keeps its name however many came first.
    for model in ("demo/one", "demo/two", "demo/three", "demo"):
        assert await chat(gw, keys[0], {**HI, "model": model}) == 200
    m = await scrape(gw)
    by_key = {s["key"] for s in series(m, "tokenkiosk_key_tokens_total")}
    assert len(by_key) == 3 and "other" in by_key  # two keys by id, the rest together
    assert len(series(m, "tokenkiosk_key_info")) == 2
    assert value(m, "tokenkiosk_requests_total", endpoint=CHAT, model="demo", provider="demo",
                 status="200") == 5  # fmt: skip
    assert value(m, "tokenkiosk_requests_total", endpoint=CHAT, model="demo/one",
                 provider="demo", status="200") == 1  # fmt: skip
    assert value(m, "tokenkiosk_requests_total", endpoint=CHAT, model="other", provider="demo",
                 status="200") == 2  # fmt: skip
    off = with_metrics(make_settings(admin_key=ADMIN), per_key=False)
    gw = await start_gateway(aiohttp_client, off)
    limited = await create_key(gw, rpm=1)
    assert [await chat(gw, limited) for _ in range(2)] == [200, 429]
    m = await scrape(gw)
    assert not series(m, "tokenkiosk_key_tokens_total")
    assert not series(m, "tokenkiosk_key_info")
    assert value(m, "tokenkiosk_tokens_total", model="demo", type="input") > 0
    # Refusals still count, by reason alone.
    assert series(m, "tokenkiosk_refusals_total") == [{"key": "", "reason": "requests_per_minute"}]


def key_id(client: TestClient[Any, Any], name: str) -> str:
    return next(k.id for k in app_of(client)[KEYS_KEY].records() if k.name == name)


async def test_rate_limit_and_budget_refusals_by_key_and_reason(gw: TestClient[Any, Any]) -> None:
    limited = await create_key(gw, name="limited", rpm=1)
    assert [await chat(gw, limited) for _ in range(3)] == [200, 429, 429]
    budgeted = await create_key(gw, name="budgeted", budget_tokens=1, budget_period="day")
    assert await chat(gw, budgeted) == 429
    small = await create_key(gw, name="small", tpm=1)
    assert await chat(gw, small) == 429  # more tokens than a minute of its limit
    m = await scrape(gw)
    refusals = "tokenkiosk_refusals_total"
    assert value(m, refusals, key=key_id(gw, "limited"), reason="requests_per_minute") == 2
    assert value(m, refusals, key=key_id(gw, "budgeted"), reason="budget") == 1
    assert value(m, refusals, key=key_id(gw, "small"), reason="tokens_per_minute") == 1
    assert len(series(m, refusals)) == 3
    # A refusal is a request too, with its status: before the body is read (the request
    # rate) its model is not known yet; a budget is checked once it is.
    requests = "tokenkiosk_requests_total"
    assert value(m, requests, endpoint=CHAT, model="", provider="", status="429") == 2
    assert value(m, requests, endpoint=CHAT, model="demo", provider="demo", status="429") == 2


async def test_hostile_model_ids_cannot_break_the_format(gw: TestClient[Any, Any]) -> None:
    """A client-chosen `<provider>/<model>` id with quotes, braces, backslashes and a newline
    is a label value like any other: escaped, and the scrape still parses."""
    key = await create_key(gw)
    hostile = 'demo/a"b}\\c\nd{e="f"}'
    assert await chat(gw, key, {**HI, "model": hostile}) == 200
    m = await scrape(gw)
    models = {s["model"] for s in series(m, "tokenkiosk_requests_total")}
    assert hostile in models
    assert value(m, "tokenkiosk_tokens_total", model=hostile, type="output") > 0


async def test_scrapes_while_requests_and_streams_run(gw: TestClient[Any, Any]) -> None:
    """Scrapes (made in a worker thread) side by side with requests changing the counters."""
    key = await create_key(gw)
    stream = {**HI, "stream": True}

    async def scrapes() -> list[Samples]:
        return [await scrape(gw) for _ in range(10)]

    results = await asyncio.gather(
        scrapes(), *(chat(gw, key, stream if i % 2 else HI) for i in range(40)), scrapes()
    )
    assert results[1:-1] == [200] * 40
    final = await scrape(gw)
    chat_ok = {"endpoint": CHAT, "model": "demo", "provider": "demo", "status": "200"}
    assert value(final, "tokenkiosk_requests_total", **chat_ok) == 40
    seen = [value(s, "tokenkiosk_requests_total", **chat_ok) for s in [*results[0], *results[-1]]]
    assert all(0 <= n <= 40 for n in seen)
    assert value(final, "tokenkiosk_open_streams") == 0


async def test_scrapes_at_once_share_one_rendering(
    gw: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of scrapes costs one rendering at a time, and each gets the whole text."""
    metrics = app_of(gw)[METRICS_KEY]
    reads = []
    read = metrics.state.read
    monkeypatch.setattr(metrics.state, "read", lambda: reads.append(read()))
    texts = await asyncio.gather(*(render(metrics) for _ in range(20)))
    assert len(reads) == 1
    assert len(set(texts)) == 1 and b"tokenkiosk_open_streams" in texts[0]
    await render(metrics)  # that one is done: the next is made afresh
    assert len(reads) == 2


def _two_upstreams(
    make_settings: MakeSettings, a: FakeOpenAI, b: FakeOpenAI, routing: RoutingSettings
) -> Settings:
    return make_settings(
        admin_key=ADMIN,
        routing=routing,
        providers=(
            OpenAIConfig(name="a", base_url=a.base_url, api_keys=("key-a0", "key-a1")),
            OpenAIConfig(name="b", base_url=b.base_url, api_keys=("key-b",)),
        ),
        models=(
            ModelConfig(
                name="m",
                targets=(
                    Target(provider="a", model="gpt-a"),
                    Target(provider="b", model="gpt-b", priority=1),
                ),
            ),
        ),
    )


async def test_attempts_retries_failovers_and_breakers(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, make_settings: MakeSettings
) -> None:
    a, b = FakeOpenAI(), FakeOpenAI()
    await a.start(aiohttp_server)
    await b.start(aiohttp_server)
    routing = RoutingSettings(
        max_attempts=3, backoff_initial=0.001, backoff_max=0.002, failure_threshold=1
    )
    gw = await start_gateway(aiohttp_client, _two_upstreams(make_settings, a, b, routing))
    key = await create_key(gw)
    body = {**HI, "model": "m"}
    # a#0 fails (its breaker opens: one failure is the threshold), a#1 answers.
    a.script(status=500)
    assert await chat(gw, key, body) == 200
    m = await scrape(gw)
    assert value(m, "tokenkiosk_upstream_attempts_total", provider="a", account="0",
                 outcome="error") == 1  # fmt: skip
    assert value(m, "tokenkiosk_upstream_attempts_total", provider="a", account="1",
                 outcome="success") == 1  # fmt: skip
    assert value(m, "tokenkiosk_retries_total", model="m") == 1
    assert value(m, "tokenkiosk_failovers_total", model="m") == 1
    state = "tokenkiosk_upstream_breaker_state"
    assert value(m, state, provider="a", account="0", state="open") == 1
    assert value(m, state, provider="a", account="0", state="closed") == 0
    assert value(m, state, provider="a", account="1", state="closed") == 1
    assert value(m, state, provider="b", account="0", state="closed") == 1
    wait = value(m, "tokenkiosk_upstream_breaker_retry_in_seconds", provider="a", account="0")
    assert 0 < wait <= routing.cooldown
    # a#1 rate limited with retry-after: the request fails over to b.
    a.script(status=429, headers={"retry-after": "20"})
    assert await chat(gw, key, body) == 200
    m = await scrape(gw)
    assert value(m, "tokenkiosk_upstream_attempts_total", provider="a", account="1",
                 outcome="rate_limited") == 1  # fmt: skip
    assert value(m, "tokenkiosk_upstream_attempts_total", provider="b", account="0",
                 outcome="success") == 1  # fmt: skip
    assert value(m, state, provider="a", account="1", state="open") == 1
    assert value(m, "tokenkiosk_failovers_total", model="m") == 2
    by_provider = {"endpoint": CHAT, "model": "m", "status": "200"}
    assert value(m, "tokenkiosk_requests_total", **by_provider, provider="a") == 1
    assert value(m, "tokenkiosk_requests_total", **by_provider, provider="b") == 1


async def test_bad_credentials_show_as_a_disabled_account(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, make_settings: MakeSettings
) -> None:
    a, b = FakeOpenAI(), FakeOpenAI()
    await a.start(aiohttp_server)
    await b.start(aiohttp_server)
    routing = RoutingSettings(max_attempts=1)
    gw = await start_gateway(aiohttp_client, _two_upstreams(make_settings, a, b, routing))
    key = await create_key(gw)
    a.script(status=401)
    with pytest.raises(openai.APIStatusError):
        async with openai_client(gw, key) as oai:
            await oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
    m = await scrape(gw)
    assert value(m, "tokenkiosk_upstream_breaker_state", provider="a", account="0",
                 state="disabled") == 1  # fmt: skip
    assert value(m, "tokenkiosk_requests_total", endpoint=CHAT, model="m", provider="a",
                 status="502") == 1  # fmt: skip


def test_negative_usage_from_an_upstream_counts_nothing() -> None:
    """A hostile upstream's negative token count never reaches a counter (which would raise)."""
    from gateway.trace import RequestTrace

    metrics = Metrics(MetricsSettings())
    trace = RequestTrace(request_id="r", started=0.0, ts=0.0, endpoint=CHAT, key_id="key_1",
                         model_id="m", provider="up", prompt_tokens=-5, completion_tokens=3,
                         cost_usd=-1.0)  # fmt: skip
    metrics.observe(trace, CHAT, 200, 0.1)
    m = parse(generate_latest(metrics.registry).decode())
    assert value(m, "tokenkiosk_tokens_total", model="m", type="input") == 0
    assert value(m, "tokenkiosk_tokens_total", model="m", type="output") == 3
    assert value(m, "tokenkiosk_cost_usd_total", model="m") == 0


async def test_a_failing_metric_update_costs_the_request_nothing(
    gw: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(app_of(gw)[METRICS_KEY], "observe", broken)
    key = await create_key(gw)
    assert await chat(gw, key) == 200
    assert len(await usage_rows(gw)) == 1  # the usage row is still written


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "success"),
        (429, "rate_limited"),
        (504, "timeout"),
        (499, "cancelled"),
        (400, "client_error"),
        (500, "error"),
        (502, "error"),
    ],
)
def test_attempt_outcomes(status: int, expected: str) -> None:
    assert outcome(status) == expected


def _names(samples: Iterable[tuple[str, Any]]) -> set[str]:
    return {name for name, _ in samples}


async def test_metric_names_follow_conventions(gw: TestClient[Any, Any]) -> None:
    """Counters end in `_total`, units are in names, everything has our prefix; the docs list
    every family."""
    key = await create_key(gw)
    assert await chat(gw, key) == 200
    resp = await gw.get("/metrics", headers=AS_ADMIN)
    families = list(text_string_to_metric_families(await resp.text()))
    assert families
    for family in families:
        assert family.name.startswith("tokenkiosk_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    for family in families:
        shown = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{shown}`" in doc, f"{shown} is not in docs/metrics.md"
