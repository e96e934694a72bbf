"""Gemini answers and stream chunks → OpenAI `chat.completion` and `chat.completion.chunk`."""

from __future__ import annotations

import msgspec
import structlog
from msgspec import UNSET

from gateway.errors import UpstreamBadResponse, UpstreamError
from gateway.providers._answers import read_usage
from gateway.providers._errors import DECODE_ERRORS, stream_error
from gateway.providers._translate import (
    ChunkWriter,
    completion_body,
    completion_id,
    message,
    new_call_id,
)
from gateway.providers.base import ChatCall
from gateway.providers.gemini.request import GEMINI_ID, join_call_id
from gateway.providers.gemini.wire import (
    NO_DETAILS,
    NO_USAGE,
    RESPONSE_DECODER,
    USAGE_DECODER,
    GeminiReadPart,
    GeminiResponse,
    GeminiUsage,
)
from gateway.schemas.chat import Choice, FunctionCall, ToolCall
from gateway.schemas.common import CompletionTokensDetails, PromptTokensDetails, Usage

__all__ = [
    "GeminiStream",
    "choice_count",
    "finish_reason",
    "from_gemini",
    "has_usage",
    "openai_usage",
    "usage_of",
]

log = structlog.get_logger(__name__)

FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "LANGUAGE",
        "OTHER",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "IMAGE_OTHER",
        "NO_IMAGE",
    }
)


# The counts of a `usageMetadata` that only grow along a stream (its total aside).
_COUNT_FIELDS = (
    "prompt_token_count",
    "candidates_token_count",
    "thoughts_token_count",
    "cached_content_token_count",
    "tool_use_prompt_token_count",
)
# The modality details of a count (what its tokens were: audio and images priced apart).
_DETAIL_FIELDS = ("prompt_tokens_details", "candidates_tokens_details", "cache_tokens_details")


def openai_usage(usage: GeminiUsage) -> Usage:
    prompt = usage.prompt_token_count + usage.tool_use_prompt_token_count
    completion = usage.candidates_token_count + usage.thoughts_token_count
    given = PromptTokensDetails(cached_tokens=usage.cached_content_token_count)
    done = CompletionTokensDetails(reasoning_tokens=usage.thoughts_token_count)
    if (
        usage.prompt_tokens_details != NO_DETAILS
        or usage.candidates_tokens_details != NO_DETAILS
        or usage.cache_tokens_details != NO_DETAILS
    ):  # (priced apart)
        # The prompt's audio, and of it what was read from the cache (priced at the cached
        # audio rate), as OpenAI counts a prompt's audio: cached or not.
        cached_audio = usage.modality(usage.cache_tokens_details, "AUDIO")
        audio = max(usage.modality(usage.prompt_tokens_details, "AUDIO"), cached_audio)
        given.audio_tokens = audio or UNSET
        given.cached_audio_tokens = cached_audio or UNSET
        done.audio_tokens = usage.modality(usage.candidates_tokens_details, "AUDIO") or UNSET
        done.image_tokens = usage.modality(usage.candidates_tokens_details, "IMAGE") or UNSET
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=usage.total_token_count or prompt + completion,
        prompt_tokens_details=given,
        completion_tokens_details=done,
    )


def has_usage(raw: msgspec.Raw) -> bool:
    return raw != NO_USAGE


def usage_of(raw: msgspec.Raw, provider: str) -> Usage | None:
    """The usage of a `usageMetadata`; None if it is absent (every Gemini answer has one: an
    answer without could otherwise cost nothing) or a count cannot be read: the row is then
    estimated, and the client told nothing."""
    if not has_usage(raw):
        log.warning("upstream_usage_missing", provider=provider)
        return None
    counts = read_usage(provider, raw, USAGE_DECODER)
    return openai_usage(counts) if counts is not None else None


def finish_reason(reason: str | None, called_tools: bool) -> str:
    if called_tools:
        return "tool_calls"
    if reason == "MAX_TOKENS":
        return "length"
    return "content_filter" if reason in FILTERED else "stop"


def _tool_call(part: GeminiReadPart, provider: str) -> ToolCall | None:
    """A `functionCall` part as an OpenAI tool call, its `args` (an object: Gemini's `Struct`)
    as the JSON text of its arguments; none or `null` is `{}`.

    Raises:
        UpstreamBadResponse: `args` is not an object (a list, a string, a number), which a
            client reads as arguments no function takes and sends back in a history that
            Gemini refuses.
    """
    fc = part.function_call
    if fc is None:
        return None
    call_id = f"{GEMINI_ID}{fc.id}" if fc.id else new_call_id()
    call_id = join_call_id(call_id, part.thought_signature)
    args = bytes(fc.args).strip() if fc.args is not UNSET else b"null"
    if args == b"null":
        args = b"{}"
    elif not args.startswith(b"{"):
        raise UpstreamBadResponse(
            f"The upstream provider '{provider}' sent a function call whose args are not an object."
        )
    return ToolCall(id=call_id, function=FunctionCall(fc.name, args.decode()))


