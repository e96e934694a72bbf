"""How a Gemini or Anthropic stream the upstream breaks is charged, and one that fails first.

A stream that reached the client and then broke (an error event, the connection dropped) is
charged what the upstream reported so far, as a stream the client cuts is
(`tests/test_cut_stream_usage.py`): Anthropic's `message_start` counts with the streamed text's
estimate, Gemini's last `usageMetadata`. A stream whose first event is an error reaches the
client as an HTTP status and is charged nothing, as the upstream's own error status would be
(not `message_start`'s counts either); when another route then answers, only its answer is
charged. The upstreams are raw TCP servers (`test_cut_stream_usage.Upstream`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, RoutingSettings, Target
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    create_key,
    provider_config,
    start_gateway,
)
from tests.test_cut_stream_usage import (
    ANTHROPIC_BEGUN,
    BLOCK,
    HEAD,
    PATHS,
    START,
    Upstream,
    charged,
    counts,
    delta,
    event,
    gemini_chunk,
    request,
)

OVERLOADED = event(
    {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error"
)
GEMINI_ERROR = event({"error": {"code": 503, "message": "Overloaded.", "status": "UNAVAILABLE"}})
END = (
    event({"type": "content_block_stop", "index": 0}, "content_block_stop")
    + event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 7},
        },
        "message_delta",
    )
    + event({"type": "message_stop"}, "message_stop")
)


class Dropping(Upstream):
    """Writes its reply, then drops the connection (no end of the stream)."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply, hold=False)


Build = Callable[..., Awaitable[tuple[TestClient[Any, Any], str]]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    servers: list[asyncio.Server] = []

    async def make(kind: str, *upstreams: Upstream) -> tuple[TestClient[Any, Any], str]:
        """A model with a route to each upstream (providers of `kind`), tried in their order."""
        providers, targets = [], []
        for n, up in enumerate(upstreams):
            server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
            servers.append(server)
            port = server.sockets[0].getsockname()[1]
            providers.append(
                provider_config(
                    kind,
                    name=f"up{n}",
                    base_url=f"http://127.0.0.1:{port}",
                    api_keys=("sk-up-0123456789",),
                )
            )
            targets.append(Target(provider=f"up{n}", model="m-1", priority=n))
        model = ModelConfig(name="m", targets=tuple(targets))
        routing = RoutingSettings(max_attempts=len(upstreams), backoff_initial=0.0)
        settings = make_settings(providers=tuple(providers), models=(model,), routing=routing)
        gw = await start_gateway(aiohttp_client, settings)
        return gw, await create_key(gw, budget_tokens=100_000)

    yield make
    for server in servers:
        server.close()


async def post(gw: TestClient[Any, Any], secret: str, path: str) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {secret}"}
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post(path, json=request(path), headers=headers)
        return resp.status, await resp.read()


def broken(path: str) -> int:
    """The status a stream broken by an overload records (Messages routes: Anthropic's)."""
    return 529 if path == "/v1/messages" else 503


# --- broken after content: what the upstream reported counts --------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("how", ["error_event", "dropped"])
async def test_a_broken_anthropic_stream_is_charged_message_starts_counts(
    build: Build, path: str, how: str
) -> None:
    if how == "error_event":
        up: Upstream = Upstream(ANTHROPIC_BEGUN + OVERLOADED)
    else:
        up = Dropping(ANTHROPIC_BEGUN)
    gw, secret = await build("anthropic", up)
    status, body = await post(gw, secret, path)
    assert status == 200 and b"omega" in body and b"error" in body, body
    row, spent = await charged(gw, secret)
    if how == "error_event":
        assert row["status"] == broken(path)
    assert row["status"] >= 500, row  # (a dropped connection: 502, or 500 on Messages routes)
    # As for a cut stream: message_start's counts, its output the 1,200 characters streamed.
    assert counts(row)[1:] == (1, 1_000, 300, 40, 60), row
    assert spent == 1_000 + 300


@pytest.mark.parametrize("how", ["error_event", "dropped"])
async def test_a_broken_gemini_stream_is_charged_its_last_running_count(
    build: Build, how: str
) -> None:
    first = {"promptTokenCount": 900, "candidatesTokenCount": 40, "totalTokenCount": 940}
    last = {"promptTokenCount": 900, "candidatesTokenCount": 90, "totalTokenCount": 990}
    reply = HEAD + gemini_chunk("first ", first) + gemini_chunk("second ", last)
    up = Upstream(reply + GEMINI_ERROR) if how == "error_event" else Dropping(reply)
    gw, secret = await build("gemini", up)
    status, body = await post(gw, secret, "/v1/chat/completions")
    assert status == 200 and b"second" in body and b"error" in body, body
    row, spent = await charged(gw, secret)
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (1, 900, 90)
    assert row["status"] >= 500, row
    assert spent == 990


# --- failed at the first event: nothing charged ----------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_an_anthropic_stream_overloaded_after_message_start_is_charged_nothing(
    build: Build, path: str
) -> None:
    """message_start reported the input; the overload that follows is a status, not charged."""
    up = Upstream(HEAD + event(START, "message_start") + OVERLOADED)
    gw, secret = await build("anthropic", up)
    status, _ = await post(gw, secret, path)
    assert status == broken(path)
    row, spent = await charged(gw, secret)
    assert counts(row) == (broken(path), 0, 0, 0, 0, 0), row
    assert (row["cost_usd"], spent) == (0.0, 0)


