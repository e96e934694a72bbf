"""Attacks on the breakers with streams that break after their first byte.

A stream whose first byte went out is never retried, but how it ends is its account's verdict:
an upstream that breaks it (a reset, an error event) failed, one that finishes it succeeded,
and a client that hangs up says nothing of the upstream. Every streaming way through failover
is attacked: chat (passed through, in `tests.test_attack_routing`, and translated from an
Anthropic upstream), the Responses API (translated, and passed through to an upstream that
serves it), the Messages API (translated, and passed through to Anthropic) and legacy
completions. The rig is `tests.test_routing`'s (provider `a`, two accounts, then `b`;
failure_threshold 2, cooldown 30 s, the breakers on a clock of the test's).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer

from gateway.settings import AnthropicConfig, ModelConfig, OpenAIConfig, Target
from gateway.state import USAGE_KEY
from tests.conftest import NEVER_HANG, MakeSettings, app_of, create_key, router_of, start_gateway
from tests.fake_anthropic import FakeAnthropic
from tests.fakes import FakeOpenAI
from tests.test_routing import CHAT, HI, KEYS, ROUTING, Clock, Rig, make_rig

A0, A1, B0 = ("a", 0), ("a", 1), ("b", 0)
STREAM = {**HI, "stream": True}
RESPONSES = {"model": "m", "input": "hello there", "stream": True}
MESSAGES = {"model": "m", "max_tokens": 50, "messages": HI["messages"], "stream": True}
COMPLETIONS = {"model": "m", "prompt": "hello there", "stream": True}

# way: (path, body, what only a whole stream ends with, upstream of `a`, `a`'s provider fields)
WAYS: dict[str, tuple[str, dict[str, Any], bytes, str, dict[str, Any]]] = {
    "chat-translated": (CHAT, STREAM, b"data: [DONE]", "anthropic", {}),
    "responses-translated": ("/v1/responses", RESPONSES, b"response.completed", "openai", {}),
    "responses-passed-through": (
        "/v1/responses",
        RESPONSES,
        b"response.completed",
        "openai",
        {"responses_api": True},
    ),
    "messages-translated": ("/v1/messages", MESSAGES, b"message_stop", "openai", {}),
    "messages-passed-through": ("/v1/messages", MESSAGES, b"message_stop", "anthropic", {}),
    "completions": ("/v1/completions", COMPLETIONS, b"data: [DONE]", "openai", {}),
}


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    return await make_rig(aiohttp_server, aiohttp_client, make_settings)


async def anthropic_rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    """The rig with an Anthropic upstream as `a` (two accounts), `b` still OpenAI's."""
    a, b = FakeAnthropic(), FakeOpenAI()
    await a.start(aiohttp_server)
    await b.start(aiohttp_server)
    settings = make_settings(
        routing=ROUTING,
        providers=(
            AnthropicConfig(name="a", base_url=a.base_url, api_keys=KEYS),
            OpenAIConfig(name="b", base_url=b.base_url, api_keys=("key-b",)),
        ),
        models=(
            ModelConfig(
                name="m",
                targets=(
                    Target(provider="a", model="claude-a"),
                    Target(provider="b", model="gpt-b", priority=1),
                ),
            ),
        ),
    )
    gw = await start_gateway(aiohttp_client, settings)
    clock = Clock()
    router_of(gw).breakers.clock = clock
    return Rig(a, b, gw, await create_key(gw), clock)  # type: ignore[arg-type]