def _image_url(part: GeminiReadPart) -> str | None:
    blob = part.inline_data
    if blob is None or part.thought:  # interim "thought images" are not the answer
        return None
    return f"data:{blob.mime_type};base64,{blob.data}"


def choice_count(call: ChatCall) -> int:
    """How many choices the client asked for (`n`), and so the most it gets: candidates past
    them (an upstream that answers several to `n = 1`, or indexes of its own) are dropped."""
    n = call.request.n
    return n if isinstance(n, int) else 1


def from_gemini(
    resp: GeminiResponse, model: str, provider: str = "gemini", *, choice_count: int = 1
) -> tuple[bytes, Usage | None]:
    """A `GenerateContentResponse` as an OpenAI `chat.completion` (encoded) and its usage
    (None: unreadable, see `usage_of`); candidates at `choice_count` or past it are dropped."""
    choices: list[Choice] = []
    for cand in resp.candidates:
        if not 0 <= cand.index < choice_count or any(c.index == cand.index for c in choices):
            continue
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[ToolCall] = []
        images: list[str] = []
        for part in cand.content.parts if cand.content else ():
            if part.text is not None:
                (thoughts if part.thought else texts).append(part.text)
            elif (call := _tool_call(part, provider)) is not None:
                calls.append(call)
            elif (url := _image_url(part)) is not None:
                images.append(url)
        msg = message(
            "".join(texts) if texts else None, calls, reasoning="".join(thoughts), images=images
        )
        choices.append(Choice(cand.index, msg, finish_reason(cand.finish_reason, bool(calls))))
    if not choices:  # the prompt itself was blocked
        choices.append(Choice(0, message(None), "content_filter"))
    usage = usage_of(resp.usage_metadata, provider)
    body = completion_body(
        id=completion_id(resp.response_id),
        model=resp.model_version or model,
        choices=sorted(choices, key=lambda c: c.index),
        usage=usage,
    )
    return body, usage