@pytest.mark.parametrize("path", PATHS)
async def test_after_a_first_event_error_only_the_answering_route_is_charged(
    build: Build, path: str
) -> None:
    failing = Upstream(HEAD + event(START, "message_start") + OVERLOADED)
    answering = Upstream(ANTHROPIC_BEGUN + END)
    gw, secret = await build("anthropic", failing, answering)
    status, body = await post(gw, secret, path)
    assert status == 200 and b"omega" in body, body
    assert failing.seen.is_set()
    row, spent = await charged(gw, secret)
    # The answer's own usage, not estimated; nothing of the failed attempt's message_start.
    assert counts(row) == (200, 0, 1_000, 7, 40, 60), row
    assert spent == 1_007


async def test_a_gemini_stream_failing_first_then_answered_elsewhere_is_charged_the_answer(
    build: Build,
) -> None:
    usage = {"promptTokenCount": 900, "candidatesTokenCount": 40, "totalTokenCount": 940}
    failing = Upstream(HEAD + GEMINI_ERROR)
    answering = Dropping(
        HEAD
        + gemini_chunk("first ", None)
        + event(
            {
                "candidates": [
                    {
                        "content": {"role": "model", "parts": [{"text": "end"}]},
                        "finishReason": "STOP",
                    }
                ],
                "usageMetadata": usage,
                "modelVersion": "m-1",
            }
        )
    )
    gw, secret = await build("gemini", failing, answering)
    status, body = await post(gw, secret, "/v1/chat/completions")
    assert status == 200 and b"end" in body, body
    row, spent = await charged(gw, secret)
    assert (row["status"], row["estimated"], row["prompt_tokens"]) == (200, 0, 900), row
    assert spent == 940


async def test_a_delta_before_the_error_in_one_read_is_content(build: Build) -> None:
    """Content and an error event in one read: the content goes out (a 200), so the stream
    broke after content and is charged message_start's counts."""
    reply = HEAD + event(START, "message_start") + event(BLOCK, "content_block_start")
    gw, secret = await build("anthropic", Upstream(reply + delta("alpha " * 100) + OVERLOADED))
    status, body = await post(gw, secret, "/v1/chat/completions")
    assert status == 200 and b"alpha" in body, body
    row, _ = await charged(gw, secret)
    assert counts(row) == (503, 1, 1_000, 150, 40, 60), row
