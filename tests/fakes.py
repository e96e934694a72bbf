"""An in-process fake OpenAI-compatible upstream for gateway tests.

    fake = FakeOpenAI()
    server = await fake.start(aiohttp_server)        # or: await aiohttp_server(fake.make_app())
    provider = OpenAIConfig(..., base_url=fake.base_url)

Requests are checked where OpenAI is strict and clients meet it: a tool-call id over 40 characters
(a Responses ``call_id`` over 64) gets OpenAI's 400 ``string_above_max_length``.

By default ``POST /v1/chat/completions`` answers like OpenAI does: a ``chat.completion`` echoing the
last user message ("echo: <text>"; in JSON mode a JSON object sampled from the schema), or a call
to the first tool when ``tools`` are given and ``tool_choice`` is not ``"none"``; with
``stream: true`` the real SSE chunk sequence. Every request is recorded in ``fake.requests``.
Scripting (see ``Script`` for every knob):

    fake.script(status=429, headers={"retry-after": "1"})  # next request only (FIFO queue)
    fake.script(status=503, times=2)                       # the next two requests
    fake.always(chunk_delay=0.05)                          # every request without a queued script

Knobs: status/error/headers (scripted HTTP errors), delay_headers, chunk_delay, hold (an
``asyncio.Event`` the answer waits for; with hold_after=N, a stream waits after N chunks),
drop_before_response, drop_after=N (abort mid-stream), error_after=N (`data: {"error": ...}`
event), content (a long text without spaces streams as one huge SSE line), tool_call/arguments,
finish_reason, match (a queued script only takes chat requests whose last user text contains
it). Scripts apply to chat and Responses requests; ``GET /v1/models`` lists
``fake.models``.

``POST /v1/embeddings`` and ``POST /v1/completions`` answer as OpenAI's do (see
``tests.fake_endpoints``), with the same scripts.

``POST /v1/responses`` gives the same answers in the Responses API's shapes: a ``response``
object, or with ``stream: true`` the real event sequence (``event:`` lines, ``sequence_number``,
no ``[DONE]``; ``error_after`` sends an ``error`` event).

Events for concurrency tests: ``fake.request_seen`` is set when any request arrives (``.clear()`` it
to wait for the next one); ``fake.client_disconnected`` is set when the client hangs up while a
chat request is in progress (seen as ConnectionResetError on a write, or as handler cancellation).
Tests synchronise on these and on ``hold``, never on time: a request held by the fake stays in
flight until the test releases it, however slow the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web
from aiohttp.pytest_plugin import AiohttpServer
from aiohttp.test_utils import TestServer

from tests.fake_endpoints import (
    Refused,
    completion_chunks,
    completion_reply,
    openai_embeddings,
)

Json = dict[str, Any]

# Realistic bodies for scripted error statuses, as OpenAI sends them.
ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid value for 'messages'."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: sk-fake."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Not supported."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached. Please try again in 1s."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded."),
}


def error_body(
    status: int,
    message: str | None = None,
    *,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> Json:
    """An OpenAI error body ``{"error": {message, type, param, code}}`` for ``status``."""
    default_type, default_code, default_message = ERRORS.get(status, ERRORS[500])
    return {
        "error": {
            "message": message or default_message,
            "type": type or default_type,
            "param": param,
            "code": code if code is not None else default_code,
        }
    }


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any


RECORDED = web.RequestKey("recorded", Recorded)


@dataclass(kw_only=True)
class Script:
    """How the fake answers one chat request. Every knob defaults to "behave like OpenAI"."""

    status: int = 200  # non-2xx: answer with ``error`` (default: error_body(status))
    error: Json | None = None
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    delay_headers: float = 0.0  # seconds before anything is sent
    chunk_delay: float = 0.0  # seconds between stream chunks
    hold: asyncio.Event | None = None  # answer only once the test sets it (never: a hung upstream)
    hold_after: int | None = None  # stream: send N chunks first, then wait for ``hold``
    drop_before_response: bool = False  # close the connection without any response
    drop_after: int | None = None  # stream: abort the connection after N chunks, no [DONE]
    error_after: int | None = None  # stream: after N chunks send `data: {"error": ...}` and end
    stream_error: Json = field(
        default_factory=lambda: error_body(500, "The server had an error mid-stream.")
    )
    content: str | None = None  # reply text (default "echo: <last user text>"); split on spaces
    tool_call: bool | None = None  # None: call a tool iff tools given and tool_choice != "none"
    arguments: str | None = None  # tool call arguments (default: built from the tool's schema)
    finish_reason: str | None = None  # default "stop" / "tool_calls"
    match: str | None = None  # queued: only for requests whose last user text contains it


S = TypeVar("S")


class ScriptedFake(Generic[S]):
    """What every fake upstream shares: scripts (a FIFO queue and a default), the request log,
    the events tests wait on, and the server it runs in. `script_type` is its `Script` class;
    `root` is the path the gateway's provider `base_url` points at."""

    script_type: type[S]
    root = ""

    def __init__(self, *, api_key: str | None = None) -> None:
        self.api_key = api_key  # when set, requests must carry it (how: see each fake)
        self.requests: list[Recorded] = []
        self.default: S = self.script_type()
        self.queue: list[S] = []
        self.request_seen = asyncio.Event()
        self.client_disconnected = asyncio.Event()
        self.server: TestServer | None = None

    def script(self, *, times: int = 1, **knobs: Any) -> S:
        """Queue a behaviour (``Script`` knobs) for the next ``times`` model requests."""
        behaviour = self.script_type(**knobs)
        self.queue.extend([behaviour] * times)
        return behaviour

    def always(self, **knobs: Any) -> S:
        """Set the behaviour of every model request that has no queued script."""
        self.default = self.script_type(**knobs)
        return self.default

    def next_plan(self, text: str = "") -> S:
        """The first queued script for a request whose last user text is `text` (a script
        with a `match` only takes requests containing it), else the default."""
        for i, plan in enumerate(self.queue):
            match = getattr(plan, "match", None)
            if match is None or match in text:
                return self.queue.pop(i)
        return self.default

    def make_app(self) -> web.Application:
        raise NotImplementedError

    async def start(self, aiohttp_server: AiohttpServer) -> TestServer:
        self.server = await aiohttp_server(self.make_app())
        return self.server

    @property
    def base_url(self) -> str:
        assert self.server is not None, "call `await fake.start(aiohttp_server)` first"
        return str(self.server.make_url(self.root or "/")).rstrip("/")

    def record(self, request: web.Request, raw: bytes) -> Recorded:
        """Log a request (its JSON body decoded when it is JSON) and wake whoever waits."""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in request.headers.items()}
        request[RECORDED] = recorded = Recorded(request.method, request.path, headers, body)
        self.requests.append(recorded)
        self.request_seen.set()
        return recorded

    async def pause(self, plan: Any) -> None:
        """Before an answer: `delay_headers`, then `hold` (unless that is for mid-stream)."""
        await asyncio.sleep(plan.delay_headers)
        if plan.hold is not None and plan.hold_after is None:
            await plan.hold.wait()

    def _drop(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """Abort the TCP connection; aiohttp's final write then fails quietly."""
        assert request.transport is not None
        request.transport.abort()
        return response

    async def play(
        self,
        request: web.Request,
        response: web.StreamResponse,
        frames: list[bytes],
        plan: Any,
        error: Callable[[int], bytes],
        end: bytes = b"",
    ) -> web.StreamResponse:
        """Write a prepared stream's SSE `frames` the way `plan` says: abort after
        `drop_after` frames, or send `error(n)` after `error_after` and end, pausing
        `chunk_delay` between frames (and for `hold` after `hold_after`); then `end`. Notes a
        client that hangs up."""
        try:
            for sent, frame in enumerate(frames):
                if sent == plan.drop_after:
                    return self._drop(request, response)
                if sent == plan.error_after:
                    await response.write(error(sent))
                    await response.write_eof()
                    return response
                if sent and plan.chunk_delay:
                    await asyncio.sleep(plan.chunk_delay)
                if sent == plan.hold_after and plan.hold is not None:
                    await plan.hold.wait()
                await response.write(frame)
            if end:
                await response.write(end)
            await response.write_eof()
        except ConnectionResetError:  # the client went away (seen on the next write)
            self.client_disconnected.set()
        except asyncio.CancelledError:  # ... or, with handler_cancellation, at once
            self.client_disconnected.set()
            raise
        return response


class FakeOpenAI(ScriptedFake[Script]):
    """A scriptable fake of OpenAI's chat API. See the module docstring."""

    script_type = Script
    root = "/v1"

    def __init__(self, *, api_key: str | None = None, models: tuple[str, ...] = ()) -> None:
        # api_key: requests must carry `Authorization: Bearer <api_key>`
        super().__init__(api_key=api_key)
        self.models = models or ("gpt-4o-mini", "gpt-4o")
        self._ids = itertools.count(1)

    @property
    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    @property
    def responses_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/v1/responses"]

    @property
    def embeddings_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/embeddings")]

    @property
    def completions_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/completions")]

    # -- serving --------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        headers = self.record(request, await request.read()).headers
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return web.json_response(error_body(401), status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data}, headers=self._headers())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = request[RECORDED].json
        if not isinstance(body, dict):
            return web.json_response(
                error_body(400, "We could not parse the JSON body."), status=400
            )
        refused = _too_long_ids(body)
        if refused is not None:
            return web.json_response(refused, status=400)
        plan = self.next_plan(_last_user(body.get("messages") or []))
        try:
            await self.pause(plan)
            if plan.drop_before_response:
                return self._drop(request, web.Response())
            if plan.status >= 400:
                error = plan.error or error_body(plan.status)
                return web.json_response(error, status=plan.status, headers=self._headers(plan))
            reply = self._reply(body, plan)
            if body.get("stream"):
                return await self._stream(request, body, plan, reply)
            return web.json_response(reply, status=plan.status, headers=self._headers(plan))
        except asyncio.CancelledError:
            self.client_disconnected.set()
            raise

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``: the same answers as chat, in the Responses API's shapes."""
        plan = self.next_plan()
        body = request[RECORDED].json
        if not isinstance(body, dict) or not body.get("model"):
            return web.json_response(
                error_body(400, "Missing required parameter: 'model'."), status=400
            )
        refused = _too_long_ids(body)
        if refused is not None:
            return web.json_response(refused, status=400)
        try:
            await self.pause(plan)
            if plan.drop_before_response:
                return self._drop(request, web.Response())
            if plan.status >= 400:
                error = plan.error or error_body(plan.status)
                return web.json_response(error, status=plan.status, headers=self._headers(plan))
            response = self._response(body, self._reply(_chat_body(body), plan))
            if body.get("stream"):
                return await self._stream(request, body, plan, response)
            return web.json_response(response, headers=self._headers(plan))
        except asyncio.CancelledError:
            self.client_disconnected.set()
            raise

    async def _refusal(self, request: web.Request, plan: Script) -> web.StreamResponse | None:
        """What a script or a body without a model answers instead of the endpoint (or None)."""
        await self.pause(plan)
        if plan.drop_before_response:
            return self._drop(request, web.Response())
        if plan.status >= 400:
            error = plan.error or error_body(plan.status)
            return web.json_response(error, status=plan.status, headers=self._headers(plan))
        body = request[RECORDED].json
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            missing = error_body(400, "You must provide a model parameter.")
            return web.json_response(missing, status=400)
        return None

    async def _embeddings(
        self, request: web.Request, model: str | None = None
    ) -> web.StreamResponse:
        """``POST /v1/embeddings`` (see ``tests.fake_endpoints``); scripts apply as for chat."""
        plan = self.next_plan()
        refused = await self._refusal(request, plan)
        if refused is not None:
            return refused
        body = request[RECORDED].json
        try:
            answer = openai_embeddings(body, model or body["model"])
        except Refused as exc:
            return web.json_response(error_body(400, str(exc), param=exc.param), status=400)
        return web.json_response(answer, headers=self._headers(plan))

    async def _completions(
        self, request: web.Request, model: str | None = None
    ) -> web.StreamResponse:
        """``POST /v1/completions`` (see ``tests.fake_endpoints``); scripts as for chat."""
        plan = self.next_plan()
        try:
            refused = await self._refusal(request, plan)
            if refused is not None:
                return refused
            body = request[RECORDED].json
            reply_id = f"cmpl-fake{next(self._ids)}"
            try:
                reply = completion_reply(body, model or body["model"], reply_id)
            except Refused as exc:
                return web.json_response(error_body(400, str(exc), param=exc.param), status=400)
            if not body.get("stream"):
                return web.json_response(reply, headers=self._headers(plan))
            headers = {"Content-Type": "text/event-stream; charset=utf-8"} | self._headers(plan)
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            frames = [_sse(c) for c in completion_chunks(body, reply)]

            def error(_: int) -> bytes:
                return _sse(plan.stream_error)

            return await self.play(request, response, frames, plan, error, b"data: [DONE]\n\n")
        except asyncio.CancelledError:
            self.client_disconnected.set()
            raise

    # -- building replies -----------------------------------------------------------------

    def _headers(self, plan: Script | None = None) -> dict[str, str]:
        headers = {
            "x-request-id": f"req_fake{next(self._ids)}",
            "openai-processing-ms": "42",
            "openai-version": "2020-10-01",
        }
        return headers | (plan.headers if plan else {})

    def _reply(self, body: Json, plan: Script) -> Json:
        """The non-streaming ``chat.completion`` answering ``body``; streams are cut from it."""
        messages = body.get("messages") or []
        tool = _chosen_tool(body) if plan.tool_call is not False else None
        message: Json = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
        if tool is not None or plan.tool_call:
            function = (tool or {}).get("function", {"name": "tool"})
            arguments = plan.arguments or json.dumps(
                _sample(function.get("parameters") or {"type": "object"})
            )
            call = {"name": function["name"], "arguments": arguments}
            message["tool_calls"] = [{"id": "call_fake1", "type": "function", "function": call}]
            finish, completion = "tool_calls", len(arguments) // 4 + 5
        else:
            text = plan.content if plan.content is not None else _answer(body, messages)
            message["content"] = text
            finish, completion = "stop", len(text.split())
        prompt = sum(len(_text(m.get("content")).split()) + 4 for m in messages) + 3
        return {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "gpt-4o-mini"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": plan.finish_reason or finish,
                }
            ],
            "usage": openai_usage(prompt, completion),
            "service_tier": "default",
            "system_fingerprint": "fp_fake0001",
        }

    def _chunks(self, body: Json, reply: Json) -> list[Json]:
        """The ``chat.completion.chunk`` sequence OpenAI streams for ``reply``."""
        options = body.get("stream_options") or {}
        with_usage = bool(options.get("include_usage"))
        head = {
            k: reply[k] for k in ("id", "created", "model", "service_tier", "system_fingerprint")
        }
        head["object"] = "chat.completion.chunk"
        choice = reply["choices"][0]
        message = choice["message"]

        def chunk(delta: Json, finish: str | None = None) -> Json:
            out = head | {
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            }
            return out | {"usage": None} if with_usage else out

        chunks = []
        if message.get("tool_calls"):
            for index, call in enumerate(message["tool_calls"]):
                name, arguments = call["function"]["name"], call["function"]["arguments"]
                first = {"index": index, "id": call["id"], "type": "function"}
                first["function"] = {"name": name, "arguments": ""}
                delta = {"role": "assistant", "content": None} if index == 0 else {}
                chunks.append(chunk(delta | {"tool_calls": [first]}))
                for start in range(0, len(arguments), 8):
                    piece = {
                        "index": index,
                        "function": {"arguments": arguments[start : start + 8]},
                    }
                    chunks.append(chunk({"tool_calls": [piece]}))
        else:
            chunks.append(chunk({"role": "assistant", "content": "", "refusal": None}))
            words = message["content"].split(" ")
            for i, word in enumerate(words):
                chunks.append(chunk({"content": word if i == 0 else " " + word}))
        chunks.append(chunk({}, choice["finish_reason"]))
        if with_usage:
            chunks.append(head | {"choices": [], "usage": reply["usage"]})
        if options.get("include_obfuscation", True):
            for c in chunks:
                c["obfuscation"] = "".join(random.choices(string.ascii_letters, k=6))
        return chunks

    def _response(self, body: Json, reply: Json) -> Json:
        """The ``response`` object answering a Responses request, built from the chat reply."""
        choice = reply["choices"][0]
        message = choice["message"]
        output: list[Json] = []
        if message.get("content") is not None:
            text = {"type": "output_text", "text": message["content"]}
            output.append(
                {
                    "type": "message",
                    "id": f"msg_fake{next(self._ids)}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [text | {"annotations": [], "logprobs": []}],
                }
            )
        for call in message.get("tool_calls") or []:
            output.append(
                {
                    "type": "function_call",
                    "id": f"fc_fake{next(self._ids)}",
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
            )
        usage = reply["usage"]
        cut = choice["finish_reason"] == "length"
        tools = [
            {
                "type": "function",
                "name": t["name"],
                "description": t.get("description"),
                "parameters": t.get("parameters"),
                "strict": t.get("strict", True),
            }
            for t in body.get("tools") or []
            if t.get("type") == "function"
        ]
        return {
            "id": f"resp_fake{next(self._ids)}",
            "object": "response",
            "created_at": reply["created"],
            "status": "incomplete" if cut else "completed",
            "background": False,
            "completed_at": None if cut else reply["created"],
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"} | (body.get("text") or {}),
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": tools,
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"],
            },
            "metadata": body.get("metadata") or {},
        }

    async def _stream(
        self, request: web.Request, body: Json, plan: Script, reply: Json
    ) -> web.StreamResponse:
        """Stream ``reply``: chat chunks and ``[DONE]``, or (a ``response``) its events."""
        events = reply.get("object") == "response"
        headers = {"Content-Type": "text/event-stream; charset=utf-8"} | self._headers(plan)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        chunks = _response_events(reply) if events else self._chunks(body, reply)
        frames = [_sse(c, c["type"] if events else None) for c in chunks]

        def error(sent: int) -> bytes:
            body = plan.stream_error
            if events:  # a Responses `error` event is flat
                body = body["error"] | {"type": "error", "sequence_number": sent}
            return _sse(body, "error" if events else None)

        end = b"" if events else b"data: [DONE]\n\n"
        return await self.play(request, response, frames, plan, error, end)


