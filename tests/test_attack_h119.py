"""Attack on 64ca027 (helper-119): Anthropic's fast mode (`speed`) held and charged at the
list's `speed: "fast"` rates or refused to USD budgets; OpenRouter's per-request 402s
("can only afford N", "Prompt tokens limit exceeded") fail over without disabling, "can only
afford 0" disables, and a per-request 402 is not retried on its account.

Attacked as a hostile client with a USD budget (spelling `speed` so one side sees it and the
other does not), as a hostile or odd upstream (402 texts, the answer's `usage.speed`), and as
an `anthropic` / `openai` SDK user. Failing tests are problems (the comment above each says
what happens, what it costs, how realistic it is and what would be right); tests marked
`# SOUND:` pin properties checked here that hold. Upstreams are in-process raw TCP servers.

Bundled price list: claude-opus-5-5 $4 / $20 a million tokens (cache writes $5, 1h $8, reads
$0.20), `speed: "fast"` $8 / $40 (writes $10, 1h $16, reads $0.40); claude-3-5-haiku-latest
$0.80 / $4 and no fast rates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, RoutingSettings, Target
from tests.conftest import MakeSettings, create_key, openai_client, provider_config, start_gateway
from tests.raw_upstream import STREAM_HEAD, RawUpstream, auth, sse
from tests.test_attack_h105 import Build, build, mtok, row_and_spend, whole
from tests.test_attack_h116 import answered, std
from tests.test_attack_h117 import CHAT, Build2, Scripted, call, chat_ok, http, states, two
from tests.test_attack_h118 import AFFORD_NOTHING, CANNOT_AFFORD, PROMPT_LIMIT, openrouter_402

__all__ = ["build", "two"]  # (the fixtures)

BASE = {"openai": "/v1", "anthropic": "", "gemini": ""}
OPUS = "claude-opus-5-5"
HAIKU = "claude-3-5-haiku-latest"
STANDARD = (4.0, 20.0)
FAST = (8.0, 40.0)
IN, OUT = 10_000, 1_000


def cost(rates: tuple[float, float], prompt: int = IN, output: int = OUT) -> float:
    return mtok(prompt, rates[0]) + mtok(output, rates[1])


def message(usage: dict[str, Any], model: str = OPUS) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def opus_usage(speed: str | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": IN,
        "output_tokens": OUT,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    if speed is not None:
        usage["speed"] = speed
    return usage


def opus_answer(speed: str | None, model: str = OPUS) -> bytes:
    return whole(message(opus_usage(speed), model))


def opus_stream(speed: str | None, model: str = OPUS) -> bytes:
    start = message(opus_usage(speed) | {"output_tokens": 1}, model)
    start |= {"content": [], "stop_reason": None}
    return (
        STREAM_HEAD
        + sse({"type": "message_start", "message": start}, "message_start")
        + sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        )
        + sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "ok"},
            },
            "content_block_delta",
        )
        + sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        + sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": OUT},
            },
            "message_delta",
        )
        + sse({"type": "message_stop"}, "message_stop")
    )


MSG = {"model": "m", "max_tokens": 1_000, "messages": [{"role": "user", "content": "hi"}]}


def sdk(gw: TestClient[Any, Any], secret: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=secret, base_url=str(gw.make_url("")), max_retries=0)


async def post_raw(
    gw: TestClient[Any, Any], secret: str, path: str, body: bytes, headers: dict[str, str] | None
) -> tuple[int, Any]:
    resp = await gw.post(
        path,
        data=body,
        headers=auth(secret) | {"Content-Type": "application/json"} | (headers or {}),
    )
    return resp.status, await resp.json()


# --- a gateway of two providers: `up0` (priority 0) first, `up1` (priority 1) its fallback ---

Duo = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def duo(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Duo]:
    servers: list[asyncio.Server] = []

    async def make(
        first: tuple[str, Any, str, dict[str, Any]],
        second: tuple[str, Any, str, dict[str, Any]],
        *,
        max_attempts: int = 3,
    ) -> TestClient[Any, Any]:
        providers, targets = [], []
        for i, (kind, upstream, model, fields) in enumerate((first, second)):
            server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
            servers.append(server)
            port = server.sockets[0].getsockname()[1]
            providers.append(
                provider_config(
                    kind,
                    name=f"up{i}",
                    base_url=f"http://127.0.0.1:{port}{BASE[kind]}",
                    api_keys=(f"sk-up-{i}{'x' * 20}",),
                    **fields,
                )
            )
            targets.append(Target(provider=f"up{i}", model=model, priority=i))
        settings = make_settings(
            providers=tuple(providers),
            models=(ModelConfig(name="m", targets=tuple(targets)),),
            routing=RoutingSettings(max_attempts=max_attempts, backoff_initial=0.0),
        )
        return await start_gateway(aiohttp_client, settings)

    yield make
    for server in servers:
        server.close()


UNAVAILABLE = http("503 Service Unavailable", {"error": {"message": "overloaded"}})


# WRONG (medium, USD budgets and every key's recorded cost): a Messages request with
# `speed: "fast"` whose model's FIRST route is not Anthropic (an OpenAI-compatible route, e.g.
# OpenRouter's or a proxy's copy of the same Claude model, as the primary; Anthropic direct as
# the fallback) is translated (`native_first`), and the translated chat request may fail over
# to the Anthropic route, where `to_anthropic` builds a fresh body WITHOUT `speed`: Anthropic
# serves and bills it at the standard rates. But `_account` asks `_sends_tier(ex.provider,
# "speed=fast")`, which is true for any `anthropic` provider whether the body was relayed or
# translated, so the answer is charged the fast rates: 10,000 + 1,000 tokens billed $0.06 are
# charged $0.12 (2x on Opus 5.5; 6x where fast mode is 6x). Realistic wherever a model mixes
# an OpenAI-compatible route ahead of an Anthropic one and the first fails (the usual reason
# to have a fallback); Claude Code in fast mode sends `speed: "fast"` on every request.
# Right: speed is a tier only on the pass-through (`MessagesPassThrough` relayed the client's
# body); a translated attempt is charged as sent (standard), e.g. clear the tier when the
# exchange goes to `translated()`, or have `_sends_tier` know the request was translated.
async def test_translated_failover_to_anthropic_is_not_charged_fast(duo: Duo) -> None:
    primary = Scripted(lambda path, body, key: UNAVAILABLE)
    anthropic_up = Scripted(lambda path, body, key: opus_answer(None))
    gw = await duo(
        ("openai", primary, OPUS, {"pricing": "anthropic"}),
        ("anthropic", anthropic_up, OPUS, {}),
    )
    secret = await create_key(gw, budget_usd=5.0)
    status, body = await call(gw, secret, "/v1/messages", MSG | {"speed": "fast"})
    assert status == 200, body
    assert primary.seen and anthropic_up.seen[0][0] == "/v1/messages"
    assert "speed" not in anthropic_up.seen[0][1]  # (translated: served at standard)
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(STANDARD)), (row["cost_usd"], cost(STANDARD))
    assert spend.usd == pytest.approx(cost(STANDARD))


# SOUND: the same model mix when the OpenAI-compatible route answers: the translated request
# carries no `speed` and is charged the standard rates (not refused: that route drops it).
async def test_translated_route_answering_is_charged_standard(duo: Duo) -> None:
    usage = {"prompt_tokens": IN, "completion_tokens": OUT, "total_tokens": IN + OUT}
    primary = RawUpstream(
        whole(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": OPUS,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        ),
        hold=False,
    )
    anthropic_up = Scripted(lambda path, body, key: opus_answer(None))
    gw = await duo(
        ("openai", primary, OPUS, {"pricing": "anthropic"}),
        ("anthropic", anthropic_up, OPUS, {}),
    )
    secret = await create_key(gw, budget_usd=5.0)
    status, body = await call(gw, secret, "/v1/messages", MSG | {"speed": "fast"})
    assert status == 200, body
    assert "speed" not in primary.bodies[0] and not anthropic_up.seen
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(STANDARD)), row


# --- the answer's own word: `usage.speed` ------------------------------------------------


FALLBACK_BETA = {"anthropic-beta": "server-side-fallback-2026-07-01"}


# WRONG (high, USD budgets): `speed` has a second spelling the gateway never reads. The
# Messages API's server-side fallback (anthropic SDK 2.17 `BetaFallbackParam`, beta header
# `server-side-fallback-2026-07-01`, forwarded by the gateway) takes `fallbacks: [{"model":
# ..., "speed": "fast"}]`: when the requested model declines, Anthropic retries on the entry's
# model AT THE ENTRY'S SPEED. The relay passes `fallbacks` through untouched (unknown fields
# reach Anthropic by design), `ChatCall.speed` is only the top-level field, and the answer's
# `usage.speed: "fast"` (anthropic SDK `Usage.speed`: "the inference speed mode used for this
# request") is not read either (`UsageTally` ignores it): the answer is charged $0.06 for what
# Anthropic bills $0.12 (2x on Opus 5.5, 6x on models whose fast mode is 6x), and nothing was
# held at the fast rates. A hostile key needs a prompt the primary declines (policy) and a
# fallback entry naming the same model family; every such request counts half (or a sixth)
# against its budget. Right: charge the speed the answer says (`usage.speed` from a whole
# answer and from `message_start`, as `service_tier` is read from OpenAI's answers), and
# treat a `fallbacks` entry's `speed` (or any `fallbacks`) like the top-level one for the
# refusal and the hold (or refuse `fallbacks` to USD budgets).
@pytest.mark.parametrize("stream", [False, True])
async def test_fast_fallback_entry_is_charged_fast(build: Build, stream: bool) -> None:
    up = RawUpstream(opus_stream("fast") if stream else opus_answer("fast"), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = MSG | {"fallbacks": [{"model": OPUS, "speed": "fast"}], "stream": stream}
    resp = await gw.post("/v1/messages", json=body, headers=auth(secret) | FALLBACK_BETA)
    text = await resp.text()
    if resp.status == 400:
        return  # (refused to a USD budget: also right)
    assert resp.status == 200, text
    assert up.bodies[0]["fallbacks"][0]["speed"] == "fast"  # (it reached Anthropic)
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(FAST)), (row["cost_usd"], cost(FAST))
    assert spend.usd == pytest.approx(cost(FAST))


# WRONG (medium, USD budgets and recorded costs): the other way round, Anthropic may serve a
# `speed: "fast"` request at standard speed and say so (`usage.speed: "standard"`): the
# anthropic SDK documents that a fallback attempt "runs at fast speed only when the request
# sets speed to fast and your organization can use fast mode on model. Otherwise ... at
# standard speed", and `Usage.speed` exists to tell which one was used. The gateway charges the
# request's `speed` whatever the answer says: 10,000 + 1,000 tokens billed $0.06 are charged
# $0.12 (6x where fast mode is 6x). A client loses budget it did not spend; the operator's
# reports show twice the real cost. Realistic for Claude Code users in fast mode with
# fallbacks, or any org whose fast-mode access is per model. Right: the answer's
# `usage.speed` wins when present (as an answer's `service_tier` does for OpenAI).
@pytest.mark.parametrize("stream", [False, True])
async def test_fast_request_served_standard_is_charged_standard(build: Build, stream: bool) -> None:
    up = RawUpstream(opus_stream("standard") if stream else opus_answer("standard"), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = MSG | {"speed": "fast", "stream": stream}
    resp = await gw.post("/v1/messages", json=body, headers=auth(secret))
    assert resp.status == 200, await resp.text()
    await resp.read()
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(STANDARD)), (row["cost_usd"], cost(STANDARD))
    assert spend.usd == pytest.approx(cost(STANDARD))


# --- the anthropic SDK user ----------------------------------------------------------------


# SOUND: `speed="fast"` through the anthropic SDK on a model with fast rates reaches
# Anthropic as sent, whole and streamed, and is charged the fast rates (the answer's
# `usage.speed` relayed to the SDK).
@pytest.mark.parametrize("stream", [False, True])
async def test_sdk_fast_mode_is_charged_fast(build: Build, stream: bool) -> None:
    up = RawUpstream(opus_stream("fast") if stream else opus_answer("fast"), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    client = sdk(gw, secret)
    try:
        if stream:
            async with client.messages.stream(
                model="m",
                max_tokens=1_000,
                speed="fast",
                messages=[{"role": "user", "content": "hi"}],
            ) as events:
                done = await events.get_final_message()
        else:
            done = await client.messages.create(
                model="m",
                max_tokens=1_000,
                speed="fast",
                messages=[{"role": "user", "content": "hi"}],
            )
    finally:
        await client.close()
    assert done.usage.speed == "fast"
    assert up.bodies[0]["speed"] == "fast"
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(FAST)), row
    assert spend.usd == pytest.approx(cost(FAST))


# SOUND: on a model the list has no fast rates for, a USD-budget key's `speed="fast"` is
# refused before anything goes upstream (400, param `speed`, Anthropic-shaped for the SDK);
# `speed="standard"` passes and is charged the standard rates; a key without a budget is
# relayed (its row priced at the standard rates the list has).
async def test_sdk_fast_mode_without_fast_rates(build: Build) -> None:
    up = RawUpstream(opus_answer("standard", model=HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0)
    client = sdk(gw, secret)
    try:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(
                model="m",
                max_tokens=1_000,
                speed="fast",
                messages=[{"role": "user", "content": "hi"}],
            )
        assert not up.bodies
        assert "speed" in str(refused.value)
        await client.messages.create(
            model="m",
            max_tokens=1_000,
            speed="standard",
            messages=[{"role": "user", "content": "hi"}],
        )
    finally:
        await client.close()
    assert up.bodies[0]["speed"] == "standard"
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost((0.8, 4.0))), row


# SOUND: a hostile client cannot split what the gateway reads from what Anthropic gets: a
# duplicated `speed` (the last wins on both sides: msgspec's struct and the relay's re-encoded
# dict), an escaped key or value (decoded alike), each is refused on a model without fast
# rates, and `speed: null` after "fast" is no fast mode on either side.
@pytest.mark.parametrize(
    ("raw", "refused"),
    [
        (b'"speed": "standard", "speed": "fast"', True),
        (b'"sp\\u0065ed": "fast"', True),
        (b'"speed": "f\\u0061st"', True),
        (b'"speed": "fast", "speed": null', False),
        (b'"speed": "fast", "speed": "standard"', False),
    ],
)
async def test_hidden_speed_is_seen(build: Build, raw: bytes, refused: bool) -> None:
    up = RawUpstream(opus_answer(None, model=HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0)
    head = b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], '
    status, body = await post_raw(gw, secret, "/v1/messages", head + raw + b"}", None)
    if refused:
        assert status == 400 and not up.bodies, (status, body)
    else:
        assert status == 200, body
        assert up.bodies[0].get("speed") in (None, "standard"), up.bodies[0]


# SOUND: `speed` on chat completions to an Anthropic route is dropped by the translation
# (`to_anthropic` builds its own body): the request is served and charged at standard, not
# refused (it is no tier there).
async def test_chat_speed_to_anthropic_route_is_dropped(build: Build) -> None:
    up = RawUpstream(opus_answer(None), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    async with openai_client(gw, secret) as client:
        await client.chat.completions.create(
            model="m",
            max_tokens=1_000,
            messages=[{"role": "user", "content": "x " * 10_000}],
            extra_body={"speed": "fast"},
        )
    assert "speed" not in up.bodies[0]
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(STANDARD)), row


COUNT = whole({"input_tokens": 12})


# SOUND: a token count with `speed="fast"` (a parameter of the SDK's `count_tokens`) on a
# model with fast rates is relayed as sent and holds nothing of the budget.
async def test_count_tokens_with_fast_mode(build: Build) -> None:
    up = RawUpstream(COUNT, hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=0.000001)
    client = sdk(gw, secret)
    try:
        counted = await client.messages.count_tokens(
            model="m", speed="fast", messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        await client.close()
    assert counted.input_tokens == 12
    assert up.paths[0] == "/v1/messages/count_tokens" and up.bodies[0]["speed"] == "fast"


# --- ordinary Messages requests (Claude Code-shaped): unchanged -----------------------------

CLAUDE_CODE = {
    "model": "m",
    "max_tokens": 32_000,
    "stream": True,
    "system": [
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "fix the bug", "cache_control": {"type": "ephemeral"}}
            ],
        }
    ],
    "tools": [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}],
    "thinking": {"type": "enabled", "budget_tokens": 4_000},
    "metadata": {"user_id": "user_abc"},
}


# SOUND: a Claude Code-shaped stream (cache marks, tools, thinking, no `speed`) is relayed
# without a `speed` and charged the standard rates, cache writes and reads included.
async def test_claude_code_request_costs_unchanged(build: Build) -> None:
    usage = {
        "input_tokens": 2_000,
        "output_tokens": 1,
        "cache_creation_input_tokens": 30_000,
        "cache_read_input_tokens": 50_000,
    }
    start = message(usage) | {"content": [], "stop_reason": None}
    reply = (
        STREAM_HEAD
        + sse({"type": "message_start", "message": start}, "message_start")
        + sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        )
        + sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "ok"},
            },
            "content_block_delta",
        )
        + sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        + sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 700},
            },
            "message_delta",
        )
        + sse({"type": "message_stop"}, "message_stop")
    )
    up = RawUpstream(reply, hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=50.0)
    resp = await gw.post(
        "/v1/messages",
        json=CLAUDE_CODE,
        headers=auth(secret)
        | {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
    )
    text = await resp.text()
    assert resp.status == 200 and "message_stop" in text, text
    assert "speed" not in up.bodies[0]
    row, spend = await row_and_spend(gw, secret)
    expected = mtok(2_000, 4.0) + mtok(30_000, 5.0) + mtok(50_000, 0.2) + mtok(700, 20.0)
    assert row["cost_usd"] == pytest.approx(expected), (row["cost_usd"], expected)
    assert spend.usd == pytest.approx(expected)


# --- the openai SDK user on a Groq-like route ------------------------------------------------


# SOUND: `service_tier="on_demand"` (Groq's standard tier) passes for a USD-budget key on a
# Groq-priced route and is forwarded and charged the standard rates; "performance" (dearer,
# unpriced) is refused before it goes upstream.
async def test_groq_on_demand_passes_and_performance_is_refused(build: Build) -> None:
    up = RawUpstream(answered("on_demand"), hold=False)
    gw = await build("openai", up, "llama-3.1-8b-instant", fields={"pricing": "groq"})
    secret = await create_key(gw, budget_usd=5.0)
    async with openai_client(gw, secret) as client:
        await client.chat.completions.create(
            model="m",
            max_tokens=1_000,
            messages=[{"role": "user", "content": "x " * 10_000}],
            service_tier="on_demand",  # type: ignore[arg-type]
        )
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="m",
                max_tokens=5,
                messages=[{"role": "user", "content": "hi"}],
                service_tier="performance",  # type: ignore[arg-type]
            )
    assert len(up.bodies) == 1 and up.bodies[0]["service_tier"] == "on_demand"
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(std(0.05, 0.08)), row


# --- OpenRouter's 402s ---------------------------------------------------------------------


# SOUND: "can only afford 0" at the end of a sentence or before a comma may be the spent
# account (out of rotation for `cooldown`, "open": not disabled for `auth_cooldown`, as this
# file's test of a prompt that leaves no output asks); a two-digit or larger N ("afford 05",
# "afford 1024") is one request's (not taken out, fails over).
@pytest.mark.parametrize(
    ("afford", "disabled"),
    [("0.", True), ("0,", True), ("05", False), ("1024", False), ("10", False)],
)
async def test_afford_numbers(two: Build2, afford: str, disabled: bool) -> None:
    text = CANNOT_AFFORD.replace("afford 3919.", f"afford {afford}")

    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        return openrouter_402(text) if key.startswith("sk-up-a") else chat_ok()

    up = Scripted(reply)
    gw = await two("openai", up, "openai/gpt-4o-mini")
    secret = await create_key(gw)
    status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert states(gw) == (["open", "closed"] if disabled else ["closed", "closed"])


# SOUND: three accounts all answering a per-request 402, with `max_attempts` above the
# number of accounts: each account is asked once, then the client gets the 503 (quota), no
# account is disabled; a stream request fails over the same way to the account that answers.
async def test_three_accounts_each_asked_once(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    keys = tuple(f"sk-up-{c}{'q' * 20}" for c in "abc")
    up = Scripted(lambda path, body, key: openrouter_402(PROMPT_LIMIT))
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        cfg = provider_config(
            "openai", name="up0", base_url=f"http://127.0.0.1:{port}/v1", api_keys=keys
        )
        m = ModelConfig(name="m", targets=(Target(provider="up0", model="openai/gpt-4o-mini"),))
        settings = make_settings(
            providers=(cfg,),
            models=(m,),
            routing=RoutingSettings(max_attempts=7, backoff_initial=0.0),
        )
        gw = await start_gateway(aiohttp_client, settings)
        secret = await create_key(gw)
        status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
        assert status == 503 and body["error"]["code"] == "upstream_quota_exhausted", body
        assert sorted(up.keys()) == sorted(keys), up.keys()
    finally:
        server.close()


async def test_a_streams_per_request_402_fails_over(two: Build2) -> None:
    stream_ok = (
        STREAM_HEAD
        + b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"x",'
        + b'"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n'
        + b"data: [DONE]\n\n"
    )

    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        return openrouter_402(CANNOT_AFFORD) if key.startswith("sk-up-a") else stream_ok

    up = Scripted(reply)
    gw = await two("openai", up, "openai/gpt-4o-mini")
    secret = await create_key(gw)
    resp = await gw.post("/v1/chat/completions", json=CHAT | {"stream": True}, headers=auth(secret))
    text = await resp.text()
    assert resp.status == 200 and "ok" in text, text
    assert states(gw) == ["closed", "closed"]


# WRONG (medium, any key, no budget needed): "can only afford 0" is now the spent account's
# 402 (disabled for `auth_cooldown`, 300 s), but OpenRouter computes what a request can afford
# AFTER its prompt: a prompt that leaves less than one output token's price of the account's
# credit gets "can only afford 0" from an account that serves every smaller request. A client
# finds that prompt size by bisection with `max_tokens: 1` (200 below it, 503 at and above,
# neither taking anything out: "Prompt tokens limit exceeded" past the credit is per-request
# too), ~20 requests; the first failing size lands in the window where the prompt fits but
# no output token does, and its 402 takes the account out for everyone for 5 minutes, and
# again every 5 minutes, one account after the other. Realistic where an account (or an
# OpenRouter key with a credit limit) holds less than a context-window prompt's price, the
# case h118 made for "Prompt tokens limit exceeded". (Modelled OpenRouter below: credit $0.01,
# $0.15 / $0.60 a million tokens.) Right: "can only afford 0" is only the account's verdict
# when it says so for a request too small to matter (e.g. take the account out briefly, as a
# breaker failure, not for `auth_cooldown`), or check the account with a small request
# before disabling it.
async def test_a_prompt_that_leaves_no_output_does_not_disable_the_account(two: Build2) -> None:
    credit, per_in, per_out = 0.01, 0.15e-6, 0.60e-6
    affords: list[int] = []

    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        prompt = len(body["messages"][0]["content"]) // 4
        left = credit - prompt * per_in
        if left < 0:
            return openrouter_402(
                f"Prompt tokens limit exceeded: {prompt} > {int(credit / per_in)}"
            )
        afford = int(left / per_out)
        affords.append(afford)
        wanted = body.get("max_tokens") or 16_384
        if wanted > afford:
            return openrouter_402(
                "This request requires more credits, or fewer max_tokens. You requested up to "
                f"{wanted} tokens, but can only afford {afford}. To increase, visit "
                "https://openrouter.ai/settings/credits and add more credits"
            )
        return chat_ok()

    up = Scripted(reply)
    gw = await two("openai", up, "openai/gpt-4o-mini", keys=1)
    hostile = await create_key(gw, name="hostile")
    other = await create_key(gw, name="other")
    # (the bisection's last step: the largest prompt that fits, plus a few tokens)
    edge = int(credit / per_in) - 1
    big = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "abcd" * edge}]}
    status, _ = await call(gw, hostile, "/v1/chat/completions", big)
    assert status == 503 and affords == [0], affords  # (its prompt fits; no output does)
    status, body = await call(gw, other, "/v1/chat/completions", CHAT)
    assert status == 200, (status, body, states(gw))


# SOUND: the h118 texts keep their meaning: "Prompt tokens limit exceeded" and "can only
# afford 3919" fail over without taking the account out; "can only afford 0" takes it out for
# `cooldown` ("open").
@pytest.mark.parametrize(
    ("text", "disabled"),
    [(PROMPT_LIMIT, False), (CANNOT_AFFORD, False), (AFFORD_NOTHING, True)],
)
async def test_h118_texts(two: Build2, text: str, disabled: bool) -> None:
    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        return openrouter_402(text) if key.startswith("sk-up-a") else chat_ok()

    up = Scripted(reply)
    gw = await two("openai", up, "openai/gpt-4o-mini")
    secret = await create_key(gw)
    status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert states(gw)[0] == ("open" if disabled else "closed")


# SOUND: `speed: "fast"` is held at the fast rates: a budget that covers the output limit at
# the standard rates ($0.02) but not at the fast ones ($0.04) is refused before anything goes
# upstream; the same request without `speed` is admitted.
async def test_fast_mode_is_held_at_fast_rates(build: Build) -> None:
    up = RawUpstream(opus_answer(None), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=0.03)
    status, body = await call(gw, secret, "/v1/messages", MSG | {"speed": "fast"})
    assert status != 200 and not up.bodies, (status, body)
    status, body = await call(gw, secret, "/v1/messages", MSG)
    assert status == 200, body
