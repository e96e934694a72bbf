"""Upstream answers are checked before they are relayed: a 2xx body that is not what the API
promises, an error carried in a 2xx body or an event, and an OpenAI stream that stops short.

Upstreams are untrusted: a `200` whose body is `{"error": ...}`, `null` or of the wrong shape
must not reach the client as a success. The error it carries is classified by its typed `type`
and `code`, as its status would be (a request's fault is the client's 400, a rate limit a 429);
anything else is an `UpstreamBadResponse`, a 502 that another route may do better.
(Embeddings answers are classified where their vectors are checked, in the same decode:
`_embeddings.relayed_embeddings`.)
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
import structlog
from msgspec import UNSET, UnsetType

from gateway.errors import UpstreamBadResponse, UpstreamError
from gateway.providers._errors import error_from_status
from gateway.providers.base import Call
from gateway.schemas.codec import encode
from gateway.schemas.common import Usage
from gateway.schemas.response_output import ResponseUsage

__all__ = [
    "answer_error",
    "completion_usage",
    "event_error",
    "read_usage",
    "response_usage",
    "served_at",
    "text_completion_usage",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")


class _ErrorFields(msgspec.Struct):
    type: str | None = None
    code: str | int | None = None
    message: str | None = None
    param: str | None = None


class _ErrorView(_ErrorFields):
    """`{"type": "error", "code", "message", "param"}` as the Responses API documents it, or
    with those fields in an `error` object, as OpenAI (and Anthropic, and chat-style servers,
    and Google with an HTTP `code`) send it."""

    error: _ErrorFields | str | None = None


_ERROR = msgspec.json.Decoder(_ErrorView)

# The HTTP status an error `type` (or `code`) stands for, where a body or event has none.
_STATUS_OF = {
    "invalid_request_error": 400,
    "not_found_error": 404,
    "insufficient_quota": 429,
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "too_many_requests": 429,
    "requests": 429,  # OpenAI's rate limit types name the limit that was hit
    "tokens": 429,
}
# Codes that blame the request itself (OpenAI's `ResponseError` codes, and the context
# window), for flat events that carry no `type`.
_REQUEST_CODES = frozenset(
    {
        "context_length_exceeded",
        "invalid_prompt",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "image_too_large",
        "image_too_small",
        "image_parse_error",
        "image_content_policy_violation",
        "invalid_image_mode",
        "image_file_too_large",
        "unsupported_image_media_type",
        "empty_image_file",
        "failed_to_download_image",
        "image_file_not_found",
    }
)


def _view(payload: bytes) -> _ErrorView | None:
    try:
        return _ERROR.decode(payload)
    except (msgspec.MsgspecError, RecursionError):
        return None


def event_error(provider: str, payload: bytes) -> UpstreamError:
    """The error an upstream `error` event reports, mapped as its status would be.

    Only what blames the request or is a rate limit is classified; anything else (a server
    error) stays a plain `UpstreamError`, a 502 that the pipeline makes retryable before the
    first event, as for chat streams.
    """
    view = _view(payload) or _ErrorView()
    fields = view.error if isinstance(view.error, _ErrorFields) else view
    message = fields.message or (view.error if isinstance(view.error, str) else None)
    code = fields.code
    status = code if isinstance(code, int) and code >= 400 else None
    for key in (fields.type, code):
        if status is None and isinstance(key, str):
            status = _STATUS_OF.get(key)
    if status is None and code in _REQUEST_CODES:
        status = 400
    if status is None:
        return UpstreamError(
            f"The upstream provider '{provider}' failed mid-stream: {message or 'unknown error'}"
        )
    envelope = {
        "error": {
            "message": message,
            "type": fields.type if fields.type not in ("error", None) else None,
            "param": fields.param,
            "code": code if isinstance(code, str) else None,
        }
    }
    return error_from_status(provider, status, encode(envelope))


def answer_error(provider: str, body: bytes, what: str) -> UpstreamError:
    """Why a 2xx `body` is not the `what` (a chat completion, a response...) it should be:
    the error it carries, classified; else a bad response (502, retryable)."""
    view = _view(body)
    if view is not None and (view.error is not None or view.type == "error"):
        error = event_error(provider, body)
        if type(error) is not UpstreamError:
            return error  # the request's fault, or a rate limit
        return UpstreamBadResponse(
            error.message.replace("failed mid-stream", "answered HTTP 200 with an error", 1)
        )
    return UpstreamBadResponse(
        f"The upstream provider '{provider}' answered HTTP 200 with something that is not a {what}."
    )


def read_usage(provider: str, raw: msgspec.Raw, decoder: msgspec.json.Decoder[T]) -> T | None:
    """A usage object we cannot read (a count that is negative, past `Count`'s bound or not an
    integer) must not cost the client a good answer, nor give its key budget back: None then
    (the usage row is estimated), with a warning."""
    try:
        return decoder.decode(raw)
    except (msgspec.ValidationError, RecursionError):
        log.warning("upstream_usage_unreadable", provider=provider)
        return None


_NULL = msgspec.Raw(b"null")


class _Object(msgspec.Struct):
    """Any JSON object: decoding one checks the JSON and skips every value unread."""


class _Choice(msgspec.Struct):
    message: _Object


class _Completion(msgspec.Struct):
    """What makes a body an OpenAI `chat.completion`: choices that hold messages."""

    items: list[_Choice] | UnsetType = msgspec.field(default=UNSET, name="choices")
    usage: msgspec.Raw = _NULL  # (a Raw cannot be in a union)
    service_tier: object = None


class _Response(msgspec.Struct):
    """What makes a body a Responses API `response`: its output items (objects)."""

    items: list[_Object] | UnsetType = msgspec.field(default=UNSET, name="output")
    usage: msgspec.Raw = _NULL
    service_tier: object = None


class _TextChoice(msgspec.Struct):
    text: str


class _TextCompletion(msgspec.Struct):
    """What makes a body a legacy `text_completion`: choices that hold text."""

    items: list[_TextChoice] | UnsetType = msgspec.field(default=UNSET, name="choices")
    usage: msgspec.Raw = _NULL
    service_tier: object = None


_COMPLETION = msgspec.json.Decoder(_Completion)
_TEXT_COMPLETION = msgspec.json.Decoder(_TextCompletion)
_RESPONSE = msgspec.json.Decoder(_Response)
_USAGE = msgspec.json.Decoder(Usage | None)
_RESPONSE_USAGE = msgspec.json.Decoder(ResponseUsage | None)

View = TypeVar("View", _Completion, _Response, _TextCompletion)


def _checked(provider: str, body: bytes, decoder: msgspec.json.Decoder[View], what: str) -> View:
    try:
        view = decoder.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        raise answer_error(provider, body, what) from None
    if view.items is UNSET:
        raise answer_error(provider, body, what)
    return view


def text_completion_usage(provider: str, body: bytes, call: Call) -> Usage | None:
    """The usage of an upstream legacy completion, once its body is known to be one (its
    processing tier into `call`: `served_at`).

    Raises:
        UpstreamError: the body is not a completion (`answer_error`).
    """
    view = _checked(provider, body, _TEXT_COMPLETION, "completion")
    served_at(call, view.service_tier)
    return read_usage(provider, view.usage, _USAGE)


def completion_usage(provider: str, body: bytes, call: Call) -> Usage | None:
    """The usage of an upstream `chat.completion`, once its body is known to be one (its
    processing tier into `call`: `served_at`).

    Raises:
        UpstreamError: the body is not a completion (`answer_error`).
    """
    view = _checked(provider, body, _COMPLETION, "chat completion")
    served_at(call, view.service_tier)
    return read_usage(provider, view.usage, _USAGE)


def response_usage(provider: str, body: bytes, call: Call) -> Usage | None:
    """The usage (in chat terms) of an upstream Responses `response`, once its body is known
    to be one (its processing tier into `call`: `served_at`).

    Raises:
        UpstreamError: the body is not a response (`answer_error`).
    """
    view = _checked(provider, body, _RESPONSE, "response")
    served_at(call, view.service_tier)
    usage = read_usage(provider, view.usage, _RESPONSE_USAGE)
    return usage.to_usage() if usage is not None else None


def served_at(call: Call, tier: object) -> None:
    """Keep the processing tier an answer says it was served at (`service_tier`), which it
    is charged at (`Call.service_tier`): OpenAI answers "priority" for a request sent with
    "auto" or none on a project whose default is priority processing, and "default" for a
    priority request past its priority limit, and bills each so."""
    if isinstance(tier, str) and 0 < len(tier) <= _LONGEST_TIER:
        call.service_tier = tier


_LONGEST_TIER = 32  # (OpenAI's are a word; a longer one is no tier, and charged standard)
