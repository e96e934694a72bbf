"""Virtual-key authentication: `sign_in` finds the caller's key in the key cache.

Routes under `/v1/` and `/api/` need a usable key (not revoked, not expired); the request then
carries its `Principal` under `PRINCIPAL_KEY`, and its trace the key's id (`middleware.gateway`
binds it to the log context).
The key may come as `Authorization: Bearer <key>` (OpenAI's SDK, Anthropic's with an auth
token), `x-api-key: <key>` (Anthropic's SDK and Claude Code) or `api-key: <key>` (Azure-style
clients), checked alike.
"""

from __future__ import annotations

import time

from aiohttp import web

from gateway.errors import AuthenticationFailed
from gateway.keys import Principal
from gateway.state import KEYS_KEY, PRINCIPAL_KEY
from gateway.trace import RequestTrace

__all__ = ["authenticate", "client_key", "sign_in"]

# Routes that need a virtual key; health checks and the admin API (own key) do not.
_PROTECTED_PREFIXES = ("/v1/", "/api/")


# Headers that carry the key by itself, in the order they are read after `Authorization`.
_KEY_HEADERS = ("x-api-key", "api-key")


def client_key(request: web.Request) -> str | None:
    """The key the client sent: a Bearer token, else an `x-api-key` or `api-key` header."""
    header = request.headers.get("Authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in _KEY_HEADERS:
        value = request.headers.get(name, "").strip()
        if value:
            return value
    return None


def authenticate(request: web.Request) -> Principal:
    """The caller's principal.

    Raises:
        AuthenticationFailed: the key is missing, unknown, revoked or expired.
    """
    secret = client_key(request)
    if secret is None:
        raise AuthenticationFailed(
            "Missing API key. Send it as 'Authorization: Bearer <key>' (or in an 'x-api-key' "
            "or 'api-key' header).",
            code="missing_api_key",
        )
    key = request.app[KEYS_KEY].lookup(secret)
    if key is None:
        raise AuthenticationFailed("Incorrect API key provided.")
    if key.revoked_at is not None:
        raise AuthenticationFailed("This API key has been revoked.", code="key_revoked")
    if not key.usable_at(time.time()):
        raise AuthenticationFailed("This API key has expired.", code="key_expired")
    return Principal(key)


def sign_in(request: web.Request, trace: RequestTrace) -> Principal | None:
    """The caller's principal on the routes that need a key (None elsewhere), stored on the
    request under `PRINCIPAL_KEY` and its key's id in the trace.

    Raises:
        AuthenticationFailed: as `authenticate`.
    """
    if not request.path.startswith(_PROTECTED_PREFIXES):
        return None
    principal = authenticate(request)
    request[PRINCIPAL_KEY] = principal
    key = principal.key
    trace.key_id = key.id
    if key.rpm is not None or key.tpm is not None:
        trace.limited = key  # its responses tell the state of its limits
    return principal
