"""Shared fixtures: settings on a temp database, the gateway under test, keys, and clients."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import msgspec
import openai
import pytest
import structlog
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from gateway import cli, limits_fallback, logs
from gateway.app import create_app
from gateway.logs import configure_logging
from gateway.router import Router
from gateway.rows import USAGE_COLUMNS
from gateway.server import GatewayRunner
from gateway.settings import (
    DemoConfig,
    ModelConfig,
    ProviderConfig,
    RoutingSettings,
    ServerSettings,
    Settings,
    Target,
)
from gateway.state import KEYS_KEY, LIVE_KEY, REFUSALS_KEY, STORE_KEY, USAGE_KEY
from tests.fake_anthropic import FakeAnthropic
from tests.fake_azure import FakeAzure
from tests.fake_gemini import FakeGemini
from tests.fakes import FakeOpenAI
from tests.redis_server import RedisServer

DEMO = DemoConfig(name="demo")
# One upstream attempt per request, so a scripted upstream failure reaches the client as it is;
# tests about retries and failover (test_routing.py) pass their own routing settings.
ONE_ATTEMPT = RoutingSettings(max_attempts=1)
# As every config has it (gateway.config.DEMO_MODEL): a chat model that embeds too.
DEMO_MODEL = ModelConfig(
    name="demo", targets=(Target(provider="demo", model="demo"),), embeddings=True
)

# Where the tests' throw-away files go (SQLite databases, PostgreSQL's data directories, logs):
# memory, when the machine has room there and no TMPDIR was chosen. On a disk, each SQLite
# commit of a fresh database waits for an fsync: opening and closing the gateway's store took
# 10-40 ms a test on the 2-core VM, more while other processes wrote (test_contract, test_store
# and test_admin alone: 28 s, against 15 s in memory). The files are the same; fsync is free.
SHM = Path("/dev/shm")  # noqa: S108 (a root for private dirs: pytest and mkdtemp make them 0700)
SHM_ROOM = 2 * 1024**3


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist's workers inherit TMPDIR from the controller, which sets it here first.
    if "TMPDIR" in os.environ or config.option.basetemp is not None:
        return
    try:
        room = os.statvfs(SHM)
    except OSError:  # not Linux, or no /dev/shm
        return
    if room.f_bavail * room.f_frsize >= SHM_ROOM and os.access(SHM, os.W_OK | os.X_OK):
        os.environ["TMPDIR"] = tempfile.tempdir = str(SHM)


# Tests wait on events, never on time; this bound only turns a hang (a regression that never
# sets the event) into a failure, and is far longer than any passing wait.
NEVER_HANG = 30.0

MakeSettings = Callable[..., Settings]
MakeKey = Callable[..., Awaitable[str]]


@pytest.fixture
def make_settings(tmp_path: Path) -> MakeSettings:
    """Settings with a temp database and fast background loops; demo provider always present."""

    def build(
        providers: tuple[ProviderConfig, ...] = (),
        models: tuple[ModelConfig, ...] = (),
        routing: RoutingSettings = ONE_ATTEMPT,
        **server: Any,
    ) -> Settings:
        server.setdefault("database", str(tmp_path / "keys.db"))
        server.setdefault("usage_flush_seconds", 0.05)
        server.setdefault("keys_refresh_seconds", 0.1)
        return Settings(
            server=ServerSettings(**server),
            routing=routing,
            providers=(DEMO, *providers),
            models=(DEMO_MODEL, *models),
        )

    return build


class GatewayTestServer(TestServer):
    """aiohttp's test server on the gateway's own runner (`gateway.server`), so tests speak
    to the protocol `gateway serve` runs: its parser errors, header timeout and all."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)


async def start_gateway(aiohttp_client: AiohttpClient, settings: Settings) -> TestClient[Any, Any]:
    # handler_cancellation: a client that hangs up cancels its request, as under `gateway serve`
    # (the test server sets it).
    return await aiohttp_client(GatewayTestServer(create_app(settings)))


