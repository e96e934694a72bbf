"""OpenAI's processing tiers priced apart (`service_tier`: "priority", "flex"): a request is
charged at the rates of the tier its answer says it was served at, from the price list, and
one asking for priority processing is held at its rates.

gpt-4o-mini in the bundled price list: $0.15 / $0.60 a million tokens, priority $0.25 / $1.00;
gpt-5-mini $0.25 / $2, flex $0.125 / $1.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import create_key
from tests.raw_upstream import RawUpstream, auth
from tests.test_attack_h105 import (
    Build,
    build,
    completion,
    message_item,
    mtok,
    post,
    response_body,
    responses_event,
    row_and_spend,
    whole,
)

__all__ = ["build"]  # (the fixture, shared with the attack tests on what upstreams bill)

USAGE = {"prompt_tokens": 10_000, "completion_tokens": 1_000, "total_tokens": 11_000}
ASK = {
    "model": "m",
    "max_tokens": 1_000,
    "messages": [{"role": "user", "content": "x " * 10_000}],
}
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def served_at(tier: Any) -> bytes:
    reply = json.loads(completion(USAGE).split(b"\r\n\r\n", 1)[1])
    reply["service_tier"] = tier
    return whole(reply)


# A request sent without a tier (or "auto") on a project whose default is priority
# processing is served and billed at priority: the answer says so, and that is charged.
@pytest.mark.parametrize("asked", [{}, {"service_tier": "auto"}, {"service_tier": "default"}])
async def test_an_answer_served_at_priority_is_charged_its_rates(
    build: Build, asked: dict[str, Any]
) -> None:
    up = RawUpstream(served_at("priority"), hold=False)
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=5.0)
    status, answer = await post(gw, secret, "/v1/chat/completions", ASK | asked)
    assert status == 200 and answer["service_tier"] == "priority", answer
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(mtok(10_000, 0.25) + mtok(1_000, 1.0))
    assert spend.usd == pytest.approx(row["cost_usd"])


async def test_flex_is_charged_its_rates(build: Build) -> None:
    up = RawUpstream(served_at("flex"), hold=False)
    gw = await build("openai", up, "gpt-5-mini")
    secret = await create_key(gw, budget_usd=5.0)
    status, answer = await post(gw, secret, "/v1/chat/completions", ASK | {"service_tier": "flex"})
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(mtok(10_000, 0.125) + mtok(1_000, 1.0))


# What is not a tier priced apart is charged the standard rates, and breaks nothing.
@pytest.mark.parametrize("tier", ["default", "PRIORITY", "scale", None, 5, {"a": 1}, ["flex"]])
async def test_other_tiers_are_standard(build: Build, tier: Any) -> None:
    up = RawUpstream(served_at(tier), hold=False)
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=5.0)
    status, answer = await post(gw, secret, "/v1/chat/completions", ASK)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(mtok(10_000, 0.15) + mtok(1_000, 0.6))


# A stream says its tier in its usage chunk, which the gateway reads whether or not the
# client asked for usage.
@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_served_at_priority_is_charged_its_rates(
    build: Build, include_usage: bool
) -> None:
    def chunk(**fields: Any) -> bytes:
        payload = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up"}
        return b"data: " + json.dumps(payload | fields).encode() + b"\n\n"

    events = [
        chunk(choices=[{"index": 0, "delta": {"content": "hi"}}], service_tier="priority"),
        chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        chunk(choices=[], usage=USAGE, service_tier="priority"),
        b"data: [DONE]\n\n",
    ]
    up = RawUpstream(STREAM_HEAD + b"".join(events), hold=False)
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=5.0)
    body = ASK | {"stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth(secret))
    text = await resp.text()
    assert resp.status == 200 and text.endswith("data: [DONE]\n\n"), text
    assert ('"usage"' in text) is include_usage
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(mtok(10_000, 0.25) + mtok(1_000, 1.0))


async def test_a_responses_pass_through_says_its_tier(build: Build) -> None:
    usage = {"input_tokens": 10_000, "output_tokens": 1_000, "total_tokens": 11_000}
    done = response_body(usage, [message_item("hi")]) | {"service_tier": "priority"}
    events = [
        responses_event("response.created", response=done | {"status": "in_progress"}),
        responses_event("response.completed", response=done),
    ]
    up = RawUpstream(STREAM_HEAD + b"".join(events), hold=False)
    gw = await build("openai", up, "gpt-4o-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=5.0)
    body = {"model": "m", "input": "hi", "max_output_tokens": 1_000, "stream": True}
    resp = await gw.post("/v1/responses", json=body, headers=auth(secret))
    assert "response.completed" in await resp.text()
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(mtok(10_000, 0.25) + mtok(1_000, 1.0))


# A request asking for priority processing is held at its rates: its likely 5,000 tokens in
# (20,000 characters) and 1,000 out are $0.00135 at standard rates and $0.00225 at priority,
# so a $0.002 budget admits the plain request and refuses the priority one (nothing of it
# goes upstream).
async def test_asking_for_priority_holds_its_rates(build: Build) -> None:
    up = RawUpstream(served_at("default"), hold=False)
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=0.002)
    status, answer = await post(
        gw, secret, "/v1/chat/completions", ASK | {"service_tier": "priority"}
    )
    assert status == 429 and answer["error"]["code"] == "insufficient_quota", answer
    assert up.bodies == []
    status, answer = await post(gw, secret, "/v1/chat/completions", ASK)
    assert status == 200, answer
