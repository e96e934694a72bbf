"""Model resolution and target choice: which provider, upstream model and account serve a request.

A model id is a configured `[[models]]` name, or `<provider>/<upstream model>` for any
configured provider. A model has targets with priorities and weights: the best priority wins,
ties are spread by weight, and each provider's API keys (accounts) are used in turn.
Retries, failover and cooldowns build on `Route` (a later issue).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from gateway.errors import NotFound
from gateway.providers import Provider
from gateway.settings import ModelConfig, Settings, Target

__all__ = ["Route", "Router"]


@dataclass(frozen=True, slots=True)
class Route:
    model: ModelConfig
    provider: Provider
    upstream_model: str
    api_key: str | None


class Router:
    """Resolves model ids and picks a target for each request. Pure in-memory, no I/O."""

    def __init__(self, settings: Settings, providers: Mapping[str, Provider]) -> None:
        self._settings = settings
        self._providers = dict(providers)
        self._models = {m.name: m for m in settings.models}
        self._accounts: dict[str, Iterator[str | None]] = {
            name: itertools.cycle(p.config.api_keys or (None,)) for name, p in providers.items()
        }
        self._rng = random.Random()  # noqa: S311 - load spreading, not security

    @property
    def models(self) -> tuple[ModelConfig, ...]:
        return self._settings.models

    def provider(self, name: str) -> Provider | None:
        return self._providers.get(name)

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
            reasoning=self._settings.is_reasoning(provider.config, upstream),
        )

    @staticmethod
    def providers_of(model: ModelConfig) -> tuple[str, ...]:
        return tuple(t.provider for t in model.targets)

    def pick(self, model: ModelConfig) -> Route:
        """Choose a target of the best priority (weighted) and the provider's next account."""
        best = min(t.priority for t in model.targets)
        tier = [t for t in model.targets if t.priority == best]
        target = tier[0] if len(tier) == 1 else self._rng.choices(tier, [t.weight for t in tier])[0]
        return Route(
            model=model,
            provider=self._providers[target.provider],
            upstream_model=target.model,
            api_key=next(self._accounts[target.provider]),
        )
