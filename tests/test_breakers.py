"""Breakers never take down what they protect (issue #12).

A model with one upstream account (the most common config) is driven with the real `openai`
client: one failing request must not cost anyone else an answer, an account that failed is
still tried when it is the only way to answer, and what the gateway refuses locally (an
upstream's pause, refused credentials) carries the real remaining wait or a non-retryable
error that tells the operator what to fix.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.breaker import BreakerBoard
from gateway.errors import GatewayStopping, UpstreamPoolFull, UpstreamRateLimited
from gateway.failover import Exchange, attempt_each
from gateway.router import Route
from gateway.settings import ModelConfig, OpenAIConfig, RoutingSettings, Target
from gateway.trace import RequestTrace
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    create_key,
    openai_client,
    router_of,
    start_gateway,
)
from tests.fakes import FakeOpenAI
from tests.test_routing import Clock

# The defaults (3 attempts, 3 failures open a breaker), with a quick backoff.
ROUTING = RoutingSettings(backoff_initial=0.001, backoff_max=0.002)
HELLO = [{"role": "user", "content": "hello"}]


class Solo:
    """One model, `m`, on one upstream account of one fake OpenAI upstream."""

    def __init__(self, fake: FakeOpenAI, gw: TestClient[Any, Any], clock: Clock) -> None:
        self.fake, self.gw, self.clock = fake, gw, clock

    @property
    def breakers(self) -> BreakerBoard:
        return router_of(self.gw).breakers

    async def client(self, **options: Any) -> openai.AsyncOpenAI:
        client = openai_client(self.gw, await create_key(self.gw))
        return client.with_options(**options) if options else client


async def solo(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    routing: RoutingSettings = ROUTING,
    accounts: tuple[str, ...] = ("key-0",),
) -> Solo:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    settings = make_settings(
        routing=routing,
        providers=(OpenAIConfig(name="up", base_url=fake.base_url, api_keys=accounts),),
        models=(ModelConfig(name="m", targets=(Target(provider="up", model="gpt-x"),)),),
    )
    gw = await start_gateway(aiohttp_client, settings)
    rig = Solo(fake, gw, Clock())
    rig.breakers.clock = rig.clock
    return rig


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Solo:
    return await solo(aiohttp_server, aiohttp_client, make_settings)


async def test_one_failing_request_does_not_affect_a_concurrent_clients_next_request(
    rig: Solo,
) -> None:
    """Client A's request fails on every retry while client B is talking to the same model:
    B's requests, during and after A's failure, are answered."""
    release = asyncio.Event()
    rig.fake.script(status=500, match="boom", hold=release)  # A's first attempt, held
    rig.fake.script(status=500, match="boom", times=2)  # ... and its two retries
    async with await rig.client() as a, await rig.client() as b:
        failing = asyncio.create_task(
            a.chat.completions.create(model="m", messages=[{"role": "user", "content": "boom"}])
        )
        await rig.fake.request_seen.wait()  # A is in flight
        during = await b.chat.completions.create(model="m", messages=HELLO)
        release.set()
        with pytest.raises(openai.InternalServerError):
            async with asyncio.timeout(NEVER_HANG):
                await failing
        after = await b.chat.completions.create(model="m", messages=HELLO)
        again = await b.chat.completions.create(model="m", messages=HELLO)
    assert [r.choices[0].message.content for r in (during, after, again)] == ["echo: hello"] * 3
    assert len(rig.fake.chat_requests) == 3 + 3  # A's three attempts, B's three requests
    assert rig.breakers.state(("up", 0)) == "closed"  # A's retries were one failure


async def test_a_requests_retries_count_as_one_failure(rig: Solo) -> None:
    rig.fake.script(status=503, times=3)
    async with await rig.client() as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=HELLO)
        assert len(rig.fake.chat_requests) == 3
        assert rig.breakers.state(("up", 0)) == "closed"
        rig.fake.script(status=503, times=6)  # two more requests fail on every attempt
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="m", messages=HELLO)
    assert rig.breakers.state(("up", 0)) == "open"  # three failed requests: threshold


async def test_the_only_account_is_tried_while_it_cools_down(rig: Solo) -> None:
    """Open for failures, the only route is still tried (Envoy's panic mode): it may have
    recovered, and refusing locally would turn an upstream blip into an outage."""
    for _ in range(3):
        rig.breakers.failed(("up", 0))
    assert rig.breakers.state(("up", 0)) == "open"
    async with await rig.client() as client:
        reply = await client.chat.completions.create(model="m", messages=HELLO)
    assert reply.choices[0].message.content == "echo: hello"
    assert rig.breakers.state(("up", 0)) == "closed"  # its success closed the breaker


async def test_a_failed_panic_attempt_reopens_the_breaker_without_retries(rig: Solo) -> None:
    """While the only account is out for failures, a request tries it once (it may have
    recovered), not max_attempts times: a dead upstream is not hammered."""
    for _ in range(3):
        rig.breakers.failed(("up", 0))
    rig.clock.now += 20
    rig.fake.always(status=500)
    async with await rig.client() as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=HELLO)
    assert len(rig.fake.chat_requests) == 1
    assert rig.breakers.remaining(("up", 0)) == ROUTING.cooldown  # from the last failure


async def test_with_every_account_cooling_the_one_closest_to_recovery_goes_first(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    rig = await solo(
        aiohttp_server, aiohttp_client, make_settings, accounts=("key-0", "key-1", "key-2")
    )
    for index, after in ((0, 20), (1, 0), (2, 10)):
        rig.clock.now += after
        for _ in range(3):
            rig.breakers.failed(("up", index))
    assert [rig.breakers.state(("up", i)) for i in range(3)] == ["open"] * 3
    async with await rig.client() as client:
        await client.chat.completions.create(model="m", messages=HELLO)
    assert rig.fake.chat_requests[-1].headers["authorization"] == "Bearer key-0"


async def test_after_an_upstream_429_the_next_request_gets_429_with_the_remaining_wait(
    rig: Solo,
) -> None:
    """Before #12: a 503 with a fixed `retry-after: 5`, which made the SDKs' retries fail."""
    rig.fake.script(status=429, headers={"retry-after": "2"})
    async with await rig.client() as client:
        with pytest.raises(openai.RateLimitError) as first:
            await client.chat.completions.create(model="m", messages=HELLO)
        assert first.value.response.headers["retry-after-ms"] == "2000"
        rig.clock.now += 0.5
        with pytest.raises(openai.RateLimitError) as second:
            await client.chat.completions.create(model="m", messages=HELLO)
        headers = second.value.response.headers
        assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1500")
        assert second.value.code == "rate_limit_exceeded"
        assert len(rig.fake.chat_requests) == 1  # the upstream's wish was honoured locally
        rig.clock.now += 1.5
        reply = await client.chat.completions.create(model="m", messages=HELLO)
    assert reply.choices[0].message.content == "echo: hello"


async def test_the_sdk_retries_a_benched_account_after_the_real_wait(rig: Solo) -> None:
    """The SDK's own retries (it obeys retry-after-ms) get an answer once the pause is over."""
    rig.breakers.clock = asyncio.get_running_loop().time  # real time for this one
    rig.fake.script(status=429, headers={"retry-after-ms": "200"})
    async with await rig.client(max_retries=3) as client:
        reply = await client.chat.completions.create(model="m", messages=HELLO)
    assert reply.choices[0].message.content == "echo: hello"
    assert len(rig.fake.chat_requests) == 2  # no request reached the benched account


async def test_a_5xx_with_retry_after_keeps_its_status_and_the_remaining_wait(rig: Solo) -> None:
    rig.fake.script(status=503, headers={"retry-after": "10"})
    rig.fake.script(status=503)
    rig.fake.script(status=503)
    async with await rig.client() as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=HELLO)
        rig.clock.now += 4
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="m", messages=HELLO)
    assert err.value.status_code == 503
    assert err.value.response.headers["retry-after-ms"] == "6000"


