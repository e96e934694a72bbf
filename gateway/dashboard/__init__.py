"""The dashboard at `/dashboard`: server-rendered pages over the same data as the admin API.

Pages are Jinja2 templates (`templates/`); the only script is `static/dashboard.js` (charts
with uPlot, shipped in `static/` with its MIT licence, and the copy button). See
docs/dashboard.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.dashboard import guard, keypages, pages

__all__ = ["ROUTES"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/dashboard", pages.overview),
    ("GET", "/dashboard/upstreams", pages.upstreams),
    ("GET", "/dashboard/static/{name}", pages.static_file),
    ("GET", "/dashboard/signin", guard.sign_in_page),
    ("POST", "/dashboard/signin", guard.sign_in),
    ("POST", "/dashboard/signout", guard.sign_out),
    ("GET", "/dashboard/keys", keypages.keys),
    ("POST", "/dashboard/keys", keypages.create_key),
    ("GET", "/dashboard/keys/{key_id}", keypages.key_detail),
    ("POST", "/dashboard/keys/{key_id}", keypages.update_key),
    ("GET", "/dashboard/keys/{key_id}/revoke", keypages.confirm_revoke),
    ("POST", "/dashboard/keys/{key_id}/revoke", keypages.revoke_key),
)
