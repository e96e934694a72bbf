"""Two changes attacked from outside: key digests by CPython's built-in SHA-256 (e7f0f0c) and
the accounting of a request without limits deferred until its answer is out (f0f6dd5,
`RequestTrace.settle`). Every endpoint, hang-ups, failover and metrics must still give a row
its tokens and cost; a key with limits or a budget must settle before its slot is freed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway import keys
from gateway.admission import Ticket
from gateway.keys import digest_of
from gateway.settings import GroupConfig, ModelConfig, OpenAIConfig, RoutingSettings, Target
from gateway.state import GATE_KEY, KEYS_KEY, USAGE_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    cli_key,
    create_key,
    free_port,
    openai_client,
    raw_request,
    start_gateway,
    start_serve,
    usage_rows,
)
from tests.fakes import FakeOpenAI
from tests.test_metrics import ADMIN, scrape, value

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hello there world"}]
HI = {"model": "gpt", "messages": MSGS}
IN_PRICE, OUT_PRICE = 3.0, 5.0


class Rig:
    def __init__(self, gw: TestClient[Any, Any], a: FakeOpenAI, b: FakeOpenAI) -> None:
        self.gw, self.a, self.b = gw, a, b
        self.leaves: list[tuple[bool, tuple[int, float] | None]] = []

    def post(self, key: str, path: str = CHAT, body: Any = None) -> Any:
        return self.gw.post(path, json=body or HI, headers={"Authorization": f"Bearer {key}"})

    async def rows(self, count: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(NEVER_HANG):
            await app_of(self.gw)[USAGE_KEY].wait_recorded(count)
        return await usage_rows(self.gw)


PRICES: dict[str, Any] = {"input_price_per_mtok": IN_PRICE, "output_price_per_mtok": OUT_PRICE}


def cost(row: dict[str, Any]) -> float:
    return float((row["prompt_tokens"] * IN_PRICE + row["completion_tokens"] * OUT_PRICE) / 1e6)


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> Rig:
    return await make_rig(aiohttp_server, aiohttp_client, make_settings, monkeypatch)


async def make_rig(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
    **server: Any,
) -> Rig:
    a, b = FakeOpenAI(), FakeOpenAI()
    await a.start(aiohttp_server)
    await b.start(aiohttp_server)
    settings = make_settings(
        providers=(
            OpenAIConfig(name="a", api_keys=("ka",), base_url=a.base_url),
            OpenAIConfig(name="b", api_keys=("kb",), base_url=b.base_url),
        ),
        models=(
            ModelConfig(
                name="gpt",
                targets=(
                    Target(provider="a", model="a-1"),
                    Target(provider="b", model="b-1", priority=1),
                ),
                embeddings=True,
                **PRICES,
            ),
        ),
        routing=RoutingSettings(max_attempts=2, backoff_initial=0.0),
        admin_key=ADMIN,
        **server,
    )
    team = msgspec.convert({"name": "team", "tpm": 10**6}, GroupConfig)
    settings = msgspec.structs.replace(settings, groups=(team,))
    gw = await start_gateway(aiohttp_client, settings)
    r = Rig(gw, a, b)
    gate = app_of(gw)[GATE_KEY]
    leave = gate.leave

    def spying_leave(ticket: Ticket) -> None:  # what a ticket holds as its slot is freed
        r.leaves.append((ticket.charged, ticket.used))
        leave(ticket)

    monkeypatch.setattr(gate, "leave", spying_leave)
    return r


# ---- digests -------------------------------------------------------------------------------


def _secrets() -> Iterator[str]:
    yield from ("", "sk-kiosk-" + "a" * 43, "x" * 1_000_000, "é\u2603\U0001f600")
    yield from (bytes([b, 0x80, 0xFF]).decode("utf-8", "surrogateescape") for b in range(256))
    yield "".join(chr(c) for c in range(0xDC80, 0xDD00))  # every escaped byte


def test_digests_are_hashlib_s_for_every_string_the_parser_can_give() -> None:
    for secret in _secrets():
        expected = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
        assert digest_of(secret) == expected
    # A lone surrogate no header decodes to fails alike (never a different digest).
    with pytest.raises(UnicodeEncodeError):
        hashlib.sha256("\ud800".encode("utf-8", "surrogateescape"))
    with pytest.raises(UnicodeEncodeError):
        digest_of("\ud800")
    assert keys._sha256 is not hashlib.sha256  # the built-in is in use here
    assert "compare_digest" in keys.KeyCache.lookup.__code__.co_names


async def test_cli_keys_authenticate_and_undecodable_keys_are_refused(
    rig: Rig, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    secret = await cli_key(tmp_path / "keys.db", capsys)
    await app_of(rig.gw)[KEYS_KEY].refresh()
    async with openai_client(rig.gw, secret) as oai:
        reply = await oai.chat.completions.create(model="gpt", messages=MSGS)  # type: ignore[arg-type]
    assert reply.usage is not None
    for bad in (b"sk-\xff\xed\xa0\x80", b"\xed\xb0\x80", secret.encode() + b"\x80"):
        reply_ = await raw_request(
            rig.gw, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: " + bad + b"\r\n\r\n"
        )
        assert reply_.status == 401, reply_.body


# ---- every endpoint's row, with and without limits -------------------------------------------

REQUESTS: list[tuple[str, dict[str, Any]]] = [
    (CHAT, HI),
    (CHAT, {**HI, "stream": True}),
    (CHAT, {**HI, "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/responses", {"model": "gpt", "input": "hello there world"}),
    ("/v1/responses", {"model": "gpt", "input": "hello there world", "stream": True}),
    ("/v1/messages", {"model": "gpt", "max_tokens": 50, "messages": MSGS}),
    ("/v1/messages", {"model": "gpt", "max_tokens": 50, "messages": MSGS, "stream": True}),
    ("/v1/embeddings", {"model": "gpt", "input": "hello there"}),
    ("/v1/completions", {"model": "gpt", "prompt": "hello there"}),
    ("/v1/completions", {"model": "gpt", "prompt": "hello there", "stream": True}),
]


@pytest.mark.parametrize("limits", ["none", "tpm", "budget", "group"])
async def test_every_endpoint_s_row_and_metrics_have_the_upstream_s_usage_and_cost(
    rig: Rig, limits: str
) -> None:
    fields: dict[str, Any] = {
        "none": {},
        "tpm": {"tpm": 10**6, "max_concurrency": 3},
        "budget": {"budget_usd": 100.0},
        "group": {"group_name": "team"},
    }[limits]
    key = await create_key(rig.gw, **fields)
    for path, body in REQUESTS:
        async with rig.post(key, path, body) as resp:
            assert resp.status == 200, (path, await resp.text())
            await resp.read()
    rows = await rig.rows(len(REQUESTS))
    assert len(rows) == len(REQUESTS)
    for row, (path, _) in zip(rows, REQUESTS, strict=True):
        assert row["endpoint"] == path and row["status"] == 200
        assert row["estimated"] == 0 and row["prompt_tokens"] > 0, row
        assert path == "/v1/embeddings" or row["completion_tokens"] > 0, row
        assert row["cost_usd"] == pytest.approx(cost(row)) and row["cost_usd"] > 0
    # Every ticket was settled before its slot was freed (none for a key without limits).
    assert rig.leaves == ([] if limits == "none" else [(False, None)] * len(REQUESTS))
    m = await scrape(rig.gw)
    assert value(m, "tokenkiosk_tokens_total", model="gpt", type="input") == sum(
        r["prompt_tokens"] for r in rows
    )
    assert value(m, "tokenkiosk_tokens_total", model="gpt", type="output") == sum(
        r["completion_tokens"] for r in rows
    )
    assert value(m, "tokenkiosk_cost_usd_total", model="gpt") == pytest.approx(
        sum(r["cost_usd"] for r in rows)
    )
    for kind, total in (("input", "prompt_tokens"), ("output", "completion_tokens")):
        by_key = [v for (n, labels), v in m.items() if n == "tokenkiosk_key_tokens_total"
                  and ("type", kind) in labels]  # fmt: skip
        assert sum(by_key) == sum(r[total] for r in rows)
    if limits == "budget":
        (record,) = [k for k in app_of(rig.gw)[KEYS_KEY].records() if k.id == rows[0]["key_id"]]
        spent = app_of(rig.gw)[GATE_KEY].spent(record)
        assert spent is not None and spent.usd == pytest.approx(sum(r["cost_usd"] for r in rows))


# ---- hang-ups, cut streams, failover --------------------------------------------------------


@pytest.mark.parametrize("limits", [{}, {"budget_usd": 100.0}])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_hang_up_before_the_first_byte_is_estimated(
    rig: Rig, stream: bool, limits: dict[str, Any]
) -> None:
    key = await create_key(rig.gw, **limits)
    rig.a.script(hold=asyncio.Event())  # never answers
    session = aiohttp.ClientSession()
    task = asyncio.ensure_future(
        session.post(
            rig.gw.make_url(CHAT), json={**HI, "stream": stream},
            headers={"Authorization": f"Bearer {key}"},
        )
    )  # fmt: skip
    async with asyncio.timeout(NEVER_HANG):
        await rig.a.request_seen.wait()
        task.cancel()
        await session.close()
        await rig.a.client_disconnected.wait()
    (row,) = await rig.rows(1)
    assert (row["status"], row["estimated"], row["completion_tokens"]) == (499, 1, 0)
    assert row["prompt_tokens"] > 0 and row["cost_usd"] == pytest.approx(cost(row)), row
    assert rig.leaves == ([] if not limits else [(False, None)])


@pytest.mark.parametrize("how", ["client", "upstream_drop", "upstream_error"])
async def test_a_stream_cut_midway_keeps_what_was_sent(rig: Rig, how: str) -> None:
    key = await create_key(rig.gw)
    content = "one two three four five six"
    rest = asyncio.Event()
    if how == "upstream_error":
        rig.a.script(content=content, error_after=3)
    else:  # three chunks, then the client hangs up or the upstream drops the connection
        rig.a.script(content=content, hold=rest, hold_after=3, drop_after=4)
    async with rig.post(key, CHAT, {**HI, "stream": True}) as resp:
        assert resp.status == 200
        got = b""
        while how != "upstream_error" and got.count(b"data: ") < 3:
            got += await resp.content.readany()
        if how == "client":
            resp.close()
            async with asyncio.timeout(NEVER_HANG):
                await rig.a.client_disconnected.wait()
        else:
            rest.set()
            assert b'"error"' in await resp.read()
    (row,) = await rig.rows(1)
    assert row["status"] == 499 if how == "client" else row["status"] >= 500, row
    assert row["estimated"] == 1 and row["prompt_tokens"] > 0 and row["completion_tokens"] >= 2
    assert row["ttft_ms"] is not None and row["cost_usd"] == pytest.approx(cost(row))


async def test_failover_accounts_the_answering_upstream_and_errors_cost_nothing(rig: Rig) -> None:
    key = await create_key(rig.gw)
    rig.a.script(status=503)
    async with rig.post(key) as resp:
        assert resp.status == 200
        usage = (await resp.json())["usage"]
    rig.a.script(status=503)
    rig.b.script(status=500)
    async with rig.post(key) as resp:
        assert resp.status >= 500
    ok, failed = await rig.rows(2)
    assert ok["provider"] == "b" and ok["upstream_model"] == "b-1"
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert ok["cost_usd"] == pytest.approx(cost(ok)) and ok["estimated"] == 0
    assert (failed["prompt_tokens"], failed["completion_tokens"], failed["cost_usd"]) == (0, 0, 0)


async def test_shared_limits_in_redis_count_what_each_request_used(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
) -> None:
    rig = await make_rig(
        aiohttp_server, aiohttp_client, make_settings, monkeypatch,
        redis_url=redis_url, redis_timeout_seconds=5.0,
    )  # fmt: skip
    key = await create_key(rig.gw, budget_usd=100.0, tpm=10**6, max_concurrency=2)
    for path, body in REQUESTS:
        async with rig.post(key, path, body) as resp:
            assert resp.status == 200, (path, await resp.text())
            await resp.read()
    rows = await rig.rows(len(REQUESTS))
    # Settled before its lease went to Redis: what it used, never "ended without settling".
    assert [used for _, used in rig.leaves] == [
        (r["prompt_tokens"] + r["completion_tokens"], pytest.approx(r["cost_usd"])) for r in rows
    ]
    gate = app_of(rig.gw)[GATE_KEY]
    (record,) = [k for k in app_of(rig.gw)[KEYS_KEY].records() if k.id == rows[0]["key_id"]]
    spent = await gate.spending(record)  # (after the leases still being ended)
    assert spent is not None and spent.usd == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert spent.tokens == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)


async def test_sigterm_with_requests_in_flight_loses_no_token_of_any_row(
    aiohttp_server: AiohttpServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real `gateway serve`: one answer held past the grace period, one stream held after
    # two chunks, one answer the upstream gives during the grace period. Each row keeps its
    # tokens and cost (estimated for the two cut short).
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    never, late = asyncio.Event(), asyncio.Event()
    fake.script(match="held", hold=never)
    fake.script(match="streamed", content="a b c d", hold=never, hold_after=2)
    fake.script(match="late", hold=late)
    db, config, port = tmp_path / "keys.db", tmp_path / "gateway.toml", free_port()
    config.write_text(
        f'[server]\ndatabase = "{db}"\nshutdown_grace_seconds = 1.0\n'
        f'[[providers]]\nname = "up"\ntype = "openai"\napi_keys = ["k"]\n'
        f'base_url = "{fake.base_url}"\n'
        f'[[models]]\nname = "gpt"\ntargets = [{{ provider = "up", model = "x" }}]\n'
        f"input_price_per_mtok = {IN_PRICE}\noutput_price_per_mtok = {OUT_PRICE}\n"
    )
    secret = await cli_key(db, capsys)
    proc = await start_serve(config, port, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}{CHAT}"
    auth = {"Authorization": f"Bearer {secret}"}
    try:
        async with asyncio.timeout(NEVER_HANG), aiohttp.ClientSession() as session:
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()

            async def call(text: str, stream: bool) -> tuple[int, bytes]:
                body = {"model": "gpt", "messages": [{"role": "user", "content": text}]}
                try:
                    async with session.post(
                        url, json={**body, "stream": stream}, headers=auth
                    ) as r:
                        return r.status, await r.read()
                except aiohttp.ClientError as exc:
                    return 0, repr(exc).encode()

            calls = []
            for text, stream in (("held one", False), ("streamed one", True), ("late one", False)):
                fake.request_seen.clear()
                calls.append(asyncio.ensure_future(call(text, stream)))
                await fake.request_seen.wait()
            proc.terminate()
            await asyncio.sleep(0.2)  # (SIGTERM has reached it: no event to await across processes)
            late.set()
            results = await asyncio.gather(*calls)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert results[2][0] == 200 and b"usage" in results[2][1], results
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["request_id"]: dict(r) for r in conn.execute("SELECT * FROM usage")}
    assert len(rows) == 3, rows
    answered, streamed, held = sorted(
        rows.values(), key=lambda r: (r["status"] != 200, not r["stream"])
    )
    usage = json.loads(results[2][1])["usage"]
    assert (answered["status"], answered["estimated"]) == (200, 0)
    assert answered["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert answered["completion_tokens"] == usage["completion_tokens"] > 0
    assert held["estimated"] == 1 and held["prompt_tokens"] > 0, held
    assert streamed["estimated"] == 1 and streamed["completion_tokens"] >= 2, streamed
    for row in (held, streamed, answered):
        assert row["cost_usd"] == pytest.approx(cost(row)) and row["cost_usd"] > 0, row
