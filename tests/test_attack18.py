"""Four changes attacked from outside (bb65f12..0b851aa): the deferred settle dropped before it
runs and `raw_fields` off the struct's own tuples, so "a request leaves no reference cycle";
the young collection every 2,000 allocations that this claim allowed; and log lines through a
buffer of their own over stdout under PYTHONUNBUFFERED=1, whole lines of at most PIPE_BUF a
write.

Cycles: every request runs with the collector off, then `gc.DEBUG_SAVEALL` shows what only the
collector would have freed. Answers, streams and refusals leave nothing; nor, since errors
that are dealt with drop their tracebacks (`errors.drop_tracebacks`) and a lost connection
drops its last body, does a request with a failed upstream attempt, an error event or a
dropped connection mid-stream, a refusal raised from a local, or a client that hangs up
(each left a cycle before). Memory and logs: a real `gateway serve`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

import gateway as gateway_package
from gateway import logs, middleware
from gateway.failover import Exchange
from gateway.logs import configure_logging
from gateway.middleware import LOGGED_PATH
from gateway.server import GatewayProtocol
from gateway.settings import ModelConfig, RoutingSettings, Target
from gateway.trace import TRACE_KEY, RequestTrace
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    cli_key,
    create_key,
    fake_provider,
    free_port,
    provider_config,
    start_fakes,
    start_gateway,
    start_serve,
)
from tests.fakes import FakeOpenAI
from tests.test_lifecycle import refused
from tests.test_log_lines_process import load

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hello there world"}]
PRICES: dict[str, Any] = {"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0}
GATEWAY_DIR = str(Path(gateway_package.__file__).parent)
PIPE_BUF = 4096


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": MSGS, "stream": stream}


def messages(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "max_tokens": 20, "messages": MSGS, "stream": stream}


# ---- reference cycles: the rig --------------------------------------------------------------


class Rig:
    """The gateway in this process before fake OpenAI (two), Anthropic and Gemini upstreams, a
    redirecting one and a slow one; keys without limits, with limits, and with a spent
    budget. `finished` counts requests whose accounting (`middleware._finish`) ran."""

    def __init__(self, gw: TestClient[Any, Any], fakes: dict[str, Any]) -> None:
        self.gw, self.fakes = gw, fakes
        self.keys: dict[str, str] = {}
        self.finished = 0
        self.changed = asyncio.Event()

    async def settled(self, count: int) -> None:
        """Wait until `count` requests have been accounted for (their line written)."""
        async with asyncio.timeout(NEVER_HANG):
            while self.finished < count:
                self.changed.clear()
                await self.changed.wait()

    async def post(self, path: str, body: Any, key: str = "free") -> int:
        headers = {"Authorization": f"Bearer {self.keys[key]}"}
        async with self.gw.post(path, json=body, headers=headers) as resp:
            await resp.read()
            return resp.status


A = Target(provider="a", model="a-1")


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> Rig:
    fakes = await start_fakes(aiohttp_server, "openai", "anthropic", "gemini")
    fakes["b"] = FakeOpenAI()
    await fakes["b"].start(aiohttp_server)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("http://127.0.0.1:1/elsewhere")

    redirecting = web.Application()
    redirecting.router.add_post(CHAT, redirect)
    elsewhere = await aiohttp_server(redirecting)
    settings = make_settings(
        providers=(
            fake_provider("openai", fakes["openai"], name="a"),
            fake_provider("openai", fakes["b"], name="b"),
            fake_provider("openai", fakes["openai"], name="native", responses_api=True),
            fake_provider("anthropic", fakes["anthropic"], name="ant"),
            fake_provider("gemini", fakes["gemini"], name="gem"),
            fake_provider("openai", fakes["openai"], name="slow", first_byte_timeout=0.05),
            provider_config(
                "openai", name="redir", api_keys=["k"], base_url=str(elsewhere.make_url("/v1"))
            ),
        ),
        models=(
            ModelConfig(
                name="gpt",
                targets=(A, Target(provider="b", model="b-1", priority=1)),
                embeddings=True,
                **PRICES,
            ),
            ModelConfig(name="solo", targets=(A,), embeddings=True, **PRICES),
            ModelConfig(name="native", targets=(Target(provider="native", model="n-1"),), **PRICES),
            ModelConfig(
                name="claude", targets=(Target(provider="ant", model="claude-x"),), **PRICES
            ),
            ModelConfig(
                name="gem",
                targets=(Target(provider="gem", model="gemini-2.5-flash"),),
                embeddings=True,
                **PRICES,
            ),
            ModelConfig(name="slow", targets=(Target(provider="slow", model="s-1"),), **PRICES),
            ModelConfig(name="redir", targets=(Target(provider="redir", model="r-1"),), **PRICES),
        ),
        # Every attempt tried every time: no breaker takes an account out after the warm-up.
        routing=RoutingSettings(max_attempts=2, backoff_initial=0.0, failure_threshold=10**6),
        max_body_bytes=16384,
    )
    r = Rig(await start_gateway(aiohttp_client, settings), fakes)
    r.keys["free"] = await create_key(r.gw)
    r.keys["limited"] = await create_key(r.gw, budget_usd=100.0, tpm=10**6, max_concurrency=4)
    r.keys["spent"] = await create_key(r.gw, budget_tokens=1)
    r.keys["rpm"] = await create_key(r.gw, rpm=1)
    r.keys["solo_only"] = await create_key(r.gw, models=["solo"])
    finish = middleware._finish

    def counted(*args: Any) -> None:
        finish(*args)
        r.finished += 1
        r.changed.set()

    monkeypatch.setattr(middleware, "_finish", counted)
    return r


def _ours(obj: object) -> str | None:
    """The name of a gateway object of a request or a connection, or None."""
    if isinstance(obj, (RequestTrace, Exchange, GatewayProtocol)):
        return type(obj).__name__
    if isinstance(obj, web.Request) and TRACE_KEY in obj:  # (not the fakes' requests)
        return "web.Request"
    if isinstance(obj, types.FrameType) and obj.f_code.co_filename.startswith(GATEWAY_DIR):
        return f"frame {obj.f_code.co_name}"
    return None


Action = Callable[[Rig, str], Awaitable[object]]


async def leftovers(rig: Rig, action: Action, key: str, times: int = 3) -> dict[str, int]:
    """What `times` runs of `action` (one request each) left for the garbage collector, of
    the gateway's objects, after one run to warm up (what is made once is no garbage).

    Runs inside `_collector_held`: the collections here walk only what was made since the
    last freeze, not the whole test process (a full one over every test module took ~0.1 s)."""
    start = rig.finished
    await action(rig, key)
    await rig.settled(start + 1)
    gc.collect()
    gc.freeze()  # what is alive now is out of the way: each collection here is quick
    try:
        start = rig.finished
        for _ in range(times):
            await action(rig, key)
        await rig.settled(start + times)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = Counter(name for obj in gc.garbage if (name := _ours(obj)) is not None)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return dict(found)


@contextlib.contextmanager
def _collector_held() -> Iterator[None]:
    """The collector off, and what is alive at the start frozen out of its sight, until the
    end: one full collection per test instead of one per action."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.enable()


