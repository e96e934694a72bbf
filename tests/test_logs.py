"""The canonical request log line: one per request, ids and numbers, never secrets or prompts."""

from __future__ import annotations

import re
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import middleware
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


async def test_the_row_and_line_are_made_after_the_answer_is_written(
    gateway: TestClient[Any, Any], key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The usage row, metrics and log line cost the client no latency: they are made once
    # aiohttp has handed the answer to the socket, and still before anything else is read.
    written: list[int] = []
    finish = middleware._finish

    def noting(request: web.Request, trace: Any, status: int) -> None:
        written.append(request.writer.output_size if request.writer is not None else -1)
        finish(request, trace, status)

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
