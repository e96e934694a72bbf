"""Keep-alive pings of client event streams: one task for all streams, only during silences."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer

from gateway import sse_pings
from gateway.sse_pings import PING
from gateway.state import PINGS_KEY
from tests.conftest import NEVER_HANG, MakeSettings, app_of, openai_client, sse_events
from tests.test_openai_provider import HI, Rig, make_rig

INTERVAL = 0.06


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings)
    app_of(rig.gateway)[PINGS_KEY].interval = INTERVAL
    return rig


async def test_a_silent_stream_is_pinged_and_the_sdk_reads_it_whole(rig: Rig) -> None:
    rest = asyncio.Event()
    rig.fake.always(hold=rest, hold_after=1)  # a first chunk, then a long silence
    pings = app_of(rig.gateway)[PINGS_KEY]
    async with rig.post({**HI, "stream": True}) as resp:
        async with asyncio.timeout(NEVER_HANG):
            first = await resp.content.readuntil(b"\n\n")
            ping = await resp.content.readuntil(b"\n\n")  # the upstream is still silent
        assert ping == PING and len(pings) == 1
        rest.set()
        events = sse_events(first + ping + await resp.read())
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and len(events) > 2
    assert len(pings) == 0  # the stream ended: it is no longer watched
    watcher = pings._task
    assert watcher is not None
    async with asyncio.timeout(NEVER_HANG):
        await watcher  # it stops by itself once nothing is open


async def test_the_openai_sdk_skips_the_pings(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    pinged = asyncio.Event()
    send = sse_pings._send

    async def send_and_tell(response: Any, writer: Any) -> None:
        await send(response, writer)
        pinged.set()

    monkeypatch.setattr(sse_pings, "_send", send_and_tell)
    rest = asyncio.Event()
    rig.fake.always(content="one two three", hold=rest, hold_after=1)
    oai: Any = openai_client(rig.gateway, rig.key)
    stream = await oai.chat.completions.create(model="gpt", messages=HI["messages"], stream=True)
    chunks = [await anext(stream)]
    async with asyncio.timeout(NEVER_HANG):
        await pinged.wait()  # the SDK is reading a stream that sent a ping after its chunk
    rest.set()
    chunks += [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    await oai.close()


async def test_a_busy_stream_gets_no_ping(rig: Rig) -> None:
    # A chunk every third of the interval for about three intervals: never a silence.
    rig.fake.always(content=" ".join(["w"] * 9), chunk_delay=INTERVAL / 3)
    async with rig.post({**HI, "stream": True}) as resp:
        body = await resp.read()
    assert PING not in body and sse_events(body)


async def test_pings_stop_with_the_stream_and_never_follow_its_end(rig: Rig) -> None:
    rig.fake.always(content="a b")
    for _ in range(3):
        async with rig.post({**HI, "stream": True}) as resp:
            body = await resp.read()
        assert body.endswith(b"data: [DONE]\n\n") and PING not in body
    assert len(app_of(rig.gateway)[PINGS_KEY]) == 0
