"""APIs some upstreams serve themselves and others get translated: which routes go which way.

The Responses API (OpenAI upstreams with `responses_api = true`) and the Messages API
(Anthropic upstreams) are relayed untranslated where the upstream speaks them, and translated
to chat completions for the rest. `native_first()` decides, over a request's routes in the
router's order:

- A request that asks for what only such an upstream can do (`refusal`) is tried on those
  routes only, wherever the router placed them; with none, the refusal is the answer.
- When the first route (the router's pick) is such an upstream, those routes are tried first;
  should every one of them fail in a way another upstream may not share (what `attempt_each`
  moves on from: retryable failures, refused credentials), the translated request gets the
  remaining routes, within the same deadline.
- Otherwise the request is translated and may fail over to any route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway.errors import GatewayError, UpstreamAuthError, UpstreamError
from gateway.failover import Exchange
from gateway.providers.base import has_capability

__all__ = ["may_fail_over", "native_first"]

T = TypeVar("T")


def may_fail_over(exc: UpstreamError) -> bool:
    """Whether another upstream might succeed where these failed."""
    return exc.retryable or isinstance(exc, UpstreamAuthError)


async def native_first(
    ex: Exchange[Any],
    native: type,
    refusal: GatewayError | None,
    relayed: Callable[[], Awaitable[T]],
    translated: Callable[[], Awaitable[T]],
) -> T:
    """The answer of the native routes (capability `native`) or of the translated request.

    Args:
        refusal: the error for what only a native upstream can take (None: nothing).
        relayed: runs the request over `ex.routes`, all native.
        translated: runs the translated request over `ex.routes`.

    Raises:
        GatewayError: `refusal` without a native route, or what the attempts raised.
    """
    through = [route for route in ex.routes if has_capability(route.provider, native)]
    if refusal is not None:
        if not through:
            raise refusal
        ex.routes = through  # only they can serve it
        return await relayed()
    if has_capability(ex.routes[0].provider, native):
        rest = [route for route in ex.routes if not has_capability(route.provider, native)]
        ex.routes = through
        try:
            return await relayed()
        except UpstreamError as exc:
            # The fallback shares the request's deadline (ex.deadline, set by the first round
            # of attempts): it stops at once when that has passed.
            if not (rest and may_fail_over(exc)):
                raise
        ex.routes = rest
    return await translated()
