"""An in-process fake of Anthropic's Messages API (``POST /v1/messages``) for gateway tests.

    fake = FakeAnthropic(api_key="sk-ant-test")     # optional: require `x-api-key` (else 401)
    server = await fake.start(aiohttp_server)       # or: await aiohttp_server(fake.make_app())
    provider = AnthropicConfig(..., base_url=fake.base_url)  # the root: clients add /v1/messages

Every request is checked like the real API checks it (``validate``: the anthropic-version header,
field types and ranges, role alternation, block shapes, tool_use/tool_result pairing, thinking
rules) and a violation gets the real 400 ``invalid_request_error`` body with a message close to
Anthropic's, so a translation bug fails a test as it would fail in production. A valid request
gets a ``message`` echoing the last user text ("echo: <text>"), a tool call (see ``_tool_calls``),
"tool said: <result>" after a tool_result turn, or JSON sampled from ``output_config``'s schema;
``stop_sequences`` and ``max_tokens`` (a token per word) cut the text. ``stream: true`` gets the
real ``event:``/``data:`` SSE sequence. A replayed thinking block must carry a signature this
fake issued (``fake.signatures``), unchanged. ``POST /v1/messages/count_tokens`` counts a
request's input tokens. Requests are recorded in ``fake.requests``. Scripting:

    fake.script(status=529)                                  # next request only (FIFO queue)
    fake.script(status=429, headers={"retry-after": "1"}, times=2)
    fake.always(thinking="Hmm.", parallel=True)              # every request without a script

Knobs (see ``Script``): status/error/headers, delay_headers, chunk_delay, hold/hold_after,
drop_before_response,
drop_after=N, error_after=N (``event: error``), content, tool_call, parallel, arguments,
stop_reason, thinking, input/output_tokens, cache_read/cache_creation_input_tokens, ping. A
rejected request uses up its script too. ``request_seen``/``client_disconnected``: as FakeOpenAI.
Converter unit tests can call ``check_request(body)`` directly (raises ``Invalid(message)``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import Recorded, ScriptedFake, _sample

Json = dict[str, Any]

VERSION = "2023-06-01"
# The versions the API takes: the first GA one, and what anthropic-sdk-python 2.x sends.
VERSIONS = (VERSION, "2026-10-21")
DOCS = "Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude"

# Realistic (type, message) for scripted error statuses, as Anthropic sends them.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "prompt is too long: 215000 tokens > 200000 maximum"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "model: claude-does-not-exist"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "This request would exceed the rate limit for your organization."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}
STREAM_ERROR = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


def _rand(n: int) -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=n))


def new_request_id() -> str:
    return f"req_011C{_rand(20)}"


def error_body(status: int, message: str | None = None, *, type: str | None = None) -> Json:
    """An Anthropic error body ``{"type": "error", "error": {type, message}, "request_id"}``."""
    default_type, default_message = ERRORS.get(status, ERRORS[500])
    error = {"type": type or default_type, "message": message or default_message}
    return {"type": "error", "error": error, "request_id": new_request_id()}


@dataclass(kw_only=True)
class Script:
    """How the fake answers one messages request. Every knob defaults to "behave like Anthropic"."""

    status: int = 200  # non-2xx: answer with ``error`` (default: error_body(status))
    error: Json | None = None
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (retry-after)
    delay_headers: float = 0.0  # seconds before anything is sent
    chunk_delay: float = 0.0  # seconds between SSE events
    hold: asyncio.Event | None = None  # answer only once the test sets it (never: a hung upstream)
    hold_after: int | None = None  # stream: send N events first, then wait for ``hold``
    drop_before_response: bool = False  # close the connection without any response
    drop_after: int | None = None  # stream: abort the connection after N events
    error_after: int | None = None  # stream: after N events send `event: error` and end
    content: str | None = None  # reply text (default "echo: <last user text>"); given together
    # with a tool call it becomes a text block before the tool_use block(s)
    tool_call: bool | None = None  # None: decide like the API (see _tool_calls); True: always
    parallel: bool = False  # also call the next tool (unless disable_parallel_tool_use)
    arguments: Json | None = None  # tool input (default: sampled from input_schema)
    stop_reason: str | None = None  # default: end_turn / tool_use / stop_sequence / max_tokens
    thinking: str | None = None  # thinking block text (default "Let me think." if enabled)
    input_tokens: int | None = None  # default: words of all text + 4 per message
    output_tokens: int | None = None  # default: words of the reply (+10 per tool call)
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    ping: bool = True  # stream a ping event after the first content_block_start


class Invalid(Exception):
    """The request breaks a rule of the real API; ``str(self)`` is the 400 message."""


class FakeAnthropic(ScriptedFake[Script]):
    """A scriptable, validating fake of Anthropic's Messages API. See the module docstring."""

    script_type = Script

    def __init__(self, *, api_key: str | None = None) -> None:
        # api_key: when set, requests must carry `x-api-key: <api_key>`
        super().__init__(api_key=api_key)
        self.signatures: set[str] = set()  # of the thinking blocks issued: valid to replay

    # -- scripting ------------------------------------------------------------------------

    @property
    def messages_requests(self) -> list[Recorded]:
        return [r for r in self.requests if (r.method, r.path) == ("POST", "/v1/messages")]

    # -- serving --------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=32 * 1024**2)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        headers = self.record(request, await request.read()).headers
        if self.api_key is not None and headers.get("x-api-key") != self.api_key:
            return _error_response(error_body(401), 401)
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:  # unknown path or method: the API answers in JSON
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            return _error_response(error_body(exc.status, exc.reason, type=kind), exc.status)
        return response

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        plan = self.next_plan()
        try:
            body = validate(request.headers.get("anthropic-version"), await request.read())
            _check_signatures(body, self.signatures)
        except Invalid as exc:
            return _error_response(error_body(400, str(exc)), 400)
        try:
            await self.pause(plan)
            if plan.drop_before_response:
                return self._drop(request, web.Response())
            if plan.status >= 400:
                error = plan.error or error_body(plan.status)
                return _error_response(error, plan.status, plan.headers)
            reply = _reply(body, plan)
            self.signatures |= {b["signature"] for b in reply["content"] if "signature" in b}
            if body.get("stream"):
                return await self._stream(request, plan, reply)
            return web.json_response(reply, headers=_headers(plan))
        except asyncio.CancelledError:
            self.client_disconnected.set()
            raise

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """``POST /v1/messages/count_tokens``: a request as for messages, without ``max_tokens``
        or ``stream`` (which the API refuses here); answers ``{"input_tokens": N}``."""
        plan = self.next_plan()
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
            if isinstance(body, dict):
                for name in ("max_tokens", "stream"):
                    if name in body:
                        raise Invalid(f"{name}: Extra inputs are not permitted")
                raw = json.dumps({**body, "max_tokens": 1}).encode()
            body = validate(request.headers.get("anthropic-version"), raw)
        except (Invalid, ValueError) as exc:
            return _error_response(error_body(400, str(exc)), 400)
        if plan.status >= 400:
            return _error_response(plan.error or error_body(plan.status), plan.status, plan.headers)
        tokens = _count_input(body) if plan.input_tokens is None else plan.input_tokens
        return web.json_response({"input_tokens": tokens}, headers=_headers(plan))

    async def _stream(self, request: web.Request, plan: Script, reply: Json) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        response = web.StreamResponse(headers=headers | _headers(plan))
        await response.prepare(request)
        frames = [sse(event) for event in _events(reply, plan)]
        return await self.play(request, response, frames, plan, lambda _: sse(STREAM_ERROR))


