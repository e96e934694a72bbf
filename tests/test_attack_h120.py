"""Attack on 7c675ac (helper-120): Anthropic's fast mode charged at the speed the answer's
`usage.speed` says, asked through `fallbacks[]` entries too (held and refused as the top-level
`speed`), and never on a request translated to Anthropic; OpenRouter's "can only afford 0"
takes an account out for `cooldown` as a failure (panic mode may still try it), no longer
disabling it for `auth_cooldown`.

Attacked as a hostile client with a USD budget (fast mode spelled so the gateway misses it,
`fallbacks` in odd shapes and sizes), as a hostile or odd upstream (`usage.speed` of other
types, lengths and places in a stream), as an `anthropic` SDK user (`speed="fast"`, the
`fallbacks` beta) and against the breaker change (a run of "afford 0" answers, probes, the
threshold for other failures, the metrics). Failing tests are problems (the comment above
each says what happens, what it costs, how realistic it is and what would be right); tests
marked `# SOUND:` pin properties checked here that hold.

Bundled price list: claude-opus-5-5 $4 / $20 a million tokens, `speed: "fast"` $8 / $40;
claude-3-5-haiku-latest $0.80 / $4 and no fast rates.
"""

from __future__ import annotations

import asyncio
import gc
import io
import time
import tracemalloc
from types import SimpleNamespace
from typing import Any

import anthropic
import msgspec
import pytest

from gateway.gauges import _breakers
from gateway.handlers.messages import _refuse_other_models
from gateway.messages.schema import MessagesRequest
from gateway.schemas.codec import decode_body
from gateway.state import PRINCIPAL_KEY
from tests.conftest import app_of, create_key, router_of
from tests.raw_upstream import STREAM_HEAD, RawUpstream, auth, sse
from tests.test_attack_h105 import Build, build, row_and_spend, whole
from tests.test_attack_h117 import CHAT, Build2, Scripted, call, chat_ok, http, states, two
from tests.test_attack_h118 import AFFORD_NOTHING, openrouter_402
from tests.test_attack_h119 import (
    FALLBACK_BETA,
    FAST,
    HAIKU,
    IN,
    MSG,
    OPUS,
    OUT,
    STANDARD,
    cost,
    message,
    opus_answer,
    opus_usage,
    post_raw,
    sdk,
)

__all__ = ["build", "two"]  # (the fixtures)

HAIKU_RATES = (0.8, 4.0)
BETA = "server-side-fallback-2026-07-01"


def stream_of(start: dict[str, Any], delta: dict[str, Any], model: str = OPUS) -> bytes:
    """An Anthropic stream whose `message_start` usage is `start` and whose closing
    `message_delta` usage is `delta`."""
    begin = message(start, model) | {"content": [], "stop_reason": None}
    return (
        STREAM_HEAD
        + sse({"type": "message_start", "message": begin}, "message_start")
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
                "usage": delta,
            },
            "message_delta",
        )
        + sse({"type": "message_stop"}, "message_stop")
    )


def with_fallbacks(raw: bytes) -> bytes:
    """MSG with `"fallbacks": <raw>` spliced in as written (escapes and duplicates kept)."""
    return msgspec.json.encode(MSG)[:-1] + b', "fallbacks": ' + raw + b"}"


# --- `fallbacks` in the shapes Anthropic documents, and in others --------------------------


# WRONG (medium, every key, no budget needed; a regression of 7c675ac): the Messages API's
# `fallbacks` is `list[BetaFallbackParam] | Literal["default"]` (anthropic SDK 2.17
# `BetaFallbacksParam`: "The string "default" requests the requested model's server-defined
# default fallback configuration"). `MessagesRequest.fallbacks` is now typed `list[Raw] |
# None`, so `decode_body` refuses `fallbacks="default"` with a 400 ("Expected `array | null`,
# got `str`") before anything goes upstream; before 7c675ac the field was unknown to the
# schema and relayed as sent. Every SDK user of the server-side fallback beta who takes
# Anthropic's own default chain (the simplest way to use the feature) is refused on every
# request. Realistic: it is the documented one-word form of the feature. Right: accept the
# string (`list[Raw] | str | None`, or read `fallbacks` leniently as `object` in `_speed`),
# relay it as sent, and treat "default" like an entry without `speed` (fast only when the
# top-level `speed` is: held and refused as that is).
async def test_fallbacks_default_is_relayed(build: Build) -> None:
    up = RawUpstream(opus_answer("standard"), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_tokens=10**9)  # (a USD budget is refused `fallbacks`)
    client = sdk(gw, secret)
    try:
        done = await client.beta.messages.create(
            model="m",
            max_tokens=1_000,
            messages=[{"role": "user", "content": "hi"}],
            fallbacks="default",
            betas=[BETA],
        )
    except anthropic.BadRequestError as exc:
        pytest.fail(f"refused by the gateway: {exc}")
    finally:
        await client.close()
    assert done.usage.input_tokens == IN
    assert up.bodies[0]["fallbacks"] == "default"


