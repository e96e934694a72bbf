"""Attack on 1b21598's accounting (helper-96): Exchange.sent, UsageTally.final, _output_sent.

Each failing test is a way the accounting charges a key other than the documented (or
reasonable) amount; the comment above it says what is wrong and what should happen. The
passing tests pin properties verified here that no other test covers. The harness is
test_attack_accounting3's (raw TCP upstreams that write their bytes, then hold or close).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.settings import RoutingSettings
from tests import test_attack_accounting3
from tests.conftest import NEVER_HANG, create_key
from tests.test_attack_accounting3 import (
    ANSWER,
    CHAT,
    ESTIMATE,
    PRICES,
    Build,
    auth,
    block_start,
    block_stop,
    charged,
    cut_after,
    start_with,
    text_delta,
    whole,
)
from tests.test_cut_stream_usage import HEAD, Upstream, event

build = test_attack_accounting3.build  # the fixture: a gateway over raw TCP upstreams

STATUS_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b'Content-Length: 43\r\nConnection: close\r\n\r\n{"error":{"message":"busy","type":"x"}}   '
)


def early_delta(output: int) -> bytes:
    """A `message_delta` with a usage but no stop_reason, before any content: real Anthropic
    never sends one (its one `message_delta` comes after the last block, with the stop_reason,
    right before `message_stop`), but the stream order accepts it."""
    payload = {
        "type": "message_delta",
        "delta": {"stop_reason": None, "stop_sequence": None},
        "usage": {"output_tokens": output},
    }
    return event(payload, "message_delta")


def thinking_delta(index: int, text: str) -> bytes:
    payload: dict[str, Any] = {"type": "content_block_delta", "index": index}
    payload["delta"] = {"type": "thinking_delta", "thinking": text}
    return event(payload, "content_block_delta")


LONG = "word " * 800  # 4,000 characters: 1,000 tokens at four characters a token


# --- (a) UsageTally.final set by an early message_delta ------------------------------------


# WRONG: 1b21598 makes any `message_delta` with a usage the stream's "final" count
# (`UsageTally.final = event.usage is not UNSET`), and the pass-through already took every
# `message_delta`'s usage as the call's whole usage (`passthrough._account`). An upstream
# that sends `message_delta` with `output_tokens: 1` before its content (the stream order
# allows it; real Anthropic sends its one message_delta last, with the stop_reason), then
# thinks and answers at length, then is cut: the cut stream is charged 1 output token, with
# `estimated = 0` (the row says "exact"), and neither the reasoning rule (3,000, the limit it
# was sent) nor the streamed-text floor (1,000 tokens of thinking streamed) applies. Right:
# the count is final only when nothing follows it, i.e. a `message_delta` that carries a
# stop_reason and after which no content block event came (a content event after it clears
# `final`, or is refused as out of order); the pass-through's count taken at message_delta is
# likewise "so far" (`usage_estimated`) until `message_stop`.
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_an_early_message_delta_does_not_make_a_cut_reasoning_stream_cheap(
    build: Build, path: str
) -> None:
    reply = (
        HEAD
        + start_with({"input_tokens": 900, "output_tokens": 1})
        + early_delta(1)
        + block_start(0, {"type": "thinking", "thinking": ""})
        + thinking_delta(0, LONG)
        + block_stop(0)
        + block_start(1, {"type": "text", "text": ""})
        + text_delta(1, "Hi")
    )
    gw = await build([("anthropic", Upstream(reply), {})], model={"reasoning": True})
    secret = await create_key(gw, budget_tokens=100_000)
    body: dict[str, Any] = CHAT | {"max_tokens": 3_000, "stream": True}
    await cut_after(gw, secret, path, body, b"Hi")
    row, _ = await charged(gw, secret)
    assert row["status"] == 499, row
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] >= 3_000, row


# WRONG, the same without a reasoning model: an upstream reporting input 0 at message_start
# (the case the prompt floor is for) and an early message_delta of output 0, then 4,000
# characters of text, cut: charged 0 prompt and 0 output tokens, `estimated = 0`. Right:
# still a cut stream's counts so far, so never below the prompt's estimate (307) and the
# streamed text at four characters a token (1,000), marked estimated.
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_an_early_message_delta_does_not_lift_a_cut_streams_floors(
    build: Build, path: str
) -> None:
    reply = (
        HEAD
        + start_with({"input_tokens": 0, "output_tokens": 0})
        + early_delta(0)
        + block_start(0, {"type": "text", "text": ""})
        + text_delta(0, LONG)
        + text_delta(0, "Hi")
    )
    gw = await build([("anthropic", Upstream(reply), {})])
    secret = await create_key(gw, budget_tokens=100_000)
    body: dict[str, Any] = CHAT | {"max_tokens": 3_000, "stream": True}
    await cut_after(gw, secret, path, body, b"Hi")
    row, tokens = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["prompt_tokens"] >= ESTIMATE, row
    assert row["completion_tokens"] >= 1_000, row
    assert tokens >= ESTIMATE + 1_000


# SOUND: a whole Anthropic stream of a reasoning model, thinking included, whose one
# message_delta (stop_reason, output 1,200) comes last as real Anthropic sends it, is charged
# exactly its usage, unestimated, at the configured prices (cost_usd matches the counts).
async def test_a_whole_thinking_stream_is_charged_exactly_its_usage(build: Build) -> None:
    reply = (
        HEAD
        + start_with({"input_tokens": 900, "output_tokens": 1})
        + block_start(0, {"type": "thinking", "thinking": ""})
        + thinking_delta(0, LONG)
        + block_stop(0)
        + block_start(1, {"type": "text", "text": ""})
        + text_delta(1, "Hi")
        + block_stop(1)
        + event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 1_200},
            },
            "message_delta",
        )
        + event({"type": "message_stop"}, "message_stop")
    )
    gw = await build(
        [("anthropic", Upstream(reply, hold=False), {})], model={"reasoning": True, **PRICES}
    )
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 3_000, "stream": True}
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post("/v1/chat/completions", json=body, headers=auth(secret))
        assert resp.status == 200, await resp.text()
        await resp.read()
    row, tokens = await charged(gw, secret)
    got = (row["status"], row["prompt_tokens"], row["completion_tokens"], row["estimated"])
    assert got == (200, 900, 1_200, 0), row
    assert row["cost_usd"] == pytest.approx((900 * 1.0 + 1_200 * 10.0) / 1e6), row
    assert tokens == 2_100


# --- (b) _output_sent for attempts given up on ----------------------------------------------


# WRONG: each attempt given up on is charged a reasoning model's output limit "as sent"
# (`_output_sent`), but `_account` works it out once, for `ex.provider`: the provider of the
# LAST attempt, not of each unanswered one. A model routed Anthropic first, OpenAI second, with
# a configured max_tokens of 1,000 and `reasoning_effort: high`: the Anthropic attempt was sent
# max_tokens 5,096 (1,000 + the 4,096 thinking budget on top; admission held that), timed out
# unanswered (the upstream may think all 5,096 tokens, billed), and OpenAI answered. The given-up
# attempt is charged 1,000 (OpenAI's limit). (The other order overcharges: an OpenAI attempt
# given up on is charged Anthropic's 5,096.) Right: each unanswered attempt charged the limit
# its own upstream was sent (record it per attempt, e.g. in `attempt_each` as it counts
# `unanswered`).
async def test_an_unanswered_anthropic_attempt_is_charged_its_own_thinking_budget(
    build: Build,
) -> None:
    silent = Upstream(b"")  # takes the prompt, says nothing
    quick = {"read_timeout": 0.3, "total_timeout": 0.3}
    good = Upstream(whole(ANSWER), hold=False)
    gw = await build(
        [("anthropic", silent, quick), ("openai", good, {})],
        model={"reasoning": True, "max_tokens": 1_000},
        routing=RoutingSettings(max_attempts=2, backoff_initial=0.0),
    )
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"reasoning_effort": "high"}
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post("/v1/chat/completions", json=body, headers=auth(secret))
        assert resp.status == 200, await resp.text()
    (sent,) = silent.bodies
    assert sent["max_tokens"] == 5_096, sent
    row, _ = await charged(gw, secret)
    # the answer's 10 + 2, and the given-up attempt's prompt estimate and limit as sent
    assert row["prompt_tokens"] == 10 + ESTIMATE, row
    assert row["completion_tokens"] >= 2 + 5_096, row


# --- (c) Exchange.sent ----------------------------------------------------------------------


# SOUND: `sent` is set False before a backoff, and a later attempt that was sent puts it back
# (from HANDED in the cancelled attempt): a client that hangs up while its second attempt
# (after a 503 and the backoff) waits for the answer is charged the prompt's estimate and, on
# a reasoning model, its output limit; the 503 attempt costs nothing.
@pytest.mark.parametrize("reasoning", [False, True])
async def test_a_hang_up_on_the_attempt_after_a_backoff_is_charged(
    build: Build, reasoning: bool
) -> None:
    busy = Upstream(STATUS_503, hold=False)
    silent = Upstream(b"")
    gw = await build(
        [("openai", busy, {}), ("openai", silent, {"read_timeout": 60.0})],
        model={"reasoning": reasoning},
        routing=RoutingSettings(max_attempts=2, backoff_initial=0.01),
    )
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 3_000, "stream": True}
    task = asyncio.create_task(gw.post("/v1/chat/completions", json=body, headers=auth(secret)))
    await asyncio.wait_for(silent.seen.wait(), NEVER_HANG)
    task.cancel()
    row, tokens = await charged(gw, secret)
    assert row["status"] == 499, row
    completion = 3_000 if reasoning else 0
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        ESTIMATE,
        completion,
        1,
    ), row
    assert tokens == ESTIMATE + completion


# SOUND: a hang-up in the backoff after an attempt given up on (sent, unanswered) is charged
# that attempt (the prompt's estimate) and nothing for the backoff: unanswered and sent do
# not double-count or cancel out.
async def test_a_hang_up_in_the_backoff_after_an_unanswered_attempt_charges_it_once(
    build: Build,
) -> None:
    silent = Upstream(b"")
    never = Upstream(b"")
    quick = {"read_timeout": 0.2, "total_timeout": 0.2}
    gw = await build(
        [("openai", silent, quick), ("openai", never, {})],
        routing=RoutingSettings(max_attempts=2, backoff_initial=30.0, backoff_max=30.0),
    )
    secret = await create_key(gw, budget_tokens=100_000)
    task = asyncio.create_task(gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret)))
    await asyncio.wait_for(silent.closed.wait(), NEVER_HANG)  # given up on: now backing off
    task.cancel()
    row, tokens = await charged(gw, secret)
    assert not never.seen.is_set()
    assert row["status"] == 499, row
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (ESTIMATE, 0, 1)
    assert tokens == ESTIMATE


# --- (d) a whole answer without usage ---------------------------------------------------------

NO_USAGE = {k: v for k, v in ANSWER.items() if k != "usage"} | {
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": LONG}, "finish_reason": "stop"}
    ]
}


# WRONG: an OpenAI-compatible upstream whose whole (non-streamed) answer carries no `usage`
# (some compatible servers omit it) is charged the prompt's estimate and 0 completion tokens
# (`_chunks_charged`: a JSON answer has no chunks), and a reasoning model not its limit
# either (`_reasoning_charged` applies to streams and hang-ups only): 4,000 characters of
# answer (and any hidden reasoning) cost a budgeted key nothing. Right: an answer without usage
# is estimated like a cut stream's: at least its text at four characters a token, and a
# reasoning model its output limit (its thinking is counted nowhere else).
@pytest.mark.parametrize("reasoning", [False, True])
async def test_a_whole_answer_without_usage_is_charged_its_output(
    build: Build, reasoning: bool
) -> None:
    gw = await build(
        [("openai", Upstream(whole(NO_USAGE), hold=False), {})], model={"reasoning": reasoning}
    )
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 3_000}
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post("/v1/chat/completions", json=body, headers=auth(secret))
        assert resp.status == 200, await resp.text()
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["prompt_tokens"] == ESTIMATE, row
    assert row["completion_tokens"] >= (3_000 if reasoning else 1_000), row
