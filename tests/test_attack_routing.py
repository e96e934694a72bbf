"""Attacks on routing, failover and the breakers with real faulty upstreams.

The promise under attack: one upstream blip must not take a model offline for everyone.
A model `m` has two targets (fake OpenAI upstreams `a`, two accounts, and `b`, the fallback;
the rig of `tests.test_routing`); faults are scripted per request: a single 5xx, reset or
timeout, a flapping target, every target failing then recovering, a retry storm of concurrent
requests, 4xx answers (the client's fault or the upstream's), 429s, streams failing before
and after their first byte, and failover between providers of different types.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer

from gateway.settings import ModelConfig, RoutingSettings, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    fake_provider,
    openai_client,
    sse_events,
    start_fakes,
    start_gateway,
)
from tests.test_routing import HI, Rig, make_rig

A0, A1, B0 = ("a", 0), ("a", 1), ("b", 0)


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    return await make_rig(aiohttp_server, aiohttp_client, make_settings)


def text(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["message"]["content"])


@pytest.mark.parametrize(
    "fault",
    [{"status": 500}, {"status": 502}, {"drop_before_response": True}],
    ids=["500", "502", "reset"],
)
async def test_one_blip_costs_nothing(rig: Rig, fault: dict[str, Any]) -> None:
    """One 5xx or reset on one account: the request is answered elsewhere, the next ones too,
    and the account stays in rotation."""
    rig.a.script(**fault)
    for _ in range(4):
        async with rig.post() as resp:
            assert resp.status == 200
            assert text(await resp.json()) == "echo: hello there"
    assert [rig.breakers.state(a) for a in (A0, A1, B0)] == ["closed"] * 3
    assert len(rig.a.chat_requests) == 5  # the blip, its retry, then one per request


async def test_a_flapping_target_never_fails_a_request(rig: Rig) -> None:
    """Every other attempt on `a` fails: each request is still answered."""
    for _ in range(6):
        rig.a.script(status=503)
        rig.a.script()
    for _ in range(6):
        async with rig.post() as resp:
            assert resp.status == 200
    assert not rig.b.chat_requests  # `a`'s other account answered each time


async def test_a_4xx_from_the_upstream_that_blames_the_request_burns_nothing_else(
    rig: Rig,
) -> None:
    for status, relayed in ((400, 400), (404, 404), (413, 413), (422, 400)):
        rig.a.script(status=status)
        async with rig.post() as resp:
            assert resp.status == relayed
    assert len(rig.a.chat_requests) == 4 and not rig.b.chat_requests
    assert [rig.breakers.state(a) for a in (A0, A1)] == ["closed"] * 2
    assert rig.breakers.recent_failures(A0)[0] == rig.breakers.recent_failures(A1)[0] == 0


@pytest.mark.parametrize("status", [405, 410, 421, 501])
async def test_a_target_that_cannot_serve_fails_over(rig: Rig, status: int) -> None:
    """An upstream answering a status that says nothing about the request (a wrong base_url's
    405, a 410 for a retired endpoint, a misdirected 421, a 501) is the target's fault: the
    request goes to the next route instead of failing with a 502."""
    rig.a.always(status=status)
    async with rig.post() as resp:
        assert resp.status == 200, await resp.text()
    assert resp.headers["x-gateway-provider"] == "b"


async def test_a_429_fails_over_and_the_account_comes_back(rig: Rig) -> None:
    rig.a.script(status=429, headers={"retry-after": "5"})
    async with rig.post() as resp:
        assert resp.status == 200
    assert rig.breakers.state(A0) == "open"
    rig.clock.now += 5
    assert rig.breakers.state(A0) == "half-open"
    for _ in range(2):
        async with rig.post() as resp:
            assert resp.status == 200
    assert rig.breakers.state(A0) == "closed"
    assert not rig.b.chat_requests


async def test_every_target_failing_then_recovering(rig: Rig) -> None:
    """Every target down: breakers open, but requests still reach the upstreams (panic
    mode); as soon as they recover the model answers, with no 503 in between."""
    rig.a.always(status=500)
    rig.b.always(status=500)
    for _ in range(3):
        async with rig.post() as resp:
            assert resp.status == 503  # an upstream 5xx is the gateway's 503 upstream_error
    assert [rig.breakers.state(a) for a in (A0, A1, B0)] == ["open"] * 3
    seen = len(rig.a.chat_requests) + len(rig.b.chat_requests)
    async with rig.post() as resp:
        assert resp.status == 503
    # Each account at most once in panic mode: a dead upstream is not hammered.
    assert len(rig.a.chat_requests) + len(rig.b.chat_requests) - seen <= 3
    rig.a.always()
    rig.b.always()
    async with rig.post() as resp:  # recovered: the very next request is answered
        assert resp.status == 200


async def test_a_retry_storm_is_bounded(rig: Rig) -> None:
    """50 concurrent requests while `a` fails: each tries at most max_attempts times, and
    once `a`'s breakers open it stops being tried."""
    rig.a.always(status=500)
    results = await asyncio.gather(*(_status(rig) for _ in range(50)))
    assert results == [200] * 50
    assert len(rig.a.chat_requests) + len(rig.b.chat_requests) <= 50 * 3
    assert len(rig.b.chat_requests) == 50
    before = len(rig.a.chat_requests)
    assert await asyncio.gather(*(_status(rig) for _ in range(20))) == [200] * 20
    assert len(rig.a.chat_requests) == before  # a's breakers are open: b answers alone


