"""Retries and failover: try a request's routes in turn until one answers (or its first byte).

An attempt that fails for a reason another account or target may not share (connection
refused or reset, timeouts, 429, 5xx, Anthropic's 529) moves on to the next route, after a
capped exponential backoff with jitter; the failed account's breaker counts the failure, once
however often this request failed there (a 429 with `retry-after` cools it down for that long,
which is how the upstream's wish is honoured: the next try goes elsewhere). An upstream that
refuses our credentials disables that account for a while. With every route out of rotation,
the one closest to recovery is still tried, once (`gateway.breaker`).
A 4xx caused by the request itself is answered at once. A per-request deadline bounds it all.
Nothing here runs once a byte of the answer went to the client: streams never retry. A
stream's verdict waits for its end (`stream_ended`): a first byte says nothing of a stream
that breaks after it.

`Exchange` is the request being tried; the breakers and the routing settings come from
the caller (`pipeline.try_routes`), so this loop depends on no application state.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec
from aiohttp import web

from gateway.admission import Ticket
from gateway.breaker import Account, BreakerBoard, Claim, credentials_refused, out_of_credit
from gateway.errors import (
    Fault,
    UpstreamError,
    UpstreamOutOfCredit,
    UpstreamRateLimited,
    UpstreamTimeout,
    drop_tracebacks,
    fault_of,
)
from gateway.providers import Provider
from gateway.providers._connector import HANDED
from gateway.providers.base import UNBOUNDED, Call
from gateway.router import Route
from gateway.settings import RoutingSettings
from gateway.trace import CLIENT_CLOSED, RequestTrace, elapsed_ms
from gateway.usage_bounds import output_sent

__all__ = ["Exchange", "attempt_each", "backoff", "stream_ended"]

T = TypeVar("T")
C = TypeVar("C", bound=Call)

_rng = random.Random()  # noqa: S311 - jitter, not security


class _Owed(NamedTuple):
    """The answering account of a stream, whose verdict waits for the stream's end."""

    breakers: BreakerBoard
    account: Account
    claim: Claim
    counted: bool  # False: the request failed on the account already (its one failure)


class Exchange(msgspec.Struct, Generic[C]):
    """One model request between its client and its upstream. (A Struct: its fields are set
    in C, where a dataclass's `__init__` is Python.)"""

    request: web.Request
    trace: RequestTrace
    call: C
    provider: Provider  # the upstream of the current (finally: the answering) attempt
    routes: list[Route]  # what the request may try, in order
    ticket: Ticket | None = None  # what the request holds of its key's limits and budget
    deadline: float | None = None  # loop time by which an answer must have begun (set once)
    owed: _Owed | None = None  # a stream's account, told how it went at its end
    unanswered: int = 0  # attempts given up waiting for after the prompt went upstream
    unanswered_output: int = 0  # their output limits, a reasoning model's (`_gave_up`)
    # Whether the last attempt had its request sent (a connection was handed to it): a client
    # that hangs up before then (waiting for a connection, or in a backoff) has sent nothing.
    sent: bool = True


def backoff(retry: int, routing: RoutingSettings) -> float:
    """Seconds to wait before retry number `retry` (1, 2, ...): capped doubling, 75-100 %."""
    delay = min(routing.backoff_max, routing.backoff_initial * 2.0 ** (retry - 1))
    return delay * (1 - 0.25 * _rng.random())


def _bound(route: Route, stream: bool) -> float:
    """The longest one attempt can take by its provider's timeouts alone."""
    cfg = route.provider.config
    if stream:  # until the first batch
        return cfg.connect_timeout + (cfg.first_byte_timeout or cfg.read_timeout)
    return min(cfg.total_timeout, cfg.read_timeout)


def _use(ex: Exchange[Any], route: Route) -> None:
    """Point the exchange at `route`, forgetting what an earlier attempt left in the call."""
    call, trace = ex.call, ex.trace
    ex.provider = route.provider
    call.upstream_model = route.upstream_model
    call.api_key = route.api_key
    _forget(call)
    trace.provider = route.provider.config.name
    trace.upstream_model = route.upstream_model
    headers = trace.headers if trace.headers is not None else {}
    headers["x-gateway-provider"] = route.provider.config.name
    trace.headers = headers


def _forget(call: Call) -> None:
    """Clear what an attempt left in the call (its usage, chunks, first byte, the tier it was
    served at, whether its answer came), so that it is
    charged nothing of its own: a failed stream attempt costs what `Exchange.unanswered`
    counts, whether or not another attempt follows (`pipeline._account` would otherwise
    estimate the last one, e.g. a stream whose first event was an error, as if it had
    answered)."""
    call.usage, call.chunks, call.first_byte_at = None, 0, None
    call.cache_write_tokens = call.cache_write_1h_tokens = 0
    call.usage_estimated = False
    call.usage_chunks = -1
    call.service_tier = ""
    call.steps = (0, 0, 0, 0, 0)
    if call.server_tools is not None:
        call.server_tools.answered = False  # (an error event said so of that attempt only)