async def test_refused_credentials_are_a_non_retryable_error_for_the_operator(
    rig: Solo,
) -> None:
    rig.fake.script(status=401)
    async with await rig.client(max_retries=2) as client:
        with pytest.raises(openai.APIStatusError) as first:
            await client.chat.completions.create(model="m", messages=HELLO)
        assert len(rig.fake.chat_requests) == 1  # x-should-retry: false stopped the SDK
        response = first.value.response
        assert response.status_code == 502 and response.headers["x-should-retry"] == "false"
        assert "retry-after" not in response.headers
        message = first.value.message
        assert "providers 'up' api_keys[0]" in message and "reload" in message
        assert "key-0" not in message  # the key itself is never shown
        rig.clock.now += 100
        with pytest.raises(openai.APIStatusError) as second:
            await client.chat.completions.create(model="m", messages=HELLO)
        assert len(rig.fake.chat_requests) == 1  # refused locally, no upstream call
        assert second.value.response.headers["x-should-retry"] == "false"
        assert "again in 200 seconds" in second.value.message
        rig.clock.now += 200  # auth_cooldown: the key is probed again
        reply = await client.chat.completions.create(model="m", messages=HELLO)
    assert reply.choices[0].message.content == "echo: hello"
    assert rig.breakers.state(("up", 0)) == "closed"


