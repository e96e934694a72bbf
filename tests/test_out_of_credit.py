"""An upstream account whose credit is spent (OpenAI's `insufficient_quota` 429, the 402 of
OpenRouter and DeepSeek, Anthropic's "credit balance is too low" 400) is the operator's
problem: its account is taken out like one whose key is refused, the request goes on to
another account, and a client left without one gets a 503 it is told not to retry."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import create_key
from tests.raw_upstream import RawUpstream, auth
from tests.test_attack_h105 import Build, build

__all__ = ["build"]  # (the fixture, shared with the attack tests on what upstreams bill)

ASK = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def answer(status: str, error: dict[str, Any]) -> bytes:
    body = json.dumps({"type": "error", "error": error}).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


OPENAI_QUOTA = answer(
    "429 Too Many Requests",
    {
        "message": "You exceeded your current quota, please check your plan and billing "
        "details (org-acme).",
        "type": "insufficient_quota",
        "code": "insufficient_quota",
    },
)
ANTHROPIC_CREDIT = answer(
    "400 Bad Request",
    {
        "type": "invalid_request_error",
        "message": "Your credit balance is too low to access the Anthropic API. Please go to "
        "Plans & Billing to upgrade or purchase credits.",
    },
)
PAYMENT = answer("402 Payment Required", {"message": "Insufficient balance (acme)"})


@pytest.mark.parametrize(
    ("kind", "reply"),
    [("openai", OPENAI_QUOTA), ("openai", PAYMENT), ("anthropic", ANTHROPIC_CREDIT)],
    ids=["insufficient_quota", "402", "anthropic"],
)
async def test_a_spent_account_is_taken_out_and_not_retried(
    build: Build, kind: str, reply: bytes
) -> None:
    up = RawUpstream(reply, hold=False)
    gw = await build(kind, up, "some-model")
    secret = await create_key(gw)
    for _ in range(3):
        resp = await gw.post("/v1/chat/completions", json=ASK, headers=auth(secret))
        body = await resp.json()
        assert resp.status == 503, body
        assert body["error"]["code"] == "upstream_quota_exhausted"
        assert resp.headers["x-should-retry"] == "false"
        # The upstream's text names the operator's account: never relayed.
        assert "acme" not in body["error"]["message"]
        assert "Plans & Billing" not in body["error"]["message"]
    # One attempt reached the upstream: not retried, and the account then waits for the
    # operator (`auth_cooldown`) instead of failing every request again.
    assert len(up.paths) == 1, up.paths


# The openai SDK takes the answer's word and does not retry it either.
async def test_the_sdk_does_not_retry_a_spent_account(build: Build) -> None:
    up = RawUpstream(OPENAI_QUOTA, hold=False)
    gw = await build("openai", up, "some-model")
    secret = await create_key(gw)
    client = openai.AsyncOpenAI(api_key=secret, base_url=str(gw.make_url("/v1")), max_retries=2)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    await client.close()
    assert caught.value.code == "upstream_quota_exhausted"
    assert len(up.paths) == 1