# WRONG (medium-high, USD budgets and key model lists): a `fallbacks` entry names any
# Anthropic model by its upstream id (`{"model": "claude-opus-..."}`), relayed untouched, and
# when the requested model declines (a refusal for policy reasons, which a client can provoke
# with the right prompt) Anthropic serves the answer from that model and bills ITS rates; the
# answer says so (`model`, and a `fallback_message` entry in `usage.iterations`). The gateway
# prices the row at the requested route's model whatever served it, and never checks the
# entry against the key's model grants: a key limited to a cheap model (here Haiku, $0.80 /
# $4) gets Opus answers ($4 / $20; $15 / $75 on older Opus models, e.g. from a frontier model
# that declines to one that does not) charged at the cheap rates: $0.012 recorded for $0.06
# billed, 5x here, ~19x Haiku → Opus 4.1, and nothing held at the dearer rates. Honest users
# are mis-charged the same way in the other direction (an expensive primary falling back to
# a cheap model). Realistic: it is the feature's purpose that the fallback model answers what
# the requested one declined. Right: price an answer at the model it says served it (where
# the price list has it, else refuse `fallbacks` to USD budgets), hold at the dearest model of
# the chain, and refuse entries naming models the key may not use (or that no route maps).
async def test_a_fallback_model_is_charged_at_its_own_rates(build: Build) -> None:
    usage = opus_usage("standard") | {
        "iterations": [
            {
                "type": "fallback_message",
                "model": OPUS,
                "input_tokens": IN,
                "output_tokens": OUT,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            }
        ]
    }
    up = RawUpstream(whole(message(usage, OPUS)), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0, models=["m"])
    status, body = await post_raw(
        gw,
        secret,
        "/v1/messages",
        with_fallbacks(b'[{"model": "%s"}]' % OPUS.encode()),
        FALLBACK_BETA,
    )
    if status == 400:
        return  # (refused: also right)
    assert status == 200, body
    assert up.bodies[0]["fallbacks"] == [{"model": OPUS}]
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(STANDARD)), (row["cost_usd"], cost(STANDARD))
    assert spend.usd == pytest.approx(cost(STANDARD))