def test_board_unit() -> None:
    """What the board allows, account by account, as its clock moves."""
    clock = Clock()
    board = BreakerBoard(RoutingSettings(failure_threshold=1, cooldown=10), clock=clock)
    failing, paused, refused = ("p", 0), ("p", 1), ("p", 2)
    board.failed(failing)
    board.failed(paused, retry_after=5)
    board.disable(refused)
    accounts = [failing, paused, refused]
    assert not any(board.usable(a) for a in accounts)
    assert [board.may_panic(a) for a in accounts] == [True, False, False]
    assert board.panic(accounts) == failing
    assert isinstance(board.refusal([paused, refused], "m"), UpstreamRateLimited)
    assert board.refusal([refused], "m").should_retry is False
    clock.now += 5  # the pause is over: half-open, and any request may try it
    assert board.usable(paused) and board.may_panic(paused)
    assert board.panic([failing, paused]) == paused  # due back first


async def test_the_gateways_own_refusals_are_no_verdict_on_a_probed_account() -> None:
    """A full pool or the server's shutdown refuses an attempt before it reaches the upstream:
    the account's half-open breaker neither closes (a probe that succeeded) nor reopens (one
    that failed); its probe slot is free again."""
    clock = Clock()
    routing = RoutingSettings(failure_threshold=1, cooldown=10, max_attempts=1)
    board = BreakerBoard(routing, clock=clock)
    account = ("p", 0)
    board.failed(account)
    clock.now += 10  # half-open: the next attempt is its probe
    opened = board.recovery(account)
    config = SimpleNamespace(
        name="p", total_timeout=60.0, read_timeout=60.0, connect_timeout=5.0,
        first_byte_timeout=None,
    )  # fmt: skip
    route = Route(
        model=None, provider=SimpleNamespace(config=config), upstream_model="m", api_key=None,
        account=account,
    )  # fmt: skip
    for refusal in (GatewayStopping(), UpstreamPoolFull("All connections stayed in use.")):
        call = SimpleNamespace(
            is_stream=False, upstream_model="", api_key=None, usage=None, chunks=0,
            first_byte_at=None, cache_write_tokens=0, server_tools=None,
        )  # fmt: skip
        ex: Exchange[Any] = Exchange(
            request=SimpleNamespace(task=asyncio.current_task()),  # type: ignore[arg-type]
            trace=RequestTrace(request_id="r", started=0.0, ts=0.0),
            call=call,
            provider=route.provider,
            routes=[route],
        )

        async def refused(route: Route, refusal: Exception = refusal) -> None:
            raise refusal

        with pytest.raises(type(refusal)):
            await attempt_each(ex, refused, breakers=board, routing=routing)
        assert ex.trace.attempts[0]["status"] == 503
        assert board.recovery(account) == opened  # neither closed nor opened anew
        assert board.usable(account)  # and its probe slot is free for the next request