def request(path: str, body: Any, fake: str | None = None, **script: Any) -> Action:
    """A request to `path`, the upstream `fake` scripted with `script` for it first."""

    async def run(rig: Rig, key: str) -> int:
        if fake is not None:
            rig.fakes[fake].script(**script)
        return await rig.post(path, body, key)

    return run


async def _all_left(rig: Rig, actions: dict[str, Action], keys: tuple[str, ...]) -> dict[str, Any]:
    left = {}
    with _collector_held():
        for name, action in actions.items():
            for key in keys:
                found = await leftovers(rig, action, key)
                if found:
                    left[f"{name} ({key} key)"] = found
    return left


# ---- reference cycles: what leaves none -----------------------------------------------------


async def _models_404(rig: Rig, key: str) -> int:
    headers = {"Authorization": f"Bearer {rig.keys[key]}"}
    async with rig.gw.get("/v1/models/no-such-model", headers=headers) as resp:
        return resp.status


def _raw(path: str, data: bytes, auth: str) -> Action:
    """A request of `data` bytes to `path`, with `auth` as its bearer (a key's name or not)."""

    async def run(rig: Rig, key: str) -> int:
        headers = {"Authorization": f"Bearer {rig.keys.get(auth, auth)}"}
        async with rig.gw.post(path, data=data, headers=headers) as resp:
            await resp.read()
            return resp.status

    return run


