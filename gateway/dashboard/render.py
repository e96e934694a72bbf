"""Pages from Jinja2 templates (autoescaped), their security headers, and the static files.

Every page forbids inline scripts and styles and anything from another origin
(Content-Security-Policy), framing, and caching; chart data travels in
`<script type="application/json">` blocks, which are never run. Static files are read from
the package once and served with their content type.
"""

from __future__ import annotations

import importlib.resources
from datetime import UTC, datetime
from typing import Any

import jinja2
import msgspec
from aiohttp import web

__all__ = ["SECURITY_HEADERS", "page", "static"]

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".LICENSE": "text/plain"}
_STATIC = importlib.resources.files("gateway.dashboard") / "static"
_static_cache: dict[str, bytes] = {}


def _data(value: Any) -> str:
    """JSON for a `<script type="application/json">` block: `<`, `>` and `&` escaped so no
    value can close the element."""
    text = msgspec.json.encode(value).decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _usd(value: float | None) -> str:
    if value is None:
        return "—"
    return f"${value:,.4f}" if 0 < value < 1 else f"${value:,.2f}"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} ms"


def _seconds(value: float) -> str:
    whole = round(value)
    if whole < 120:
        return f"{whole} s"
    return f"{whole // 60} min" if whole < 7200 else f"{whole // 3600} h"


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway.dashboard", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(data=_data, when=_when, usd=_usd, num=_num, ms=_ms, seconds=_seconds)


def page(template: str, status: int = 200, **context: Any) -> web.Response:
    """A rendered page with the dashboard's security headers."""
    body = _env.get_template(template).render(**context)
    response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    response.headers.update(SECURITY_HEADERS)
    return response


def static(name: str) -> web.Response | None:
    """A static file by name (None if there is no such file): only files shipped in the
    package, never a path."""
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    kind = _STATIC_TYPES.get(suffix)
    if kind is None or "/" in name or "\\" in name or name.startswith("."):
        return None
    body = _static_cache.get(name)
    if body is None:
        resource = _STATIC / name
        if not resource.is_file():
            return None
        body = _static_cache[name] = resource.read_bytes()
    response = web.Response(body=body, content_type=kind, charset="utf-8")
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response