# SOUND: no crash on odd `fallbacks`: null, a list of strings, of numbers / nulls / lists, an
# empty list, an entry nested past the decoder's depth inside a list are relayed (the
# upstream judges them) and charged the standard rates; a bare object or a string other
# than a list is refused with a 400 naming `fallbacks` (Anthropic refuses them too), never a
# 500.
@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"null", 200),
        (b'["a", "b"]', 200),
        (b"[1, null, [], true, 2.5]", 200),
        (b"[]", 200),
        (b'[{"speed": {"speed": "fast"}}]', 200),
        (b'[{"model": "x", "speed": ["fast"]}]', 200),
        (b'{"speed": "fast"}', 400),
        (b'"fast"', 400),
        (b"[" + b"[" * 5_000 + b"]" * 5_000 + b"]", 400),
    ],
)
async def test_odd_fallbacks_do_not_crash(build: Build, raw: bytes, status: int) -> None:
    up = RawUpstream(opus_answer(None, model=HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_tokens=10**9)  # (a USD budget is refused `fallbacks`)
    got, body = await post_raw(gw, secret, "/v1/messages", with_fallbacks(raw), FALLBACK_BETA)
    assert got == status, body
    if status == 200:
        row, _ = await row_and_spend(gw, secret)
        assert row["cost_usd"] == pytest.approx(cost(HAIKU_RATES)), row
    else:
        assert not up.bodies and body["error"]["type"] == "invalid_request_error", body


# SOUND: a fast entry is seen however it is spelled, wherever it is in the list: an escaped
# key or value, a duplicated `speed` whose last is "fast" (last wins on both sides: the entry
# is relayed as written and Anthropic's JSON reads the last), an entry after non-objects;
# each is refused to a USD budget on a model without fast rates before anything goes
# upstream. "FAST", "standard", null, a last `speed` that is not "fast" are no fast mode.
@pytest.mark.parametrize(
    ("raw", "refused"),
    [
        (b'[{"model": "x", "sp\\u0065ed": "fast"}]', True),
        (b'[{"model": "x", "speed": "f\\u0061st"}]', True),
        (b'[{"model": "x", "speed": "standard", "speed": "fast"}]', True),
        (b'["x", 1, null, {"model": "y"}, {"model": "x", "speed": "fast"}]', True),
        (b'[{"model": "x", "speed": "fast", "speed": null}]', False),
        (b'[{"model": "x", "speed": "FAST"}]', False),
        (b'[{"model": "x", "speed": "standard"}, {"model": "y", "speed": null}]', False),
    ],
)
async def test_fast_fallback_spellings(build: Build, raw: bytes, refused: bool) -> None:
    up = RawUpstream(opus_answer(None, model=HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0)
    status, body = await post_raw(gw, secret, "/v1/messages", with_fallbacks(raw), FALLBACK_BETA)
    # (Since the fix of this file's fallback-model finding, a USD budget is refused any
    # `fallbacks`, however its speeds are spelled: `refused` no longer tells them apart.)
    assert status == 400 and not up.bodies, (status, body)
    assert body["error"]["message"].startswith("fallbacks:"), body


# SOUND: a long `fallbacks` list of OBJECTS is cheap: 25,000 entries (~1 MB) are read for
# their `speed` in milliseconds and relayed through the gateway (a list of scalars is not:
# `test_a_long_fallbacks_list_of_scalars_is_cheap`).
async def test_a_huge_fallbacks_list_is_cheap(build: Build) -> None:
    up = RawUpstream(opus_answer(None, model=HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_tokens=10**9)  # (a USD budget is refused `fallbacks`)
    raw = b"[" + b",".join([b'{"model": "x", "speed": "standard"}'] * 25_000) + b"]"
    started = time.perf_counter()
    resp = await gw.post(
        "/v1/messages",
        data=io.BytesIO(with_fallbacks(raw)),
        headers=auth(secret) | {"Content-Type": "application/json"} | FALLBACK_BETA,
    )
    text = await resp.text()
    took = time.perf_counter() - started
    assert resp.status in (200, 413), text
    assert took < 2.0, took


# WRONG (medium, any key, no budget needed; new in 7c675ac): `MessagesRequest.fallbacks` is
# now `list[Raw]`, so msgspec builds one `Raw` object (~56 bytes) for every entry, where the
# field was skipped unread before; and `_speed` then decodes each entry on its own, raising
# and catching a `ValidationError` for every one that is not an object. A body of
# `"fallbacks": [1,1,1,...]` within `max_body_bytes` (32 MB by default: 16.7 million
# entries) holds ~900 MB for the request's whole life (28x its size; the worst other field
# found here, content blocks, ~6x) and blocks the event loop ~7 s in `_speed` alone
# (measured; the body's decoding takes 0.6 s), stalling every other request on the worker.
# A handful of such requests at once exhausts the memory of a small host; one every 7 s
# keeps the gateway unresponsive. Scaled down here to a 4 MB body. Realistic for any key
# holder (Anthropic's own limit is far smaller; the gateway reads the body first). Right:
# read `fallbacks` lazily and bounded (e.g. only when the body holds "fast" or an escape, as
# `_cache_writes` does; refuse a list past a small length, Anthropic's chain is a few
# models), or decode it as one `Raw` and walk it with a struct that skips non-objects.
def test_a_long_fallbacks_list_of_scalars_is_cheap() -> None:
    head = msgspec.json.encode(MSG)[:-1] + b', "fallbacks": ['
    n = 2_000_000
    body = head + b"1," * (n - 1) + b"1]}"
    plain = msgspec.json.encode(MSG | {"messages": [{"role": "user", "content": "x" * len(body)}]})
    started = time.perf_counter()
    decode_body(plain, MessagesRequest)
    baseline = time.perf_counter() - started
    gc.collect()
    tracemalloc.start()
    try:
        started = time.perf_counter()
        req = decode_body(body, MessagesRequest)
        decoded = time.perf_counter() - started
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    started = time.perf_counter()
    # (Since the fix, `fallbacks` is one `Raw`, never walked: a key that may send it has it
    # relayed, one that may not is refused by its presence alone.)
    free = SimpleNamespace(key=SimpleNamespace(budget_usd=None, models=[]))
    _refuse_other_models({PRINCIPAL_KEY: free}, req)  # type: ignore[arg-type]
    read = time.perf_counter() - started
    assert held < 8 * len(body), (held / 2**20, len(body) / 2**20)
    assert read < 10 * max(baseline, decoded / 10), (read, baseline, decoded)


# --- the answer's `usage.speed` --------------------------------------------------------------


# SOUND: the answer's word decides, whole and streamed, and only a word the list prices
# charges fast: "fast" charges the fast rates on a request that did not ask (the upstream
# served it so); "standard", an unknown word ("FAST", "turbo") or an empty string on a fast
# request, the standard rates for the first three and the asked rates for "" ; a non-string
# (a number, a list, an object) or a string past 32 characters is no word: the speed asked
# for is charged.
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("said", "asked", "rates"),
    [
        ("fast", None, FAST),
        ("standard", "fast", STANDARD),
        ("FAST", "fast", STANDARD),
        ("turbo", "fast", STANDARD),
        ("", "fast", FAST),
        (1, "fast", FAST),
        (["fast"], None, STANDARD),
        ({"speed": "fast"}, "fast", FAST),
        ("fast" * 100, None, STANDARD),
        ("fast" * 100, "fast", FAST),
    ],
)
async def test_usage_speed_words(
    build: Build, stream: bool, said: Any, asked: str | None, rates: tuple[float, float]
) -> None:
    usage = opus_usage(None) | {"speed": said}
    reply = (
        stream_of(usage | {"output_tokens": 1}, {"output_tokens": OUT})
        if stream
        else whole(message(usage))
    )
    up = RawUpstream(reply, hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = MSG | {"stream": stream} | ({"speed": asked} if asked else {})
    resp = await gw.post("/v1/messages", json=body, headers=auth(secret))
    assert resp.status == 200, await resp.text()
    await resp.read()
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(rates)), (row["cost_usd"], cost(rates))
    assert spend.usd == pytest.approx(cost(rates))


# SOUND: in a stream, the last word wins: `speed` only in the closing `message_delta` usage
# charges it; "fast" in `message_start` and "standard" in `message_delta` is standard; a
# `message_delta` without `speed` (or with null) keeps `message_start`'s.
@pytest.mark.parametrize(
    ("start", "delta", "rates"),
    [
        (None, "fast", FAST),
        ("standard", "fast", FAST),
        ("fast", "standard", STANDARD),
        ("fast", None, FAST),
        ("fast", "null", FAST),
    ],
)
async def test_stream_speed_placement(
    build: Build, start: str | None, delta: str | None, rates: tuple[float, float]
) -> None:
    first = opus_usage(start) | {"output_tokens": 1}
    last: dict[str, Any] = {"output_tokens": OUT}
    if delta is not None:
        last["speed"] = None if delta == "null" else delta
    up = RawUpstream(stream_of(first, last), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    resp = await gw.post("/v1/messages", json=MSG | {"stream": True}, headers=auth(secret))
    assert resp.status == 200
    assert "message_stop" in await resp.text()
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(rates)), (row["cost_usd"], cost(rates))


# SOUND: a stream cut after `message_start` said "fast" (the upstream drops the connection) is
# charged its counts so far at the fast rates, asked or not; a cut after it said "standard"
# on a fast request, at the standard rates.
@pytest.mark.parametrize(
    ("said", "asked", "rates"), [("fast", None, FAST), ("standard", "fast", STANDARD)]
)
async def test_cut_stream_keeps_the_speed_said(
    build: Build, said: str, asked: str | None, rates: tuple[float, float]
) -> None:
    begin = message(opus_usage(said) | {"output_tokens": 1}) | {"content": [], "stop_reason": None}
    reply = (
        STREAM_HEAD
        + sse({"type": "message_start", "message": begin}, "message_start")
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
                "delta": {"type": "text_delta", "text": "x" * 4_000},
            },
            "content_block_delta",
        )
    )
    up = RawUpstream(reply, hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = MSG | {"stream": True} | ({"speed": asked} if asked else {})
    resp = await gw.post("/v1/messages", json=body, headers=auth(secret))
    await resp.read()
    row, _ = await row_and_spend(gw, secret)
    assert row["estimated"], row
    expected = cost(rates, IN, 1_000)  # (4,000 characters streamed: ~1,000 tokens)
    assert row["cost_usd"] == pytest.approx(expected), (row["cost_usd"], expected)


# SOUND: a client that hangs up before `message_start` arrives on a request that asked fast
# is charged its estimate at the fast rates (what it asked; the answer never said otherwise),
# not the standard ones. (Asked through a `fallbacks` entry at first; a USD budget is refused
# `fallbacks` since, so the top-level `speed` asks here.)
async def test_hang_up_before_message_start_is_charged_as_asked(build: Build) -> None:
    up = RawUpstream(STREAM_HEAD, hold=True)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = MSG | {"stream": True, "speed": "fast"}
    task = asyncio.ensure_future(gw.post("/v1/messages", json=body, headers=auth(secret)))
    await asyncio.wait_for(up.seen.wait(), 5)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(up.closed.wait(), 5)
    for _ in range(100):
        try:
            row, _ = await row_and_spend(gw, secret)
            break
        except (AssertionError, IndexError, KeyError, TypeError):
            await asyncio.sleep(0.02)
    prompt = row["prompt_tokens"]
    assert row["estimated"] and prompt > 0, row
    assert row["cost_usd"] == pytest.approx(cost(FAST, prompt, row["completion_tokens"])), row


# SOUND: an answer on a translated route (chat completions → Anthropic, which sends no
# `speed`) that says `speed: "fast"` is charged the fast rates: the upstream's word on how it
# served (and billed) the request, as an OpenAI answer's `service_tier` is. Right as it is:
# the gateway records what the upstream bills; a real Anthropic never says so for a request
# without `speed`, and a proxy upstream that adds it bills it.
async def test_translated_answer_saying_fast_is_charged_fast(build: Build) -> None:
    up = RawUpstream(opus_answer("fast"), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    big = {"model": "m", "max_tokens": 1_000, "messages": [{"role": "user", "content": "x " * IN}]}
    status, body = await call(gw, secret, "/v1/chat/completions", big)
    assert status == 200, body
    assert "speed" not in up.bodies[0]
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(FAST)), row


# --- the anthropic SDK user ------------------------------------------------------------------


# SOUND: the SDK's beta client (`/v1/messages?beta=true`) with a fast `fallbacks` entry, whole
# and streamed, reaches Anthropic as sent (entry and beta header) and is charged at the
# speed the answer says: fast when it says fast, standard when the primary answered at
# standard (the fallback was not used).
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("said", "rates"), [("fast", FAST), ("standard", STANDARD)])
async def test_sdk_fast_fallback(
    build: Build, stream: bool, said: str, rates: tuple[float, float]
) -> None:
    usage = opus_usage(said)
    reply = (
        stream_of(usage | {"output_tokens": 1}, {"output_tokens": OUT})
        if stream
        else whole(message(usage))
    )
    up = RawUpstream(reply, hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_tokens=10**9)  # (a USD budget is refused `fallbacks`)
    client = sdk(gw, secret)
    args: dict[str, Any] = {
        "model": "m",
        "max_tokens": 1_000,
        "messages": [{"role": "user", "content": "hi"}],
        "fallbacks": [{"model": OPUS, "speed": "fast"}],
        "betas": [BETA],
    }
    try:
        if stream:
            async with client.beta.messages.stream(**args) as events:
                done = await events.get_final_message()
        else:
            done = await client.beta.messages.create(**args)
    finally:
        await client.close()
    assert done.usage.speed == said
    assert up.bodies[0]["fallbacks"] == [{"model": OPUS, "speed": "fast"}]
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(rates)), row
    assert spend.usd == pytest.approx(cost(rates))