def _as(key_name: str, path: str, body: Any) -> Action:
    async def run(rig: Rig, _: str) -> int:
        return await rig.post(path, body, key_name)

    return run


# Refused before any upstream call.
REFUSED: dict[str, Action] = {
    "401 unknown key": _raw(CHAT, b"{}", "sk-no-such-key"),
    "403 model not allowed": _as("solo_only", CHAT, chat("gpt")),
    "404 unknown model": request(CHAT, chat("no-such-model")),
    "404 unknown route": _raw("/v1/nowhere", b"{}", "free"),
    "400 malformed JSON": _raw(CHAT, b"{nope", "free"),
    "413 body too large": request(CHAT, chat("solo") | {"messages": [{"role": "user",
                                                                      "content": "x" * 20_000}]}),
    "429 requests per minute": _as("rpm", CHAT, chat("solo")),
}  # fmt: skip


ANSWERED: dict[str, Action] = {
    "chat": request(CHAT, chat("gpt")),
    "chat stream": request(CHAT, chat("gpt", True)),
    "responses": request("/v1/responses", {"model": "gpt", "input": "hi there"}),
    "responses stream": request("/v1/responses", {"model": "gpt", "input": "hi", "stream": True}),
    "responses native": request("/v1/responses", {"model": "native", "input": "hi there"}),
    "messages": request("/v1/messages", messages("gpt")),
    "messages stream": request("/v1/messages", messages("gpt", True)),
    "embeddings": request("/v1/embeddings", {"model": "gpt", "input": "hi"}),
    "completions": request("/v1/completions", {"model": "gpt", "prompt": "hi"}),
    "completions stream": request("/v1/completions", {"model": "gpt", "prompt": "hi",
                                                      "stream": True}),
    "anthropic chat stream": request(CHAT, chat("claude", True)),
    "anthropic messages": request("/v1/messages", messages("claude")),
    "gemini chat": request(CHAT, chat("gem")),
    "gemini stream": request(CHAT, chat("gem", True)),
    "gemini embeddings": request("/v1/embeddings", {"model": "gem", "input": "hi"}),
    # The upstream's refusal of the request itself is answered at once (no retry).
    "upstream 400": request(CHAT, chat("solo"), "openai", status=400),
    "upstream 404 stream": request(CHAT, chat("solo", True), "openai", status=404),
    # (An error event mid-stream from Anthropic, translated to chat, leaves none.)
    "anthropic error event mid-stream": request(
        CHAT, chat("claude", True), "anthropic", error_after=5, content="a b c d e f g"
    ),
}  # fmt: skip


async def test_answers_and_refusals_leave_no_reference_cycle(rig: Rig) -> None:
    # Every endpoint and provider, answered, streamed or refused by the upstream, with and
    # without limits (a deferred settle, or one run at once), and refusals before any call.
    left = await _all_left(rig, ANSWERED, ("free", "limited"))
    left.update(await _all_left(rig, REFUSED, ("free",)))
    assert left == {}


# ---- reference cycles: what left one before -------------------------------------------------

FAILED_ATTEMPTS: dict[str, Action] = {
    "503, answered by the second provider": request(CHAT, chat("gpt"), "openai", status=503),
    "429 on a stream, the second provider": request(CHAT, chat("gpt", True), "openai",
                                                     status=429),
    "responses, 500 twice": request("/v1/responses", {"model": "solo", "input": "hi"}, "openai",
                                    status=500, times=2),
    "messages, connection reset twice": request("/v1/messages", messages("solo"), "openai",
                                                drop_before_response=True, times=2),
    "embeddings, 503 twice": request("/v1/embeddings", {"model": "solo", "input": "x"}, "openai",
                                     status=503, times=2),
    "completions, 503 twice": request("/v1/completions", {"model": "solo", "prompt": "x"},
                                      "openai", status=503, times=2),
    "anthropic 529 twice": request(CHAT, chat("claude"), "anthropic", status=529, times=2),
    "gemini 429 twice": request(CHAT, chat("gem"), "gemini", status=429, times=2),
    "a redirect, refused": request(CHAT, chat("redir")),
    "no first byte in time": request(CHAT, chat("slow", True), "openai", hold=asyncio.Event(),
                                     times=2),
}  # fmt: skip


