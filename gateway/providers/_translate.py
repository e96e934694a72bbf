"""What every translating provider (Anthropic, Gemini) shares: reading the OpenAI request,
refusing what an upstream cannot honour, and writing OpenAI completions and stream chunks.

Translated answers must be indistinguishable from OpenAI's: the same object shapes, `role` only
in the first chunk, a tool call's `id` and `name` only in its first fragment, one finish chunk,
and the usage chunk last (only when the client asked for it).
"""

from __future__ import annotations

import binascii
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Protocol

import msgspec
from msgspec import UNSET, UnsetType

from gateway.errors import InvalidRequest, UpstreamBadResponse, UpstreamError
from gateway.providers._http import done
from gateway.providers.base import ChatCall
from gateway.schemas.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    CompletionView,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    FileContentPart,
    ImageOutput,
    ImageURL,
    TextContentPart,
    ToolCall,
)
from gateway.schemas.codec import encode
from gateway.schemas.common import Usage

__all__ = [
    "ChunkWriter",
    "DataURL",
    "HeldAnswer",
    "StreamState",
    "assistant_text",
    "completion_body",
    "completion_id",
    "completion_usage",
    "data_url",
    "file_data",
    "joined_text",
    "json_value",
    "message",
    "new_call_id",
    "nonzero",
    "object_arguments",
    "read_completion",
    "refuse_unsupported",
    "stop_sequences",
    "tool_choice_without_tools",
    "top_k",
    "translated_stream",
    "unsupported",
]


class DataURL(msgspec.Struct, frozen=True):
    mime: str
    data: str  # base64, as sent


def data_url(url: str) -> DataURL | None:
    """Split `data:<mime>[;param...];base64,<data>`; None for anything else."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    mime, *params = head.split(";")
    if not sep or not params or params[-1].lower() != "base64" or not mime or not data:
        return None
    return DataURL(mime=mime.lower(), data=data)


def joined_text(content: str | list[TextContentPart] | None, sep: str = "\n") -> str:
    """The text of a system/developer/tool message: a string or its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return sep.join(p.text for p in content)


def assistant_text(msg: AssistantMessage) -> str:
    """An assistant message's text, its refusal included: an answer the SDK appends to the
    history after a refusal has `content: null` and the text in `refusal`."""
    content = msg.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        text = "".join(p.text if isinstance(p, TextContentPart) else p.refusal for p in content)
    return text or (msg.refusal if isinstance(msg.refusal, str) else "")


def file_data(part: FileContentPart, param: str, provider_type: str) -> str:
    """The data URL of an inline file part (`file.file_data`); uploaded file ids are refused."""
    try:
        fields = msgspec.json.decode(part.file)
    except (msgspec.DecodeError, RecursionError):
        fields = None
    data = fields.get("file_data") if isinstance(fields, dict) else None
    if not isinstance(data, str):
        raise unsupported(provider_type, param, "only inline files (file_data) can be sent")
    return data


def stop_sequences(req: ChatCompletionRequest) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or ())


def top_k(req: ChatCompletionRequest) -> int | None:
    """The client's `top_k` if it limits anything (0 or less means no limit, as vLLM reads it)."""
    value = req.top_k
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 1:
        return int(value)
    return None


def nonzero(value: float | UnsetType | None) -> float | None:
    """A sampling number the client really set: absent, null and 0 mean "leave the default"."""
    return float(value) if isinstance(value, int | float) and value != 0 else None


def refuse_unsupported(req: ChatCompletionRequest, provider_type: str) -> None:
    """Refuse the fields no translated upstream can honour (OpenAI-only features)."""
    if req.logprobs is True or (isinstance(req.top_logprobs, int) and req.top_logprobs > 0):
        raise unsupported(provider_type, "logprobs" if req.logprobs is True else "top_logprobs")
    if req.logit_bias:
        raise unsupported(provider_type, "logit_bias")
    if req.prediction is not UNSET:
        raise unsupported(provider_type, "prediction")
    if req.functions is not UNSET or req.function_call is not UNSET:
        raise unsupported(provider_type, "functions", "use tools instead of the legacy functions")


def tool_choice_without_tools() -> InvalidRequest:
    return InvalidRequest(
        "'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice"
    )


def unsupported(provider_type: str, param: str, why: str = "") -> InvalidRequest:
    """The 400 for a request field this upstream cannot honour (never silently dropped)."""
    reason = f": {why}" if why else "."
    return InvalidRequest(
        f"The '{param}' parameter is not supported by {provider_type} models{reason}",
        param=param,
        code="unsupported_parameter",
    )