class GeminiStream:
    """Turns Gemini stream chunks into OpenAI chunks as they arrive.

    Each Gemini chunk holds only new parts: text becomes `content` deltas, thoughts
    `reasoning_content`, a function call (always whole) one tool-call delta with its full
    arguments, an image an `images` delta. The last chunk's `finishReason` ends each choice
    (parts of a candidate after its finish are dropped: a chat client would see content after
    its choice's `finish_reason`); the stream itself ends when the upstream closes it, or at an
    OpenAI-style `[DONE]`, which Gemini never sends but proxies in front of it may add
    (what follows it is not read; without a finish before it, the answer is incomplete).
    """

    def __init__(self, call: ChatCall, provider: str) -> None:
        self.call = call
        self.provider = provider
        self.writer: ChunkWriter | None = None
        # Each readable `usageMetadata` counts the whole answer so far: the largest counts seen
        # (per field; an unreadable one is ignored), and whether the last one is a final count.
        self.most: GeminiUsage | None = None
        self.final = False  # the last `usageMetadata` was readable and not below an earlier one
        self.unreadable = False  # one could not be read (logged once)
        self.answered = False  # output other than thoughts streamed (it has candidate tokens)
        # Characters of output and of thoughts streamed since the last count taken as the
        # answer's so far (`_count`): what a cut stream's counts do not hold yet.
        self.text_since = 0
        self.thought_since = 0
        self.seen: set[int] = set()  # choices that started
        self.open: set[int] = set()  # choices that started and have not finished
        self.choices = choice_count(call)  # (candidates at other indexes are dropped)
        self.done = False  # Gemini has no end event (its stream just closes): a proxy's [DONE]

    def feed(self, data: bytes) -> list[bytes]:
        if data.startswith(b"[DONE]"):  # (not JSON: read as a chunk, it ended as malformed)
            self.done = True
            return []
        if b'"error"' in data[:48]:  # an error envelope, possibly list-wrapped or spaced
            error = stream_error(self.provider, data)
            if error is not None:
                raise error
        try:
            resp = RESPONSE_DECODER.decode(data)
        except DECODE_ERRORS:
            raise UpstreamError(
                f"The upstream provider '{self.provider}' sent a malformed stream chunk."
            ) from None
        writer = self.writer
        if writer is None:
            writer = self.writer = ChunkWriter(
                id=completion_id(resp.response_id),
                model=resp.model_version or self.call.upstream_model,
                include_usage=self.call.request.wants_usage,
            )
        counted = False  # a count of the answer so far, this chunk's parts included
        if resp.usage_metadata != NO_USAGE:  # (absent, or `null`: none)
            self._count(resp.usage_metadata)
            counted = self.final
        out: list[bytes] = []
        if not resp.candidates and resp.prompt_feedback and resp.prompt_feedback.block_reason:
            out.append(writer.finish("content_filter"))
        in_chunk: set[int] = set()
        for cand in resp.candidates:
            index = cand.index
            if not 0 <= index < self.choices or index in in_chunk:
                continue  # (one candidate per index in a chunk, as in an answer)
            in_chunk.add(index)
            if index not in self.seen:
                self.seen.add(index)
                self.open.add(index)
            elif index not in self.open:
                continue  # it finished: what it says after that is not part of its answer
            for part in cand.content.parts if cand.content else ():
                out.extend(self._part(writer, part, index))
            if cand.finish_reason and index in self.open:
                self.open.discard(index)
                called = writer.tool_calls.get(index, 0) > 0
                out.append(writer.finish(finish_reason(cand.finish_reason, called), index))
        if counted:
            self.text_since = self.thought_since = 0
        return out

    def _part(self, writer: ChunkWriter, part: GeminiReadPart, index: int) -> list[bytes]:
        size = 0
        if part.text:
            chunk = (writer.reasoning if part.thought else writer.text)(part.text, index)
            size = len(part.text)
        elif (call := _tool_call(part, self.provider)) is not None:
            _, chunk = writer.tool_start(
                call.id, call.function.name, call.function.arguments, index
            )
            size = len(call.function.arguments)
        elif (url := _image_url(part)) is not None:
            chunk = writer.images([url], index)
        else:
            return []
        if part.thought:
            self.thought_since += size
        else:
            self.answered = True
            self.text_since += size
        self.call.chunks += 1
        return [chunk]

    def _count(self, raw: msgspec.Raw) -> None:
        """Take a chunk's `usageMetadata` into the counts so far."""
        try:
            counts = USAGE_DECODER.decode(raw)
        except (msgspec.ValidationError, RecursionError):
            if not self.unreadable:
                self.unreadable = True
                log.warning("upstream_usage_unreadable", provider=self.provider)
            self.final = False
            return
        most = self.most
        if most is None or all(getattr(counts, n) >= getattr(most, n) for n in _COUNT_FIELDS):
            if most is not None:  # a count without the details an earlier one had keeps them
                for name in _DETAIL_FIELDS:
                    if getattr(counts, name) == NO_DETAILS:
                        setattr(counts, name, getattr(most, name))
            self.most, self.final = counts, True
            return
        if self.final:  # (once a run)
            log.warning("upstream_usage_decreased", provider=self.provider)
        self.final = False
        for name in _COUNT_FIELDS:
            setattr(most, name, max(getattr(most, name), getattr(counts, name)))

    def end(self) -> list[bytes]:
        """The chunks after the upstream closed the stream: usage, if the client asked and the
        last `usageMetadata` is a final count (readable, not below an earlier one, with
        candidate tokens if output streamed, and no output streamed after it). Without one,
        the stream is accounted as cut (`cut`: its counts so far, estimated) and the client
        told nothing."""
        writer = self.writer
        if writer is None or self.open:
            raise UpstreamError(
                f"The upstream provider '{self.provider}' ended the stream before it was complete."
            )
        most = self.most
        if most is None:
            if not self.unreadable:
                log.warning("upstream_usage_missing", provider=self.provider)
            return []
        after = self.text_since or self.thought_since  # output after the last count
        if self.final and not after and (most.candidates_token_count or not self.answered):
            usage = self.call.usage = openai_usage(most)
            return [writer.usage(usage)] if writer.include_usage else []
        if self.final:
            log.warning(
                "upstream_usage_before_output" if after else "upstream_usage_without_output",
                provider=self.provider,
            )
        self.cut()
        return []

    def cut(self) -> None:
        """Account a stream cut or broken before its end (the client hung up, an error
        event, a dropped connection), or ended without a final count: each `usageMetadata`
        counts the whole answer so far, so the largest readable counts seen are the least the
        upstream bills for it, and what streamed after the last of them (text, thoughts, tool
        arguments) is added at four characters a token (marked estimated: what it generated
        and did not stream is not counted; the pipeline floors them at its own estimate).
        Without one, its estimate stands."""
        call, most = self.call, self.most
        if call.usage is None and most is not None:
            call.usage = openai_usage(
                msgspec.structs.replace(
                    most,
                    candidates_token_count=most.candidates_token_count + (self.text_since + 3) // 4,
                    thoughts_token_count=most.thoughts_token_count + (self.thought_since + 3) // 4,
                    total_token_count=0,
                )
            )
            call.usage_estimated = True
