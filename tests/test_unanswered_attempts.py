"""Attempts the gateway stopped waiting for are charged their prompt: the upstream had it.

An attempt that timed out after its request went upstream may be billed by the upstream (which
may still be generating); one whose connection never opened, or that the upstream answered
with an error, is not. A request's usage row (and so its key's budget) counts the prompt's
estimate once for each attempt given up on, on top of what the answering attempt used.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp.pytest_plugin import AiohttpClient

from gateway.errors import UpstreamTimeout
from gateway.providers._errors import upstream_failure
from gateway.settings import ModelConfig, RoutingSettings, Target
from gateway.state import GATE_KEY, KEYS_KEY, USAGE_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    provider_config,
    start_gateway,
    usage_rows,
)
from tests.raw_upstream import read_request

ANSWER = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "m-1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1_000, "completion_tokens": 5, "total_tokens": 1_005},
}


class FirstHangs:
    """An upstream whose first connection takes the request and never answers; later ones
    answer `ANSWER` at once."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            self.requests += 1
            if self.requests == 1:
                await reader.read()  # until the gateway gives up and closes
                return
            body = json.dumps(ANSWER).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_an_attempt_given_up_on_adds_its_prompt_to_the_answering_ones_usage(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    up = FirstHangs()
    await up.start()
    assert up.server is not None
    try:
        cfg = provider_config(
            "openai",
            name="up",
            base_url=f"http://127.0.0.1:{up.port}/v1",
            api_keys=("sk-upstream-0123456789abcdefghij",),
            read_timeout=0.2,
            total_timeout=0.2,
        )
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        routing = RoutingSettings(max_attempts=2, backoff_initial=0.01, backoff_max=0.01)
        gw = await start_gateway(
            aiohttp_client, make_settings(providers=(cfg,), models=(model,), routing=routing)
        )
        secret = await create_key(gw, budget_tokens=100_000)
        body = {"model": "m", "messages": [{"role": "user", "content": "word " * 800}]}
        async with gw.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
        ) as resp:
            assert resp.status == 200, await resp.text()
        assert up.requests == 2
        app = app_of(gw)
        async with asyncio.timeout(NEVER_HANG):
            await app[USAGE_KEY].wait_recorded(1)
        (row,) = await usage_rows(gw)
        # The answer's own 1,000 prompt tokens, and about 1,000 more for the attempt that
        # timed out with the same prompt upstream (four characters a token).
        assert 1_900 <= row["prompt_tokens"] <= 2_200, row
        assert row["completion_tokens"] == 5
        assert row["estimated"]
        record = app[KEYS_KEY].lookup(secret)
        assert record is not None
        spend = await app[GATE_KEY].spending(record)
        assert spend is not None and spend.tokens == row["prompt_tokens"] + 5
    finally:
        up.server.close()


def test_only_a_timeout_after_the_request_went_out_is_unanswered() -> None:
    """A connection that never opened had no prompt to bill; an upstream's own 504 answered."""
    cases: list[tuple[BaseException, bool]] = [
        (TimeoutError(), True),
        (aiohttp.ServerTimeoutError("read"), True),
        (aiohttp.ConnectionTimeoutError("connect"), False),
    ]
    for exc, unanswered in cases:
        err: Any = upstream_failure("up", exc)
        assert type(err) is UpstreamTimeout
        assert err.unanswered is unanswered, exc
    assert UpstreamTimeout("answered 504").unanswered is False