# SOUND: a fast `fallbacks` entry is held at the fast rates as the top-level `speed` is: a
# budget between the standard ($0.02) and fast ($0.04) hold of the output limit is refused
# before anything goes upstream; without the entry it is admitted.
async def test_fast_fallback_is_held_fast(build: Build) -> None:
    up = RawUpstream(opus_answer(None), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=0.03)
    body = MSG | {"fallbacks": [{"model": OPUS, "speed": "fast"}]}
    status, out = await call(gw, secret, "/v1/messages", body)
    assert status != 200 and not up.bodies, (status, out)
    # (Any `fallbacks` is refused to a USD budget since; the request without them passes.)
    status, out = await call(gw, secret, "/v1/messages", MSG | {"fallbacks": [{"model": OPUS}]})
    assert status == 400 and out["error"]["message"].startswith("fallbacks:"), out
    status, out = await call(gw, secret, "/v1/messages", MSG)
    assert status == 200, out


# --- "can only afford 0": out for `cooldown` as a failure ---------------------------------


def afford_or_ok(spent: list[bool]) -> Scripted:
    """One account's OpenRouter: "can only afford 0" while `spent[0]`, else an answer."""
    return Scripted(
        lambda path, body, key: openrouter_402(AFFORD_NOTHING) if spent[0] else chat_ok()
    )


