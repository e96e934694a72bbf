"""Validate wire objects against OpenAI's official OpenAPI schemas.

The schemas live in ``tests/openapi/chat_schemas.json`` (JSON Schema 2020-12, ``$defs`` layout),
extracted from OpenAI's ``openapi.yaml`` by ``tests/openapi/extract.py``. Each ``validate_*``
raises ``jsonschema.ValidationError`` (its message names the failing path) on mismatch; the
stream-level checks in ``validate_chat_stream`` raise ``AssertionError``.

Notable things the spec requires (and real OpenAI sends):
* completion choices: ``index``, ``message``, ``finish_reason`` AND ``logprobs`` (nullable);
  the message: ``role``, ``content`` AND ``refusal`` (both nullable).
* chunk choices: ``index``, ``delta``, ``finish_reason`` (nullable); ``logprobs`` is optional.
  Chunk ``usage`` is nullable; every ``delta.tool_calls[]`` entry needs an integer ``index``.
* ``system_fingerprint`` is a (deprecated) non-nullable string: omit it rather than send null.
"""

from __future__ import annotations

import base64
import json
import struct
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import best_match

SCHEMAS_PATH = Path(__file__).parent / "openapi" / "chat_schemas.json"


@cache
def schemas() -> dict[str, Any]:
    """The whole schema document (``{"$defs": {name: schema}}``)."""
    document: dict[str, Any] = json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))
    return document


@cache
def validator(name: str) -> Draft202012Validator:
    """A validator for the schema ``name`` (a key of ``$defs``)."""
    if name not in schemas()["$defs"]:
        raise KeyError(f"no schema {name!r} in {SCHEMAS_PATH.name}")
    return Draft202012Validator({**schemas(), "$ref": f"#/$defs/{name}"})


def validate(name: str, obj: Any) -> None:
    """Raise the most relevant ``ValidationError`` if ``obj`` does not match schema ``name``."""
    error = best_match(validator(name).iter_errors(obj))
    if error is None:
        return
    where = "".join(f"[{p!r}]" for p in error.absolute_path) or "(root)"
    error.message = f"{name}{where}: {error.message}"
    if error.context:  # anyOf/oneOf: say why each alternative failed
        why = {
            "".join(f"[{p!r}]" for p in sub.relative_path) + " " + sub.message
            for sub in error.context
        }
        error.message += "; alternatives failed: " + " | ".join(sorted(why)[:8])
    raise error


def validate_chat_completion(obj: dict[str, Any]) -> None:
    """A non-streaming ``chat.completion`` response body."""
    validate("CreateChatCompletionResponse", obj)


def validate_chat_chunk(obj: dict[str, Any]) -> None:
    """One ``chat.completion.chunk`` (the JSON of one SSE ``data:`` line)."""
    validate("CreateChatCompletionStreamResponse", obj)


def validate_models_list(obj: dict[str, Any]) -> None:
    """The ``GET /v1/models`` body."""
    validate("ListModelsResponse", obj)


def validate_model(obj: dict[str, Any]) -> None:
    """One model object (``GET /v1/models/{model}``)."""
    validate("Model", obj)


def validate_error(obj: dict[str, Any]) -> None:
    """An error body ``{"error": {message, type, param, code}}`` (all four keys required)."""
    validate("ErrorResponse", obj)


def validate_response(obj: dict[str, Any]) -> None:
    """A Responses API ``response`` object (``POST /v1/responses``)."""
    validate("Response", obj)


def validate_response_event(obj: dict[str, Any]) -> None:
    """One Responses API streaming event (the JSON of one SSE ``data:`` line)."""
    validate("ResponseStreamEvent", obj)


def validate_embeddings(obj: dict[str, Any]) -> None:
    """An embeddings ``list`` (``POST /v1/embeddings``). The spec describes vectors as floats:
    base64 vectors (little-endian float32s) are checked as the floats they decode to."""
    decoded = dict(obj)
    if isinstance(obj.get("data"), list):
        decoded["data"] = [
            item | {"embedding": floats_of(item["embedding"])}
            if isinstance(item, dict) and isinstance(item.get("embedding"), str)
            else item
            for item in obj["data"]
        ]
    validate("CreateEmbeddingResponse", decoded)


def floats_of(encoded: str) -> list[float]:
    """A base64 embedding as the SDKs decode it: little-endian float32s."""
    raw = base64.b64decode(encoded, validate=True)
    assert len(raw) % 4 == 0, f"base64 embedding of {len(raw)} bytes is not float32s"
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def validate_completion(obj: dict[str, Any]) -> None:
    """A legacy ``text_completion`` (or one chunk of its stream: the same shape)."""
    validate("CreateCompletionResponse", obj)


def validate_chat_stream(chunks: list[dict[str, Any]], *, include_usage: bool = False) -> None:
    """A whole chat stream (decoded ``data:`` payloads before ``[DONE]``): each chunk against the
    schema, plus what SDK accumulators rely on and the schema cannot say (AssertionError)."""
    assert chunks, "empty stream"
    for chunk in chunks:
        if "error" in chunk:
            raise AssertionError(f"mid-stream error event: {chunk['error']!r}")
        validate_chat_chunk(chunk)
    ids = {(c["id"], c["created"], c["model"]) for c in chunks}
    assert len(ids) == 1, f"id/created/model must be the same on every chunk: {ids}"
    body = chunks
    if include_usage:
        *body, last = chunks
        assert last["choices"] == [], f"last chunk must be the usage chunk: {last}"
        assert last.get("usage"), f"usage chunk without usage: {last}"
        for c in body:
            assert "usage" in c, f"with include_usage every chunk carries usage: null: {c}"
            assert c["usage"] is None, f"usage before the final chunk: {c}"
    finishes: Counter[int] = Counter()
    roles: Counter[int] = Counter()
    calls: set[tuple[int, int]] = set()
    for c in body:
        assert c["choices"], f"chunk without choices before the end: {c}"
        for choice in c["choices"]:
            n = choice["index"]
            assert not finishes[n], f"choice {n} continues after its finish_reason: {c}"
            finishes[n] += choice["finish_reason"] is not None
            delta = choice["delta"]
            roles[n] += "role" in delta
            for call in delta.get("tool_calls") or []:
                key = (n, call["index"])
                if key not in calls:
                    assert call["index"] == sum(k[0] == n for k in calls), (
                        f"tool call indices must be 0-based and contiguous: {c}"
                    )
                    assert call.get("id") and call.get("function", {}).get("name"), (
                        f"first fragment of a tool call needs id and function.name: {c}"
                    )
                else:
                    assert "id" not in call and "name" not in call.get("function", {}), (
                        f"id/name repeated in a later tool-call fragment (SDKs concatenate): {c}"
                    )
                calls.add(key)
    for n in {choice["index"] for c in body for choice in c["choices"]}:
        assert roles[n] <= 1, f"role sent {roles[n]} times for choice {n}"
        assert finishes[n] == 1, f"choice {n} needs exactly one finish_reason"


__all__ = [
    "ValidationError",
    "floats_of",
    "schemas",
    "validate",
    "validate_chat_chunk",
    "validate_chat_completion",
    "validate_chat_stream",
    "validate_completion",
    "validate_embeddings",
    "validate_error",
    "validate_model",
    "validate_models_list",
    "validate_response",
    "validate_response_event",
    "validator",
]
