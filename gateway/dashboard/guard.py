"""Who may see the dashboard: sign in with the admin key, a session cookie, CSRF checks, sign out.

Without an admin key (or with `server.dashboard = false`) every dashboard route is 404, as the
admin API is. A page without a live session sends the browser to the sign-in page. Every POST
must carry the session's CSRF token in its form, and, when the browser sends `Origin`, come
from the gateway's own origin. The cookie is `Secure` when the request came over HTTPS (or,
with `server.trust_forwarded_proto`, a proxy says so with `X-Forwarded-Proto: https`).
"""

from __future__ import annotations

import asyncio
import functools
import math
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from gateway.dashboard.render import page
from gateway.dashboard.sessions import SessionsUnavailable
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.handlers.admin import admin_key_matches
from gateway.intake import read_body
from gateway.state import DASHBOARD_SESSION_KEY, DASHBOARD_SESSIONS_KEY, LIVE_KEY, SNAPSHOT_KEY

__all__ = ["COOKIE", "FORM_LIMIT", "form", "redirect", "render", "signed_in"]
__all__ += ["sign_in", "sign_in_page", "sign_out"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger(__name__)

COOKIE = "kiosk_session"
FORM_LIMIT = 64 * 1024  # a dashboard form is a few hundred bytes
_MAX_FIELDS = 64  # it has a dozen fields
_FAILED_SIGN_IN_DELAY = 0.5  # seconds each wrong admin key costs its sender


def _admin_key(request: web.Request) -> str:
    server = request[SNAPSHOT_KEY].settings.server
    if server.admin_key is None or not server.dashboard:
        raise NotFound(f"Unknown route: {request.method} {request.path}", code="not_found")
    return server.admin_key


def _admin_key_now(request: web.Request) -> str | None:
    """The admin key of the config in place now (a reload may have come since the request's
    snapshot was taken)."""
    server = request.app[LIVE_KEY].current.settings.server
    return server.admin_key if server.dashboard else None


def _scheme(request: web.Request) -> str:
    if request.secure:
        return "https"
    server = request[SNAPSHOT_KEY].settings.server
    forwarded = request.headers.get("X-Forwarded-Proto", "").strip().lower()
    return "https" if server.trust_forwarded_proto and forwarded == "https" else "http"


def _same_origin(request: web.Request) -> bool:
    """No `Origin` (an old browser, or a same-origin GET), or exactly our own."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{_scheme(request)}://{request.host}"


def redirect(location: str) -> web.Response:
    """A 303 to another dashboard page (returned, not raised, so the log sees its status)."""
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _refused(status: int, message: str) -> web.Response:
    return page("refused.html", status=status, message=message)


async def form(request: web.Request) -> dict[str, str]:
    """The request's URL-encoded form, read within the body timeout and `FORM_LIMIT`.

    Parsed here, strictly: aiohttp's `post()` fails with a 500 on bytes that are not UTF-8.
    """
    if request.content_type != "application/x-www-form-urlencoded":
        raise web.HTTPUnsupportedMediaType(text="A dashboard form is URL-encoded.")
    length = request.content_length
    if length is None or length > FORM_LIMIT:
        raise web.HTTPRequestEntityTooLarge(max_size=FORM_LIMIT, actual_size=length or 0)
    body = await read_body(request)
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode(), keep_blank_values=True, errors="strict", max_num_fields=_MAX_FIELDS
        )
    except ValueError:  # UnicodeDecodeError included
        raise InvalidRequest("The form is not URL-encoded UTF-8.") from None
    return dict(pairs)


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """A page for the signed-in operator (its sign-out form needs the CSRF token)."""
    session = request[DASHBOARD_SESSION_KEY]
    context.setdefault("nav", "")
    return page(template, status=status, csrf=session.csrf, **context)


def signed_in(handler: Handler) -> Handler:
    """Only with a live session; a POST also needs its CSRF token and our own Origin."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        admin_key = _admin_key(request)
        book = request.app[DASHBOARD_SESSIONS_KEY]
        try:
            session = await book.get(request.cookies.get(COOKIE), admin_key)
        except SessionsUnavailable as exc:
            return _unavailable(exc)
        if session is None:
            if request.method in ("GET", "HEAD"):
                return redirect("/dashboard/signin")
            return _refused(403, "Your session has ended. Sign in again.")
        if request.method == "POST":
            fields = await form(request)
            if not _same_origin(request) or not session.csrf_matches(fields.get("csrf", "")):
                return _refused(403, "This form did not come from the dashboard (CSRF check).")
        request[DASHBOARD_SESSION_KEY] = session
        try:
            return await handler(request)
        except GatewayError as exc:  # an unknown key, a busy database: said on a page
            return render(request, "refused.html", status=exc.status, message=exc.message)

    return guarded


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    """`GET /dashboard/signin`."""
    _admin_key(request)
    return page("signin.html", error=None)


async def sign_in(request: web.Request) -> web.StreamResponse:
    """`POST /dashboard/signin`: the admin key in, a session cookie out."""
    admin_key = _admin_key(request)
    if not _same_origin(request):
        return _refused(403, "Sign in from the dashboard's own page.")
    presented = (await form(request)).get("admin_key", "")
    try:
        return await _sign_in(request, admin_key, presented)
    except SessionsUnavailable as exc:
        return _unavailable(exc)


def _unavailable(exc: SessionsUnavailable) -> web.Response:
    log.warning("dashboard_sessions_unavailable", error=str(exc))
    response = _refused(503, "The dashboard's sessions are kept in Redis, which does not answer.")
    response.headers["Retry-After"] = "1"
    return response


async def _sign_in(request: web.Request, admin_key: str, presented: str) -> web.StreamResponse:
    book = request.app[DASHBOARD_SESSIONS_KEY]
    # One attempt at a time, a wrong one holding the turn for its delay (the turn is this
    # process's; the count is every process's when sessions are in Redis). An attempt is
    # counted as failed before the key is compared, and taken back when it was right: guesses
    # sent at once never get past the limit, and a count that cannot be written (Redis
    # refusing writes) compares no key at all.
    await book.turn.acquire()
    held = False  # a wrong key keeps the turn for the delay, even if its sender hangs up
    try:
        wait, ticket = await book.attempt()  # counted as failed before the key is compared
        if wait > 0:
            response = page(
                "signin.html", status=429, error=f"Too many failed sign-ins; wait {wait:.0f} s."
            )
            response.headers["Retry-After"] = str(max(1, math.ceil(min(wait, 3600.0))))
            return response
        if not admin_key_matches(presented, admin_key):
            log.warning("dashboard_sign_in_failed", remote=request.remote)
            asyncio.get_running_loop().call_later(_FAILED_SIGN_IN_DELAY, book.turn.release)
            held = True
            await asyncio.sleep(_FAILED_SIGN_IN_DELAY)  # slows a guesser; costs a person nothing
            return page("signin.html", status=401, error="That is not the admin key.")
        await book.succeeded(ticket)
    finally:
        if not held:
            book.turn.release()
    ttl = request[SNAPSHOT_KEY].settings.server.dashboard_session_hours * 3600
    token, _ = await book.open(admin_key, ttl)
    if _admin_key_now(request) != admin_key:  # a reload changed it meanwhile: its clear
        await book.close(token)  # may have run before this session was written
        return _refused(403, "The admin key changed while you signed in. Sign in again.")
    response = redirect("/dashboard")
    _set_cookie(request, response, token, max_age=round(ttl))
    return response


def _set_cookie(request: web.Request, response: web.Response, token: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=max_age,
        path="/dashboard",
        httponly=True,
        samesite="Strict",
        secure=_scheme(request) == "https",
    )


@signed_in
async def sign_out(request: web.Request) -> web.StreamResponse:
    """`POST /dashboard/signout`: the session ends on the server, the cookie in the browser."""
    try:
        await request.app[DASHBOARD_SESSIONS_KEY].close(request.cookies.get(COOKIE))
    except SessionsUnavailable as exc:
        return _unavailable(exc)
    response = redirect("/dashboard/signin")
    _set_cookie(request, response, "", max_age=0)
    return response
