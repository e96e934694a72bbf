"""`GET /v1/models` and `GET /v1/models/{id}`: the models the calling key may use, OpenAI-shaped
(with one extension field, `embeddings`, that says which models embed)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from gateway.errors import GatewayError, NotFound
from gateway.records import model_allowed
from gateway.schemas.codec import encode
from gateway.state import PRINCIPAL_KEY, SNAPSHOT_KEY

__all__ = ["get_model", "list_models"]

# Models have no creation date of their own; report a fixed one rather than "now".
_CREATED = 1_700_000_000


class ModelObject(msgspec.Struct):
    id: str
    owned_by: str
    object: str = "model"
    created: int = _CREATED
    # Extension: an embedding model (`embeddings = true` in its config), for /v1/embeddings.
    embeddings: bool = False


class ModelList(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"


def _json(obj: msgspec.Struct) -> web.Response:
    return web.Response(body=encode(obj), content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    router = request[SNAPSHOT_KEY].router
    patterns = request[PRINCIPAL_KEY].key.models
    data = [
        ModelObject(id=m.name, owned_by=m.targets[0].provider, embeddings=m.embeddings)
        for m in router.models
        if model_allowed(patterns, m.name, router.providers_of(m))
    ]
    return _json(ModelList(data=data))


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    router = request[SNAPSHOT_KEY].router
    missing = NotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.", param="model"
    )
    try:
        model = router.resolve(model_id)
    except GatewayError:
        raise missing from None
    # A model the key may not use is reported as missing, not as forbidden: no existence leak.
    if not model_allowed(request[PRINCIPAL_KEY].key.models, model_id, router.providers_of(model)):
        raise missing
    return _json(
        ModelObject(id=model_id, owned_by=model.targets[0].provider, embeddings=model.embeddings)
    )