# SOUND: a run of "afford 0" answers on a model's only account never locks it out: each
# request still goes upstream (panic: the account is out for failures only), gets the 503
# (`upstream_quota_exhausted`) and is tried once (no retry on the account that priced it
# out); the first request after the account is topped up is answered, with no wait for the
# cooldown, and puts the account back ("closed").
async def test_only_account_recovers_at_once(two: Build2) -> None:
    spent = [True]
    up = afford_or_ok(spent)
    gw = await two("openai", up, "openai/gpt-4o-mini", keys=1, max_attempts=3)
    secret = await create_key(gw)
    for n in range(1, 6):
        status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
        assert status == 503 and body["error"]["code"] == "upstream_quota_exhausted", body
        assert len(up.seen) == n
        assert states(gw)[0] == "open"
    spent[0] = False
    status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert states(gw)[0] == "closed"


# SOUND: after the cooldown the account is half-open; its probe answering "afford 0" takes
# it out for another `cooldown` (open, not disabled); a probe answering puts it back.
async def test_probe_after_afford_nothing(two: Build2) -> None:
    spent = [True]
    up = afford_or_ok(spent)
    gw = await two("openai", up, "openai/gpt-4o-mini", keys=2, max_attempts=1, cooldown=30.0)
    board = router_of(gw).breakers
    now = [1_000.0]
    board.clock = lambda: now[0]
    secret = await create_key(gw)
    assert (await call(gw, secret, "/v1/chat/completions", CHAT))[0] == 503
    first = states(gw)
    assert first.count("open") == 1 and first.count("closed") == 1, first
    assert board.remaining(("up0", first.index("open"))) == pytest.approx(30.0)
    now[0] += 31
    assert states(gw)[first.index("open")] == "half-open"
    spent[0] = False
    for _ in range(2):  # (the probe lands on the half-open account within two requests)
        assert (await call(gw, secret, "/v1/chat/completions", CHAT))[0] == 200
    assert states(gw) == ["closed", "closed"]


