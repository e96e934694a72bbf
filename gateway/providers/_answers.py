"""Upstream answers are checked before they are relayed: a 2xx body that is not what the API
promises, an error carried in a 2xx body or an event, and an OpenAI stream that stops short.

Upstreams are untrusted: a `200` whose body is `{"error": ...}`, `null` or of the wrong shape
must not reach the client as a success. The error it carries is classified by its typed `type`
and `code`, as its status would be (a request's fault is the client's 400, a rate limit a 429);
anything else is an `UpstreamBadResponse`, a 502 that another route may do better.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
import structlog
from msgspec import UNSET, UnsetType

from gateway.errors import UpstreamBadResponse, UpstreamConnectionError, UpstreamError
from gateway.providers._errors import error_from_status
from gateway.schemas.codec import encode
from gateway.schemas.common import Usage
from gateway.schemas.response_output import ResponseUsage

__all__ = [
    "StreamCheck",
    "answer_error",
    "completion_usage",
    "embeddings_usage",
    "event_error",
    "response_usage",
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


def _usage(provider: str, raw: msgspec.Raw, decoder: msgspec.json.Decoder[T]) -> T | None:
    """A usage object we cannot read must not cost the client a good answer: None then (the
    usage row is estimated), with a warning."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError:
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


class _Response(msgspec.Struct):
    """What makes a body a Responses API `response`: its output items."""

    items: list[msgspec.Raw] | UnsetType = msgspec.field(default=UNSET, name="output")
    usage: msgspec.Raw = _NULL


class _Embeddings(msgspec.Struct):
    """What makes a body an OpenAI embeddings `list`: its data items."""

    items: list[msgspec.Raw] | UnsetType = msgspec.field(default=UNSET, name="data")
    usage: msgspec.Raw = _NULL


class _TextCompletion(msgspec.Struct):
    """What makes a body a legacy `text_completion`: its choices."""

    items: list[msgspec.Raw] | UnsetType = msgspec.field(default=UNSET, name="choices")
    usage: msgspec.Raw = _NULL


_COMPLETION = msgspec.json.Decoder(_Completion)
_EMBEDDINGS = msgspec.json.Decoder(_Embeddings)
_TEXT_COMPLETION = msgspec.json.Decoder(_TextCompletion)
_RESPONSE = msgspec.json.Decoder(_Response)
_USAGE = msgspec.json.Decoder(Usage | None)
_RESPONSE_USAGE = msgspec.json.Decoder(ResponseUsage | None)

View = TypeVar("View", _Completion, _Response, _Embeddings, _TextCompletion)


def _checked(provider: str, body: bytes, decoder: msgspec.json.Decoder[View], what: str) -> View:
    try:
        view = decoder.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        raise answer_error(provider, body, what) from None
    if view.items is UNSET:
        raise answer_error(provider, body, what)
    return view


def embeddings_usage(provider: str, body: bytes) -> Usage | None:
    """The usage of an upstream embeddings answer, once its body is known to be one.

    Raises:
        UpstreamError: the body is not an embeddings list (`answer_error`).
    """
    view = _checked(provider, body, _EMBEDDINGS, "embeddings list")
    return _usage(provider, view.usage, _USAGE)


def text_completion_usage(provider: str, body: bytes) -> Usage | None:
    """The usage of an upstream legacy completion, once its body is known to be one.

    Raises:
        UpstreamError: the body is not a completion (`answer_error`).
    """
    view = _checked(provider, body, _TEXT_COMPLETION, "completion")
    return _usage(provider, view.usage, _USAGE)


def completion_usage(provider: str, body: bytes) -> Usage | None:
    """The usage of an upstream `chat.completion`, once its body is known to be one.

    Raises:
        UpstreamError: the body is not a completion (`answer_error`).
    """
    view = _checked(provider, body, _COMPLETION, "chat completion")
    return _usage(provider, view.usage, _USAGE)


def response_usage(provider: str, body: bytes) -> Usage | None:
    """The usage (in chat terms) of an upstream Responses `response`, once its body is known
    to be one.

    Raises:
        UpstreamError: the body is not a response (`answer_error`).
    """
    view = _checked(provider, body, _RESPONSE, "response")
    usage = _usage(provider, view.usage, _RESPONSE_USAGE)
    return usage.to_usage() if usage is not None else None


# A finish_reason with a value, as servers write it; inside a JSON string every quote is
# escaped, so in an event that is valid JSON these bytes can only be the key itself.
_FINISHED = (b'"finish_reason":"', b'"finish_reason": "')


_EVENT = msgspec.json.Decoder(_Object)


class _RunChoice(msgspec.Struct):
    finish_reason: object = None


class _RunChunk(msgspec.Struct):
    """What a relayed chunk is checked for; the rest is skipped unread."""

    choices: list[_RunChoice] = []
    usage: object = None
    error: object = None


_RUN = msgspec.json.Decoder(list[_RunChunk])


class StreamCheck:
    """What an OpenAI chat stream must be before it is relayed as complete: every event a JSON
    object, and a `finish_reason` (or `data: [DONE]`) before it ends, so that a stream cut
    short ends with an error event instead of looking finished."""

    __slots__ = ("finished", "provider")

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.finished = False

    def see(self, data: bytes) -> bool:
        """Check one event; False for a blank one (a keep-alive, not for the client).

        Raises:
            UpstreamError: the event is not a JSON object.
        """
        if not data or data.isspace():
            return False
        try:
            _EVENT.decode(data)
        except (msgspec.MsgspecError, RecursionError):
            raise UpstreamError(
                f"The upstream provider '{self.provider}' sent a stream event that is not "
                "a JSON object."
            ) from None
        if not self.finished and (_FINISHED[0] in data or _FINISHED[1] in data):
            self.finished = True
        return True

    def see_run(self, events: bytes) -> int:
        """Check a run of SSE events (from `data: ` to a blank line) in one decode, for
        relaying them as they are: how many they are, or 0 when they are not all plain
        chunks, each one `data:` line holding one JSON object with no usage and no error
        (then the caller splits them and looks at each with `see`).

        With the separators turned into commas they make a JSON array. A line break left in
        it (a comment, a second data line, an object over several lines) or a CR is refused:
        JSON would read through what an SSE client splits. An event that is several objects
        ("{},{}") gives more elements than events, so their count is checked too.
        """
        body = events[6:-2].replace(b"\n\ndata: ", b",")
        if b"\n" in body or b"\r" in body:
            return 0
        try:
            chunks = _RUN.decode(b"[%b]" % body)
        except (msgspec.MsgspecError, RecursionError):
            return 0
        count = (len(events) - 8 - len(body)) // 7 + 1  # each separator is 7 bytes shorter
        if len(chunks) != count:
            return 0
        finished = self.finished
        for chunk in chunks:
            if chunk.usage is not None or chunk.error is not None:
                return 0
            if not finished:
                finished = any(choice.finish_reason for choice in chunk.choices)
        self.finished = finished
        return count

    def end(self) -> None:
        """The upstream closed the stream without `[DONE]`.

        Raises:
            UpstreamConnectionError: no choice had finished: the answer was cut short.
        """
        if not self.finished:
            raise UpstreamConnectionError(
                f"The upstream provider '{self.provider}' ended the stream before the answer "
                "was complete (no finish_reason and no [DONE])."
            )