# -- building replies ---------------------------------------------------------------------------


def _headers(plan: Script) -> dict[str, str]:
    limits = {"anthropic-ratelimit-requests-limit": "4000"}  # one of many; clients may log it
    return {"request-id": new_request_id()} | limits | plan.headers


def _error_response(body: Json, status: int, extra: dict[str, str] | None = None) -> web.Response:
    headers = {"request-id": str(body.get("request_id") or new_request_id())} | (extra or {})
    return web.json_response(body, status=status, headers=headers)


def sse(event: Json) -> bytes:
    """One SSE frame as Anthropic writes it: ``event: <type>`` then ``data: <json>``."""
    data = json.dumps(event, separators=(",", ":"))
    if event == {"type": "ping"}:
        data = '{"type": "ping"}'  # sic: the real API spaces this one
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def _blocks(content: Any) -> list[Json]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _text(content: Any) -> str:
    """The text blocks of a string or block list, joined by spaces."""
    return " ".join(b["text"] for b in _blocks(content) if b["type"] == "text")


def _tool_calls(body: Json, plan: Script, after_result: bool) -> list[Json]:
    """The tools called: the forced one, else the first tool unless a tool_result came in."""
    tools: list[Json] = body.get("tools") or []
    choice: Json = body.get("tool_choice") or {"type": "auto"}
    if plan.tool_call is False or (plan.tool_call is None and choice["type"] == "none"):
        return []
    if choice["type"] == "tool":
        calls = [next(t for t in tools if t["name"] == choice["name"])]
    elif tools and (plan.tool_call or choice["type"] == "any" or not after_result):
        calls = tools[:1]
    elif plan.tool_call:
        calls = [{"name": "tool", "input_schema": {"type": "object"}}]
    else:
        return []
    others = [t for t in tools if t is not calls[0]]
    if plan.parallel and others and not choice.get("disable_parallel_tool_use"):
        calls.append(others[0])
    return calls