def json_value(text: str) -> msgspec.Raw | None:
    """`text` as raw JSON if it is JSON (not too deeply nested to decode), else None."""
    raw = text.encode()
    try:
        msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    return msgspec.Raw(raw)


def object_arguments(arguments: str, param: str) -> msgspec.Raw:
    """A tool call's `arguments` string as raw JSON, checked to be a JSON object."""
    if not arguments.strip():
        return msgspec.Raw(b"{}")
    raw = json_value(arguments)
    if raw is None:
        raise InvalidRequest(
            f"Invalid value for '{param}': the tool call arguments are not valid JSON.",
            param=param,
        )
    if not bytes(raw).lstrip().startswith(b"{"):
        raise InvalidRequest(
            f"Invalid value for '{param}': the tool call arguments must be a JSON object.",
            param=param,
        )
    return raw


_COMPLETION = msgspec.json.Decoder(CompletionView)


def read_completion(body: bytes) -> CompletionView:
    """A whole `chat.completion` as the struct, to answer it in another API's shape (its
    usage is not read: the provider's `ChatReply.usage` is the one to believe).

    Raises:
        UpstreamError: the body is not one, or has no choice (no answer to translate: chat
            clients get such a body as it is, the Responses and Messages APIs a 502).
    """
    try:
        completion = _COMPLETION.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        raise UpstreamError("The upstream provider returned a malformed completion.") from None
    if not completion.choices:
        raise UpstreamError("The upstream provider returned a completion without choices.")
    return completion


_USAGE = msgspec.json.Decoder(Usage)


def completion_usage(completion: CompletionView) -> Usage | None:
    """A completion's own usage, or None when it has none that can be believed (a negative,
    huge or non-integer count: the provider's usage row is estimated already)."""
    if completion.usage is UNSET:
        return None
    try:
        return _USAGE.decode(completion.usage)
    except (msgspec.MsgspecError, RecursionError):
        return None


def completion_id(upstream_id: str) -> str:
    """Our `chatcmpl-` id, built on the upstream's own id when it gives one."""
    return f"chatcmpl-{upstream_id or binascii.hexlify(os.urandom(12)).decode()}"


def new_call_id() -> str:
    """A tool-call id for upstreams that do not give one (OpenAI's `call_` + 24 characters)."""
    return "call_" + binascii.hexlify(os.urandom(12)).decode()


def image_outputs(urls: Iterable[str]) -> list[ImageOutput]:
    return [ImageOutput(image_url=ImageURL(url=u)) for u in urls]


def completion_body(
    *,
    id: str,
    model: str,
    choices: list[Choice],
    usage: Usage | None,
) -> bytes:
    """A whole `chat.completion` object, encoded."""
    return encode(
        ChatCompletion(
            id=id,
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=usage if usage is not None else UNSET,
        )
    )


def message(
    text: str | None,
    tool_calls: list[ToolCall] | None = None,
    *,
    reasoning: str | None = None,
    images: list[str] | None = None,
) -> ChatMessage:
    return ChatMessage(
        content=text,
        tool_calls=tool_calls or UNSET,
        reasoning_content=reasoning if reasoning else UNSET,
        images=image_outputs(images) if images else UNSET,
    )