# SOUND: other failures keep `failure_threshold`: a 503 (no retry-after) with a threshold of
# 3 leaves the account in rotation until its third request's failure; only then is it open.
async def test_threshold_for_5xx_unchanged(two: Build2) -> None:
    failing = [True]

    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        if failing[0] and key.startswith("sk-up-a"):
            return http("503 Service Unavailable", {"error": {"message": "overloaded"}})
        return chat_ok()

    up = Scripted(reply)
    gw = await two("openai", up, "openai/gpt-4o-mini", failure_threshold=3, max_attempts=2)
    secret = await create_key(gw)
    seen = []
    for _ in range(6):
        assert (await call(gw, secret, "/v1/chat/completions", CHAT))[0] == 200
        seen.append(states(gw)[0])
    assert seen.count("open") >= 1 and seen[0] == "closed", seen
    failed = sum(1 for _, _, k in up.seen if k.startswith("sk-up-a"))
    assert failed == 3, (failed, up.keys())


# SOUND: the metrics and the breaker board show an "afford 0" account as open (not disabled),
# with its retry-in no more than `cooldown`, and the other account closed.
async def test_metrics_show_afford_nothing_as_open(two: Build2) -> None:
    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        return openrouter_402(AFFORD_NOTHING) if key.startswith("sk-up-a") else chat_ok()

    gw = await two("openai", Scripted(reply), "openai/gpt-4o-mini", cooldown=30.0)
    secret = await create_key(gw)
    assert (await call(gw, secret, "/v1/chat/completions", CHAT))[0] == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in _breakers(app_of(gw))
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    state = "tokenkiosk_upstream_breaker_state"
    assert value(state, provider="up0", account="0", state="open") == 1
    assert value(state, provider="up0", account="0", state="disabled") == 0
    assert value(state, provider="up0", account="1", state="closed") == 1
    wait = value("tokenkiosk_upstream_breaker_retry_in_seconds", provider="up0", account="0")
    assert 0 < wait <= 30.0


