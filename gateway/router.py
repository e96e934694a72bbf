"""Model resolution and the order in which a request tries its upstream accounts.

A model id is a configured `[[models]]` name, or `<provider>/<upstream model>` for any
configured provider. A model has targets with priorities and weights, and a provider may hold
several API keys (accounts). `routes()` lists what a request may try, in order: the best
priority first, its targets in a weighted random order, each target's accounts in turn (a
round-robin cursor spreads load), then the lower priorities as fallbacks. Accounts out of
rotation (their breaker is open) come last, closest to recovery first: they are tried only when
no other route is left (see `gateway.breaker`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.breaker import Account, BreakerBoard
from gateway.errors import NotFound
from gateway.providers import Provider
from gateway.settings import ModelConfig, Settings, Target

__all__ = ["Route", "Router"]


@dataclass(frozen=True, slots=True)
class Route:
    model: ModelConfig
    provider: Provider
    upstream_model: str
    api_key: str | None = field(repr=False)  # a secret: never in a repr, so never in a log
    account: Account = ("", 0)


class Router:
    """Resolves model ids and orders each request's attempts. Pure in-memory, no I/O."""

    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._providers = dict(providers)
        self._models = {m.name: m for m in settings.models}
        self._cursor: dict[str, int] = dict.fromkeys(providers, 0)
        self.rng = random.Random()  # noqa: S311 - load spreading, not security
        # Configured models with one target on a provider with one account: their route.
        self._single: dict[str, Route] = {}
        for m in settings.models:
            provider = self._providers.get(m.targets[0].provider)
            if len(m.targets) == 1 and provider is not None and len(provider.config.api_keys) <= 1:
                key = provider.config.api_keys[0] if provider.config.api_keys else None
                account = (provider.config.name, 0)
                self._single[m.name] = Route(m, provider, m.targets[0].model, key, account)
        self.breakers = BreakerBoard(settings.routing, _accounts(self._providers), clock=clock)

    @property
    def models(self) -> tuple[ModelConfig, ...]:
        return self.settings.models

    def resolve(self, model_id: str) -> ModelConfig:
        """The model config for a client's model id.

        Raises:
            NotFound: no configured model and no `<provider>/` prefix matches.
        """
        found = self._models.get(model_id)
        if found is not None:
            return found
        prefix, sep, upstream = model_id.partition("/")
        provider = self._providers.get(prefix) if sep and upstream else None
        if provider is None:
            raise NotFound(
                f"The model '{model_id}' does not exist or you do not have access to it.",
                param="model",
            )
        # Built per request, never cached: clients choose these ids, so a cache would let any
        # key grow the gateway's memory without bound.
        return ModelConfig(
            name=model_id,
            targets=(Target(provider=prefix, model=upstream),),
            reasoning=self.settings.is_reasoning(provider.config, upstream),
        )

    def provider(self, name: str) -> Provider:
        """A configured provider (targets were checked to name one when the config loaded)."""
        return self._providers[name]

    @staticmethod
    def providers_of(model: ModelConfig) -> tuple[str, ...]:
        return tuple(t.provider for t in model.targets)

    def _weighted_order(self, tier: list[Target]) -> list[Target]:
        """The targets of one priority in a random order drawn by weight, without repeats."""
        if len(tier) == 1:
            return tier
        rest, order = list(tier), []
        while rest:
            pick = self.rng.choices(range(len(rest)), [t.weight for t in rest])[0]
            order.append(rest.pop(pick))
        return order

    def _accounts(self, provider: Provider) -> list[tuple[str | None, int]]:
        keys: tuple[str | None, ...] = provider.config.api_keys or (None,)
        name = provider.config.name
        start = self._cursor[name] % len(keys)
        self._cursor[name] = start + 1
        return [(keys[(start + i) % len(keys)], (start + i) % len(keys)) for i in range(len(keys))]

    def routes(self, model: ModelConfig) -> list[Route]:
        """Every target and account the request may try, best first; those out of rotation
        last, closest to recovery first.

        Raises:
            UpstreamError: no account may be tried now: each is benched for the retry-after
                its upstream asked for, or its credentials were refused
                (`BreakerBoard.refusal`).
        """
        breakers = self.breakers
        single = self._single.get(model.name)
        if single is not None and self._models.get(model.name) is model:
            # The common case, one target on one account, without building anything.
            if breakers.usable(single.account) or breakers.may_panic(single.account):
                return [single]
            raise breakers.refusal([single.account], model.name)
        ready: list[Route] = []
        waiting: list[Route] = []
        for priority in sorted({t.priority for t in model.targets}):
            tier = [t for t in model.targets if t.priority == priority]
            for target in self._weighted_order(tier):
                provider = self._providers[target.provider]
                for key, index in self._accounts(provider):
                    account = (provider.config.name, index)
                    route = Route(model, provider, target.model, key, account)
                    (ready if breakers.usable(account) else waiting).append(route)
        if not ready and not any(breakers.may_panic(r.account) for r in waiting):
            raise breakers.refusal([r.account for r in waiting], model.name)
        waiting.sort(key=lambda r: breakers.recovery(r.account))
        return ready + waiting


def _accounts(providers: Mapping[str, Provider]) -> dict[Account, object]:
    """Every account, with what identifies it across config reloads: its provider's name,
    type and address, and its key (a breaker belongs to an upstream account, not to a slot
    in the config)."""
    accounts: dict[Account, object] = {}
    for name, provider in providers.items():
        cfg = provider.config
        keys: tuple[str | None, ...] = cfg.api_keys or (None,)
        for index, key in enumerate(keys):
            accounts[(name, index)] = (name, cfg.type, cfg.base_url, key)
    return accounts