async def _status(rig: Rig) -> int:
    async with rig.post() as resp:
        await resp.read()
        return resp.status


async def test_a_retry_after_from_every_target_is_not_amplified(rig: Rig) -> None:
    """Every account answers 503 with retry-after: each is tried once, and the next requests
    are refused locally with the remaining wait instead of hitting the upstreams again."""
    rig.a.always(status=503, headers={"retry-after": "7"})
    rig.b.always(status=503, headers={"retry-after": "9"})
    async with rig.post() as resp:
        assert resp.status == 503
        assert resp.headers["retry-after"] == "7"
    tried = len(rig.a.chat_requests) + len(rig.b.chat_requests)
    assert tried == 3
    for _ in range(5):
        async with rig.post() as resp:
            assert resp.status == 503
    assert len(rig.a.chat_requests) + len(rig.b.chat_requests) == tried


async def test_a_stream_failing_before_its_first_byte_fails_over_after_it_does_not(
    rig: Rig,
) -> None:
    rig.a.script(drop_before_response=True)
    async with rig.post({**HI, "stream": True}) as resp:
        assert resp.status == 200
        events = sse_events(await resp.read())
    assert "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")
    )
    rig.a.script(drop_after=2)
    async with rig.post({**HI, "stream": True}) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert b'"error"' in body and len(rig.a.chat_requests) == 3  # no retry after the first byte


async def test_failover_from_openai_to_anthropic_keeps_the_chat_shape(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    fakes = await start_fakes(aiohttp_server, "openai", "anthropic")
    settings = make_settings(
        routing=RoutingSettings(backoff_initial=0.001, backoff_max=0.002),
        providers=(
            fake_provider("openai", fakes["openai"]),
            fake_provider("anthropic", fakes["anthropic"]),
        ),
        models=(
            ModelConfig(
                name="m",
                targets=(
                    Target(provider="openai", model="gpt-x"),
                    Target(provider="anthropic", model="claude-x", priority=1),
                ),
            ),
        ),
    )
    gw = await start_gateway(aiohttp_client, settings)
    fakes["openai"].always(status=503)
    async with openai_client(gw, await create_key(gw)) as client:
        reply = await client.chat.completions.create(model="m", messages=HI["messages"])
        assert reply.object == "chat.completion"
        assert reply.choices[0].message.content == "echo: hello there"
        stream = await client.chat.completions.create(
            model="m", messages=HI["messages"], stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts) == "echo: hello there"
    assert len(fakes["anthropic"].requests) == 2


@pytest.mark.parametrize(
    "body",
    [b"<html><body>502 Bad Gateway</body></html>", b'{"id": "x", "choices": [', b"{}"],
    ids=["html", "truncated", "empty-object"],
)
async def test_a_target_answering_200_with_garbage_fails_over(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    body: bytes,
) -> None:
    """A proxy in front of one target answers 200 with something that is not a completion:
    that target is broken, not the request, so another route answers it."""

    async def garbage(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", garbage)
    broken = await aiohttp_server(app)
    rig = await make_rig(
        aiohttp_server, aiohttp_client, make_settings, a_url=str(broken.make_url("/v1"))
    )
    async with rig.post() as resp:
        assert resp.status == 200, await resp.text()
        assert text(await resp.json()) == "echo: hello there"
    assert resp.headers["x-gateway-provider"] == "b"


@pytest.mark.parametrize("fault", [{"drop_after": 1}, {"error_after": 1}], ids=["reset", "event"])
async def test_a_target_that_breaks_every_stream_is_taken_out_of_rotation(
    rig: Rig, fault: dict[str, Any]
) -> None:
    """Every stream from `a` breaks after its first chunk: no failover for those (a byte went
    out), but each is a failed request of its account, so after `failure_threshold` of them
    the account is out and the next streams are whole, from `b`."""
    rig.a.always(**fault)
    for _ in range(4):  # two per account of `a` (they take turns); threshold: 2
        async with rig.post({**HI, "stream": True}) as resp:
            assert resp.status == 200 and resp.headers["x-gateway-provider"] == "a"
            assert b'"error"' in await resp.read()
    assert [rig.breakers.state(a) for a in (A0, A1)] == ["open"] * 2
    async with rig.post({**HI, "stream": True}) as resp:
        assert resp.headers["x-gateway-provider"] == "b"
        body = await resp.read()
    assert b'"error"' not in body and body.endswith(b"data: [DONE]\n\n")