# WRONG (low, any key): the client's error for "can only afford 0" still says "a request with
# a lower max_tokens may fit" (`error_from_status` builds one message for every per-request
# 402, `counts` or not). An account that can afford 0 output tokens fits no lower max_tokens:
# either its credit is spent or the prompt alone uses it up. Clients (and agents reading the
# message) retry with ever lower limits to no avail, each retry another upstream call, and
# the operator is not told to top up. Realistic whenever an OpenRouter account runs dry.
# Right: for "afford 0", say the account's credit may be spent or the prompt too large for
# what is left (shorter prompt, or the operator tops up), not a lower max_tokens.
async def test_afford_nothing_does_not_advise_a_lower_max_tokens(two: Build2) -> None:
    up = afford_or_ok([True])
    gw = await two("openai", up, "openai/gpt-4o-mini", keys=1)
    secret = await create_key(gw)
    status, body = await call(gw, secret, "/v1/chat/completions", CHAT)
    assert status == 503, body
    assert "lower max_tokens" not in body["error"]["message"], body["error"]["message"]


# WRONG (low-medium, any key, no budget): "can only afford 0" is also what OpenRouter answers
# a prompt that leaves less than one output token's credit (h119's
# `test_a_prompt_that_leaves_no_output_does_not_disable_the_account`), and it is retryable on
# the next account, where the same prompt gets the same answer: ONE such request from a
# hostile client takes EVERY account of the provider out for `cooldown` (up to
# `max_attempts` of them). Panic mode then puts back only the account the next request lands
# on; the rest stay out for 30 s, so for every request the client sends each 30 s, the
# whole model's traffic rides on a single account (its rate limits, its credit), with the
# other keys idle. Realistic where accounts hold small credits (OpenRouter keys with monthly
# limits, the h118/h119 case), and it needs ~2 requests a minute. Right: an "afford 0" is the
# account's verdict only for a request too small to matter (a prompt that fits the credit
# with room to spare), or take the account out only once another account answered "afford 0"
# to a smaller request; at least do not fail the same prompt over to every account (an
# "afford 0" for a prompt says the prompt is the likely cause).
@pytest.mark.xfail(
    strict=True,
    reason='known trade-off (docs/operations.md): "can only afford 0" takes an account out '
    "for `cooldown` at once, as test_attack_h118 asks of a spent account; panic mode keeps "
    "the model served meanwhile",
)
async def test_one_request_does_not_take_every_account_out(two: Build2) -> None:
    def reply(path: str, body: dict[str, Any], key: str) -> bytes:
        if len(body["messages"][0]["content"]) > 1_000:  # (the prompt leaves no output)
            return openrouter_402(AFFORD_NOTHING)
        return chat_ok()

    up = Scripted(reply)
    gw = await two("openai", up, "openai/gpt-4o-mini", max_attempts=3)
    hostile = await create_key(gw, name="hostile")
    big = CHAT | {"messages": [{"role": "user", "content": "x" * 5_000}]}
    status, _ = await call(gw, hostile, "/v1/chat/completions", big)
    assert status == 503
    assert states(gw) != ["open", "open"], states(gw)


# SOUND: a Messages request with `speed: "fast"` and a fast `fallbacks` entry to an
# OpenAI-compatible (OpenRouter-priced) route is translated without either, admitted to a
# USD budget (that route drops them).
async def test_translated_request_drops_speed_and_fallbacks(build: Build) -> None:
    up = Scripted(lambda path, body, key: chat_ok())
    gw = await build("openai", up, "openai/gpt-4o-mini", fields={"pricing": "openrouter"})
    secret = await create_key(gw, budget_tokens=10**9)  # (a USD budget is refused `fallbacks`)
    body = MSG | {"speed": "fast", "fallbacks": [{"model": OPUS, "speed": "fast"}]}
    status, out = await call(gw, secret, "/v1/messages", body)
    assert status == 200, out
    sent = up.seen[0][1]
    assert "speed" not in sent and "fallbacks" not in sent, sent
