"""Whose fault a failure is, decided once (`errors.fault_of`) for the two places that act on it:
failover before an answer's first byte (`failover.attempt_each`) and the end of a stream that
broke after it (`sse.relay`, then `failover.stream_ended`). The same failure must blame the
same party in both: an account is not marked for a malformed answer before the first byte
and spared for it after, or the other way round.

Driven through the gateway (raw HTTP in, the real failover, relay and breakers), with the
failure raised at the provider boundary, where each provider raises it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.errors import (
    Fault,
    GatewayError,
    GatewayStopping,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamBadResponse,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamPoolFull,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    fault_of,
)
from gateway.settings import RoutingSettings
from tests.conftest import MakeSettings, router_of
from tests.rigs import fake_for, model_on, serve

ACCOUNT = ("up", 0)
FAILURES: dict[str, Callable[[], UpstreamError]] = {
    "malformed": lambda: UpstreamError("The upstream provider 'up' sent a malformed event."),
    "bad-response": lambda: UpstreamBadResponse("too large"),
    "unavailable": lambda: UpstreamUnavailable("HTTP 500"),
    "rate-limited": lambda: UpstreamRateLimited("429"),
    "timeout": lambda: UpstreamTimeout("slow"),
    "connection": lambda: UpstreamConnectionError("reset"),
    "request": lambda: UpstreamBadRequest("context_length_exceeded"),
    "pool-full": lambda: UpstreamPoolFull("All connections stayed in use."),
    "stopping": GatewayStopping,
    "credentials": lambda: UpstreamAuthError("refused"),
}
CHUNK = msgspec.json.encode(
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m-1",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
    }
)


async def _gateway(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> tuple[TestClient[Any, Any], str]:
    def settings(**fields: Any) -> Any:
        routing = RoutingSettings(max_attempts=1, failure_threshold=5, backoff_initial=0.0)
        return make_settings(routing=routing, **fields)

    model = model_on("m", "up", "m-1")
    return await serve(
        "openai", fake_for("openai"), aiohttp_server, aiohttp_client, settings, model
    )


def blamed(gateway: TestClient[Any, Any]) -> Fault:
    """What the account's breaker holds against it: a failure, disabled credentials, or none."""
    breakers = router_of(gateway).breakers
    if breakers.state(ACCOUNT) == "disabled":
        return Fault.CREDENTIALS
    return Fault.UPSTREAM if breakers.recent_failures(ACCOUNT)[0] else Fault.NONE


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_failure_blames_the_same_party_before_and_after_the_first_byte(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    failure: str,
) -> None:
    make = FAILURES[failure]
    verdicts = []
    for stream in (False, True):
        gateway, key = await _gateway(aiohttp_server, aiohttp_client, make_settings)
        provider: Any = router_of(gateway)._providers["up"]

        async def chat(call: Any) -> Any:
            raise make()

        async def stream_chat(call: Any) -> AsyncGenerator[list[bytes], None]:
            yield [CHUNK]  # the first byte goes out: only the stream's end can blame now
            raise make()

        provider.chat, provider.stream_chat = chat, stream_chat
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        resp = await gateway.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        answer = await resp.read()
        assert resp.status == (200 if stream else make().status), answer
        if stream:
            assert b'"error"' in answer and b"data: [DONE]" not in answer
        verdicts.append(blamed(gateway))
    before, after = verdicts
    # The request's own fault leaves no mark; refused credentials disable the account before
    # the first byte, and after it (the key opened the stream) are a failure of the account.
    fault = fault_of(make())
    assert before == (Fault.NONE if fault is Fault.REQUEST else fault)
    assert after == {Fault.CREDENTIALS: Fault.UPSTREAM, Fault.REQUEST: Fault.NONE}.get(fault, fault)


def test_fault_of_every_error() -> None:
    assert fault_of(UpstreamError("malformed")) is Fault.UPSTREAM
    assert fault_of(UpstreamBadRequest("bad")) is Fault.REQUEST
    assert fault_of(UpstreamPoolFull("full")) is Fault.NONE
    assert fault_of(GatewayStopping()) is Fault.NONE
    assert fault_of(UpstreamAuthError("refused")) is Fault.CREDENTIALS
    assert fault_of(GatewayError("our bug")) is Fault.NONE
