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
from gateway.providers.base import ChatCall, has_capability
from gateway.router import Route
from gateway.state import STORED_KEY
from gateway.stored import Naming, StoredResponses

__all__ = ["Remembering", "may_fail_over", "native_first", "relays"]

T = TypeVar("T")


def relays(routes: list[Route], native: type, refusal: GatewayError | None) -> bool:
    """Whether `native_first` relays the request as it is over `routes` (capability
    `native`), its choice: only then do the ids it names of what the upstream stores go
    upstream (the lookup of stored ids asks the same)."""
    if refusal is not None:
        return any(has_capability(route.provider, native) for route in routes)
    return has_capability(routes[0].provider, native)


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
    if not relays(ex.routes, native, refusal):
        if refusal is not None:
            raise refusal
        return await translated()
    through = [route for route in ex.routes if has_capability(route.provider, native)]
    if refusal is not None:
        ex.routes = through  # only they can serve it
        return await relayed()
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


class Remembering:
    """What a pass-through upstream stores for the request's key, remembered as its answer
    shows it (`gateway.stored`, `ChatCall.shown`): a stream's response (or message) and
    items as they pass (another key is refused them while the stream runs), then its size
    once its usage is known (none without: a `background` response); call it after each
    batch, and with `final` at the end.

    Ids the request named itself (`Naming`) are not taken from its answer, which may echo
    them; nor, when one of them is not known here, the containers and conversation its answer
    shows, which may be that context's: continuing what was made elsewhere (another key's
    before a restart) must not make its container the continuing key's. An item id another
    key's answer showed is contested only by an answer that is this key's own response.
    `files`: the items are files the upstream's code wrote (Anthropic's), which requests are
    then searched for (`StoredResponses.files`)."""

    __slots__ = (
        "_contexts",
        "_echo",
        "_ex",
        "_files",
        "_items",
        "_named",
        "_own",
        "_response",
    )

    def __init__(self, ex: Exchange[ChatCall], named: Naming, *, files: bool = False) -> None:
        self._ex = ex
        self._named = named
        self._files = files
        self._items = self._contexts = 0  # how many of `call.shown`'s are remembered
        self._response: str | None = None
        self._own = False  # whether the response is the key's own (`StoredResponses.own`)
        # Whether the response is another key's again (an echo) or one the request named:
        # its ids are that response's, none of this key's.
        self._echo = False

    def __call__(self, final: bool = False) -> None:
        call = self._ex.call
        named = self._named.ids
        key_id = self._ex.trace.key_id
        response_id = call.response_id
        if response_id and (final or response_id != self._response):
            self._response = response_id
            if response_id not in named:
                usage = call.usage if final else None
                tokens = None if usage is None else usage.prompt_tokens + usage.completion_tokens
                self._own = self._stored().remember(response_id, key_id, tokens)
                # (Not kept is not an echo: an id too long to remember is the key's own.)
                self._echo = self._stored().others(response_id, key_id)
            else:
                self._echo = True
        shown = call.shown
        if shown is None:
            return
        if self._echo:  # (those this process never knew included)
            self._items, self._contexts = len(shown.items), len(shown.contexts)
            shown.spilled = []
            return
        if len(shown.items) > self._items:
            items = [found for found in shown.items[self._items :] if found not in named]
            self._items = len(shown.items)
            if self._files:
                self._stored().files = True
            self._stored().own(items, key_id, contest=self._own, files=self._files)
        if len(shown.contexts) > self._contexts:
            if not self._named.unknown:
                contexts = shown.contexts[self._contexts :]
                self._stored().own([found for found in contexts if found not in named], key_id)
            self._contexts = len(shown.contexts)
        if shown.spilled:  # (past the answer's first ids: shared only, and taken away)
            fresh = [found for found in shown.spilled if found[0] not in named]
            shown.spilled = []
            items = [found for found, context in fresh if not context]
            if items and self._files:
                self._stored().files = True
            self._stored().share(items, key_id, contest=self._own, files=self._files)
            if not self._named.unknown:
                self._stored().share([found for found, context in fresh if context], key_id)

    def _stored(self) -> StoredResponses:
        return self._ex.request.app[STORED_KEY]