def _too_long(param: str, value: Any, limit: int) -> Json | None:
    if not isinstance(value, str) or len(value) <= limit:
        return None
    return error_body(
        400,
        f"Invalid '{param}': string too long. Expected a string with maximum length "
        f"{limit}, but got a string with length {len(value)} instead.",
        code="string_above_max_length",
        param=param,
    )


def _too_long_ids(body: Json) -> Json | None:
    """OpenAI's 400 for a tool-call id over its limit: 40 characters in chat messages, 64 for
    a Responses `call_id` (as real clients have met it, e.g. with ids minted by other APIs)."""
    for i, msg in enumerate(body.get("messages") or []):
        for j, call in enumerate(msg.get("tool_calls") or [] if isinstance(msg, dict) else []):
            found = _too_long(f"messages[{i}].tool_calls[{j}].id", call.get("id"), 40)
            if found is not None:
                return found
    items = body.get("input")
    for i, item in enumerate(items if isinstance(items, list) else []):
        found = _too_long(f"input[{i}].call_id", item.get("call_id"), 64)
        if found is not None:
            return found
    return None


def openai_usage(prompt: int, completion: int) -> Json:
    """A `usage` object as OpenAI sends it, detail objects included."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _sse(obj: Json, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chat_body(body: Json) -> Json:
    """A Responses request as the chat request it means, so chat replies can answer it."""
    messages: list[Json] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input") or []
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": item["content"]})
        elif kind == "function_call":
            call = {"name": item["name"], "arguments": item["arguments"]}
            tool_call = {"id": item["call_id"], "type": "function", "function": call}
            messages.append({"role": "assistant", "content": None, "tool_calls": [tool_call]})
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            )
    tools = [
        {"type": "function", "function": {"name": t["name"], "parameters": t.get("parameters")}}
        for t in body.get("tools") or []
        if t.get("type") == "function"
    ]
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice["name"]}}
    fmt = dict((body.get("text") or {}).get("format") or {"type": "text"})
    if fmt["type"] == "json_schema":
        fmt = {"type": "json_schema", "json_schema": {"name": fmt["name"], "schema": fmt["schema"]}}
    return {
        "model": body["model"],
        "messages": messages,
        "tools": tools,
        "tool_choice": choice,
        "response_format": fmt,
    }


def _response_events(response: Json) -> list[Json]:
    """The Responses API event sequence that streams ``response`` (numbered from 0)."""
    start = {k: v for k, v in response.items() if k not in ("usage", "completed_at")}
    start |= {"status": "in_progress", "output": [], "incomplete_details": None}
    events: list[Json] = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
    ]
    for index, item in enumerate(response["output"]):
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            added = item | {"status": "in_progress", "content": []}
            part = item["content"][0]
            text = part["text"]
            events.append(
                {"type": "response.output_item.added", "output_index": index, "item": added}
            )
            events.append(
                {"type": "response.content_part.added", **where, "content_index": 0}
                | {"part": part | {"text": ""}}
            )
            for i, word in enumerate(text.split(" ")):
                delta = word if i == 0 else " " + word
                events.append(
                    {"type": "response.output_text.delta", **where, "content_index": 0}
                    | {"delta": delta, "logprobs": []}
                )
            events.append(
                {"type": "response.output_text.done", **where, "content_index": 0}
                | {"text": text, "logprobs": []}
            )
            events.append(
                {"type": "response.content_part.done", **where, "content_index": 0, "part": part}
            )
        else:
            added = item | {"status": "in_progress", "arguments": ""}
            events.append(
                {"type": "response.output_item.added", "output_index": index, "item": added}
            )
            arguments = item["arguments"]
            for start_at in range(0, len(arguments), 8):
                piece = arguments[start_at : start_at + 8]
                events.append(
                    {"type": "response.function_call_arguments.delta", **where, "delta": piece}
                )
            events.append(
                {"type": "response.function_call_arguments.done", **where}
                | {"name": item["name"], "arguments": arguments}
            )
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    terminal = "response.completed" if response["status"] == "completed" else "response.incomplete"
    events.append({"type": terminal, "response": response})
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and "text" in p)
    return content if isinstance(content, str) else ""


def _last_user(messages: list[Json]) -> str:
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return _text(users[-1].get("content")) if users else ""


def _answer(body: Json, messages: list[Json]) -> str:
    """ "echo: <last user text>", or in JSON mode a JSON object (sampled from the schema)."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return json.dumps(_sample(fmt.get("json_schema", {}).get("schema") or {"type": "object"}))
    if fmt.get("type") == "json_object":
        return json.dumps({"reply": _last_user(messages)})
    return f"echo: {_last_user(messages)}"


def _chosen_tool(body: Json) -> Json | None:
    """The tool OpenAI would call: the forced one, else the first; None if tools are off."""
    tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict) and "function" in choice:
        wanted = choice["function"].get("name")
        return next((t for t in tools if t["function"]["name"] == wanted), tools[0])
    return tools[0]


def _sample(schema: Json) -> Any:
    """A plausible value for a JSON schema (what a model would fill in)."""
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: _sample(v) for k, v in props.items() if k in schema.get("required", props)}
    return SAMPLES.get(str(kind))


SAMPLES: dict[str, Any] = {
    "string": "Paris",
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [],
}


__all__ = ["ERRORS", "FakeOpenAI", "Recorded", "Script", "ScriptedFake", "error_body"]


def completion(usage: Json, model: str = "m") -> Json:
    """A minimal ``chat.completion`` answering "ok", with ``usage`` as given."""
    message = {"role": "assistant", "content": "ok", "refusal": None}
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }
