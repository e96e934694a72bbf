"""The route table, and nothing else."""

from __future__ import annotations

from aiohttp import web

from gateway.handlers import chat, health, models

__all__ = ["setup_routes"]


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat.create_chat_completion)
    app.router.add_post("/api/v1/chat", chat.create_chat)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/models/{model:.+}", models.get_model)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
