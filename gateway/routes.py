"""The route table, and nothing else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import dashboard
from gateway.handlers import (
    admin,
    chat,
    completions,
    embeddings,
    health,
    messages,
    metrics,
    models,
    responses,
)
from gateway.intake import expect_later
from gateway.metrics import OTHER
from gateway.middleware import UNMATCHED, through_gateway, unmatched

__all__ = ["setup_routes"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_STORED = "/v1/responses/{response_id}"  # nothing is stored: each says so (404)

_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/v1/chat/completions", chat.create_chat_completion),
    ("POST", "/api/v1/chat", chat.create_chat),
    ("POST", "/v1/responses", responses.create_response),
    ("POST", "/v1/embeddings", embeddings.create_embeddings),
    ("POST", "/v1/completions", completions.create_completion),
    ("POST", "/v1/messages", messages.create_message),
    ("POST", "/v1/messages/count_tokens", messages.count_tokens),
    ("GET", _STORED, responses.stored_response),
    ("DELETE", _STORED, responses.stored_response),
    ("GET", f"{_STORED}/input_items", responses.stored_response),
    ("POST", f"{_STORED}/cancel", responses.stored_response),
    ("GET", "/v1/models", models.list_models),
    ("GET", "/v1/models/{model:.+}", models.get_model),
    ("GET", "/healthz", health.healthz),
    ("GET", "/readyz", health.readyz),
    ("GET", "/metrics", metrics.metrics),
    ("POST", "/admin/keys", admin.create_key),
    ("GET", "/admin/keys", admin.list_keys),
    ("GET", "/admin/keys/{key_id}", admin.get_key),
    ("PATCH", "/admin/keys/{key_id}", admin.update_key),
    ("DELETE", "/admin/keys/{key_id}", admin.revoke_key),
    ("GET", "/admin/usage", admin.usage),
    ("GET", "/admin/stats", admin.stats),
    *dashboard.ROUTES,
)


def setup_routes(app: web.Application) -> None:
    """Every route, each handler called through `middleware.gateway`; last, the route of
    every other path and method (`middleware.unmatched`)."""
    for method, path, handler in _ROUTES:
        resource = app.router.add_resource(path)  # (the previous one again for the same path)
        through = through_gateway(handler, resource.canonical)
        # `Expect: 100-continue` is answered once a request is admitted (gateway.intake).
        if method == "GET":  # as add_get: it answers HEAD too
            resource.add_route("HEAD", through, expect_handler=expect_later)
        resource.add_route(method, through, expect_handler=expect_later)
    app.router.add_route(
        "*", UNMATCHED, through_gateway(unmatched, OTHER), expect_handler=expect_later
    )