@pytest.mark.parametrize("fault", ["drop_after", "error_after"], ids=["reset", "event"])
@pytest.mark.parametrize("way", list(WAYS))
async def test_every_streaming_way_takes_a_target_that_breaks_its_streams_out(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    way: str,
    fault: str,
) -> None:
    """`a` breaks every stream after its first event reached the client: each of those is a
    failed request of its account (no failover: a byte went out), so after two per account
    both are out, and the next stream is whole, from `b`."""
    path, body, whole, kind, fields = WAYS[way]
    if kind == "anthropic":
        rig = await anthropic_rig(aiohttp_server, aiohttp_client, make_settings)
        after = 4  # message_start, content_block_start, ping, then the first text
    else:
        rig = await make_rig(aiohttp_server, aiohttp_client, make_settings, **fields)
        after = 1
    rig.a.always(**{fault: after})
    headers = {"Authorization": f"Bearer {rig.key}"}
    for _ in range(4):  # two per account of `a` (they take turns); threshold: 2
        async with rig.gw.post(path, json=body, headers=headers) as resp:
            assert resp.status == 200 and resp.headers["x-gateway-provider"] == "a"
            got = await resp.read()
        assert b"error" in got and whole not in got, got
    assert [rig.breakers.state(a) for a in (A0, A1, B0)] == ["open", "open", "closed"]
    async with rig.gw.post(path, json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.headers["x-gateway-provider"] == "b"
        got = await resp.read()
    assert whole in got, got


async def test_a_whole_stream_clears_its_account_s_failures(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    """A stream that ends cleanly is its account's success: a break before it is forgotten,
    so a target that breaks now and then is not taken out for breaks far apart."""
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings)
    for _ in range(3):
        rig.a.script(drop_after=1, times=2)  # one broken stream per account of `a`
        rig.a.script(times=2)  # then a whole one each
        for _ in range(4):
            async with rig.post(STREAM) as resp:
                assert resp.headers["x-gateway-provider"] == "a"
                await resp.read()
    assert [rig.breakers.state(a) for a in (A0, A1)] == ["closed"] * 2
    assert [rig.breakers.recent_failures(a)[0] for a in (A0, A1)] == [0, 0]


async def _hang_up_mid_stream(rig: Rig, recorded: int) -> None:
    """Start a stream on a raw socket, close it once the first event arrived, and wait until
    the gateway is done with the request (its usage row is queued)."""
    payload = json.dumps(STREAM).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {rig.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(rig.gw.host, rig.gw.port)
    try:
        writer.write(head + payload)
        await writer.drain()
        got = b""
        async with asyncio.timeout(NEVER_HANG):
            while b"data: " not in got:
                chunk = await reader.read(65536)
                assert chunk, got
                got += chunk
        assert got.startswith(b"HTTP/1.1 200") and b"x-gateway-provider: a" in got.lower()
    finally:
        writer.close()
    async with asyncio.timeout(NEVER_HANG):
        await app_of(rig.gw)[USAGE_KEY].wait_recorded(recorded)


async def test_a_client_hanging_up_mid_stream_is_no_failure_of_the_target(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    """Clients hang up on `a`'s streams after their first event, twice per account (the
    threshold): neither account counts a failure, and `a` keeps answering."""
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings)
    rig.a.always(hold=asyncio.Event(), hold_after=1)  # one chunk, then nothing until hung up
    for n in range(1, 5):
        await _hang_up_mid_stream(rig, n)
    assert [rig.breakers.state(a) for a in (A0, A1)] == ["closed"] * 2
    assert [rig.breakers.recent_failures(a)[0] for a in (A0, A1)] == [0, 0]
    rig.a.always()
    async with rig.post(STREAM) as resp:
        assert resp.headers["x-gateway-provider"] == "a"
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")


async def _open_both(rig: Rig) -> None:
    """Take both accounts of `a` out with broken streams, then let their cooldown pass."""
    rig.a.always(drop_after=1)
    for _ in range(4):
        async with rig.post(STREAM) as resp:
            await resp.read()
    assert [rig.breakers.state(a) for a in (A0, A1)] == ["open"] * 2
    rig.clock.now += ROUTING.cooldown
    assert [rig.breakers.state(a) for a in (A0, A1)] == ["half-open"] * 2


async def test_a_probe_stream_puts_its_account_back_at_its_first_byte(rig: Rig) -> None:
    """docs/routing.md: a half-open account's probe that answers puts it back; for a stream,
    at its first byte (requests flow again while it streams), and its clean end keeps it."""
    await _open_both(rig)
    release = asyncio.Event()
    rig.a.always(hold=release, hold_after=1)
    async with rig.post(STREAM) as resp:
        assert resp.status == 200 and resp.headers["x-gateway-provider"] == "a"
        async with asyncio.timeout(NEVER_HANG):
            await resp.content.readuntil(b"\n\n")  # the first event is out; the rest held
        probed = [a for a in (A0, A1) if rig.breakers.state(a) == "closed"]
        assert len(probed) == 1
        release.set()
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert rig.breakers.state(probed[0]) == "closed"
    assert rig.breakers.recent_failures(probed[0])[0] == 0


async def test_a_probe_stream_that_breaks_takes_its_account_out_again(rig: Rig) -> None:
    """A probe is one request: its stream breaking after the first byte is a failed probe,
    and the account is out for another cooldown (not let back for `threshold` more breaks)."""
    await _open_both(rig)
    async with rig.post(STREAM) as resp:
        assert resp.headers["x-gateway-provider"] == "a"
        assert b'"error"' in await resp.read()
    states = sorted(rig.breakers.state(a) for a in (A0, A1))
    assert states == ["half-open", "open"]  # the probed one is out again; the other unprobed
    assert max(rig.breakers.remaining(a) for a in (A0, A1)) == ROUTING.cooldown
