"""Routing across accounts and targets: retries, failover, cooldowns, timeouts, shutdown.

Two fake OpenAI upstreams: provider `a` (two accounts, priority 0) and provider `b` (one
account, priority 1, the fallback). Faults are injected per request with the fakes' scripts.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.settings import ModelConfig, OpenAIConfig, RoutingSettings, Settings, Target
from gateway.state import SHUTTING_DOWN_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    openai_client,
    router_of,
    sse_events,
    start_gateway,
    usage_rows,
)
from tests.fakes import FakeOpenAI

CHAT = "/v1/chat/completions"
HI = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
KEYS = ("key-a0", "key-a1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(
        self, a: FakeOpenAI, b: FakeOpenAI, gw: TestClient[Any, Any], key: str, clock: Clock
    ) -> None:
        self.a, self.b, self.gw, self.key, self.clock = a, b, gw, key, clock

    @property
    def breakers(self) -> Any:
        return router_of(self.gw).breakers

    def post(self, body: dict[str, Any] | None = None) -> Any:
        return self.gw.post(CHAT, json=body or HI, headers={"Authorization": f"Bearer {self.key}"})

    def accounts(self) -> list[str]:
        """The account (API key) of each request provider `a` received, in order."""
        return [r.headers["authorization"].removeprefix("Bearer ") for r in self.a.chat_requests]


ROUTING = RoutingSettings(
    backoff_initial=0.001,
    backoff_max=0.005,
    failure_threshold=2,
    failure_window=60,
    cooldown=30,
    deadline=5,
)


async def make_rig(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    *,
    routing: RoutingSettings = ROUTING,
    a_url: str | None = None,
    **provider: Any,
) -> Rig:
    a, b = FakeOpenAI(), FakeOpenAI()
    await a.start(aiohttp_server)
    await b.start(aiohttp_server)
    base = make_settings(
        routing=routing,
        providers=(
            OpenAIConfig(name="a", base_url=a_url or a.base_url, api_keys=KEYS, **provider),
            OpenAIConfig(name="b", base_url=b.base_url, api_keys=("key-b",), **provider),
        ),
        models=(
            ModelConfig(
                name="m",
                targets=(
                    Target(provider="a", model="gpt-a"),
                    Target(provider="b", model="gpt-b", priority=1),
                ),
            ),
        ),
    )
    gw = await start_gateway(aiohttp_client, base)
    clock = Clock()
    router_of(gw).breakers.clock = clock
    return Rig(a, b, gw, await create_key(gw), clock)


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    return await make_rig(aiohttp_server, aiohttp_client, make_settings)


async def test_a_5xx_moves_to_the_next_account(rig: Rig) -> None:
    rig.a.script(status=500)
    with capture_logs() as logs:
        async with rig.post() as resp:
            assert resp.status == 200
            assert resp.headers["x-gateway-provider"] == "a"
    assert rig.accounts() == ["key-a0", "key-a1"]
    line = next(e for e in logs if e["event"] == "request")
    assert [(t["provider"], t["account"], t["status"]) for t in line["attempts"]] == [
        ("a", 0, 503),
        ("a", 1, 200),
    ]
    assert rig.b.chat_requests == []


async def test_accounts_take_turns(rig: Rig) -> None:
    for _ in range(4):
        async with rig.post() as resp:
            assert resp.status == 200
    assert rig.accounts() == ["key-a0", "key-a1", "key-a0", "key-a1"]


async def test_when_a_provider_fails_the_fallback_answers(rig: Rig) -> None:
    rig.a.script(status=503, times=2)
    async with rig.post() as resp:
        body = await resp.json()
        assert resp.status == 200
        assert resp.headers["x-gateway-provider"] == "b"
    assert body["model"] == "gpt-b"
    rows = await usage_rows(rig.gw)
    assert (rows[-1]["provider"], rows[-1]["upstream_model"]) == ("b", "gpt-b")


async def test_a_refused_connection_fails_over(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings, a_url=dead)
    async with rig.post() as resp:
        assert resp.status == 200
        assert resp.headers["x-gateway-provider"] == "b"


async def test_a_bad_request_is_not_retried(rig: Rig) -> None:
    rig.a.script(status=400)
    async with rig.post() as resp:
        assert resp.status == 400
    assert len(rig.a.chat_requests) == 1 and rig.b.chat_requests == []
    assert rig.breakers.state(("a", 0)) == "closed"


async def test_429_with_retry_after_cools_the_account_down(rig: Rig) -> None:
    rig.a.script(status=429, headers={"retry-after": "7"})
    async with rig.post() as resp:
        assert resp.status == 200  # answered by the other account
    assert rig.breakers.state(("a", 0)) == "open"
    for _ in range(3):  # account 0 sits out its 7 seconds
        async with rig.post() as resp:
            assert resp.status == 200
    assert rig.accounts() == ["key-a0", "key-a1", "key-a1", "key-a1", "key-a1"]
    rig.clock.now += 7
    assert rig.breakers.state(("a", 0)) == "half-open"
    async with rig.post() as resp:
        assert resp.status == 200
    assert "key-a0" in rig.accounts()[-2:]  # the probe went to account 0 ...
    assert rig.breakers.state(("a", 0)) == "closed"  # ... and it is back in rotation


async def test_every_account_rate_limited_is_a_429_with_the_shortest_wait(rig: Rig) -> None:
    rig.a.script(status=429, headers={"retry-after": "9"}, times=2)
    rig.b.script(status=429, headers={"retry-after": "4"})
    async with openai_client(rig.gw, rig.key) as client:
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="m", messages=HI["messages"])
    assert err.value.response.headers["retry-after"] == "4"


async def test_repeated_failures_open_the_breaker_and_a_probe_closes_it(rig: Rig) -> None:
    rig.a.always(status=500)
    for _ in range(2):  # two failures per account within the window
        async with rig.post() as resp:
            assert resp.status == 200  # b answered
    assert rig.breakers.state(("a", 0)) == "open" and rig.breakers.state(("a", 1)) == "open"
    seen = len(rig.a.chat_requests)
    async with rig.post() as resp:
        assert resp.headers["x-gateway-provider"] == "b"
    assert len(rig.a.chat_requests) == seen  # a is not even tried while it cools down
    rig.clock.now += 30
    async with rig.post() as resp:  # one probe per account fails: open again
        assert resp.status == 200
    assert rig.breakers.state(("a", 0)) == "open"
    rig.a.always()  # a heals
    rig.clock.now += 30
    async with rig.post() as resp:
        assert resp.headers["x-gateway-provider"] == "a"
    assert rig.breakers.state(("a", 0)) == "closed" or rig.breakers.state(("a", 1)) == "closed"


async def test_bad_credentials_disable_the_account_loudly(rig: Rig) -> None:
    """Refused credentials take the account out for `auth_cooldown` (not until a restart, as
    before #12): then one request probes it again."""
    rig.a.script(status=401)
    with capture_logs() as logs:
        async with rig.post() as resp:
            assert resp.status == 200
    assert rig.breakers.state(("a", 0)) == "disabled"
    disabled = [e for e in logs if e["event"] == "upstream_account_disabled"]
    assert disabled and disabled[0]["log_level"] == "error"
    rig.clock.now += ROUTING.auth_cooldown - 1
    for _ in range(3):
        async with rig.post() as resp:
            assert resp.status == 200
    assert rig.accounts().count("key-a0") == 1  # not within auth_cooldown
    rig.clock.now += 1
    rig.a.script(status=401)  # the probe: still refused, so out again
    async with rig.post() as resp:
        assert resp.status == 200
    assert rig.accounts()[-2:] == ["key-a0", "key-a1"]
    assert rig.breakers.state(("a", 0)) == "disabled"
    rig.clock.now += ROUTING.auth_cooldown  # the operator fixed the key meanwhile
    for _ in range(2):
        async with rig.post() as resp:
            assert resp.status == 200
    assert rig.breakers.state(("a", 0)) == "closed"
    assert "key-a0" in rig.accounts()[-2:]  # back in rotation


async def test_a_hanging_upstream_times_out_and_fails_over(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings, read_timeout=0.2)
    rig.a.script(hold=asyncio.Event(), times=2)  # both accounts of `a` hang for good
    for stream in (False, True):
        async with rig.post({**HI, "stream": stream}) as resp:
            assert resp.status == 200
            assert resp.headers["x-gateway-provider"] == ("a" if stream else "b")
            await resp.read()


async def test_the_deadline_bounds_every_attempt(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    routing = RoutingSettings(deadline=0.3, backoff_initial=0.001, backoff_max=0.001)
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings, routing=routing)
    rig.a.always(hold=asyncio.Event())  # every upstream hangs for good (read_timeout: 300 s)
    rig.b.always(hold=asyncio.Event())
    async with asyncio.timeout(NEVER_HANG), rig.post() as resp:
        error = (await resp.json())["error"]
    assert resp.status == 504
    assert "deadline" in error["message"]
    # The deadline cut the first attempt short, and no attempt began after it.
    assert len(rig.a.chat_requests) + len(rig.b.chat_requests) == 1


async def test_a_slow_first_byte_on_a_stream_fails_over(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    rig = await make_rig(
        aiohttp_server, aiohttp_client, make_settings, first_byte_timeout=0.2, read_timeout=5
    )
    rig.a.always(hold=asyncio.Event())  # no first byte, ever
    async with rig.post({**HI, "stream": True}) as resp:
        events = sse_events(await resp.read())
    assert resp.headers["x-gateway-provider"] == "b"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


async def test_a_started_stream_is_never_retried(rig: Rig) -> None:
    rig.a.script(drop_after=3)
    async with rig.post({**HI, "stream": True}) as resp:
        raw = await resp.read()
    assert resp.status == 200
    last = [b for b in raw.split(b"\n\n") if b.startswith(b"data: {")][-1]
    assert "error" in json.loads(last[6:])
    text = [json.loads(b[6:]) for b in raw.split(b"\n\n") if b.startswith(b"data: {")][:-1]
    assert sum(1 for e in text if e["choices"] and e["choices"][0]["delta"].get("role")) == 1
    assert len(rig.a.chat_requests) == 1 and rig.b.chat_requests == []  # no duplicate answer


async def test_every_account_benched_by_its_upstream_is_a_429_with_the_remaining_wait(
    rig: Rig,
) -> None:
    """Was a 503 with a fixed `retry-after: 5` before #12: the client now gets the upstream's
    429 with what is really left of the shortest pause."""
    for account, seconds in ((("a", 0), 60), (("a", 1), 20), (("b", 0), 90)):
        rig.breakers.failed(account, retry_after=seconds)
    rig.clock.now += 12.5
    async with rig.post() as resp:
        error = await resp.json()
    assert resp.status == 429 and error["error"]["type"] == "rate_limit_exceeded"
    assert (resp.headers["retry-after"], resp.headers["retry-after-ms"]) == ("8", "7500")
    assert "retry in 8 seconds" in error["error"]["message"]
    assert rig.a.chat_requests == [] and rig.b.chat_requests == []


async def test_weights_spread_a_priority_tier(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    a, b = FakeOpenAI(), FakeOpenAI()
    await a.start(aiohttp_server)
    await b.start(aiohttp_server)
    settings = make_settings(
        providers=(
            OpenAIConfig(name="a", base_url=a.base_url),
            OpenAIConfig(name="b", base_url=b.base_url),
        ),
        models=(
            ModelConfig(
                name="m",
                targets=(
                    Target(provider="a", model="x", weight=3),
                    Target(provider="b", model="x", weight=1),
                ),
            ),
        ),
    )
    gw = await start_gateway(aiohttp_client, settings)
    router_of(gw).rng.seed(7)
    key = await create_key(gw)
    for _ in range(200):
        async with gw.post(CHAT, json=HI, headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
    assert 125 <= len(a.chat_requests) <= 175  # about 3 of 4
    assert len(a.chat_requests) + len(b.chat_requests) == 200


async def test_shutdown_lets_a_stream_finish_within_the_grace_period(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    rest_of_stream = asyncio.Event()
    fake.script(content="one two three four", hold=rest_of_stream, hold_after=1)
    settings = make_settings(
        providers=(OpenAIConfig(name="up", base_url=fake.base_url),),
        shutdown_grace_seconds=60,  # far more than the stream needs once it may go on
    )
    gw = await start_gateway(aiohttp_client, settings)
    key = await create_key(gw)
    body = {**HI, "model": "up/x", "stream": True}
    async with gw.post(CHAT, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.content.readuntil(b"\n\n")
        shutdown = asyncio.create_task(app_of(gw).shutdown())
        await app_of(gw)[SHUTTING_DOWN_KEY].wait()  # the shutdown began mid-stream
        rest_of_stream.set()
        rest = await resp.content.read()
    await shutdown
    assert rest.endswith(b"data: [DONE]\n\n")  # finished, not cut
    assert b"shutting down" not in rest


async def test_routes_put_cooling_accounts_last_unit() -> None:
    """The router lists a route through an open breaker only after every other one (before
    #12 it left it out); the list follows priorities."""
    from gateway.providers.openai import OpenAIProvider
    from gateway.router import Router

    providers = {
        name: OpenAIProvider(OpenAIConfig(name=name, api_keys=keys), None)  # type: ignore[arg-type]
        for name, keys in (("a", KEYS), ("b", ("k",)))
    }
    model = ModelConfig(
        name="m",
        targets=(Target(provider="b", model="y", priority=2), Target(provider="a", model="x")),
    )
    router = Router(Settings(providers=tuple(p.config for p in providers.values())), providers)
    assert [r.account for r in router.routes(model)] == [("a", 0), ("a", 1), ("b", 0)]
    router.breakers.failed(("a", 1), retry_after=5)
    assert [r.account for r in router.routes(model)] == [("a", 0), ("b", 0), ("a", 1)]


def test_only_the_probe_decides_a_half_open_breaker() -> None:
    from gateway.breaker import BreakerBoard, Claim

    clock = Clock()
    routing = RoutingSettings(failure_threshold=1, failure_window=60, cooldown=10)
    board = BreakerBoard(routing, clock=clock)
    account = ("a", 0)
    assert board.attempt(account) is Claim.ORDINARY  # closed
    board.failed(account)
    assert board.state(account) == "open" and board.attempt(account) is None
    clock.now += 10
    assert board.attempt(account) is Claim.PROBE
    assert board.attempt(account) is None  # only one at a time
    board.succeeded(account)  # a late answer of an older, ordinary attempt ...
    board.failed(account)
    assert board.state(account) == "half-open"  # ... decides nothing
    board.release(account, Claim.PROBE)  # the probe was cancelled: the slot is free again
    assert board.attempt(account) is Claim.PROBE
    board.succeeded(account, Claim.PROBE)
    assert board.state(account) == "closed"
    board.failed(account, retry_after=10**6)
    assert board.state(account) == "open"
    clock.now += 300  # an upstream's retry-after is capped (max_cooldown)
    assert board.state(account) == "half-open"


async def test_a_single_account_is_retried(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    fake.script(status=500)
    fake.script(drop_before_response=True)
    settings = make_settings(
        routing=RoutingSettings(backoff_initial=0.001, backoff_max=0.002),  # 3 attempts
        providers=(OpenAIConfig(name="up", base_url=fake.base_url),),
    )
    gw = await start_gateway(aiohttp_client, settings)
    key = await create_key(gw)
    body = {**HI, "model": "up/x"}
    async with gw.post(CHAT, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
    assert len(fake.chat_requests) == 3


async def test_a_503_retry_after_also_cools_the_account(rig: Rig) -> None:
    rig.a.script(status=503, headers={"retry-after": "12"})
    async with rig.post() as resp:
        assert resp.status == 200
    assert rig.breakers.state(("a", 0)) == "open"
    rig.clock.now += 12
    assert rig.breakers.state(("a", 0)) == "half-open"


async def test_an_error_event_before_any_byte_fails_over(rig: Rig) -> None:
    rig.a.script(error_after=0)  # the stream opens with an error event
    async with rig.post({**HI, "stream": True}) as resp:
        events = sse_events(await resp.read())
    assert resp.headers["x-gateway-provider"] == "a"  # the other account answered
    assert rig.accounts() == ["key-a0", "key-a1"]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


async def test_a_cancelled_probe_frees_its_slot(rig: Rig) -> None:
    rig.breakers.failed(("a", 0), retry_after=1)
    rig.breakers.failed(("a", 1), retry_after=60)
    rig.clock.now += 1  # account 0 is half-open: the next request probes it
    rig.a.script(hold=asyncio.Event())  # the probe is still running when the client gives up
    task = asyncio.create_task(rig.post().__aenter__())
    await rig.a.request_seen.wait()
    task.cancel()  # the client gives up while the probe runs
    with pytest.raises(asyncio.CancelledError):
        await task
    await rig.a.client_disconnected.wait()
    assert rig.breakers.state(("a", 0)) == "half-open"
    assert rig.breakers.usable(("a", 0))  # not stuck: another request may probe it
