"""Attack on 92a28b6 (helper-118): processing tiers from every `service_tier` price variant
in force, a chat stream's first chunk read for its tier, tiers dropped on Anthropic and Gemini
routes and refused unpriced to USD budgets; spent credit (Anthropic's whole 400 message,
OpenRouter's 402 for one request's `max_tokens`, `insufficient_quota` stream events); forced
tool calls per attempt, web searches included.

Attacked as a client with a USD-budget key trying to be charged less than the upstream bills
or to take the operator's accounts out for everyone, as a hostile or odd upstream, and as an
`openai` / `anthropic` SDK user. Failing tests are problems (the comment above each says what
happens, what it costs, how realistic it is and what would be right); tests marked `# SOUND:`
pin properties checked here that hold. Upstreams are in-process raw TCP servers.

Bundled price list: gpt-4o-mini $0.15 / $0.60 a million tokens, priority and "fast" $0.25 /
$1; gpt-5 $1.25 / $10, flex $0.625 / $5, priority $2.50 / $20; claude-opus-5-5 $4 / $20,
`speed: "fast"` $8 / $40.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import NEVER_HANG, create_key, openai_client
from tests.raw_upstream import STREAM_HEAD, RawUpstream, auth, cut_after, read_request
from tests.test_attack_h105 import Build, build, mtok, responses_event, row_and_spend, whole
from tests.test_attack_h114 import PASS, ask, created
from tests.test_attack_h116 import (
    ASK,
    STOP,
    USAGE,
    answered,
    chunk,
    gateway_calls,
    std,
    text_chunk,
)
from tests.test_attack_h117 import (
    CHAT,
    KEYS,
    Build2,
    Scripted,
    Sequence,
    call,
    chat_ok,
    http,
    states,
    two,
)

__all__ = ["build", "two"]  # (the fixtures)


# --- OpenRouter's 402s: one request's, or the account's ----------------------------------


def openrouter_402(message: str) -> bytes:
    return http(
        "402 Payment Required",
        {"error": {"code": 402, "message": message, "metadata": {"provider_name": None}}},
    )


PROMPT_LIMIT = (
    "Prompt tokens limit exceeded: 64128 > 6964. To increase, visit "
    "https://openrouter.ai/settings/credits and upgrade to a paid account"
)
CANNOT_AFFORD = (
    "This request requires more credits, or fewer max_tokens. You requested up to 16384 "
    "tokens, but can only afford 3919. To increase, visit https://openrouter.ai/settings/"
    "credits and upgrade to a paid account"
)
AFFORD_NOTHING = (
    "This request requires more credits, or fewer max_tokens. You requested up to 32000 "
    "tokens, but can only afford 0. To increase, visit https://openrouter.ai/settings/keys "
    "and create a key with a higher monthly limit"
)
BIG = CHAT | {"messages": [{"role": "user", "content": "x " * 5_000}]}


# WRONG (high, any key): OpenRouter answers a prompt whose cost alone is more than the
# account's credit left with a 402 "Prompt tokens limit exceeded: 64128 > 6964" (real text,
# continuedev/continue#11227; anomalyco/opencode#12219). That is a verdict on THIS request's
# prompt, like "can only afford" on its `max_tokens`, but `_COSTS_TOO_MUCH` only knows the
# latter: the 402 is `UpstreamOutOfCredit(whole_account=True)`, and one long prompt takes
# EVERY account of the provider out for `auth_cooldown` (300 s). Any client, no budget
# needed, sends one large prompt every 5 minutes and every other client of every model on
# that OpenRouter pool gets 503 `upstream_quota_exhausted`. Realistic wherever an OpenRouter
# account (or key with a credit limit) holds less than a long prompt's price, which is every
# modestly funded account on an expensive model with a 1M context.
# Right: "Prompt tokens limit exceeded" is this request's 402 too (`whole_account=False`, or
# the client's 400/402 without failover); only a 402 that says nothing about the request
# disables its account.
async def test_a_prompt_too_large_for_the_credit_left_does_not_disable_accounts(
    two: Build2,
) -> None:
    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        text = body["messages"][0]["content"]
        return openrouter_402(PROMPT_LIMIT) if len(text) > 1_000 else chat_ok()

    up = Scripted(reply)
    gw = await two("openai", up, "openai/gpt-4o-mini")
    hostile = await create_key(gw, name="hostile")
    other = await create_key(gw, name="other")
    await call(gw, hostile, "/v1/chat/completions", BIG)
    status, body = await call(gw, other, "/v1/chat/completions", CHAT)
    assert status == 200, (status, body, states(gw))
    assert states(gw) == ["closed", "closed"]


# WRONG (low): a 402 "can only afford" is deterministic for this request on this account, but
# `whole_account=False` makes it `retryable`, and `_next_route` cycles routes, so a model with
# one account sends the same doomed request `max_attempts` times (3 by default), each after a
# backoff, before the client gets its 503. Every OpenRouter client that sends no `max_tokens`
# (OpenRouter checks the model's default output) on a low balance triples its upstream calls
# and adds the backoffs to its latency. The commit's comment says "then another account is
# tried at once"; the same account is tried again.
# Right: an account that said "can only afford" is not tried again for this request (only
# other accounts are), or the 402 goes to the client at once when no other account is left.
async def test_a_per_request_402_is_not_retried_on_the_same_account(two: Build2) -> None:
    up = Scripted(lambda path, body, key: openrouter_402(CANNOT_AFFORD))
    gw = await two("openai", up, "openai/gpt-4o-mini", keys=1)
    secret = await create_key(gw)
    status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
    assert status == 503 and body["error"]["code"] == "upstream_quota_exhausted", body
    assert len(up.seen) == 1, up.keys()


# WRONG (low): "can only afford 0" is what OpenRouter answers EVERY request of a key whose
# credit limit is spent (anomalyco/opencode#12219: "... but can only afford 0 ... create a key
# with a higher monthly limit"), a spent account in all but words; but it matches
# `_COSTS_TOO_MUCH`, so it is `Fault.NONE`: the account is never benched, the round-robin
# cursor sends every other request to it first, and each such request wastes an upstream
# round trip (and, on a model with one account, gets three of them and a 503 saying a lower
# `max_tokens` "may fit", which nothing will). Realistic: per-key monthly limits on
# OpenRouter are common.
# Right: "can only afford 0" (nothing affordable) is the spent account's 402 (disabled like a
# plain 402), or at least a failure the account's breaker counts.
async def test_an_account_that_can_afford_nothing_leaves_rotation(two: Build2) -> None:
    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        return openrouter_402(AFFORD_NOTHING) if key == KEYS[0] else chat_ok()

    up = Scripted(reply)
    gw = await two("openai", up, "openai/gpt-4o-mini")
    secret = await create_key(gw)
    for _ in range(4):
        status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
        assert status == 200, body
    assert up.keys().count(KEYS[0]) == 1, up.keys()


# SOUND: OpenRouter's "can only afford N" on one account of two fails over to the other,
# without disabling either; a plain 402 ("Insufficient credits") still disables its account.
async def test_a_per_request_402_fails_over_and_a_plain_one_disables(two: Build2) -> None:
    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        return openrouter_402(CANNOT_AFFORD) if key == KEYS[0] else chat_ok()

    up = Scripted(reply)
    gw = await two("openai", up, "openai/gpt-4o-mini")
    secret = await create_key(gw)
    status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert states(gw) == ["closed", "closed"]

    def spent(path: str, body: dict[str, Any], key: str) -> bytes:
        plain = "Insufficient credits. Add more using https://openrouter.ai/credits"
        return openrouter_402(plain) if key == KEYS[0] else chat_ok()

    up2 = Scripted(spent)
    gw2 = await two("openai", up2, "openai/gpt-4o-mini")
    secret2 = await create_key(gw2)
    status, body = await call(gw2, secret2, "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert states(gw2) == ["disabled", "closed"]


# SOUND: Anthropic's 400 only disables its account when the whole message is the credit
# sentence; the same sentence inside a longer message (a client's own words quoted back) is
# the client's 400, relayed, and nothing is disabled.
@pytest.mark.parametrize(
    ("message", "disabled"),
    [
        (
            "Your credit balance is too low to access the Anthropic API. Please go to Plans "
            "& Billing to upgrade or purchase credits.",
            True,
        ),
        (
            "tools.0.custom.name: String should match pattern; got 'Your credit balance is "
            "too low to access the Anthropic API. Please go to Plans & Billing to upgrade or "
            "purchase credits.'",
            False,
        ),
    ],
)
async def test_anthropic_credit_400_whole_message_only(
    two: Build2, message: str, disabled: bool
) -> None:
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku-20241022",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }

    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        return http("400 Bad Request", error) if key == KEYS[0] else http("200 OK", answer)

    up = Scripted(reply)
    gw = await two("anthropic", up, "claude-3-5-haiku-20241022")
    secret = await create_key(gw)
    status, body = await call(gw, secret, "/v1/messages", CHAT)
    if disabled:
        assert status == 200 and states(gw)[0] == "disabled", (status, body, states(gw))
    else:
        assert status == 400 and states(gw) == ["closed", "closed"], (status, body)


# --- insufficient_quota in a chat stream ----------------------------------------------------

QUOTA_EVENT = (
    b'data: {"error": {"message": "You exceeded your current quota, please check your plan '
    b'and billing details.", "type": "insufficient_quota", "param": null, "code": '
    b'"insufficient_quota"}}\n\n'
)


# SOUND: a chat stream whose FIRST event is `insufficient_quota` (tier and all) fails over
# before any byte reaches the client: the other account's standard answer is charged the
# standard rates (the failed attempt's tier forgotten), and the spent account is disabled.
async def test_a_first_event_out_of_quota_fails_over_at_standard(two: Build2) -> None:
    quota = QUOTA_EVENT.replace(
        b'"code": "insufficient_quota"}',
        b'"code": "insufficient_quota"}, "service_tier": "priority"',
    )

    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        if key == KEYS[0]:
            return STREAM_HEAD + quota
        return (
            STREAM_HEAD
            + text_chunk("hi", service_tier="default")
            + STOP
            + chunk(choices=[], usage=USAGE, service_tier="default")
            + b"data: [DONE]\n\n"
        )

    up = Scripted(reply)
    gw = await two("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=5.0)
    resp = await gw.post("/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(secret))
    text = await resp.text()
    assert resp.status == 200 and text.endswith("data: [DONE]\n\n"), text
    assert states(gw) == ["disabled", "closed"]
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(std(0.15, 0.6)), row


# SOUND: `insufficient_quota` after content: the client keeps what it got and an error event,
# what was streamed is charged, and the account is not disabled by it (the documented rule,
# `sse._upstream_fault`: only before the first byte does a stream's failure disable an
# account; its next request's 429 before any byte does); the next request is answered.
async def test_out_of_quota_after_content(two: Build2) -> None:
    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        if key == KEYS[0]:
            return STREAM_HEAD + text_chunk("partial ", service_tier="priority") + QUOTA_EVENT
        return chat_ok()

    up = Scripted(reply)
    gw = await two("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=5.0)
    resp = await gw.post("/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(secret))
    text = await resp.text()
    assert "partial" in text and '"error"' in text, text
    assert states(gw)[0] != "disabled", states(gw)
    row, _ = await row_and_spend(gw, secret)
    assert row["completion_tokens"] >= 1, row
    assert row["cost_usd"] == pytest.approx(at(PRIORITY, row)), row
    status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
    assert status == 200, body


# --- Anthropic's fast mode (`speed`), the Messages pass-through -----------------------------


def opus_answer(speed: str) -> bytes:
    return whole(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-opus-5-5",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 10_000,
                "output_tokens": 1_000,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "speed": speed,
            },
        }
    )


# WRONG (high, USD budgets): the change charges "every processing tier the price list has in
# force", but only `service_tier` variants; the same list prices Anthropic's fast mode as
# `speed: "fast"` variants (claude-opus-5-5: $8 / $40 against $4 / $20; Fable 5.2 and Mythos
# 5.2 likewise). `/v1/messages` to an Anthropic route relays the client's body as it is, so
# `speed: "fast"` (a plain parameter of the anthropic SDK, GA on Opus 5.5, no beta header
# needed) reaches Anthropic, which bills the fast rates and says `usage.speed: "fast"`; the
# gateway neither refuses it to a USD-budget key nor holds or charges it at the fast rates:
# 10,000 + 1,000 tokens cost $0.12 at Anthropic and are charged $0.06. Any key with a USD
# budget halves what its budget counts by adding one argument (6x on models whose fast mode
# is 6x). Right: read `speed` (the request's, and the answer's `usage.speed`) as a tier and
# price it from the list's `speed` variants, holding at them; or refuse `speed` other than
# "standard" to USD budgets where unpriced.
async def test_anthropic_fast_mode_is_charged_its_rates(build: Build) -> None:
    up = RawUpstream(opus_answer("fast"), hold=False)
    gw = await build("anthropic", up, "claude-opus-5-5")
    secret = await create_key(gw, budget_usd=5.0)
    client = anthropic.AsyncAnthropic(api_key=secret, base_url=str(gw.make_url("")), max_retries=0)
    try:
        message = await client.messages.create(
            model="m",
            max_tokens=1_000,
            speed="fast",
            messages=[{"role": "user", "content": "hi"}],
        )
    except anthropic.BadRequestError:
        return  # (refused to a USD budget: also right)
    finally:
        await client.close()
    assert message.usage.speed == "fast"
    assert up.bodies[0]["speed"] == "fast"
    row, spend = await row_and_spend(gw, secret)
    fast = mtok(10_000, 8.0) + mtok(1_000, 40.0)
    assert row["cost_usd"] == pytest.approx(fast), (row["cost_usd"], fast)
    assert spend.usd == pytest.approx(fast)


# --- tiers an OpenAI-compatible upstream names otherwise ------------------------------------


# WRONG (low, USD budgets): Groq's standard tier is `service_tier: "on_demand"` (its default;
# "performance" is its dearer one, "flex" costs the same). On a Groq route (`type = "openai"`,
# `pricing = "groq"`), a USD-budget key sending "on_demand" (a Literal of the groq SDK) is
# refused 400 "that processing is billed at rates the gateway's prices do not have", though
# it is the standard rate the gateway charges anyway; `UNPRICED_TIERS` knows only OpenAI's
# names. No money is lost; an ordinary request of a Groq SDK user fails.
# Right: a provider's own name for its standard tier passes (at least "on_demand"), or the
# refusal applies only where the price list prices tiers for that provider.
async def test_groq_standard_tier_is_not_refused(build: Build) -> None:
    up = RawUpstream(answered("on_demand"), hold=False)
    gw = await build("openai", up, "llama-3.1-8b-instant", fields={"pricing": "groq"})
    secret = await create_key(gw, budget_usd=5.0)
    resp = await gw.post(
        "/v1/chat/completions", json=ASK | {"service_tier": "on_demand"}, headers=auth(secret)
    )
    assert resp.status == 200, await resp.text()


# --- a config-priced model: the SDK user's ordinary tiers -----------------------------------


CONFIG_PRICE = {"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0}


# SOUND: on a model priced in the config (no tier rates), an openai SDK user with a USD
# budget may send `service_tier` "auto", "default" or "flex" (each forwarded, charged the
# config's rates whatever tier the answer says), and is refused "priority" (400, param
# `service_tier`, nothing sent upstream).
@pytest.mark.parametrize("tier", ["auto", "default", "flex"])
async def test_config_priced_ordinary_tiers_pass(build: Build, tier: str) -> None:
    up = RawUpstream(answered(tier if tier != "auto" else "default"), hold=False)
    gw = await build("openai", up, "my-model", model=CONFIG_PRICE)
    secret = await create_key(gw, budget_usd=5.0)
    async with openai_client(gw, secret) as client:
        await client.chat.completions.create(
            model="m",
            max_tokens=1_000,
            messages=[{"role": "user", "content": "x " * 10_000}],
            service_tier=tier,  # type: ignore[arg-type]
        )
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="m",
                max_tokens=1_000,
                messages=[{"role": "user", "content": "hi"}],
                service_tier="priority",
            )
    assert refused.value.body["param"] == "service_tier"  # type: ignore[index]
    assert len(up.bodies) == 1 and up.bodies[0]["service_tier"] == tier


@pytest.mark.parametrize("tier", ["auto", "default", "flex"])
async def test_config_priced_ordinary_tiers_are_charged_config_rates(
    build: Build, tier: str
) -> None:
    up = RawUpstream(answered("flex" if tier == "flex" else "default"), hold=False)
    gw = await build("openai", up, "my-model", model=CONFIG_PRICE)
    secret = await create_key(gw, budget_usd=5.0)
    async with openai_client(gw, secret) as client:
        done = await client.chat.completions.create(
            model="m",
            max_tokens=1_000,
            messages=[{"role": "user", "content": "x " * 10_000}],
            service_tier=tier,  # type: ignore[arg-type]
        )
    assert done.usage is not None
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(std(1.0, 2.0)), row
    assert spend.usd == pytest.approx(row["cost_usd"])


LEGACY_ANSWER = whole(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None}],
        "usage": USAGE,
        "service_tier": "default",
    }
)


# SOUND: a legacy completion through the openai SDK with `service_tier` "auto"/"default"/
# "flex" (extra_body: the SDK's completions have no such argument) on a list-priced model
# without tier rates passes and is charged the standard rates; "priority" is refused.
@pytest.mark.parametrize("tier", ["auto", "default", "flex"])
async def test_legacy_completion_ordinary_tiers(build: Build, tier: str) -> None:
    up = RawUpstream(LEGACY_ANSWER, hold=False)
    gw = await build("openai", up, "gpt-3.5-turbo-instruct")
    secret = await create_key(gw, budget_usd=5.0)
    async with openai_client(gw, secret) as client:
        await client.completions.create(
            model="m", prompt="x " * 10_000, max_tokens=1_000, extra_body={"service_tier": tier}
        )
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(
                model="m", prompt="hi", max_tokens=5, extra_body={"service_tier": "priority"}
            )
    assert len(up.bodies) == 1 and up.bodies[0]["service_tier"] == tier
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(std(1.5, 2.0)), row


# SOUND: a hostile client cannot hide "priority" from the check: an escaped key, or the key
# twice (the gateway reads and forwards the same last value), is refused on a model without
# priority rates like the plain field.
@pytest.mark.parametrize(
    "raw",
    [
        b'"service\\u005ftier": "priority"',
        b'"service_tier": "default", "service_tier": "priority"',
        b'"service_tier": "pr\\u0069ority"',
    ],
)
async def test_hidden_priority_is_refused(build: Build, raw: bytes) -> None:
    up = RawUpstream(answered("priority"), hold=False)
    gw = await build("openai", up, "my-model", model=CONFIG_PRICE)
    secret = await create_key(gw, budget_usd=5.0)
    body = b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], '
    resp = await gw.post(
        "/v1/chat/completions",
        data=body + raw + b"}",
        headers=auth(secret) | {"Content-Type": "application/json"},
    )
    assert resp.status == 400, await resp.text()
    assert up.bodies == []


# --- the first chunk's tier: Framed runs, split reads, disagreement -------------------------


class Paced:
    """Writes `pieces` of a stream one by one, each flushed and given time to arrive as its
    own read; `hold`: then waits for the gateway to close the connection."""

    def __init__(self, pieces: list[bytes], *, hold: bool = False) -> None:
        self.pieces = pieces
        self.hold = hold
        self.bodies: list[dict[str, Any]] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, raw = await read_request(reader)
            self.bodies.append(json.loads(raw))
            writer.write(STREAM_HEAD)
            for piece in self.pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)
            if self.hold:
                await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()


def words(n: int, tier: str | None = "priority") -> list[bytes]:
    extra = {} if tier is None else {"service_tier": tier}
    return [text_chunk("word ", **extra) for _ in range(n)]


async def cut_after_words(gw: Any, secret: str, body: dict[str, Any], n: int) -> None:
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth(secret))
    got = b""
    async with asyncio.timeout(NEVER_HANG):
        while got.count(b"word") < n:
            piece = await resp.content.readany()
            assert piece, got
            got += piece
    resp.close()


def at(rates: tuple[float, float], row: dict[str, Any]) -> float:
    return mtok(row["prompt_tokens"], rates[0]) + mtok(row["completion_tokens"], rates[1])


PRIORITY, STANDARD = (0.25, 1.0), (0.15, 0.6)


# SOUND: a stream served at priority ("auto" asked: the project's default) and cut by the
# client before its usage chunk is charged priority, however its first event arrives: a read
# of whole events (Framed), the first event split across two reads, a leading SSE comment in
# its own read, a first event with CRLF line ends.
@pytest.mark.parametrize(
    "shape", ["framed", "split-first", "comment-first", "crlf", "one-per-read"]
)
async def test_cut_stream_keeps_the_first_chunks_tier(build: Build, shape: str) -> None:
    events = words(20)
    if shape == "framed":
        pieces = [b"".join(events)]
    elif shape == "split-first":
        first = events[0]
        pieces = [first[:30], first[30:], b"".join(events[1:])]
    elif shape == "comment-first":
        pieces = [b": OPENROUTER PROCESSING\n\n", b"".join(events)]
    elif shape == "crlf":
        pieces = [b"".join(e.replace(b"\n", b"\r\n") for e in events)]
    else:
        pieces = events
    up = Paced(pieces, hold=True)
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=5.0)
    await cut_after_words(gw, secret, ASK | {"stream": True, "service_tier": "auto"}, 20)
    row, _ = await row_and_spend(gw, secret)
    assert row["completion_tokens"] > 0, row
    assert row["cost_usd"] == pytest.approx(at(PRIORITY, row)), row


# SOUND: the usage chunk's tier overrides the first chunk's, both ways.
@pytest.mark.parametrize(
    ("first", "last", "rates"),
    [("priority", "default", STANDARD), ("default", "priority", PRIORITY)],
)
@pytest.mark.parametrize("split", [False, True])
async def test_the_usage_chunks_tier_wins(
    build: Build, first: str, last: str, rates: tuple[float, float], split: bool
) -> None:
    events = [
        text_chunk("hi", service_tier=first),
        STOP,
        chunk(choices=[], usage=USAGE, service_tier=last),
        b"data: [DONE]\n\n",
    ]
    up = Paced(events if split else [b"".join(events)])
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=5.0)
    resp = await gw.post("/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(secret))
    assert (await resp.text()).endswith("data: [DONE]\n\n")
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(std(*rates)), row


# SOUND: a first chunk whose tier is no tier (33 characters, a number, empty) leaves a cut
# stream asking for priority at the priority rates, and one asking nothing at standard; a
# tier of exactly 32 characters is kept as said (charged standard: the list has no such tier).
@pytest.mark.parametrize(
    ("said", "asked", "rates"),
    [
        ("p" * 33, "priority", PRIORITY),
        ("p" * 33, None, STANDARD),
        (7, "priority", PRIORITY),
        ("", "priority", PRIORITY),
        ("p" * 32, "priority", STANDARD),
    ],
)
async def test_odd_first_chunk_tiers(
    build: Build, said: Any, asked: str | None, rates: tuple[float, float]
) -> None:
    events = [text_chunk("word ", service_tier=said) for _ in range(10)]
    up = Paced([b"".join(events)], hold=True)
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=5.0)
    body = ASK | {"stream": True} | ({"service_tier": asked} if asked else {})
    await cut_after_words(gw, secret, body, 10)
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(at(rates, row)), row


# --- the hot path ----------------------------------------------------------------------------


async def _decodes(build: Build, chunks: int, tier: str | None, split: bool) -> int:
    events = [
        *words(chunks, tier),
        STOP,
        chunk(choices=[], usage=USAGE, service_tier="priority"),
        b"data: [DONE]\n\n",
    ]
    up = Paced([*events[:3], b"".join(events[3:])] if split else [b"".join(events)])
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=5.0)
    with gateway_calls() as counts:
        resp = await gw.post(
            "/v1/chat/completions", json=ASK | {"stream": True}, headers=auth(secret)
        )
        text = await resp.text()
    assert text.count("word") == chunks
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(std(0.25, 1.0)), row
    return sum(n for name, n in counts.items() if name.endswith("decode"))


# SOUND: with `service_tier` in every chunk (as OpenAI streams), a chat stream of 300 chunks
# makes as many decodes in the OpenAI adapter as one of 3, and one more than the same stream
# without a tier (the first chunk's), whether it comes in one read or several.
@pytest.mark.parametrize("split", [False, True])
async def test_tier_in_every_chunk_costs_one_decode(build: Build, split: bool) -> None:
    few = await _decodes(build, 3, "default", split)
    many = await _decodes(build, 300, "default", split)
    plain = await _decodes(build, 300, None, split)
    assert many == few, (few, many)
    assert many == plain + 1, (plain, many)


# SOUND: a JSON (non-stream) chat request with a tier decodes its answer no more than one
# without: the tier comes out of the decode the answer had anyway.
async def test_json_answer_decodes_unchanged(build: Build) -> None:
    counts = []
    for tier in (None, "priority"):
        up = RawUpstream(answered(tier), hold=False)
        gw = await build("openai", up, "gpt-4o-mini")
        secret = await create_key(gw, budget_usd=5.0)
        with gateway_calls() as seen:
            resp = await gw.post("/v1/chat/completions", json=ASK, headers=auth(secret))
            await resp.read()
        counts.append(sum(n for name, n in seen.items() if name.endswith("decode")))
    assert counts[0] == counts[1], counts


# --- forced web searches ----------------------------------------------------------------------


def search_done() -> bytes:
    item = {"type": "web_search_call", "id": "ws_1", "status": "completed"}
    item["action"] = {"type": "search", "query": "q"}
    return responses_event("response.output_item.done", output_index=0, item=item)


# SOUND: a forced web search (`tool_choice` naming it, or "required" over web search tools
# only) on a Responses pass-through stream the client cuts before any item is charged one
# search ($0.01 on gpt-5-mini, beside the tokens); one whose search item was seen before the
# cut is charged that one search, not a second.
@pytest.mark.parametrize(
    ("choice", "seen"),
    [
        ({"type": "web_search"}, False),
        ("required", False),
        ({"type": "web_search"}, True),
    ],
)
async def test_a_forced_search_cut_is_charged_once(two: Build2, choice: Any, seen: bool) -> None:
    head = STREAM_HEAD + created() + (search_done() if seen else b"")
    up = Sequence((head, True))
    gw = await two("openai", up, "gpt-5-mini", keys=1, fields=PASS)
    secret = await create_key(gw, budget_usd=5.0)
    body = ask([{"type": "web_search"}], stream=True, tool_choice=choice)
    marker = b"output_item.done" if seen else b"response.created"
    await cut_after(gw, secret, "/v1/responses", body, marker)
    row, _ = await row_and_spend(gw, secret)
    tokens = at((0.25, 2.0), row)
    assert row["cost_usd"] == pytest.approx(tokens + 0.01), (row, tokens)
