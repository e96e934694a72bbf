"""Retries and failover: try a request's routes in turn until one answers (or its first byte).

An attempt that fails for a reason another account or target may not share (connection
refused or reset, timeouts, 429, 5xx, Anthropic's 529) moves on to the next route, after a
capped exponential backoff with jitter; the failed account's breaker counts the failure (a 429
with `retry-after` cools it down for that long, which is how the upstream's wish is honoured:
the next try goes elsewhere). An upstream that refuses our credentials disables that account.
A 4xx caused by the request itself is answered at once. A per-request deadline bounds it all.
Nothing here runs once a byte of the answer went to the client: streams never retry.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from gateway.errors import (
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.router import Route
from gateway.settings import RoutingSettings
from gateway.state import ROUTER_KEY, SETTINGS_KEY

if TYPE_CHECKING:
    from gateway.pipeline import Exchange

__all__ = ["attempt_each", "backoff"]

T = TypeVar("T")

_rng = random.Random()  # noqa: S311 - jitter, not security


def backoff(retry: int, routing: RoutingSettings) -> float:
    """Seconds to wait before retry number `retry` (1, 2, ...): capped doubling, 75-100 %."""
    delay = min(routing.backoff_max, routing.backoff_initial * 2.0 ** (retry - 1))
    return delay * (1 - 0.25 * _rng.random())


def _use(ex: Exchange, route: Route) -> None:
    """Point the exchange at `route`, forgetting what an earlier attempt left in the call."""
    call, trace = ex.call, ex.trace
    ex.provider = route.provider
    call.upstream_model = route.upstream_model
    call.api_key = route.api_key
    call.usage, call.chunks, call.first_byte_at = None, 0, None
    trace.provider = route.provider.config.name
    trace.upstream_model = route.upstream_model
    headers = trace.headers if trace.headers is not None else {}
    headers["x-gateway-provider"] = route.provider.config.name
    trace.headers = headers


def _record(ex: Exchange, route: Route, started: float, status: int) -> None:
    ex.trace.attempts.append(
        {
            "provider": route.account[0],
            "account": route.account[1],
            "model": route.upstream_model,
            "status": status,
            "ms": round((time.perf_counter() - started) * 1000, 3),
        }
    )


async def attempt_each(ex: Exchange, attempt: Callable[[Route], Awaitable[T]]) -> T:
    """The result of the first route whose attempt succeeds.

    Raises:
        UpstreamError: a non-retryable failure at once; else, when every try failed or the
            deadline passed, a 429 if every failure was a rate limit, otherwise the last one.
    """
    app = ex.request.app
    breakers = app[ROUTER_KEY].breakers
    routing = app[SETTINGS_KEY].routing
    loop = asyncio.get_running_loop()
    deadline = loop.time() + routing.deadline
    failures: list[UpstreamError] = []
    for route in ex.routes:
        if len(failures) >= routing.max_attempts:
            break
        if not breakers.attempt(route.account):
            continue  # it began cooling down since the routes were listed
        if failures:
            delay = backoff(len(failures), routing)
            if loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
        _use(ex, route)
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                result = await attempt(route)
        except TimeoutError:
            _record(ex, route, started, 504)
            breakers.failed(route.account)
            failures.append(
                UpstreamTimeout(
                    f"No upstream answered within the request deadline ({routing.deadline:g} s)."
                )
            )
            break
        except UpstreamError as exc:
            _record(ex, route, started, exc.status)
            failures.append(exc)
            if isinstance(exc, UpstreamAuthError):
                breakers.disable(route.account)  # our key: another account may still work
            elif exc.retryable:
                retry_after = exc.retry_after if isinstance(exc, UpstreamRateLimited) else None
                breakers.failed(route.account, retry_after)
            else:
                breakers.succeeded(route.account)  # the upstream is fine; the request is not
                raise
            continue
        except BaseException:
            breakers.release(route.account)  # cancelled (client gone): no verdict on it
            raise
        breakers.succeeded(route.account)
        _record(ex, route, started, 200)
        return result
    raise _final(ex, failures)


def _final(ex: Exchange, failures: list[UpstreamError]) -> UpstreamError:
    if not failures:
        return UpstreamUnavailable(
            f"No upstream account for the model '{ex.trace.model_id}' is available right now "
            "(all are cooling down after failures); retry later.",
            retry_after=5.0,
        )
    if all(isinstance(f, UpstreamRateLimited) for f in failures):
        waits = [f.retry_after for f in failures if f.retry_after is not None]
        last = failures[-1]
        last.retry_after = min(waits) if waits else None
        return last
    return failures[-1]