@pytest.fixture
async def gateway(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> TestClient[Any, Any]:
    """The gateway with only the demo provider."""
    return await start_gateway(aiohttp_client, make_settings())


@pytest.fixture(autouse=True)
def _quick_redis_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's probe looks for a Redis that went away every 0.1 s in tests instead of
    every second. Most outage tests wait for it once or twice, and what they test is what the
    probe does when it finds Redis, not how long it waits (a test that needs the probe held
    back holds its ping; `Retry-After` is still whole seconds, at least 1)."""
    monkeypatch.setattr(limits_fallback, "_PROBE_SECONDS", 0.1)


@pytest.fixture(autouse=True)
def _logging_as_it_was(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with logging as the test session set it up. `gateway serve` run
    in-process (tests/test_cli.py, test_attack_recheck.py, ...) and the tests of
    `configure_logging` set it up as a real server does: the level filtered in structlog's
    wrapper, JSON lines on stdout, and every module's logger bound to that chain on first use.
    Left so, `structlog.testing.capture_logs()` (which swaps the processors only) missed what
    later tests in the same worker logged, and their log assertions failed or passed by the
    order the worker ran them in. In tests the chain is also looked up at each call."""
    monkeypatch.setattr(cli, "configure_logging", functools.partial(configure_logging, cache=False))
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    direct = (logs._direct, logs._info)
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._direct, logs._info = direct


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One throw-away redis-server for the session (tests use fresh keys, so they do not meet);
    skips when redis-server is not installed."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port()).start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop and start (outages)."""
    server = RedisServer(tmp_path, free_port()).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def limits_backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Server settings for the limits tests: in memory, and shared through a real Redis.

    Redis is never down in these tests, so its timeout is not what they test: 5 s (the most
    allowed), not 0.5 s. With a hundred requests at once in the test's own event loop and the
    2-core machine loaded, a reply took longer than 0.5 s to be read once (the loop busy with
    the others, Redis itself waiting for a core), and a request was refused as
    `redis_unreachable`."""
    if request.param == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_url"), "redis_timeout_seconds": 5.0}


def free_port() -> int:
    """A TCP port nothing listens on right now, for a `gateway serve` process to bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def provider_config(kind: str, **fields: Any) -> ProviderConfig:
    """A provider config of type `kind` (the tagged union's tag), as a config file gives it."""
    return msgspec.convert({"type": kind, **fields}, type=ProviderConfig)  # type: ignore[arg-type]


FAKES: dict[str, Any] = {
    "openai": FakeOpenAI,
    "azure": FakeAzure,
    "anthropic": FakeAnthropic,
    "gemini": FakeGemini,
}


async def start_fakes(aiohttp_server: AiohttpServer, *kinds: str) -> dict[str, Any]:
    """A started fake upstream of each provider type in `kinds`, by type."""
    fakes = {kind: FAKES[kind]() for kind in kinds}
    for fake in fakes.values():
        await fake.start(aiohttp_server)
    return fakes


def fake_provider(kind: str, fake: Any, **fields: Any) -> ProviderConfig:
    """A provider of type `kind` on `fake` (named `kind` unless `name` says otherwise)."""
    fields.setdefault("name", kind)
    fields.setdefault("api_keys", ["k"])
    if kind == "azure":
        fields.setdefault("api_version", "2024-10-21")
    return provider_config(kind, base_url=fake.base_url, **fields)


def app_of(client: TestClient[Any, Any]) -> web.Application:
    app = client.server.app
    assert app is not None
    return app


def router_of(client: TestClient[Any, Any]) -> Router:
    """The router new requests get (the current config's)."""
    return app_of(client)[LIVE_KEY].current.router


async def cli_key(db: str | Path, capsys: pytest.CaptureFixture[str]) -> str:
    """A key made with `gateway keys create` on `db` (as an operator would); its secret."""
    capsys.readouterr()
    argv = ["keys", "create", "--name", "t", "--db", str(db), "--json"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    secret: str = json.loads(capsys.readouterr().out)["key"]
    return secret


async def start_serve(config: Path, port: int, **popen: Any) -> asyncio.subprocess.Process:
    """A real `gateway serve` process on `config` and `port` (`popen`: its stdout, stderr,
    env, cwd...; stderr is a pipe unless given)."""
    popen.setdefault("stderr", subprocess.PIPE)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
        **popen,
    )  # fmt: skip


async def create_key(client: TestClient[Any, Any], **fields: Any) -> str:
    """Create a key in the gateway's store and make the running cache see it at once."""
    app = app_of(client)
    fields.setdefault("name", "test")
    record, secret = await app[STORE_KEY].create_key(**fields)
    app[KEYS_KEY].put(record)
    return secret


@pytest.fixture
async def key(gateway: TestClient[Any, Any]) -> str:
    return await create_key(gateway)


@functools.cache
def sdk_tls() -> ssl.SSLContext:
    """One TLS context for every SDK client the tests make. Left to itself each client
    builds its own, reading the whole CA bundle (~30 ms, over a thousand clients a run); the
    tests speak plain HTTP to the gateway, so it is never used for a handshake."""
    return ssl.create_default_context()


def openai_client(client: TestClient[Any, Any], key: str) -> openai.AsyncOpenAI:
    """The `openai` SDK on the gateway, as a user makes it (on the SDK's default HTTP client,
    sharing `sdk_tls`)."""
    return openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")),
        api_key=key,
        max_retries=0,
        timeout=10,
        http_client=openai.DefaultAsyncHttpxClient(verify=sdk_tls()),
    )