def _reply_text(body: Json, blocks: list[Json], results: list[Json]) -> str:
    schema = ((body.get("output_config") or {}).get("format") or {}).get("schema")
    if schema is not None:
        return json.dumps(_sample(schema))
    if results:
        said = [_text(r["content"]) for r in results if r.get("content")]
        return "tool said: " + " ".join(said)
    return "echo: " + _text(blocks)


def _reply(body: Json, plan: Script) -> Json:
    """The ``message`` answering ``body``; streams are cut from it."""
    messages: list[Json] = body["messages"]
    blocks = _blocks(next(m for m in reversed(messages) if m["role"] == "user")["content"])
    results = [b for b in blocks if b["type"] == "tool_result"]
    calls = _tool_calls(body, plan, bool(results))
    text = plan.content
    if text is None:
        text = "" if calls else _reply_text(body, blocks, results)
    stop_reason, stop_sequence = "tool_use" if calls else "end_turn", None
    hits = sorted((text.index(s), s) for s in body.get("stop_sequences") or [] if s in text)
    if hits:  # the first stop sequence in the text ends it
        (cut, stop_sequence), stop_reason = hits[0], "stop_sequence"
        text = text[:cut]
    words = list(re.finditer(r"\S+", text))
    if len(words) > body["max_tokens"]:  # one token per word
        end = words[body["max_tokens"] - 1].end()
        text, stop_reason, stop_sequence = text[:end], "max_tokens", None

    content: list[Json] = []
    thought = plan.thinking
    if thought is None and (body.get("thinking") or {}).get("type") == "enabled":
        thought = "Let me think."
    if thought is not None:
        signature = base64.b64encode(random.randbytes(48)).decode()
        content.append({"type": "thinking", "thinking": thought, "signature": signature})
    if text:
        content.append({"type": "text", "text": text})
    for tool in calls:
        arguments = plan.arguments
        if arguments is None:
            arguments = _sample(tool["input_schema"])
        call = {"type": "tool_use", "id": f"toolu_01{_rand(22)}", "name": tool["name"]}
        content.append(call | {"input": arguments})
    output = len(text.split()) + len((thought or "").split()) + 10 * len(calls)
    usage = {
        "input_tokens": _count_input(body) if plan.input_tokens is None else plan.input_tokens,
        "cache_creation_input_tokens": plan.cache_creation_input_tokens,
        "cache_read_input_tokens": plan.cache_read_input_tokens,
        "output_tokens": output if plan.output_tokens is None else plan.output_tokens,
        "service_tier": "standard",
    }
    return {
        "id": f"msg_01{_rand(22)}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": plan.stop_reason or stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def _count_input(body: Json) -> int:
    """A rough token count: words of all text (tool inputs as JSON) plus 4 per message."""

    def words(content: Any) -> int:
        total = 0
        for block in _blocks(content):
            total += len(str(block.get("text") or block.get("thinking") or "").split())
            total += words(block.get("content", []))
            if "input" in block:
                total += len(json.dumps(block["input"]).split())
        return total

    return words(body.get("system") or []) + sum(words(m["content"]) + 4 for m in body["messages"])


def _deltas(block: Json) -> list[Json]:
    kind = block["type"]
    if kind == "tool_use":
        arguments = json.dumps(block["input"])
        pieces = ["", *(arguments[i : i + 8] for i in range(0, len(arguments), 8))]
        return [{"type": "input_json_delta", "partial_json": p} for p in pieces]
    words = [w if i == 0 else " " + w for i, w in enumerate(block[kind].split(" "))]
    if kind == "text":
        return [{"type": "text_delta", "text": w} for w in words]
    thinking = [{"type": "thinking_delta", "thinking": w} for w in words]
    return [*thinking, {"type": "signature_delta", "signature": block["signature"]}]


def _events(reply: Json, plan: Script) -> list[Json]:
    """The SSE event sequence Anthropic streams for ``reply``."""
    usage = reply["usage"] | {"output_tokens": 1}
    start = reply | {"content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
    events: list[Json] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(reply["content"]):
        empty = {
            "text": {"type": "text", "text": ""},
            "thinking": {"type": "thinking", "thinking": "", "signature": ""},
            "tool_use": block | {"input": {}},
        }[block["type"]]
        events.append({"type": "content_block_start", "index": index, "content_block": empty})
        for delta in _deltas(block):
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
    if plan.ping:
        events.insert(2 if reply["content"] else 1, {"type": "ping"})
    delta = {"stop_reason": reply["stop_reason"], "stop_sequence": reply["stop_sequence"]}
    output = {"output_tokens": reply["usage"]["output_tokens"]}
    events.append({"type": "message_delta", "delta": delta, "usage": output})
    events.append({"type": "message_stop"})
    return events


# -- validation -----------------------------------------------------------------------------------
# Shapes are declared as specs and checked by ``_conform`` (pydantic-style messages): a type
# (float = any number), a tuple of allowed literals, ``OneOf`` alternatives, a one-item list (a
# list of that), a dict (an object: "key?" is optional, "*" allows any other key) and ``Tags``
# (objects told apart by their "type"). Rules beyond shape are in ``validate`` and below.


class Tags(dict[str, Any]):
    """Object specs told apart by their ``type`` field."""


class OneOf(tuple[Any, ...]):
    """A value matching any of these specs."""


CACHE = Tags(ephemeral={"type": str, "ttl?": ("5m", "1h")})
CACHED = {"type": str, "cache_control?": CACHE}  # the keys every block may have
TEXT = CACHED | {"text": str, "citations?": list}
BASE64 = {"type": str, "media_type": str, "data": str}
URL = {"type": str, "url": str}
IMAGE = CACHED | {"source": Tags(base64=BASE64, url=URL)}
DOCUMENT = CACHED | {"source": Tags(base64=BASE64, text=BASE64, url=URL), "title?": str}
RESULT = {"tool_use_id": str, "content?": OneOf((str, [Tags(text=TEXT, image=IMAGE)]))}
BLOCK = Tags(
    text=TEXT,
    image=IMAGE,
    document=DOCUMENT | {"context?": str, "citations?": dict},
    tool_result=CACHED | RESULT | {"is_error?": bool},
    tool_use=CACHED | {"id": str, "name": str, "input": dict},
    thinking={"type": str, "thinking": str, "signature": str},
    redacted_thinking={"type": str, "data": str},
)
ROLE_BLOCKS = {
    "user": ("text", "image", "document", "tool_result"),
    "assistant": ("text", "tool_use", "thinking", "redacted_thinking"),
}
SCHEMA = {"type": ("object",), "*": None}  # "*": any other key
TOOL = {"type?": ("custom",), "name": str, "description?": str, "input_schema": SCHEMA}
TOOL |= {"cache_control?": CACHE, "strict?": bool}
SERVER_TOOL = re.compile(r"^[a-z_]+_\d{8}$")  # Anthropic-run tools, versioned by date
SERVER = {"type": str, "name": str, "cache_control?": CACHE, "*": None}
PARALLEL = {"type": str, "disable_parallel_tool_use?": bool}
REQUEST = {
    "model": str,
    "max_tokens": int,
    "messages": [{"role": ("user", "assistant"), "content": OneOf((str, [BLOCK]))}],
    "system?": OneOf((str, [Tags(text=TEXT)])),
    "stop_sequences?": [str],
    "temperature?": float,
    "top_p?": float,
    "top_k?": int,
    "tools?": list,  # of TOOL, checked with the path the API reports ("tools.0.custom.name")
    "tool_choice?": Tags(
        auto=PARALLEL, any=PARALLEL, tool=PARALLEL | {"name": str}, none={"type": str}
    ),
    "thinking?": Tags(enabled={"type": str, "budget_tokens": int}, disabled={"type": str}),
    "metadata?": {"user_id?": str},
    "stream?": bool,
    "service_tier?": ("auto", "standard_only"),
    "output_config?": {
        "format?": Tags(json_schema={"type": str, "schema": dict}),
        "effort?": ("low", "medium", "high"),
    },
}
TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "dictionary"}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
THINKING_ONLY = "when thinking is enabled. " + DOCS + "/extended-thinking#feature-compatibility"
MISSING_RESULT = (
    "messages.{n}: `tool_use` ids were found without `tool_result` blocks immediately after: "
    "{ids}. Each `tool_use` block must have a corresponding `tool_result` block in the next "
    "message."
)
UNEXPECTED_RESULT = (
    "{path}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` "
    "block must have a corresponding `tool_use` block in the previous message."
)
THINKING_FIRST = (
    "messages.{n}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
    "`{found}`. When `thinking` is enabled, a final `assistant` message must start with a "
    "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks)."
)


def _check(condition: Any, message: str) -> None:
    if not condition:
        raise Invalid(message)


def _or(options: Any) -> str:
    quoted = [f"'{o}'" for o in options]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)


