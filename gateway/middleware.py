"""Every request's way through the gateway, in one coroutine (`gateway`): its context (id,
contextvars, canonical log line, usage row), CORS preflights, authentication, intake, and the
mapping of errors to OpenAI's error shape (or Anthropic's on the Messages API routes).

In this order: context → preflight → (errors mapped from here on) authentication → intake →
handler, so the log line and usage row see the final status of every request, errors
included. `routes.setup_routes` wraps every route's handler in it (`through_gateway`), and
adds a last route that takes every other path and method (`unmatched`: a 404 or 405). Not
aiohttp middlewares: aiohttp calls each through a partial, adds one of its own whenever
there are any, and each adds a coroutine frame that every suspension of the request (reading
the body, waiting for the upstream) passes through twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Container
from typing import Any

import msgspec
import structlog
from aiohttp import web

from gateway.admission import Running, Ticket
from gateway.auth import sign_in
from gateway.cors import add_cors_headers, preflight
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    drop_tracebacks,
)
from gateway.intake import check_length, read_body
from gateway.logs import RequestLine, request_line
from gateway.messages.errors import PATH_PREFIX as MESSAGES_PATH, anthropic_error
from gateway.records import UsageRecord, mint_uid
from gateway.schemas.codec import encode
from gateway.state import (
    GATE_KEY,
    INFLIGHT_KEY,
    LIVE_KEY,
    METRICS_KEY,
    REFUSALS_KEY,
    SHUTTING_DOWN_KEY,
    SNAPSHOT_KEY,
    TICKET_KEY,
    USAGE_KEY,
)
from gateway.trace import CLIENT_CLOSED, TRACE_KEY, RequestTrace, add_trace_headers, elapsed_ms

__all__ = [
    "SERVER_NAME",
    "UNMATCHED",
    "answer_headers",
    "error_response",
    "gateway",
    "mint_request_id",
    "response_headers",
    "running_requests",
    "through_gateway",
    "unmatched",
]

log = structlog.get_logger("gateway.request")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A client-supplied id is echoed only when it is short and harmless in logs and headers.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The longest path a request line holds (the rest is cut, marked "..."): a client's path must
# not make a line longer than PIPE_BUF, the most `serve --workers N` can write to their shared
# stdout without another worker's lines landing inside it.
LOGGED_PATH = 1024

# Ids are a random per-process prefix plus a counter: unique across restarts and processes,
# without a syscall for fresh randomness on every request.
_ID_PREFIX = f"req_{uuid.uuid4().hex[:16]}"
_id_counter = itertools.count(1)


# The `Server` header of every answer: the product, never the versions of what runs it.
SERVER_NAME = "token-kiosk"


# The two fields every log line of a request carries, as structlog's context variables, set
# directly: what `bind_contextvars` does, without its call, loop, f-strings and dict of tokens
# per request. The variables are structlog's own (taken from the tokens it hands back), so
# its `merge_contextvars`, `unbind_contextvars` and `clear_contextvars` see them.
def _structlog_var(name: str) -> contextvars.ContextVar[Any]:
    token = structlog.contextvars.bind_contextvars(**{name: Ellipsis})[name]
    token.var.reset(token)
    return token.var


_REQUEST_ID = _structlog_var("request_id")
_KEY_ID = _structlog_var("key_id")


def mint_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def _new_request_id(request: web.Request) -> str:
    incoming = request.headers.get("X-Request-ID")
    if incoming and _SAFE_ID.match(incoming):
        return incoming
    return mint_request_id()


def response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer's own headers, set before it goes out: the `Server` header (aiohttp's
    would name its own and Python's versions) and the CORS headers. Set by `gateway` on the
    answers it returns and by `sse.SSEStream` on a stream before it starts (`answer_headers`),
    rather than from `on_response_prepare`: its receivers are coroutines, awaited on every
    answer."""
    response.headers["Server"] = SERVER_NAME
    add_cors_headers(request, response)


def answer_headers(
    request: web.Request,
    trace: RequestTrace,
    response: web.StreamResponse,
    shutting_down: asyncio.Event,
) -> None:
    """A request's answer's headers, set just before it goes out (by `gateway`, and by
    `sse.SSEStream` on a stream before it starts): its id and trace, `response_headers`, and
    `Connection: close` while the server stops (it closes the connection after this answer: a
    client would send its next request on it, or have one pipelined, and get no answer)."""
    response.headers["X-Request-ID"] = trace.request_id
    if trace.endpoint.startswith(MESSAGES_PATH):
        # Anthropic's own name for it: its SDK reads only this one (`_request_id`, and
        # `request_id` on its errors).
        response.headers["request-id"] = trace.request_id
    add_trace_headers(request, trace, response)
    response_headers(request, response)
    if shutting_down.is_set():
        response.force_close()