@pytest.fixture
async def oai(gateway: TestClient[Any, Any], key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(gateway, key) as client:
        yield client


async def usage_rows(client: TestClient[Any, Any]) -> list[dict[str, Any]]:
    """Every usage row written so far (after flushing the recorder)."""
    app = app_of(client)
    await app[USAGE_KEY].flush()
    names = ["id", *USAGE_COLUMNS]  # either backend: the columns by name
    rows = await app[STORE_KEY].fetch(f"SELECT {', '.join(names)} FROM usage ORDER BY id")  # noqa: S608
    return [dict(zip(names, row, strict=True)) for row in rows]


async def refusal_counts(client: TestClient[Any, Any]) -> dict[tuple[str, int], int]:
    """Refused requests counted so far, by (key id, status), after flushing the counter."""
    app = app_of(client)
    await app[REFUSALS_KEY].flush()
    async with app[STORE_KEY].db.execute(
        "SELECT key_id, status, SUM(count) FROM refusals GROUP BY key_id, status"
    ) as cur:
        return {(key_id, status): n for key_id, status, n in await cur.fetchall()}


@contextlib.contextmanager
def calls_in(module: ModuleType) -> Iterator[Counter[str]]:
    """Count, while the block runs, the calls into `module`'s functions (by function name) and
    the calls its code makes to C functions (by their name): a measure of work that, unlike
    elapsed time, is the same on a fast machine and a loaded one."""
    counts: Counter[str] = Counter()
    path = module.__file__

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if frame.f_code.co_filename != path:
            return
        if event == "call":
            counts[frame.f_code.co_name] += 1
        elif event == "c_call":
            counts[getattr(arg, "__qualname__", repr(arg))] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(previous)


def sse_events(body: bytes) -> list[Any]:
    """Decode a chat SSE body into its JSON events, asserting the framing on the way."""
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    events = []
    for block in body.split(b"\n\n"):
        if not block or block.startswith(b":"):
            continue
        assert block.startswith(b"data: "), block
        payload = block[6:]
        if payload == b"[DONE]":
            break
        events.append(msgspec.json.decode(payload))
    return events


class RawReply(msgspec.Struct):
    """One HTTP response read off a raw socket."""

    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


async def read_reply(reader: asyncio.StreamReader) -> RawReply:
    """Read one response (its head, then Content-Length bytes of body) from `reader`."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawReply(status=int(status_line.split()[1]), headers=headers, body=body)


async def raw_request(client: TestClient[Any, Any], *parts: bytes) -> RawReply:
    """Send `parts` over a new socket to the gateway (bytes no HTTP client would send) and
    read the one response."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
        async with asyncio.timeout(NEVER_HANG):
            return await read_reply(reader)
    finally:
        writer.close()


# PostgreSQL: one throw-away server per test session, a fresh database per test (tests/pg.py).

_pg_databases = iter(range(1, 1_000_000))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """The session's PostgreSQL server; the test skips (saying why) where none is installed."""
    from tests.pg import own_server

    with own_server() as server:
        yield server


@pytest.fixture
async def pg_url(pg_server: Any) -> AsyncIterator[str]:
    """A URL of a new, empty database on the session's server, dropped after the test."""
    import asyncpg

    name = f"kiosk_test_{next(_pg_databases)}"
    admin = await asyncpg.connect(pg_server.admin_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield pg_server.url(name)
    admin = await asyncpg.connect(pg_server.admin_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend in turn: a SQLite path, then a PostgreSQL URL (skipped without PostgreSQL)."""
    if request.param == "sqlite":
        return str(tmp_path / "keys.db")
    url: str = request.getfixturevalue("pg_url")
    return url