def _conform(value: Any, spec: Any, path: str) -> None:
    """Check ``value`` against a shape spec (see above); raise ``Invalid`` at the first misfit."""
    at = f"{path}: " if path else ""
    if isinstance(spec, Tags):
        _check(isinstance(value, dict), f"{at}Input should be a valid dictionary")
        tag = value.get("type")
        expected = ", ".join(f"'{t}'" for t in spec)
        _check(
            tag in spec,
            f"{at}Input tag '{tag}' found using 'type' does not match any of "
            f"the expected tags: {expected}",
        )
        _conform(value, spec[tag], f"{path}.{tag}")
    elif isinstance(spec, OneOf):
        _check(isinstance(value, str | list), f"{at}Input should be a valid string or list")
        _conform(value, spec[0] if isinstance(value, str) else spec[1], path)
    elif isinstance(spec, tuple):
        _check(value in spec, f"{at}Input should be {_or(spec)}")
    elif isinstance(spec, list):
        _check(isinstance(value, list), f"{at}Input should be a valid list")
        for i, item in enumerate(value):
            _conform(item, spec[0], f"{path}.{i}")
    elif isinstance(spec, dict):
        _check(isinstance(value, dict), f"{at}Input should be a valid dictionary")
        prefix = f"{path}." if path else ""
        for key, sub in spec.items():
            name = key.rstrip("?")
            if value.get(name) is not None:
                _conform(value[name], sub, prefix + name)
            else:
                _check(key.endswith("?") or key == "*", f"{prefix}{name}: Field required")
        for key in value:
            _check(
                key in spec or f"{key}?" in spec or "*" in spec,
                f"{prefix}{key}: Extra inputs are not permitted",
            )
    elif spec is not None:
        kind = (int, float) if spec is float else spec
        valid = isinstance(value, kind) and (spec is bool or not isinstance(value, bool))
        _check(valid, f"{at}Input should be a valid {TYPE_NAMES.get(spec, spec.__name__)}")