def running_requests(inflight: dict[asyncio.Task[Any], web.Request]) -> Running:
    """The model requests in flight of some keys, from `INFLIGHT_KEY` (`admission.Running`):
    read when keys change, not per request."""

    def of(key_ids: Container[str]) -> dict[str, list[tuple[asyncio.Task[Any], Ticket | None]]]:
        found: dict[str, list[tuple[asyncio.Task[Any], Ticket | None]]] = {}
        for task, request in inflight.items():
            trace = request.get(TRACE_KEY)
            if trace is not None and trace.metered and trace.key_id in key_ids:
                found.setdefault(trace.key_id, []).append((task, request.get(TICKET_KEY)))
        return found

    return of


def through_gateway(handler: Handler, route: str) -> Handler:
    """A route's handler, called through `gateway`; `route` is the route's pattern, the
    endpoint its requests are counted under in metrics."""
    return functools.partial(gateway, handler=handler, route=route)


# The path of the route that takes every path and method no other route does (added last,
# counted under `other` in metrics), and its pattern.
UNMATCHED = r"/{unmatched:[\s\S]*}"
_UNMATCHED_CANONICAL = "/{unmatched}"


async def unmatched(request: web.Request) -> web.StreamResponse:
    """What aiohttp's router answers a path or method no route takes (here, through
    `gateway`, in OpenAI's shape): a 405 naming the methods the path takes, else a 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical != _UNMATCHED_CANONICAL:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


async def gateway(request: web.Request, handler: Handler, route: str) -> web.StreamResponse:
    trace = RequestTrace(
        request_id=_new_request_id(request),
        started=time.perf_counter(),
        ts=time.time(),
        endpoint=request.path,
    )
    request[TRACE_KEY] = trace
    status = 500
    # The loop from the connection's task, and this request's task from the loop: on Python
    # 3.11, `get_running_loop()` and `current_task()` without a loop each make a getpid
    # system call (asyncio's check that the loop is this process's).
    loop = request.task.get_loop()
    task = asyncio.current_task(loop)
    app = request.app  # (a property that walks the match info: read once)
    inflight = app[INFLIGHT_KEY]
    if task is not None:
        inflight[task] = request
    live = app[LIVE_KEY]
    shutting_down = app[SHUTTING_DOWN_KEY]
    # The config this request runs on, held until it (or its stream) ends: a reload meanwhile
    # changes nothing for it.
    snapshot = request[SNAPSHOT_KEY] = live.enter()
    # aiohttp runs each request in a task of its own, on a copy of its connection's context:
    # what an earlier request on the connection bound (its key) is not in this one's, so
    # there is nothing to unbind (tests/test_logs.py checks it).
    _REQUEST_ID.set(trace.request_id)
    try:
        # A preflight from a listed origin is answered before authentication (browsers send
        # no credentials with it).
        response: web.StreamResponse | None = preflight(request)
        if response is None:
            try:
                principal = sign_in(request, trace)
                if principal is not None:
                    _KEY_ID.set(principal.key.id)
                check_length(request, snapshot)
                if principal is None or request.method != "POST":
                    response = await handler(request)
                else:
                    # A model request: a slot of its key's concurrency and a request of its
                    # rate are taken before its body is read (`gateway.intake`).
                    trace.metered = True  # refusals from here on are counted for the key
                    gate = app[GATE_KEY]
                    ticket = request[TICKET_KEY] = (
                        gate.enter(principal.key)
                        if gate.admits_at_once
                        else await gate.admit(principal.key)
                    )
                    try:
                        await read_body(request)
                        response = await handler(request)
                    finally:
                        if ticket is not None:  # a key without limits holds nothing
                            gate.leave(ticket)
            except GatewayError as exc:
                trace.refused = exc.reason
                response = error_response(exc, request)
                if exc.closes:  # the rest of the body is not read: the connection is spent
                    response.force_close()
                drop_tracebacks(exc)
            except web.HTTPException as exc:
                if exc.status < 400:  # (a redirect): aiohttp answers it as it is
                    response_headers(request, exc)
                    raise
                response = error_response(_from_http_exception(request, exc), request)
                if "Allow" in exc.headers:  # a 405 says which methods the route takes
                    response.headers["Allow"] = exc.headers["Allow"]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("unhandled_error")
                drop_tracebacks(exc)
                response = error_response(
                    GatewayError("The gateway failed to process the request."), request
                )
        status = response.status
        if not response.prepared:  # streams set these themselves before their headers go out
            answer_headers(request, trace, response, shutting_down)
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED  # handler cancelled because the client went away
        raise
    finally:
        if task is not None:
            inflight.pop(task, None)
        live.leave(snapshot)
        # After the answer is handed to the socket (aiohttp writes a response once this
        # returns): its usage row, metrics and log line cost the client no latency. A callback
        # made now runs before the loop reads any further input, so nothing can observe the
        # request as done without its row and line. While the server stops, at once: the
        # usage writer's last flush must find the row.
        status = trace.status or status
        if shutting_down.is_set():
            _finish(request, app, route, trace, status, loop)
        else:
            loop.call_soon(_finish, request, app, route, trace, status, loop)


def _finish(
    request: web.Request,
    app: web.Application,
    route: str,
    trace: RequestTrace,
    status: int,
    loop: asyncio.AbstractEventLoop | None,
) -> None:
    """Settle what the request used (`pipeline.finish`), queue the usage row (for model
    requests; a refusal before any upstream call is only counted) and write the canonical
    log line."""
    settle = trace.settle
    if settle is not None:
        # Dropped before it runs (or fails): it holds the request, which holds this trace. A
        # cycle left behind would keep each request's objects (its Request, parser and
        # streams, ~40) for the garbage collector: about a fifth more CPU per request.
        trace.settle = None
        try:
            settle()
        except Exception:  # the row and the line still go out, with what is known
            log.exception("settle_failed")
    record = UsageRecord(
        ts=trace.ts,
        request_id=trace.request_id,
        key_id=trace.key_id,
        model=trace.model_id,
        provider=trace.provider,
        upstream_model=trace.upstream_model,
        endpoint=trace.endpoint,
        stream=trace.stream,
        status=status,
        prompt_tokens=trace.prompt_tokens,
        completion_tokens=trace.completion_tokens,
        total_tokens=trace.prompt_tokens + trace.completion_tokens,
        cost_usd=trace.cost_usd,
        latency_ms=elapsed_ms(trace.started, time.perf_counter()),
        ttft_ms=trace.ttft_ms,
        estimated=trace.estimated,
        cache_read_tokens=trace.cache_read_tokens,
        cache_write_tokens=trace.cache_write_tokens,
        uid=mint_uid(),
    )
    if trace.metered:
        if status >= 400 and not trace.attempts and trace.key_id is not None:
            app[REFUSALS_KEY].count(trace.ts, trace.key_id, status)
        else:
            app[USAGE_KEY].record(record)
    metrics = app.get(METRICS_KEY)
    if metrics is not None:
        try:
            metrics.observe(trace, route, status, record.latency_ms / 1000)
        except Exception:  # a metric is never worth a request's log line and usage row
            log.exception("metrics_update_failed")
    # The usage row's fields but its time and endpoint: the line has its own timestamp and
    # the path.
    line = RequestLine(
        request_id=record.request_id,
        key_id=record.key_id,
        model=record.model,
        provider=record.provider,
        upstream_model=record.upstream_model,
        stream=record.stream,
        status=record.status,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        total_tokens=record.total_tokens,
        cost_usd=record.cost_usd,
        latency_ms=record.latency_ms,
        ttft_ms=record.ttft_ms,
        estimated=record.estimated,
        cache_read_tokens=record.cache_read_tokens,
        cache_write_tokens=record.cache_write_tokens,
        uid=record.uid,
        attempts=trace.attempts or msgspec.UNSET,
        method=request.method,
        path=path if len(path := request.path) <= LOGGED_PATH else path[:LOGGED_PATH] + "...",
    )
    request_line(log, line, loop)


_HTTP_ERRORS: dict[int, type[GatewayError]] = {
    400: InvalidRequest,
    404: NotFound,
    413: PayloadTooLarge,
}


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> GatewayError:
    """aiohttp's own errors (unknown route, wrong method, body too large) in our shape."""
    if exc.status == 404:
        return NotFound(f"Unknown route: {request.method} {request.path}", code="not_found")
    if exc.status == 413:
        return PayloadTooLarge("Request body is too large.")
    if exc.status == 405:
        err = InvalidRequest("Method not allowed for this route.", code="method_not_allowed")
        err.status = 405
        return err
    return _HTTP_ERRORS.get(exc.status, GatewayError)(exc.reason, status=exc.status)


def error_response(exc: GatewayError, request: web.Request | None = None) -> web.Response:
    """The response of an error: OpenAI's shape, or Anthropic's on the Messages routes."""
    headers = {}
    if exc.retry_after is not None:
        # Whole seconds, rounded up so a client that obeys is not refused again; the SDKs
        # read the exact figure from retry-after-ms first.
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        headers["retry-after-ms"] = str(max(1, math.ceil(exc.retry_after * 1000)))
    if exc.should_retry is not None:
        headers["x-should-retry"] = "true" if exc.should_retry else "false"
    status, body = exc.status, None
    if request is not None and request.path.startswith(MESSAGES_PATH):
        status, body = anthropic_error(exc, request[TRACE_KEY].request_id)
    return web.Response(
        status=status,
        body=encode(exc.body()) if body is None else body,
        content_type="application/json",
        headers=headers,
    )
