"""CORS: browser applications on the origins of `[server] cors_origins` may call the API.

`preflight` answers a preflight (`OPTIONS` with `Access-Control-Request-Method`) from a
listed origin at once, before authentication (browsers send no credentials with it);
`add_cors_headers` (through `middleware.response_headers`) adds
`Access-Control-Allow-Origin` to every answer to a listed origin before its headers go out,
so errors and event streams carry it too. An origin that is not listed gets no CORS header at
all, and its preflight goes on like any request (a 401 or 405), which a browser treats as a
refusal. The origin is echoed exactly (never `*`), with
`Vary: Origin` so caches keep answers to different origins apart. Reloadable: each request
reads the list from the config it runs on. The dashboard is left out: it is used from its own
origin only, and checks `Origin` itself against cross-site forms.
"""

from __future__ import annotations

import re

from aiohttp import web

from gateway.state import LIVE_KEY, SNAPSHOT_KEY

__all__ = ["add_cors_headers", "preflight"]

_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
_ALLOW_HEADERS = "Authorization, Content-Type"
# What a page's script may read of an answer besides the CORS-safelisted headers.
_EXPOSE = ", ".join(
    (
        "X-Request-ID",
        "request-id",  # (the same id, on the Messages API: Anthropic's SDK reads this one)
        "x-gateway-provider",
        "Retry-After",
        "retry-after-ms",
        "x-should-retry",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    )
)
_MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer
# Requested headers are echoed when they are a plain list of header names (the SDKs send
# their own, such as OpenAI's `x-stainless-*`); anything else gets the fixed list.
_HEADER_LIST = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*$")
_MAX_HEADER_LIST = 2048
_NOT_FOR = "/dashboard"  # paths CORS leaves alone


def _origins(request: web.Request) -> tuple[str, ...]:
    # Not `request.get()`: Mapping's, in Python, two calls on every answer.
    try:
        settings = request[SNAPSHOT_KEY].settings
    except KeyError:  # an answer made before `middleware.gateway` took the snapshot
        settings = request.app[LIVE_KEY].current.settings
    return settings.server.cors_origins


def _allowed(origins: tuple[str, ...], origin: str) -> bool:
    return origin in origins or "*" in origins


def preflight(request: web.Request) -> web.Response | None:
    """The answer to a preflight from a listed origin; None for every other request (nearly
    all), which goes on as usual. Called by `middleware.gateway` before authentication."""
    if (
        request.method != "OPTIONS"
        or "Access-Control-Request-Method" not in request.headers
        or request.path.startswith(_NOT_FOR)
    ):
        return None
    origin = request.headers.get("Origin")
    if origin is None or not _allowed(_origins(request), origin):
        return None
    requested = request.headers.get("Access-Control-Request-Headers", "").strip()
    allow = _ALLOW_HEADERS
    if requested and len(requested) <= _MAX_HEADER_LIST and _HEADER_LIST.match(requested):
        allow = f"{_ALLOW_HEADERS}, {requested}"
    # The origin and Vary are added by `add_cors_headers`, as on every answer.
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": _METHODS,
            "Access-Control-Allow-Headers": allow,
            "Access-Control-Max-Age": _MAX_AGE,
        },
    )


def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Before an answer's headers go out (`middleware.response_headers`): the CORS headers of
    an answer to a listed origin, and with any origins configured, `Vary: Origin` on every
    answer (a cache must not hand one origin's, or no origin's, answer to another)."""
    origins = _origins(request)
    if not origins or request.path.startswith(_NOT_FOR):
        return
    response.headers.add("Vary", "Origin")
    origin = request.headers.get("Origin")
    if origin is not None and _allowed(origins, origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _EXPOSE