def _range(value: float, path: str, low: float, high: float | None = None) -> None:
    _check(value >= low, f"{path}: Input should be greater than or equal to {low}")
    _check(high is None or value <= high, f"{path}: Input should be less than or equal to {high}")


def _nonblank(text: str, path: str) -> None:
    _check(text, f"{path}: text content blocks must be non-empty")
    _check(text.strip(), f"{path}: text content blocks must contain non-whitespace text")


def validate(version: str | None, raw: bytes) -> Json:
    """Check a request (its ``anthropic-version`` and body) like the real API; return the body.

    Raises:
        Invalid: with the message the real API puts in its 400 ``invalid_request_error``.
    """
    _check(version is not None, "anthropic-version: header is required")
    _check(version in VERSIONS, f"anthropic-version: invalid version '{version}'")
    try:
        body: Json = json.loads(raw)
    except ValueError:
        raise Invalid("There was an error parsing the body of your request.") from None
    _check(isinstance(body, dict), "Input should be a valid dictionary or object")
    check_request(body)
    return body


def check_request(body: Json) -> None:
    """Check a request body like the real API (for converter unit tests); raise ``Invalid``."""
    _conform(body, REQUEST, "")
    _range(body["max_tokens"], "max_tokens", 1)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            _range(body[name], name, 0, None if name == "top_k" else 1)
    for sequence in body.get("stop_sequences") or []:
        _check(sequence.strip(), "stop_sequences: each stop sequence must contain non-whitespace")
    for i, block in enumerate(body["system"] if isinstance(body.get("system"), list) else []):
        _nonblank(block["text"], f"system.{i}.text")
    for i, tool in enumerate(body.get("tools") or []):
        if SERVER_TOOL.match(str(tool.get("type"))):  # web_search_20250305, bash_20250124...
            _conform(tool, SERVER, f"tools.{i}.{tool['type']}")
            continue
        _conform(tool, TOOL, f"tools.{i}.custom")
    names = [tool["name"] for tool in body.get("tools") or []]
    for i, name in enumerate(names):
        _check(
            TOOL_NAME.match(name),
            f"tools.{i}.custom.name: String should match pattern '{TOOL_NAME.pattern}'",
        )
        _check(name not in names[:i], "tools: Tool names must be unique.")
    choice = body.get("tool_choice")
    if choice is not None:
        _check(names, "tool_choice: tool_choice may only be specified while providing tools")
        name = choice.get("name")
        _check(name in names or name is None, f"tool_choice: Tool '{name}' not found in tools")
    thinking = body.get("thinking") or {}
    if thinking.get("type") == "enabled":
        _range(thinking["budget_tokens"], "thinking.enabled.budget_tokens", 1024)
        _check(
            body["max_tokens"] > thinking["budget_tokens"],
            f"`max_tokens` must be greater than `thinking.budget_tokens`. {DOCS}"
            "/extended-thinking#max-tokens-and-context-window-size",
        )
        forced = choice is not None and choice["type"] in ("any", "tool")
        _check(not forced, "Thinking may not be enabled when tool_choice forces tool use.")
        _check(
            body.get("temperature") in (None, 1),
            f"`temperature` may only be set to 1 {THINKING_ONLY}",
        )
        _check(body.get("top_k") is None, f"`top_k` must be unset {THINKING_ONLY}")
        _check(
            body.get("top_p") is None or body["top_p"] >= 0.95,
            f"`top_p` must be greater than or equal to 0.95 or unset {THINKING_ONLY}",
        )
    _validate_messages(body["messages"], bool(names), thinking.get("type") == "enabled")


