"""The offline `demo` provider: deterministic answers, so a first run and the tests need no network.

It answers "You said: <last user text>", honours `max_tokens` (finish_reason "length"),
`stop`, `n`, JSON mode (a value that satisfies the schema, `demo_schema`), and tools: when
tools are offered and the last message is not a tool result, it calls the named or first tool
with arguments that satisfy the tool's JSON schema; after a tool result it reports what the
tool returned.
Tokens are counted as the words it emits (completion) and a chars/4 estimate (prompt).

It also embeds (`/v1/embeddings`): a text's vector is the normalised sum of a few signed unit
vectors per word, chosen by hashing the word (the "hashing trick"), so it is the same on every
run and texts that share words are closer than texts that do not. `dimensions` sets the length
(default 1536, at most 3072, OpenAI's figures); token ids are embedded as words of their own.
An input may hold 8192 tokens and a request 300,000 (OpenAI's limits), and the vectors are made
in a worker thread, so a large request does not stall the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
import re
import struct
import time
from collections.abc import AsyncGenerator, Iterator

import msgspec

from gateway.errors import InvalidRequest
from gateway.providers._embeddings import embedding_list
from gateway.providers.base import ChatCall, ChatReply
from gateway.providers.capabilities import EmbeddingCall
from gateway.providers.demo_schema import sample
from gateway.schemas.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    FunctionCall,
    FunctionTool,
    JSONObjectFormat,
    JSONSchemaFormat,
    ToolCall,
    ToolChoiceFunction,
    ToolMessage,
    UserMessage,
)
from gateway.schemas.codec import encode
from gateway.schemas.common import Usage
from gateway.schemas.embeddings import EmbeddingRequest
from gateway.settings import DemoConfig
from gateway.tokens import estimate_prompt_tokens, estimate_text_tokens, message_text

__all__ = ["DEMO_DIMENSIONS", "MAX_DEMO_DIMENSIONS", "DemoProvider", "demo_vector"]

DEMO_DIMENSIONS = 1536
MAX_DEMO_DIMENSIONS = 3072
MAX_INPUT_TOKENS = 8192  # OpenAI's limits for one input and one request
MAX_REQUEST_TOKENS = 300_000
_SLOTS_PER_WORD = 4
_SLOTS = struct.Struct(f"<{_SLOTS_PER_WORD}I").unpack
_WORD = re.compile(r"\w+")


class _Answer(msgspec.Struct):
    words: list[str]
    finish_reason: str
    tool_call: ToolCall | None = None


def _pick_tool(req: ChatCompletionRequest) -> FunctionTool | None:
    tools = [t for t in req.tools or () if isinstance(t, FunctionTool)]
    if not tools or req.tool_choice == "none":
        return None
    if isinstance(req.tool_choice, ToolChoiceFunction):
        wanted = req.tool_choice.function.name
        return next((t for t in tools if t.function.name == wanted), None)
    if isinstance(req.messages[-1], ToolMessage):
        return None  # answer the tool result instead of calling again
    return tools[0]


def _answer(req: ChatCompletionRequest, limit: int | None) -> _Answer:
    last = next((m for m in reversed(req.messages) if isinstance(m, UserMessage)), None)
    text = message_text(last.content) if last is not None else ""
    tool = _pick_tool(req)
    if tool is not None:
        params = msgspec.json.decode(tool.function.parameters) if tool.function.parameters else {}
        args = encode(sample(params, text)).decode()
        digest = hashlib.sha256(f"{tool.function.name}:{args}".encode()).hexdigest()[:24]
        call = ToolCall(id=f"call_{digest}", function=FunctionCall(tool.function.name, args))
        return _Answer(words=[], finish_reason="tool_calls", tool_call=call)
    if isinstance(req.messages[-1], ToolMessage):
        reply = f"The tool returned: {message_text(req.messages[-1].content)}"
    else:
        reply = f"You said: {text}"
    fmt = req.response_format
    if isinstance(fmt, JSONSchemaFormat):
        schema = msgspec.json.decode(fmt.json_schema.schema) if fmt.json_schema.schema else {}
        reply = encode(sample(schema, text)).decode()
    elif isinstance(fmt, JSONObjectFormat):
        reply = encode({"reply": text}).decode()
    finish = "stop"
    stops = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or () if s]
    hits = [i for i in (reply.find(s) for s in stops) if i >= 0]
    if hits:
        reply = reply[: min(hits)]
    words = reply.split(" ") if reply else []
    words = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
    if limit is not None and len(words) > limit:
        words, finish = words[:limit], "length"
    return _Answer(words=words, finish_reason=finish)


def _usage(req: ChatCompletionRequest, answer: _Answer, n: int) -> Usage:
    prompt = estimate_prompt_tokens(req)
    per_choice = len(answer.words) if answer.tool_call is None else 8
    completion = per_choice * n
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


class DemoProvider:
    """Adapter for `type = "demo"` providers."""

    def __init__(self, config: DemoConfig, session: object | None = None) -> None:
        self.config = config

    @staticmethod
    def _ids(call: ChatCall) -> tuple[str, int, str]:
        model = call.request.model if isinstance(call.request.model, str) else call.model.name
        return f"chatcmpl-demo-{call.request_id or 'local'}", int(time.time()), model

    async def chat(self, call: ChatCall) -> ChatReply:
        req = call.request
        n = req.n or 1
        answer = _answer(req, call.max_tokens)
        call.first_byte_at = time.monotonic()
        content = None if answer.tool_call else "".join(answer.words)
        tool_calls = [answer.tool_call] if answer.tool_call else msgspec.UNSET
        message = ChatMessage(content=content, tool_calls=tool_calls)
        call.usage = _usage(req, answer, n)
        rid, created, model = self._ids(call)
        completion = ChatCompletion(
            id=rid,
            created=created,
            model=model,
            choices=[Choice(i, message, answer.finish_reason) for i in range(n)],
            usage=call.usage,
            system_fingerprint="fp_demo",
        )
        return ChatReply(body=encode(completion), usage=call.usage)

    async def embeddings(self, call: EmbeddingCall) -> ChatReply:
        req = call.request
        dims = req.dimensions if isinstance(req.dimensions, int) else DEMO_DIMENSIONS
        if dims > MAX_DEMO_DIMENSIONS:
            raise InvalidRequest(
                f"Invalid value for 'dimensions': the demo model makes at most "
                f"{MAX_DEMO_DIMENSIONS} dimensions.",
                param="dimensions",
            )
        prompt = req.prompt_estimate()
        texts = req.texts()
        sizes = (
            [estimate_text_tokens(t) for t in texts]
            if texts is not None
            else [len(t) for t in req.token_lists()]
        )
        longest = max(sizes)
        if longest > MAX_INPUT_TOKENS or prompt > MAX_REQUEST_TOKENS:
            raise InvalidRequest(
                f"Invalid value for 'input': the demo model takes at most {MAX_INPUT_TOKENS} "
                f"tokens an input and {MAX_REQUEST_TOKENS} a request (OpenAI's limits).",
                param="input",
            )
        call.first_byte_at = time.monotonic()
        call.usage = Usage(prompt_tokens=prompt, total_tokens=prompt)
        # Hashing every word and writing the vectors is CPU work: off the event loop.
        body = await asyncio.to_thread(_embed, req, dims, prompt)
        return ChatReply(body=body, usage=call.usage)

    async def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        req = call.request
        n = req.n or 1
        answer = _answer(req, call.max_tokens)
        call.first_byte_at = time.monotonic()
        rid, created, model = self._ids(call)
        with_usage = req.wants_usage
        # The demo's whole answer is ready at once: one batch, one write to the client.
        batch = [
            encode(
                ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=model,
                    choices=choices,
                    system_fingerprint="fp_demo",
                    usage=None if with_usage else msgspec.UNSET,
                )
            )
            for choices in _deltas(answer, n)
        ]
        call.chunks = len(batch)
        call.usage = _usage(req, answer, n)
        if with_usage:
            batch.append(
                encode(
                    ChatCompletionChunk(
                        id=rid, created=created, model=model, choices=[], usage=call.usage
                    )
                )
            )
        yield batch


def _deltas(answer: _Answer, n: int) -> Iterator[list[ChunkChoice]]:
    """Chunk choices in OpenAI's order: role, content or tool-call fragments, finish."""
    if answer.tool_call is not None:
        call = answer.tool_call
        args = call.function.arguments
        half = len(args) // 2
        first = DeltaToolCall(
            index=0,
            id=call.id,
            type="function",
            function=DeltaFunction(name=call.function.name, arguments=""),
        )
        yield [
            ChunkChoice(i, Delta(role="assistant", content=None, tool_calls=[first]))
            for i in range(n)
        ]
        for piece in (args[:half], args[half:]):
            frag = DeltaToolCall(index=0, function=DeltaFunction(arguments=piece))
            yield [ChunkChoice(i, Delta(tool_calls=[frag])) for i in range(n)]
    else:
        yield [ChunkChoice(i, Delta(role="assistant", content="", refusal=None)) for i in range(n)]
        for word in answer.words:
            yield [ChunkChoice(i, Delta(content=word)) for i in range(n)]
    yield [ChunkChoice(i, Delta(), answer.finish_reason) for i in range(n)]


def demo_vector(words: list[str], dims: int) -> list[float]:
    """A unit vector for a bag of words: each word adds signed ones at hashed positions."""
    sparse: dict[int, float] = {}
    for word, count in collections.Counter(words).items():
        digest = hashlib.blake2b(word.encode(), digest_size=4 * _SLOTS_PER_WORD).digest()
        for bits in _SLOTS(digest):
            index = (bits >> 1) % dims
            sparse[index] = sparse.get(index, 0.0) + (count if bits & 1 else -count)
    norm = math.sqrt(sum(v * v for v in sparse.values()))
    vector = [0.0] * dims
    if norm == 0:  # every contribution cancelled out: still a unit vector, and a fixed one
        vector[0] = 1.0
        return vector
    for index, value in sparse.items():
        vector[index] = value / norm
    return vector


def _embed(req: EmbeddingRequest, dims: int, prompt: int) -> bytes:
    texts = req.texts()
    words = (
        [_WORD.findall(text.lower()) or [text] for text in texts]
        if texts is not None
        else [[f"#{token}" for token in tokens] for tokens in req.token_lists()]
    )
    vectors = [demo_vector(w, dims) for w in words]
    return embedding_list(vectors, model=req.model, prompt_tokens=prompt, as_base64=req.base64)