def _gave_up(ex: Exchange[Any]) -> None:
    """The gateway stopped waiting for an attempt whose request went upstream: it is charged
    the prompt's estimate, and a reasoning model the output limit that attempt was sent (its
    own provider's: Anthropic's adds the thinking budget), which it may have thought through
    unseen (`pipeline._account`)."""
    ex.unanswered += 1
    if ex.call.model.reasoning:
        most = output_sent(ex.call, ex.provider)
        if most < UNBOUNDED:
            ex.unanswered_output += most


def _record(ex: Exchange[Any], route: Route, started: float, status: int) -> None:
    ex.trace.attempts.append(
        {
            "provider": route.account[0],
            "account": route.account[1],
            "model": route.upstream_model,
            "status": status,
            "ms": elapsed_ms(started, time.perf_counter()),
        }
    )


def _next_route(
    ex: Exchange[Any], breakers: BreakerBoard, failures: list[tuple[UpstreamError, Account | None]]
) -> tuple[Route, Claim] | None:
    """The next route to try and what the attempt is; routes are cycled, so a model with one
    account still gets its retries. With no route in rotation, the one closest to recovery
    (panic) that has not failed this request already (a dead upstream is not hammered with
    retries); None when nothing is left, or the upstreams asked for a pause or refused every
    account."""
    routes, tried = ex.routes, len(failures)
    # (An account whose credit does not cover this request is not tried for it again.)
    priced_out = {a for e, a in failures if isinstance(e, UpstreamOutOfCredit)} if tried else ()
    for offset in range(len(routes)):
        route = routes[(tried + offset) % len(routes)]
        if route.account in priced_out:
            continue
        claim = breakers.attempt(route.account)
        if claim is not None:
            return route, claim
    failed = {a for _, a in failures if a}
    account = breakers.panic(r.account for r in routes if r.account not in failed)
    if account is None:
        return None
    return next(r for r in routes if r.account == account), Claim.PANIC