def _walk(blocks: list[Json], path: str) -> Iterator[tuple[str, Json]]:
    """Every block with its path, including the blocks inside tool_result content."""
    for m, block in enumerate(blocks):
        yield f"{path}.{m}", block
        if block["type"] == "tool_result" and isinstance(block.get("content"), list):
            yield from _walk(block["content"], f"{path}.{m}.tool_result.content")


def _validate_block(block: Json, path: str) -> None:
    kind = block["type"]
    if kind == "text":
        _nonblank(block["text"], f"{path}.text")
    elif kind in ("image", "document"):
        source = block["source"]
        where = f"{path}.{kind}.source.{source['type']}"
        if source["type"] == "url":
            url_ok = source["url"].startswith(("http://", "https://"))
            _check(url_ok, f"{where}.url: URL must start with 'http://' or 'https://'")
        elif kind == "image":
            _check(
                source["media_type"] in IMAGE_TYPES,
                f"{where}.media_type: Input should be {_or(IMAGE_TYPES)}",
            )
        else:
            media = "application/pdf" if source["type"] == "base64" else "text/plain"
            _check(source["media_type"] == media, f"{where}.media_type: Input should be '{media}'")
        if source["type"] == "base64":
            try:
                data = base64.b64decode(source["data"], validate=True)
            except (binascii.Error, ValueError):
                raise Invalid(f"{where}: invalid base64 data") from None
            _check(data, f"{where}.data: {kind} data must not be empty")
    elif kind in ("tool_use", "tool_result"):
        key = "id" if kind == "tool_use" else "tool_use_id"
        _check(
            TOOL_ID.match(block[key]),
            f"{path}.{kind}.{key}: String should match pattern '{TOOL_ID.pattern}'",
        )


