"""The canonical request log line: one per request, ids and numbers, never secrets or prompts."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, BinaryIO, cast

import msgspec
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import logs, middleware
from gateway.logs import configure_logging


async def test_one_line_per_request_without_secrets(
    gateway: TestClient[Any, Any], key: str
) -> None:
    prompt = "my very private prompt"
    with structlog.testing.capture_logs() as logs:
        resp = await gateway.post(
            "/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": prompt}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status == 200
        bad = await gateway.post(
            "/v1/chat/completions", json={}, headers={"Authorization": "Bearer sk-nope"}
        )
        assert bad.status == 401
    lines = [e for e in logs if e["event"] == "request"]
    assert len(lines) == 2
    ok, refused = lines
    assert ok["request_id"] == resp.headers["X-Request-ID"]
    assert ok["key_id"].startswith("key_")
    assert (ok["model"], ok["provider"], ok["status"]) == ("demo", "demo", 200)
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] == 6
    assert ok["latency_ms"] > 0
    assert refused["status"] == 401 and refused["key_id"] is None
    text = repr(logs)
    assert key not in text and "sk-nope" not in text and prompt not in text


def test_configure_logging_writes_json_lines(capfd: Any) -> None:
    configure_logging("info", cache=False)
    try:
        structlog.get_logger("t").info("hello", n=1)
        import logging

        logging.getLogger("aiohttp.server").warning("from stdlib")
        out = capfd.readouterr().out.strip().splitlines()
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    import json

    first, second = (json.loads(line) for line in out[-2:])
    assert first["event"] == "hello" and first["n"] == 1 and first["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["timestamp"])
    assert second["event"] == "from stdlib" and second["level"] == "warning"


def test_tracebacks_never_carry_local_variables(capfd: Any) -> None:
    import logging

    configure_logging("info", cache=False)
    try:
        prompt = "my password is hunter2"  # noqa: F841 - the local a leaky renderer would show
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("t").exception("failed")
        out = capfd.readouterr().out
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert "boom" in out and "ValueError" in out
    assert "hunter2" not in out


def test_a_librarys_exception_is_written_as_data_without_locals(capfd: Any) -> None:
    """asyncpg logs `Failed to restore the pool connection floor; retrying` with its exception
    every few seconds while PostgreSQL is down: through the stdlib handler its `exc_info` came
    out as three reprs (`<traceback object at 0x...>`). It is written as the gateway's own
    exceptions are: data, without frame locals."""
    import json
    import logging

    configure_logging("info", cache=False)
    try:
        password = "hunter2-in-a-frame"  # noqa: F841 - the local a leaky renderer would show
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            logging.getLogger("asyncpg.pool").warning(
                "Failed to restore the pool connection floor; retrying", exc_info=True
            )
        logs.flush_lines()
        out = capfd.readouterr().out
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    line = json.loads(next(x for x in out.splitlines() if "connection floor" in x))
    assert "exc_info" not in line and "<traceback object" not in out
    assert line["exception"][0]["exc_type"] == "ConnectionRefusedError"
    assert "hunter2" not in out


async def _one_request(gateway: TestClient[Any, Any], key: str) -> None:
    resp = await gateway.post(
        "/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status == 200


async def test_the_request_line_written_directly_is_the_one_structlog_would_write(
    gateway: TestClient[Any, Any], key: str, capfd: Any
) -> None:
    # Once configured, the request line skips structlog's processor chain (it is written on
    # every request); what comes out must be the same line, field for field.
    import json
    import logging

    with structlog.testing.capture_logs() as logs:
        await _one_request(gateway, key)
    captured = next(e for e in logs if e["event"] == "request")
    configure_logging("info", cache=False)
    try:
        await _one_request(gateway, key)
        out = capfd.readouterr().out.splitlines()
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in out if line.startswith("{")]
    written = next(line for line in lines if line["event"] == "request")
    # capture_logs shows the level as log_level, and no context variables or timestamp.
    expected = set(captured) - {"log_level"} | {"level", "timestamp", "request_id", "key_id"}
    assert set(written) == expected
    assert written["level"] == "info" and written["status"] == 200
    assert written["key_id"].startswith("key_") and written["request_id"].startswith("req_")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", written["timestamp"])
    assert key not in "\n".join(out)


async def test_above_info_no_request_line_is_written(
    gateway: TestClient[Any, Any], key: str, capfd: Any
) -> None:
    import logging

    configure_logging("warning", cache=False)
    try:
        await _one_request(gateway, key)
        out = capfd.readouterr().out
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert '"event":"request"' not in out


async def test_lines_on_one_kept_alive_connection_carry_only_their_own_ids(
    gateway: TestClient[Any, Any], key: str, capfd: Any, monkeypatch: Any
) -> None:
    """Requests one after another on one connection share its context: a line (the request
    line, an error's line) never carries an earlier request's key or request id."""
    import json
    import logging

    from aiohttp import ClientSession, TCPConnector

    from gateway.handlers import models
    from tests.conftest import create_key

    other = await create_key(gateway)

    def broken(obj: Any) -> Any:
        raise RuntimeError("a bug after auth")

    monkeypatch.setattr(models, "_json", broken)
    base = f"http://{gateway.host}:{gateway.port}"
    configure_logging("info", cache=False)
    sent: list[tuple[str, str | None]] = []
    try:
        async with ClientSession(base, connector=TCPConnector(limit=1)) as session:
            for secret in (key, other, "sk-nope", other, None, key):
                headers = {"Authorization": f"Bearer {secret}"} if secret else {}
                async with session.get("/v1/models/demo", headers=headers) as resp:
                    await resp.read()
                    sent.append((resp.headers["X-Request-ID"], secret))
        out = capfd.readouterr().out.splitlines()
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in out if line.startswith("{")]
    requests = [line for line in lines if line["event"] == "request"]
    errors = [line for line in lines if line["event"] == "unhandled_error"]
    key_ids = {line["request_id"]: line["key_id"] for line in requests if line["status"] == 500}
    assert [line["request_id"] for line in requests] == [rid for rid, _ in sent]
    assert len(set(key_ids.values())) == 2  # two keys, each request line with its own
    for (rid, secret), line in zip(sent, requests, strict=True):
        assert line["request_id"] == rid
        assert (line["key_id"] is None) == (secret in ("sk-nope", None))
    assert len(errors) == 4  # the authorised requests hit the bug: each line its own ids
    for error in errors:
        assert error["key_id"] == key_ids[error["request_id"]]


async def test_the_row_and_line_are_made_after_the_answer_is_written(
    gateway: TestClient[Any, Any], key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The usage row, metrics and log line cost the client no latency: they are made once
    # aiohttp has handed the answer to the socket, and still before anything else is read.
    written: list[int] = []
    finish = middleware._finish

    def noting(request: web.Request, *args: Any) -> None:
        written.append(request.writer.output_size if request.writer is not None else -1)
        finish(request, *args)

    monkeypatch.setattr(middleware, "_finish", noting)
    with structlog.testing.capture_logs() as logs:
        resp = await gateway.post(
            "/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        body = await resp.read()
        assert [e["status"] for e in logs if e["event"] == "request"] == [200]
    assert len(written) == 1 and written[0] >= len(body) > 0


async def test_request_lines_reach_stdout_in_whole_lines_of_at_most_pipe_buf_a_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `serve --workers N` shares one stdout pipe: a write of at most PIPE_BUF bytes is never
    # interleaved with another process's, so lines go out in whole-line writes of that size.
    writes: list[bytes] = []

    class Sink:
        def __init__(self) -> None:
            self.buffer = b""

        def write(self, data: bytes) -> None:
            self.buffer += data

        def flush(self) -> None:
            if self.buffer:
                writes.append(self.buffer)
            self.buffer = b""

    flushing = logs._Flushing(cast(BinaryIO, Sink()))
    lines = [b'{"n":%d,"pad":"%b"}\n' % (i, b"x" * (i * 37 % 900)) for i in range(200)]
    for line in lines:
        flushing(line)  # all in one turn of the loop
    big = b'{"big":"%b"}\n' % (b"y" * 9000)
    flushing(big)
    flushing.flush()
    assert b"".join(writes) == b"".join(lines) + big
    assert all(w.endswith(b"\n") for w in writes)
    assert all(len(w) <= 4096 for w in writes if w != big) and big in writes
    assert len(writes) < len(lines) / 4  # still many lines a write


async def test_an_unbuffered_stdout_gets_a_buffer_and_the_lines_keep_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under `python -u` or PYTHONUNBUFFERED=1 stdout's bytes are the raw file: request lines
    # still share a write per turn of the loop (held until then), and a line of structlog or
    # of the stdlib, written at once, takes the ones held before it along, in order.
    path = tmp_path / "stdout"
    raw = io.FileIO(path, "wb")
    text = io.TextIOWrapper(raw, write_through=True)
    monkeypatch.setattr(sys, "stdout", text)
    monkeypatch.setattr(logs, "_direct", logs._direct)  # (put back after)
    assert isinstance(sys.stdout.buffer, io.FileIO)
    configure_logging("info", cache=False)
    try:
        log = structlog.get_logger("t")
        logs.info_line(log, "a", {"n": 1})
        logs.info_line(log, "b", {"n": 2})
        assert path.read_bytes() == b""  # held for the turn
        log.warning("c")
        logs.info_line(log, "d", {"n": 4})
        logging.getLogger("aiohttp.server").warning("e")
        logs.info_line(log, "f", {"n": 6})
        await asyncio.sleep(0)  # the end of the turn
        await asyncio.sleep(0)
        events = [json.loads(line)["event"] for line in path.read_bytes().splitlines()]
        assert not raw.closed  # the buffer never closes stdout
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
        monkeypatch.undo()
        text.close()
    assert events == ["a", "b", "c", "d", "e", "f"]


def test_a_stdout_that_fails_loses_the_request_line_and_nothing_else() -> None:
    # The request line's writer wraps stdout itself (no `_Lossy` around it): a closed stdout
    # (ValueError) or a broken pipe (OSError) must not fail the request that wrote the line.
    class Failing:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def write(self, data: bytes) -> None:
            raise self.exc

        def flush(self) -> None:
            raise self.exc

    for exc in (ValueError("I/O operation on closed file"), BrokenPipeError()):
        flushing = logs._Flushing(cast(BinaryIO, Failing(exc)))
        flushing(b'{"event":"request"}\n')
        flushing(b"x" * 5000 + b"\n")  # past PIPE_BUF: a flush inside the write
        flushing.flush()


async def test_a_request_on_a_kept_alive_connection_has_none_of_the_last_ones_context(
    gateway: TestClient[Any, Any], key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp runs each request in a task of its own, on a copy of the connection's context:
    # the key an authenticated request bound is not in the context of the next request on
    # the same connection (an unauthenticated one here), with no unbind of ours.
    from aiohttp import ClientSession, TCPConnector

    from gateway.handlers import health

    seen: list[dict[str, Any]] = []
    real = health.encode

    def spying(obj: Any) -> bytes:
        seen.append(structlog.contextvars.get_contextvars())
        return real(obj)

    monkeypatch.setattr(health, "encode", spying)
    base = f"http://{gateway.host}:{gateway.port}"
    async with ClientSession(base, connector=TCPConnector(limit=1)) as session:
        async with session.get(
            "/v1/models/demo", headers={"Authorization": f"Bearer {key}"}
        ) as first:
            assert first.status == 200
            await first.read()
        async with session.get("/readyz") as second:
            await second.read()
            request_id = second.headers["X-Request-ID"]
    assert seen == [{"request_id": request_id}]


def test_the_request_line_has_every_field_of_the_usage_row_but_its_time_and_endpoint() -> None:
    # The line is its own Struct (cheaper to encode than a dict made from the row): a field
    # added to the usage row must be added to the line too.
    from gateway.records import UsageRecord

    row = {f.name for f in msgspec.structs.fields(UsageRecord)}
    line = [f.name for f in msgspec.structs.fields(logs.RequestLine)]
    extra = {"event", "attempts", "method", "path", "level", "timestamp"}
    assert set(line) == row - {"ts", "endpoint"} | extra
    assert line[0] == "event" and line[-2:] == ["level", "timestamp"]


def test_the_request_fields_are_structlog_s_own_context_variables() -> None:
    # The middleware sets request_id and key_id directly (no bind_contextvars per request):
    # they must be the very variables structlog binds, merges and clears.
    def run() -> None:
        middleware._REQUEST_ID.set("req-1")
        middleware._KEY_ID.set("key-1")
        assert structlog.contextvars.get_contextvars() == {"request_id": "req-1", "key_id": "key-1"}
        structlog.contextvars.bind_contextvars(request_id="req-2")
        assert middleware._REQUEST_ID.get() == "req-2"
        structlog.contextvars.clear_contextvars()
        assert structlog.contextvars.get_contextvars() == {}

    contextvars.copy_context().run(run)


# asyncio's look-ups of the running loop: on Python 3.11 each makes a getpid system call (its
# check that the loop belongs to this process).
_LOOP_LOOKUPS = {"get_running_loop", "_get_running_loop", "get_event_loop"}
# What runs beside requests, in tasks of its own (the usage writer, the key cache...).
_BACKGROUND = ("usage.py", "store.py", "sqlite_usage.py", "refusals.py", "keys.py", "reload.py")


async def test_a_request_asks_asyncio_for_no_loop(
    gateway: TestClient[Any, Any], key: str, capfd: Any
) -> None:
    # The gateway's code on a request's path (middleware, failover, the log line) takes the
    # loop from the request's task: asking asyncio for it was four getpid system calls a
    # request, on a path that makes about ten system calls in all.
    import asyncio
    import logging
    import os
    import sys

    asyncio_dir = os.path.dirname(asyncio.__file__)
    asks: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "c_call" or getattr(arg, "__name__", "") not in _LOOP_LOOKUPS:
            return
        while frame is not None and frame.f_code.co_filename.startswith(asyncio_dir):
            frame = frame.f_back  # (asked by asyncio for its caller: current_task(), ...)
        if frame is None:
            return
        path = frame.f_code.co_filename
        if f"{os.sep}gateway{os.sep}" in path and not path.endswith(_BACKGROUND):
            asks.append(f"{path}:{frame.f_lineno}")

    configure_logging("info", cache=False)
    try:
        capfd.readouterr()
        sys.setprofile(profile)
        try:
            resp = await gateway.post(
                "/v1/chat/completions",
                json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert resp.status == 200
            await resp.read()
            logs.flush_lines()
        finally:
            sys.setprofile(None)
        lines = [line for line in capfd.readouterr().out.splitlines() if '"request"' in line]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert len(lines) == 1  # the line was made (and written) while profiled
    assert asks == []
