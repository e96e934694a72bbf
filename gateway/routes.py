"""The route table, and nothing else."""

from __future__ import annotations

from aiohttp import web

from gateway.handlers import (
    admin,
    chat,
    completions,
    embeddings,
    health,
    messages,
    models,
    responses,
)
from gateway.intake import expect_later

__all__ = ["setup_routes"]


def setup_routes(app: web.Application) -> None:
    # `Expect: 100-continue` is answered once a request is admitted (gateway.intake).
    later = expect_later
    app.router.add_post("/v1/chat/completions", chat.create_chat_completion, expect_handler=later)
    app.router.add_post("/api/v1/chat", chat.create_chat, expect_handler=later)
    app.router.add_post("/v1/responses", responses.create_response, expect_handler=later)
    app.router.add_post("/v1/embeddings", embeddings.create_embeddings, expect_handler=later)
    app.router.add_post("/v1/completions", completions.create_completion, expect_handler=later)
    app.router.add_post("/v1/messages", messages.create_message, expect_handler=later)
    app.router.add_post("/v1/messages/count_tokens", messages.count_tokens, expect_handler=later)
    stored = "/v1/responses/{response_id}"  # nothing is stored: each says so (404)
    app.router.add_get(stored, responses.stored_response, expect_handler=later)
    app.router.add_delete(stored, responses.stored_response, expect_handler=later)
    app.router.add_get(f"{stored}/input_items", responses.stored_response, expect_handler=later)
    app.router.add_post(f"{stored}/cancel", responses.stored_response, expect_handler=later)
    app.router.add_get("/v1/models", models.list_models, expect_handler=later)
    app.router.add_get("/v1/models/{model:.+}", models.get_model, expect_handler=later)
    app.router.add_get("/healthz", health.healthz, expect_handler=later)
    app.router.add_get("/readyz", health.readyz, expect_handler=later)
    app.router.add_post("/admin/keys", admin.create_key, expect_handler=later)
    app.router.add_get("/admin/keys", admin.list_keys, expect_handler=later)
    app.router.add_get("/admin/keys/{key_id}", admin.get_key, expect_handler=later)
    app.router.add_patch("/admin/keys/{key_id}", admin.update_key, expect_handler=later)
    app.router.add_delete("/admin/keys/{key_id}", admin.revoke_key, expect_handler=later)
    app.router.add_get("/admin/usage", admin.usage, expect_handler=later)