async def test_a_request_with_a_failed_upstream_attempt_leaves_no_reference_cycle(
    rig: Rig,
) -> None:
    # Retried and answered, failed over, or failed: every endpoint, provider and kind of
    # failure (status, reset, redirect, timeout), with and without limits.
    left = await _all_left(rig, FAILED_ATTEMPTS, ("free",))
    left.update(await _all_left(rig, dict(list(FAILED_ATTEMPTS.items())[:1]), ("limited",)))
    assert left == {}


ERROR_EVENTS: dict[str, Action] = {
    "chat": request(CHAT, chat("solo", True), "openai", error_after=2),
    "completions": request("/v1/completions", {"model": "solo", "prompt": "x", "stream": True},
                           "openai", error_after=2),
    "responses, translated": request("/v1/responses", {"model": "solo", "input": "hi",
                                                       "stream": True}, "openai", error_after=2),
    "messages, translated": request("/v1/messages", messages("solo", True), "openai",
                                    error_after=2),
    "responses, relayed as they are": request("/v1/responses", {"model": "native",
                                             "input": "hi", "stream": True}, "openai",
                                             error_after=2),
    "messages to anthropic": request("/v1/messages", messages("claude", True), "anthropic",
                                     error_after=5, content="a b c d e f g"),
    "gemini chat": request(CHAT, chat("gem", True), "gemini", error_after=2,
                           content="a b c d e f g"),
}  # fmt: skip


async def test_an_error_event_mid_stream_leaves_no_reference_cycle(rig: Rig) -> None:
    assert await _all_left(rig, ERROR_EVENTS, ("free", "limited")) == {}


DROPS: dict[str, Action] = {
    "openai": request(CHAT, chat("solo", True), "openai", drop_after=2),
    "anthropic": request(CHAT, chat("claude", True), "anthropic", drop_after=5,
                         content="a b c d e f g"),
    "gemini": request(CHAT, chat("gem", True), "gemini", drop_after=2, content="a b c d e f g"),
}  # fmt: skip


async def test_an_upstream_that_drops_mid_stream_leaves_no_reference_cycle(rig: Rig) -> None:
    assert await _all_left(rig, DROPS, ("free",)) == {}


async def test_refusals_raised_from_a_local_leave_no_reference_cycle(rig: Rig) -> None:
    actions: dict[str, Action] = {
        "GET /v1/models/<unknown>": _models_404,
        "a spent budget": _as("spent", CHAT, chat("solo")),
        "a built-in tool, translated": request(
            "/v1/responses", {"model": "claude", "input": "hi", "tools": [{"type": "web_search"}]}
        ),
    }
    assert await _all_left(rig, actions, ("free",)) == {}


async def _hang_up_before_the_first_byte(rig: Rig, key: str) -> None:
    fake = rig.fakes["openai"]
    fake.request_seen.clear()
    fake.client_disconnected.clear()
    fake.script(hold=asyncio.Event())  # never answers
    session = aiohttp.ClientSession()
    call = asyncio.ensure_future(
        session.post(
            rig.gw.make_url(CHAT), json=chat("solo"),
            headers={"Authorization": f"Bearer {rig.keys[key]}"},
        )
    )  # fmt: skip
    async with asyncio.timeout(NEVER_HANG):
        await fake.request_seen.wait()
        call.cancel()
        await session.close()
        await fake.client_disconnected.wait()


async def _hang_up_mid_stream(rig: Rig, key: str) -> None:
    fake = rig.fakes["openai"]
    fake.client_disconnected.clear()
    fake.script(content="one two three four", hold=asyncio.Event(), hold_after=2)
    headers = {"Authorization": f"Bearer {rig.keys[key]}"}
    async with rig.gw.post(CHAT, json=chat("solo", True), headers=headers) as resp:
        assert resp.status == 200
        await resp.content.readany()
        resp.close()
    async with asyncio.timeout(NEVER_HANG):
        await fake.client_disconnected.wait()


async def test_a_client_that_hangs_up_leaves_no_reference_cycle(rig: Rig) -> None:
    actions = {"before the first byte": _hang_up_before_the_first_byte,
               "mid-stream": _hang_up_mid_stream}  # fmt: skip
    assert await _all_left(rig, actions, ("free",)) == {}


