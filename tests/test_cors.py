"""CORS (`[server] cors_origins`): what a browser on a listed origin sees, over raw HTTP:
preflights answered before authentication, the origin echoed on answers (errors and event
streams included), and nothing at all for an origin that is not listed."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.config import ConfigError, load_settings
from gateway.state import LIVE_KEY
from tests.conftest import (
    MakeSettings,
    app_of,
    create_key,
    raw_request,
    sse_events,
    start_gateway,
)

APP = "https://app.example.com"
OTHER = "https://evil.example.net"
CHAT = "/v1/chat/completions"
BODY = b'{"model":"demo","messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> TestClient[Any, Any]:
    return await start_gateway(aiohttp_client, make_settings(cors_origins=(APP,)))


def preflight(origin: str, headers: str = "authorization, content-type") -> bytes:
    return (
        f"OPTIONS {CHAT} HTTP/1.1\r\nHost: gw\r\nOrigin: {origin}\r\n"
        f"Access-Control-Request-Method: POST\r\n"
        f"Access-Control-Request-Headers: {headers}\r\nConnection: close\r\n\r\n"
    ).encode()


def post(origin: str, key: str | None, body: bytes = BODY) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nOrigin: {origin}\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def test_a_preflight_from_a_listed_origin_is_answered_without_a_key(
    gw: TestClient[Any, Any],
) -> None:
    reply = await raw_request(gw, preflight(APP))
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == APP
    assert reply.headers["vary"] == "Origin"
    allowed = {h.strip().lower() for h in reply.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in reply.headers["access-control-allow-methods"]
    assert int(reply.headers["access-control-max-age"]) > 0


async def test_the_sdks_own_headers_are_allowed(gw: TestClient[Any, Any]) -> None:
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    reply = await raw_request(gw, preflight(APP, asked))
    allowed = {h.strip() for h in reply.headers["access-control-allow-headers"].split(",")}
    assert {"x-stainless-os", "x-stainless-retry-count"} <= allowed
    # A list that is not plain header names is not echoed (no header injection either).
    reply = await raw_request(gw, preflight(APP, "x-ok, <script>"))
    assert reply.headers["access-control-allow-headers"] == "Authorization, Content-Type"


async def test_answers_to_a_listed_origin_carry_it_errors_included(
    gw: TestClient[Any, Any],
) -> None:
    key = await create_key(gw)
    ok = await raw_request(gw, post(APP, key))
    assert ok.status == 200
    assert ok.headers["access-control-allow-origin"] == APP
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    for reply in (
        await raw_request(gw, post(APP, None)),  # 401: no key
        await raw_request(gw, post(APP, key, b"{not json")),  # 400
        await raw_request(gw, post(APP, key, b'{"model":"nope","messages":[]}')),
    ):
        assert reply.status >= 400
        assert reply.json()["error"]["message"]
        assert reply.headers["access-control-allow-origin"] == APP
        assert reply.headers["vary"] == "Origin"


async def test_a_stream_carries_the_origin(gw: TestClient[Any, Any]) -> None:
    key = await create_key(gw)
    resp = await gw.post(
        CHAT,
        data=BODY[:-1] + b',"stream":true}',
        headers={"Origin": APP, "Authorization": f"Bearer {key}"},
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert sse_events(await resp.read())


async def test_an_unlisted_origin_gets_no_cors_headers(gw: TestClient[Any, Any]) -> None:
    reply = await raw_request(gw, preflight(OTHER))
    assert reply.status == 401  # treated as any request: no key, no answer a browser accepts
    assert not any(h.startswith("access-control-") for h in reply.headers)
    key = await create_key(gw)
    reply = await raw_request(gw, post(OTHER, key))
    assert reply.status == 200  # not a browser: CORS is only what the browser lets a page read
    assert not any(h.startswith("access-control-") for h in reply.headers)
    # No Origin at all (curl, the SDKs outside a browser): no CORS headers; `Vary` still
    # tells caches the answer depends on it.
    resp = await gw.get("/healthz")
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert resp.headers["Vary"] == "Origin"


async def test_the_dashboard_is_left_alone(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    """The dashboard is used from its own origin only: no CORS for it, even for a listed one."""
    gw = await start_gateway(aiohttp_client, make_settings(cors_origins=(APP,), admin_key="a" * 16))
    reply = await raw_request(
        gw,
        b"OPTIONS /dashboard/keys HTTP/1.1\r\nHost: gw\r\nOrigin: " + APP.encode()
        + b"\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    assert reply.status != 204
    assert not any(h.startswith("access-control-") for h in reply.headers)
    resp = await gw.get("/dashboard/signin", headers={"Origin": APP})
    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_off_by_default(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> None:
    gw = await start_gateway(aiohttp_client, make_settings())
    reply = await raw_request(gw, preflight(APP))
    assert reply.status in (401, 405)
    assert not any(h.startswith("access-control-") or h == "vary" for h in reply.headers)


async def test_any_origin_with_a_star(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(cors_origins=("*",)))
    reply = await raw_request(gw, preflight(OTHER))
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == OTHER  # echoed, never `*`


async def test_a_reload_changes_the_origins(gw: TestClient[Any, Any]) -> None:
    live = app_of(gw)[LIVE_KEY]
    settings = live.current.settings
    server = msgspec.structs.replace(settings.server, cors_origins=(OTHER,))
    live.current.settings = msgspec.structs.replace(settings, server=server)
    assert (await raw_request(gw, preflight(OTHER))).status == 204
    assert (await raw_request(gw, preflight(APP))).status == 401


@pytest.mark.parametrize(
    "origin", ["https://app.example.com/", "app.example.com", "https://a.com/path", "ftp://x"]
)
def test_an_origin_must_be_scheme_host_and_port(origin: str, tmp_path: Any) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[server]\ncors_origins = ["{origin}"]\n')
    with pytest.raises(ConfigError, match="cors_origins"):
        load_settings(str(path), {})
    path.write_text('[server]\ncors_origins = ["http://localhost:5173", "*"]\n')
    assert load_settings(str(path), {}).server.cors_origins == ("http://localhost:5173", "*")