class ChunkWriter:
    """Encodes the OpenAI `chat.completion.chunk` events of one translated stream.

    The caller says what happened (text, a tool call started, arguments, the end); the writer
    keeps the OpenAI ordering rules: `role` once, a tool call's `id`/`type`/`name` only in its
    first fragment with a 0-based `index` per call, `usage: null` on every chunk when the
    client asked for usage, and the usage chunk with empty `choices` at the very end.
    """

    def __init__(self, *, id: str, model: str, include_usage: bool) -> None:
        self.id = id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._started: set[int] = set()  # choices whose role chunk went out
        self.tool_calls: dict[int, int] = {}  # per choice: tool calls started so far

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        return encode(
            ChatCompletionChunk(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage if usage is not None else (None if self.include_usage else UNSET),
            )
        )

    def _delta(self, delta: Delta, index: int = 0, finish: str | None = None) -> bytes:
        # The role goes with a choice's first delta, not ahead of it: OpenAI's opens a tool
        # call answer with `content: null` (the SDK's stream helper then ends with None, as
        # a whole completion has), a text answer with `content: ""`.
        if index not in self._started:
            self._started.add(index)
            delta.role = "assistant"
            if delta.content is UNSET:
                delta.content = "" if delta.tool_calls is UNSET else None
            if delta.refusal is UNSET:
                delta.refusal = None
        return self._chunk([ChunkChoice(index, delta, finish)])

    def text(self, text: str, index: int = 0) -> bytes:
        return self._delta(Delta(content=text), index)

    def reasoning(self, text: str, index: int = 0) -> bytes:
        return self._delta(Delta(reasoning_content=text), index)

    def images(self, urls: list[str], index: int = 0) -> bytes:
        return self._delta(Delta(images=image_outputs(urls)), index)

    def tool_start(
        self, call_id: str, name: str, arguments: str = "", index: int = 0
    ) -> tuple[int, bytes]:
        """A tool call's first fragment; returns its OpenAI `index` (0, 1, ... per choice)."""
        slot = self.tool_calls.get(index, 0)
        self.tool_calls[index] = slot + 1
        first = DeltaToolCall(
            index=slot,
            id=call_id,
            type="function",
            function=DeltaFunction(name=name, arguments=arguments),
        )
        return slot, self._delta(Delta(tool_calls=[first]), index)

    def tool_arguments(self, slot: int, fragment: str, index: int = 0) -> bytes:
        frag = DeltaToolCall(index=slot, function=DeltaFunction(arguments=fragment))
        return self._delta(Delta(tool_calls=[frag]), index)

    def finish(self, reason: str, index: int = 0) -> bytes:
        return self._delta(Delta(), index, reason)

    def usage(self, usage: Usage) -> bytes:
        return self._chunk([], usage)


class HeldAnswer:
    """What a stream translator holds of one answer (to join or repeat it later), bounded as
    a whole answer is: past the answering provider's `max_response_bytes` (`limit`; None:
    unbounded), the stream ends with an error naming the setting. `what` names the holder.
    """

    __slots__ = ("held", "limit", "what")

    def __init__(self, what: str, limit: int | None = None) -> None:
        self.what = what
        self.limit = limit
        self.held = 0

    def add(self, size: int) -> None:
        """Count `size` more held (characters or bytes).

        Raises:
            UpstreamBadResponse: more than `limit` is held.
        """
        self.held += size
        if self.limit is not None and self.held > self.limit:
            raise UpstreamBadResponse(
                f"The upstream provider's answer grew larger than {self.limit} bytes (the "
                f"provider's max_response_bytes), the most {self.what} holds."
            )

    def release(self, size: int) -> None:
        self.held -= size


class StreamState(Protocol):
    """A provider's stream translator: upstream events in, OpenAI chunk payloads out."""

    done: bool  # the upstream said the answer is complete

    def feed(self, data: bytes) -> list[bytes]: ...

    def end(self) -> list[bytes]:
        """The last chunks once the upstream stopped; raises if the answer is incomplete."""
        ...

    def cut(self) -> None:
        """The stream was cut (the client hung up, the deadline) or broke (an error event, the
        connection, a timeout) before its end: what the upstream counted so far becomes the
        call's usage. (A first batch's failure is not charged: `failover.attempt_each` clears
        the call.)"""
        ...


async def translated_stream(
    call: ChatCall,
    events: AsyncGenerator[list[bytes], None],
    state: StreamState,
    limit: int | None = None,
) -> AsyncGenerator[list[bytes], None]:
    """Feed the upstream's SSE events through `state`, one batch per upstream read.

    Chunks are held back until the answer has content: an upstream error event that comes
    first (Anthropic reports overload right after `message_start`) then still becomes a
    proper HTTP status, and another route may be tried, instead of a broken stream. What is
    held is bounded by `limit`, the provider's `max_response_bytes` (`HeldAnswer`): an
    upstream repeating what makes no content (a Gemini prompt block, a finish) cannot grow it.

    Raises:
        UpstreamError: an error event, a malformed event, an incomplete stream, or too much
            held before any content.
    """
    out: list[bytes] = []
    held = HeldAnswer("a translated stream before its first content", limit)
    try:
        async with contextlib.aclosing(events):
            async for batch in events:
                try:
                    for data in batch:
                        chunks = state.feed(data)
                        out.extend(chunks)
                        if not call.chunks:
                            held.add(sum(map(len, chunks)))
                        if state.done:
                            break
                except UpstreamError:
                    if out and call.chunks:
                        yield out  # what arrived before the error still reaches the client
                    raise
                if state.done:
                    await done(events)  # (its connection back to the pool, not closed)
                    break
                if out and call.chunks:
                    yield out
                    out = []
        out.extend(state.end())
        if out:
            yield out
    except BaseException:
        state.cut()
        raise