# ---- memory of a real `gateway serve` under a flood ------------------------------------------

REPLY = {
    "id": "c", "object": "chat.completion", "created": 1, "model": "x",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hello"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}  # fmt: skip


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _rss_growth(tmp_path: Path, capsys: Any, *, fail_first: bool) -> int:
    """KiB the RSS of a real `gateway serve` grew by over 2,000 chat requests of 150 KB each
    (16 at a time), after 96 to warm up. With `fail_first`, the first provider answers 503 and
    the second answers (failover); else the first answers."""

    async def first(request: web.Request) -> web.Response:
        await request.read()
        if fail_first:
            return web.json_response({"error": {"message": "busy", "type": "x"}}, status=503)
        return web.json_response(REPLY)

    async def second(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(REPLY)

    app = web.Application(client_max_size=2**20)
    app.router.add_post("/a/v1/chat/completions", first)
    app.router.add_post("/b/v1/chat/completions", second)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    up = f"http://127.0.0.1:{runner.addresses[0][1]}"
    db, config, port = tmp_path / "keys.db", tmp_path / "gateway.toml", free_port()
    config.write_text(
        f'[server]\ndatabase = "{db}"\n'
        "[routing]\nmax_attempts = 2\nbackoff_initial = 0.0\nfailure_threshold = 1000000\n"
        f'[[providers]]\nname = "a"\ntype = "openai"\napi_keys = ["k"]\nbase_url = "{up}/a/v1"\n'
        f'[[providers]]\nname = "b"\ntype = "openai"\napi_keys = ["k"]\nbase_url = "{up}/b/v1"\n'
        '[[models]]\nname = "gpt"\ntargets = [{ provider = "a", model = "x" },\n'
        '  { provider = "b", model = "y", priority = 1 }]\n'
    )
    secret = await cli_key(db, capsys)
    proc = await start_serve(config, port, stdout=subprocess.DEVNULL)
    body = json.dumps(chat("gpt") | {"messages": [{"role": "user", "content": "x" * 150_000}]})
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    try:
        async with asyncio.timeout(NEVER_HANG), aiohttp.ClientSession() as session:
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()

            async def one() -> None:
                async with session.post(f"http://127.0.0.1:{port}{CHAT}", data=body,
                                        headers=headers) as resp:  # fmt: skip
                    assert resp.status == 200, await resp.text()
                    await resp.read()

            for _ in range(6):
                await asyncio.gather(*(one() for _ in range(16)))
            base = peak = rss_kib(proc.pid)
            for _ in range(125):
                await asyncio.gather(*(one() for _ in range(16)))
                peak = max(peak, rss_kib(proc.pid))
    finally:
        proc.terminate()
        await proc.wait()
        await runner.cleanup()
    return peak - base


async def test_memory_stays_flat_under_a_flood_of_answered_requests(
    tmp_path: Path, capsys: Any
) -> None:
    assert await _rss_growth(tmp_path, capsys, fail_first=False) < 32 * 1024


async def test_memory_stays_bounded_under_a_flood_of_failed_over_requests(
    tmp_path: Path, capsys: Any
) -> None:
    assert await _rss_growth(tmp_path, capsys, fail_first=True) < 32 * 1024


# ---- log lines: one buffer over stdout -------------------------------------------------------


@pytest.mark.parametrize("other", ["structlog", "stdlib"])
async def test_a_line_written_at_once_takes_no_write_past_pipe_buf(
    monkeypatch: pytest.MonkeyPatch, other: str
) -> None:
    # stdout as under PYTHONUNBUFFERED=1 (the raw file), on a SOCK_SEQPACKET socket: each
    # write(2) arrives as one record, so the reader sees every write's size.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw = io.FileIO(theirs.fileno(), "wb", closefd=False)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))
    monkeypatch.setattr(logs, "_direct", logs._direct)  # (put back after)
    assert isinstance(sys.stdout.buffer, io.FileIO)
    configure_logging("info", cache=False)
    try:
        log = structlog.get_logger("t")
        for n in range(4):  # held for the turn: 4 lines of ~1,009 bytes, under PIPE_BUF
            logs.info_line(log, "request", {"n": n, "pad": "x" * 920})
        if other == "structlog":
            log.warning("upstream_usage_unreadable", provider="up")
        else:
            logging.getLogger("aiohttp.server").warning("a warning of aiohttp's")
        await asyncio.sleep(0)  # the end of the turn
        await asyncio.sleep(0)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
        monkeypatch.undo()
        theirs.close()
    with ours:
        records = []
        while record := ours.recv(1 << 16):
            records.append(record)
    events = [json.loads(line)["level"] for line in b"".join(records).splitlines()]
    assert events == ["info"] * 4 + ["warning"]  # every line, whole and in order...
    assert [len(r) for r in records if len(r) > PIPE_BUF] == []  # ... and no write too big


def _without(name: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != name}


async def _serve_with(
    tmp_path: Path,
    capsys: Any,
    stdout: Any,
    env: dict[str, str],
    server: str = "",
    fake: FakeOpenAI | None = None,
    argv: tuple[str, ...] = (),
) -> tuple[asyncio.subprocess.Process, str, int]:
    """A real `gateway serve` (`argv` added) with `stdout` and `env`, the `up` provider on
    `fake` if given; (process, key, port) once it listens."""
    db, config, port = tmp_path / "keys.db", tmp_path / "gateway.toml", free_port()
    text = f'[server]\ndatabase = "{db}"\n{server}'
    if fake is not None:
        text += f'[[providers]]\nname = "up"\ntype = "openai"\nbase_url = "{fake.base_url}"\n'
    config.write_text(text)
    secret = await cli_key(db, capsys)
    if argv:
        proc = await asyncio.create_subprocess_exec(
            *argv, sys.executable, "-m", "gateway", "serve", "--config", str(config),
            "--port", str(port), stdout=stdout, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
    else:
        proc = await start_serve(config, port, stdout=stdout, env=env)
    return proc, secret, port


async def _listening(proc: asyncio.subprocess.Process) -> bytes:
    assert proc.stderr is not None
    async with asyncio.timeout(NEVER_HANG):
        return await proc.stderr.readline()


@pytest.mark.parametrize("unbuffered", [True, False], ids=["PYTHONUNBUFFERED", "buffered"])
async def test_every_line_is_whole_once_and_in_order_through_sigterm(
    aiohttp_server: AiohttpServer, tmp_path: Path, capsys: Any, unbuffered: bool
) -> None:
    # Requests answered just before SIGTERM (their lines held for a turn), requests the
    # upstream answers during the grace period, and a line past PIPE_BUF (a 6,000-character
    # path, which any client can send): each line once, whole, in the order written.
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    late = asyncio.Event()
    fake.script(match="late", hold=late, times=3)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"} if unbuffered else _without("PYTHONUNBUFFERED")
    out = tmp_path / "out.log"
    with out.open("wb") as stdout:
        proc, secret, port = await _serve_with(
            tmp_path, capsys, stdout, env, "shutdown_grace_seconds = 10\n", fake
        )
    headers = {"Authorization": f"Bearer {secret}"}
    url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(NEVER_HANG), aiohttp.ClientSession() as session:
            assert b"listening" in await _listening(proc)

            async def call(text: str) -> int:
                body = {"model": "up/x", "messages": [{"role": "user", "content": text}]}
                async with session.post(url + CHAT, json=body, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            async with session.get(url + "/" + "p" * 6000, headers=headers) as resp:
                assert resp.status == 404
            late_ones = []
            for _ in range(3):
                fake.request_seen.clear()
                late_ones.append(asyncio.ensure_future(call("late")))
                await fake.request_seen.wait()
            answered = await asyncio.gather(*(call("now") for _ in range(200)))
            proc.send_signal(signal.SIGTERM)
            await refused(port)  # the shutdown began
            late.set()
            assert answered + await asyncio.gather(*late_ones) == [200] * 203
            assert await proc.wait() == 0
    finally:
        late.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = [json.loads(line) for line in out.read_bytes().splitlines()]  # every one whole
    requests = [e for e in events if e["event"] == "request"]
    assert len(requests) == 204 and len({e["request_id"] for e in requests}) == 204
    # (A path is logged up to LOGGED_PATH characters, then "...": the line stays within PIPE_BUF.)
    long_path = "/" + "p" * (LOGGED_PATH - 1) + "..."
    assert [e["path"] for e in requests].count(long_path) == 1
    names = [e["event"] for e in events]
    assert names.index("serving") < names.index("request")
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)  # one stream, in the order written


@pytest.mark.parametrize("stdout", ["/dev/full", "a reader gone mid-run"])
async def test_a_stdout_that_fails_fails_no_request_and_stops_cleanly(
    tmp_path: Path, capsys: Any, stdout: str
) -> None:
    # Under PYTHONUNBUFFERED=1: every write fails (ENOSPC), or the log reader goes away
    # while lines are held in the gateway's buffer (EPIPE from then on).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    read = None
    if stdout == "/dev/full":
        full = os.open("/dev/full", os.O_WRONLY)
        try:
            proc, secret, port = await _serve_with(tmp_path, capsys, full, env)
        finally:
            os.close(full)
    else:
        read, write = os.pipe()
        try:
            proc, secret, port = await _serve_with(tmp_path, capsys, write, env)
        finally:
            os.close(write)
    try:
        async with asyncio.timeout(NEVER_HANG):
            assert b"listening" in await _listening(proc)
            statuses = await load(port, secret, 50)
            if read is not None:
                seen = b""
                while b'"event":"request"' not in seen:  # lines came, then...
                    seen += await asyncio.to_thread(os.read, read, 1 << 16)
                os.close(read)  # ... the reader is gone, with lines maybe still held
                read = None
            statuses += await load(port, secret, 200)
            assert statuses == [200] * 250
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if read is not None:
            os.close(read)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_closed_stdout_does_not_keep_the_server_from_starting(
    tmp_path: Path, capsys: Any
) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    shell = ("/bin/sh", "-c", 'exec "$@" >&-', "sh")  # runs the command with stdout closed
    proc, secret, port = await _serve_with(tmp_path, capsys, None, env, argv=shell)
    try:
        line = await _listening(proc)
        assert b"listening" in line, line
        assert await load(port, secret, 1) == [200]
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_non_blocking_stdout_never_gets_a_torn_line(tmp_path: Path, capsys: Any) -> None:
    read, write = os.pipe()
    os.set_blocking(write, False)  # (its open file description: the child's stdout too)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc, secret, port = await _serve_with(tmp_path, capsys, write, env)
    finally:
        os.close(write)
    os.set_blocking(read, False)

    def drain() -> bytes:
        data = b""
        while True:
            try:
                chunk = os.read(read, 1 << 20)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    try:
        async with asyncio.timeout(NEVER_HANG):
            assert b"listening" in await _listening(proc)
            # ~300 KB of lines, the reader stalled: the pipe fills.
            statuses = await load(port, secret, 400)
            data = drain()
            statuses += await load(port, secret, 20)
            assert statuses == [200] * 420
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            data += drain()
    finally:
        os.close(read)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    torn = []
    for line in data.splitlines():
        try:
            json.loads(line)
        except ValueError:
            torn.append(line)
    assert torn == []  # lines may be lost, but none is torn


# ---- `serve --workers 2` on one stdout pipe ---------------------------------------------------


class Workers:
    """`gateway serve --workers 2` (PYTHONUNBUFFERED=1) whose stdout is a pipe of one page
    (4,096 bytes, as a 64 KiB pipe is once a slow log reader let it fill), read slowly."""

    def __init__(self, proc: asyncio.subprocess.Process, read: int, port: int, key: str) -> None:
        self.proc, self.port, self.key = proc, port, key
        self.read = read
        self.chunks: list[bytes] = []
        self.reading = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            await asyncio.sleep(0.001)  # slow on purpose: the workers often find it full
            try:
                chunk = os.read(self.read, 512)
            except BlockingIOError:
                continue
            if not chunk:
                return
            self.chunks.append(chunk)

    async def load(self, paths: list[str], rounds: int) -> None:
        """`paths` at once, `rounds` times, each on a new connection (both workers take
        some: a kept-alive connection stays with the worker that accepted it)."""
        headers = {"Authorization": f"Bearer {self.key}"}
        url = f"http://127.0.0.1:{self.port}"
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            asyncio.timeout(NEVER_HANG),
            aiohttp.ClientSession(connector=connector) as session,
        ):

            async def get(path: str) -> None:
                async with session.get(url + path, headers=headers) as resp:
                    await resp.read()

            for _ in range(rounds):
                await asyncio.gather(*(get(path) for path in paths))

    async def stop(self) -> list[bytes]:
        """Stop the server; every line it wrote, torn ones included."""
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(NEVER_HANG):
            assert await self.proc.wait() == 0
            await self.reading  # to the end of the pipe
        return b"".join(self.chunks).splitlines()


@pytest.fixture
async def workers(tmp_path: Path, capsys: Any, redis_url: str) -> AsyncIterator[Workers]:
    db, config, port = tmp_path / "keys.db", tmp_path / "gateway.toml", free_port()
    config.write_text(f'[server]\ndatabase = "{db}"\nredis_url = "{redis_url}"\n')
    secret = await cli_key(db, capsys)
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BUF)
    os.set_blocking(read, False)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
        "--workers", "2", stdout=write, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    os.close(write)
    running = Workers(proc, read, port, secret)
    try:
        assert b"listening" in await _listening(proc)
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        running.reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.reading
        os.close(read)


def _torn(lines: list[bytes]) -> list[bytes]:
    torn = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            torn.append(line)
    return torn


async def test_two_workers_never_interleave_lines_under_pipe_buf(workers: Workers) -> None:
    # Request lines of up to ~2.6 KB, many a turn: written in whole lines of at most PIPE_BUF
    # a write, which the kernel never splits, however full the pipe.
    await workers.load(["/v1/models"] * 24 + ["/" + "p" * 2000] * 8, rounds=8)
    lines = await workers.stop()
    assert _torn(lines) == []
    assert sum(b'"event":"request"' in line for line in lines) == 256


async def test_two_workers_never_interleave_a_line_a_client_made_long(workers: Workers) -> None:
    # A client's 6,000-character path is logged cut (`LOGGED_PATH`): the line stays within
    # PIPE_BUF, so the kernel never splits it.
    await workers.load(["/v1/models"] * 24 + ["/" + "p" * 6000] * 8, rounds=8)
    assert _torn(await workers.stop()) == []


def test_stdout_is_written_through_its_descriptor_in_whole_lines_and_never_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `configure_logging` writes to, buffered (no -u) or raw (-u): stdout's descriptor,
    # in lines held until a flush; closing nothing. A stdout without a descriptor (a test's
    # capture) is written as it is.
    with (tmp_path / "out").open("wb") as buffered:
        for stdout in (io.TextIOWrapper(buffered), io.TextIOWrapper(buffered.raw)):
            monkeypatch.setattr(sys, "stdout", stdout)
            ours = logs._stdout()
            assert isinstance(ours, logs._Descriptor)
            ours.write(b"x\n")
            ours.flush()
            stdout.detach()
        assert not buffered.closed
    assert (tmp_path / "out").read_bytes() == b"x\nx\n"
    capture = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdout", capture)
    assert logs._stdout() is capture.buffer
    monkeypatch.setattr(sys, "stdout", None)
    with logs._stdout() as nowhere:
        assert nowhere.name == os.devnull


def test_a_stalled_non_blocking_pipe_keeps_the_rest_of_a_line_for_the_next_flush() -> None:
    # A pipe that is full (EAGAIN) or takes part of a write: what is left waits, in order;
    # nothing is dropped but whole lines past `_MAX_HELD`.
    read, write = os.pipe()
    os.set_blocking(write, False)
    os.set_blocking(read, False)
    try:
        ours = logs._Descriptor(write)
        lines = [b'{"n":%d,"pad":"%b"}\n' % (i, b"x" * (i * 37 % 3000)) for i in range(400)]
        got = b""
        for k, line in enumerate(lines):
            ours.write(line)
            ours.flush()
            if k % 97 == 96:  # the reader wakes up now and then
                with contextlib.suppress(BlockingIOError):
                    got += os.read(read, 1 << 20)
        while True:
            ours.flush()
            try:
                chunk = os.read(read, 1 << 20)
            except BlockingIOError:
                break
            got += chunk
        assert got == b"".join(lines)
        ours.write(b"y" * logs._MAX_HELD + b"\n")  # too much to hold: dropped whole
        ours.flush()
        with pytest.raises(BlockingIOError):
            os.read(read, 1)
    finally:
        os.close(read)
        os.close(write)