def _validate_messages(messages: list[Json], has_tools: bool, thinking: bool) -> None:
    _check(messages, "messages: at least one message is required")
    uses_tools = False
    for n, message in enumerate(messages):
        role, content, path = message["role"], message["content"], f"messages.{n}"
        _check(n or role == "user", 'messages: first message must use the "user" role')
        _check(
            not n or role != messages[n - 1]["role"],
            'messages: roles must alternate between "user" and "assistant", but found '
            f'multiple "{role}" roles in a row',
        )
        final = n == len(messages) - 1
        _check(
            content or (final and role == "assistant"),
            f"{path}: all messages must have "
            "non-empty content except for the optional final assistant message",
        )
        if isinstance(content, str):
            if content:
                _nonblank(content, f"{path}.content")
            continue
        for m, block in enumerate(content):
            kind = block["type"]
            _check(
                kind in ROLE_BLOCKS[role],
                f"{path}.content.{m}.type: `{kind}` blocks are not allowed in `{role}` messages",
            )
            uses_tools = uses_tools or kind in ("tool_use", "tool_result")
        for where, block in _walk(content, f"{path}.content"):
            _validate_block(block, where)
    last = messages[-1]
    if last["role"] == "assistant" and last["content"]:
        tail = _blocks(last["content"])[-1]
        _check(
            tail["type"] != "text" or tail["text"] == tail["text"].rstrip(),
            "messages: final assistant content cannot end with trailing whitespace",
        )
    _check(
        has_tools or not uses_tools,
        "Requests which include `tool_use` or `tool_result` blocks must define tools.",
    )
    _validate_pairing(messages, thinking)


def _check_signatures(body: Json, issued: set[str]) -> None:
    """Replayed thinking blocks must carry the signature the API gave them, unchanged."""
    for n, message in enumerate(body["messages"]):
        for m, block in enumerate(_blocks(message["content"])):
            if block["type"] == "thinking" and block["signature"] not in issued:
                raise Invalid(f"messages.{n}.content.{m}: Invalid `signature` in `thinking` block")


def _validate_pairing(messages: list[Json], thinking: bool) -> None:
    """Each tool_use is answered in the very next (user) message; each tool_result answers one."""
    uses: list[str] = []  # tool_use ids of the previous (assistant) message
    seen: set[str] = set()
    for n, message in enumerate(messages):
        blocks = _blocks(message["content"])
        if message["role"] == "assistant":
            uses = [b["id"] for b in blocks if b["type"] == "tool_use"]
            unique = len(set(uses)) == len(uses) and not seen & set(uses)
            _check(unique, f"messages.{n}: `tool_use` ids must be unique")
            seen |= set(uses)
            _check(
                not uses or n < len(messages) - 1, MISSING_RESULT.format(n=n, ids=", ".join(uses))
            )
            continue
        answered: list[str] = []
        for m, block in enumerate(blocks):
            if block["type"] != "tool_result":
                continue
            path = f"messages.{n}.content.{m}"
            _check(
                len(answered) == m,
                f"{path}: `tool_result` blocks must come before any "
                "other content in a user message",
            )
            _check(
                block["tool_use_id"] in uses,
                UNEXPECTED_RESULT.format(path=path, id=block["tool_use_id"]),
            )
            answered.append(block["tool_use_id"])
        missing = [u for u in uses if u not in answered]
        _check(not missing, MISSING_RESULT.format(n=n - 1, ids=", ".join(missing)))
        uses = []
    # With thinking on, the assistant turn a tool_result answers must replay its thinking first.
    last = _blocks(messages[-1]["content"]) if messages[-1]["role"] == "user" else []
    if thinking and any(b["type"] == "tool_result" for b in last):
        first = _blocks(messages[-2]["content"] or [{"type": None}])[0]["type"]
        replayed = first in ("thinking", "redacted_thinking")
        _check(replayed, THINKING_FIRST.format(n=len(messages) - 2, found=first))


__all__ = [
    "ERRORS",
    "FakeAnthropic",
    "Invalid",
    "Script",
    "check_request",
    "error_body",
    "sse",
    "validate",
]