async def attempt_each(
    ex: Exchange[Any],
    attempt: Callable[[Route], Awaitable[T]],
    *,
    breakers: BreakerBoard,
    routing: RoutingSettings,
    stream: bool = False,
) -> T:
    """The result of the first attempt that succeeds.

    Args:
        attempt: one try of the request on a route.
        breakers: the accounts' breakers, asked before and told after every attempt; all
            failures of one account within this request count as one.
        routing: how many attempts, the backoff between them, and the deadline.
        stream: an attempt's result is a stream's first batch: its account is told how the
            stream went at its end (`stream_ended`, which the caller must call), not at once.

    Raises:
        UpstreamError: a non-retryable failure at once; else, when every try failed or the
            deadline passed, a 429 if every failure was a rate limit, otherwise the last one;
            with no try at all, why no account may be tried (`BreakerBoard.refusal`).
    """
    # (The loop from the connection's task: `get_running_loop()` makes a getpid system call
    # on Python 3.11.)
    loop = ex.request.task.get_loop()
    if ex.deadline is None:  # one deadline per request, however many rounds of attempts
        ex.deadline = loop.time() + routing.deadline
    deadline = ex.deadline
    failures: list[tuple[UpstreamError, Account | None]] = []
    try:
        while len(failures) < routing.max_attempts:
            if loop.time() >= deadline:  # an earlier round of attempts used the time up
                failures.append((_past_deadline(routing), None))
                break
            if failures:  # back off before a retry, if the deadline leaves time for one
                delay = backoff(len(failures), routing)
                if loop.time() + delay >= deadline:
                    break
                ex.sent = False  # (a hang-up in the backoff: no attempt running)
                await asyncio.sleep(delay)
            # Claimed only now, right before the attempt, so no exit can leave a probe claimed.
            found = _next_route(ex, breakers, failures)
            if found is None:
                break
            route, claim = found
            account = route.account
            _use(ex, route)
            started = time.perf_counter()
            handed = HANDED.get()  # (a connection handed out since: the request went upstream)
            # The provider's own timeouts bound an attempt; only when the deadline comes sooner
            # is a timer of ours needed (most requests: never, and a timer costs a few us).
            soon = loop.time() + _bound(route, ex.call.is_stream) > deadline
            scope = asyncio.timeout_at(deadline) if soon else None
            try:
                if scope is None:
                    result = await attempt(route)
                else:
                    async with scope:
                        result = await attempt(route)
            except TimeoutError:
                if scope is None or not scope.expired():
                    raise  # not ours: providers turn their own timeouts into UpstreamTimeout
                _record(ex, route, started, 504)
                _forget(ex.call)  # (charged as unanswered: the prompt's estimate)
                if HANDED.get() != handed:
                    _gave_up(ex)
                breakers.release(account, claim)  # the time ran out, not the account
                failures.append((_past_deadline(routing), None))
                break
            except UpstreamError as exc:
                _record(ex, route, started, exc.status)
                if stream:
                    # Failed before its first batch, so before any byte of an answer: the
                    # upstream said so (an error status, or its first event an error: the
                    # client gets a status either way), or the gateway gave up on it
                    # (`unanswered`). What it left in the call (a first byte, Anthropic's
                    # `message_start` counts) is not charged. (A whole answer's reported usage
                    # is: an upstream that answered and billed, e.g. embeddings whose vectors
                    # the gateway refuses, is charged it.)
                    _forget(ex.call)
                if type(exc) is UpstreamTimeout and exc.unanswered and HANDED.get() != handed:
                    _gave_up(ex)
                fault = fault_of(exc)  # (the rule `sse.relay` judges a broken stream by)
                if fault is Fault.CREDENTIALS:
                    # Our key, or our account's spent credit: another account may still work;
                    # this one waits for the operator.
                    spent = isinstance(exc, UpstreamOutOfCredit)
                    breakers.disable(account, out_of_credit=spent)
                    if spent:
                        exc = out_of_credit(account, breakers.remaining(account), exc.message)
                    else:
                        exc = credentials_refused(account, breakers.remaining(account))
                elif fault is Fault.NONE:
                    # The gateway's own refusal (its bound on connections, its shutdown): the
                    # account was not reached, so no verdict on it (a burst must not take it out
                    # of rotation). A full pool may still be answered by another route.
                    breakers.release(account, claim)
                    if not exc.retryable:
                        raise
                elif fault is Fault.REQUEST:
                    # The request's own fault: the upstream answered, which is all a probe asks.
                    if claim is not Claim.ORDINARY:
                        breakers.succeeded(account, claim)
                    raise
                else:
                    breakers.failed(
                        account,
                        exc.retry_after,
                        claim,
                        counted=all(a != account for _, a in failures),
                        rate_limited=isinstance(exc, UpstreamRateLimited),
                        # (maybe spent: out for `cooldown` at once, not disabled)
                        at_once=isinstance(exc, UpstreamOutOfCredit),
                    )
                    if not exc.retryable:
                        raise  # the account's fault, but not one another route is tried for
                failures.append((exc, account))
                continue
            except BaseException:
                ex.sent = HANDED.get() != handed  # (cancelled before a connection: nothing went)
                _record(ex, route, started, CLIENT_CLOSED)
                breakers.release(account, claim)  # cancelled (client gone): no verdict
                raise
            if stream:
                # A probe (or panic attempt) still puts its account back at the first byte, so
                # that requests flow again meanwhile; the rest waits for the end of the stream.
                if claim is not Claim.ORDINARY:
                    breakers.succeeded(account, claim)
                counted = all(a != account for _, a in failures)
                ex.owed = _Owed(breakers, account, claim, counted)
            else:
                breakers.succeeded(account, claim)
            _record(ex, route, started, 200)
            return result
        raise _final(ex, failures, breakers)
    finally:
        # Each failure's traceback holds this frame, and this frame the failures: dropped, or
        # every request with a failed attempt (its Request, body and trace) would wait in a
        # cycle for the garbage collector, a full collection for most of them. (The one
        # raised, if any, is on its way with a traceback from here on.)
        for failure, _ in failures:
            drop_tracebacks(failure)
        failures.clear()


def stream_ended(ex: Exchange[Any]) -> None:
    """Tell the breaker of a stream's account how the stream went (`trace.upstream_ok`, set by
    `sse.relay`): a success if the upstream finished it, a failure if it broke it (decisive for
    a probe or panic attempt, as a failure before the first byte would have been), nothing if
    the client, a shutdown or the gateway ended it. Once per stream; a no-op without one."""
    owed, ex.owed = ex.owed, None
    if owed is None:
        return
    ok = ex.trace.upstream_ok
    if ok:
        owed.breakers.succeeded(owed.account)
    elif ok is not None:
        owed.breakers.broke(owed.account, owed.claim, counted=owed.counted)


def _past_deadline(routing: RoutingSettings) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"No upstream answered within the request deadline ({routing.deadline:g} s)."
    )


def _final(
    ex: Exchange[Any], failures: list[tuple[UpstreamError, Account | None]], breakers: BreakerBoard
) -> UpstreamError:
    if not failures:
        return breakers.refusal([r.account for r in ex.routes], ex.trace.model_id)
    last = failures[-1][0]
    # The shortest wait left: the model answers again as soon as one account is back (the
    # last failure's own pause may be the longest, and a local refusal says the shortest).
    waits = [w for w in (_wait(f, a, breakers) for f, a in failures) if w is not None]
    rate_limited = all(isinstance(f, UpstreamRateLimited) for f, _ in failures)
    if rate_limited or last.retry_after is not None:
        last.retry_after = min(waits) if waits else None
    return last


def _wait(exc: UpstreamError, account: Account | None, breakers: BreakerBoard) -> float | None:
    """What is left of the wait an upstream asked for: the account's remaining pause."""
    if exc.retry_after is None or account is None:
        return exc.retry_after
    return breakers.remaining(account) or exc.retry_after
