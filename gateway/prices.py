"""What a model costs: its config's prices, else the `genai-prices` database, else unknown.

A `[[models]]` entry's own prices always win. Otherwise the price of the upstream model is
looked up in the price database bundled with the `genai-prices` package (Pydantic's, updated
with every release; it works offline), under the provider's `pricing` id (by default the one
its type names: openai, azure, anthropic, google; `free` for the demo). The gateway fetches
newer prices at run time only when `[prices] update = true`. Lookups are cached per upstream
model, with a bound, since clients choose `<provider>/<model>` ids; the cache empties once a day
(prices change on dates the database knows) and whenever the database is updated.

Costs count what the upstream reports: cached input at its cache-read price, Anthropic's cache
writes at their price, reasoning, audio in and out and images out at their own prices where
the model has them, web searches at their price a call, and the price tier the prompt's size
reaches ("above 200k input tokens").
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import structlog

from gateway.settings import (
    MAX_PRICE_PER_MTOK,
    ConfigError,
    ModelConfig,
    PriceSettings,
    ProviderConfig,
    Settings,
)
from gateway.tool_fees import UNKNOWN_IMAGE_RATE, base_model

__all__ = [
    "FREE",
    "SPEED",
    "STANDARD_TIERS",
    "UNPRICED_TIERS",
    "Price",
    "PriceBook",
    "Rates",
    "Usage",
    "load_database",
    "open_book",
    "start_price_updates",
]

log = structlog.get_logger(__name__)

# The database's provider id for each provider type, unless a provider names its own.
DEFAULT_PRICING = {
    "openai": "openai",
    "azure": "azure",
    "anthropic": "anthropic",
    "gemini": "google",
}
_CACHE_LIMIT = 4096
# A web search's price when neither the model's config nor the price list has one (the list
# lacks it for some OpenAI search models): the most OpenAI's price page asks, $30 a thousand.
UNKNOWN_SEARCH_PRICE = 0.03
_DAY = 86400.0
# Processing tiers (OpenAI's `service_tier`) a request may ask for without a price of its
# own: the standard one, and "flex", which costs less (charged the standard rates where the
# list has no flex rates). Any other a key with a USD budget is refused where it is not priced.
STANDARD_TIERS = frozenset({"auto", "default", "on_demand", "standard", "speed=standard"})
UNPRICED_TIERS = STANDARD_TIERS | {"flex"}
# Anthropic's `speed` (its fast mode) is priced as a tier named `speed=<value>`.
SPEED = "speed="
_VARIANT_KEYS = {"service_tier": "", "speed": SPEED}


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens (a web search: USD per call)."""

    input: float
    output: float
    cached_input: float
    cache_write: float
    reasoning: float
    audio_input: float = 0.0
    audio_output: float = 0.0
    image_output: float = 0.0
    web_search: float = 0.0
    cache_write_1h: float = 0.0  # (Anthropic's writes kept an hour)
    cached_audio_input: float = 0.0  # (Gemini's audio read from the prompt cache)


class Usage(NamedTuple):
    """Token counts as the upstream reported them (cached, written and audio input tokens are
    parts of the prompt count, reasoning, audio and image output tokens parts of the
    completion count, as in OpenAI's usage), and the web searches its built-in tools made. A
    named tuple, not a frozen dataclass: one is made per request, and a tuple is built in one
    step."""

    prompt: int
    completion: int
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0
    audio_input: int = 0
    audio_output: int = 0
    image_output: int = 0
    web_searches: int = 0
    cache_write_1h: int = 0  # (of `cache_write`)
    cached_audio: int = 0  # (of `cached`, and of `audio_input`)


@dataclass(frozen=True, slots=True)
class Price:
    """A model's rates, and the rates of each tier a larger prompt reaches."""

    base: Rates
    tiers: tuple[tuple[int, Rates], ...] = ()  # (prompt tokens above which, rates), ascending
    source: str = "config"
    # The prices of the processing tiers the price list has in force for the model (OpenAI's
    # `service_tier`: "priority", "flex", "fast", ...), by tier.
    service_tiers: tuple[tuple[str, Price], ...] = ()

    def service_tier(self, tier: str) -> Price | None:
        """The model's prices at processing tier `tier`, or None when it has none listed."""
        for name, price in self.service_tiers:
            if name == tier:
                return price
        return None

    def rates(self, prompt_tokens: int) -> Rates:
        found = self.base
        for start, rates in self.tiers:
            if prompt_tokens > start:
                found = rates
        return found

    def cost(self, usage: Usage) -> float:
        r = self.rates(usage.prompt)
        # Cache reads and writes are billed as reported, even past an inconsistent prompt.
        uncached = max(0, usage.prompt - usage.cached - usage.cache_write)
        reasoning = min(usage.reasoning, usage.completion)
        cost = (
            uncached * r.input
            + usage.cached * r.cached_input
            + usage.cache_write * r.cache_write
            + (usage.completion - reasoning) * r.output
            + reasoning * r.reasoning
        ) / 1_000_000
        if (
            usage.audio_input
            or usage.audio_output
            or usage.image_output
            or usage.cache_write_1h
            or usage.cached_audio
        ):
            cost += _media(r, usage, uncached, usage.completion - reasoning)
        return cost


def _media(r: Rates, usage: Usage, uncached: int, output: int) -> float:
    """What audio and image tokens and an hour's cache writes cost beyond the rates
    `Price.cost` charged them at (each within the part of the count it belongs to). Web
    searches are priced apart (`PriceBook.search_price`)."""
    # The prompt's audio counts its cached part; less audio than cached audio can only be
    # the uncached part alone (what an older gateway in front reports).
    audio, cached_audio = usage.audio_input, usage.cached_audio
    audio_in = min(audio - cached_audio if audio >= cached_audio else audio, uncached)
    audio_out = min(usage.audio_output, output)
    image_out = min(usage.image_output, output - audio_out)
    hour = min(usage.cache_write_1h, usage.cache_write)
    cached_audio = min(cached_audio, usage.cached)
    extra = (
        audio_in * (r.audio_input - r.input)
        + audio_out * (r.audio_output - r.output)
        + image_out * (r.image_output - r.output)
        + hour * (r.cache_write_1h - r.cache_write)
        + cached_audio * (r.cached_audio_input - r.cached_input)
    ) / 1_000_000
    return extra


FREE = Price(Rates(0.0, 0.0, 0.0, 0.0, 0.0), source="free")


def _config_price(model: ModelConfig) -> Price | None:
    if model.input_price_per_mtok is None and model.output_price_per_mtok is None:
        return None
    return _price_of(
        model.input_price_per_mtok,
        model.output_price_per_mtok,
        model.cache_read_price_per_mtok,
        model.cache_write_price_per_mtok,
        model.reasoning_price_per_mtok,
        (
            model.audio_input_price_per_mtok,
            model.audio_output_price_per_mtok,
            model.image_output_price_per_mtok,
            model.web_search_price_per_call,
            model.cache_write_1h_price_per_mtok,
        ),
    )


# Made once per set of config prices rather than on every request (a frozen dataclass is
# built an attribute at a time, through object.__setattr__). Bounded: a reload may bring new
# prices, and the old sets are left to age out.
@functools.lru_cache(maxsize=1024)
def _price_of(
    inp: float | None,
    out: float | None,
    cache_read: float | None,
    cache_write: float | None,
    reasoning: float | None,
    media: tuple[float | None, ...] = (None,) * 5,
) -> Price:
    inp, out = inp or 0.0, out or 0.0
    audio_in, audio_out, image_out, web_search, hour = media
    write = _or(cache_write, inp)
    read = _or(cache_read, inp)
    return Price(
        Rates(
            input=inp,
            output=out,
            cached_input=read,
            cached_audio_input=read,
            cache_write=write,
            cache_write_1h=_or(hour, write),
            reasoning=_or(reasoning, out),
            audio_input=_or(audio_in, inp),
            audio_output=_or(audio_out, out),
            image_output=_or(image_out, out),
            web_search=_or(web_search, UNKNOWN_SEARCH_PRICE),
        )
    )


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


# Looks up (database provider id, upstream model) -> Price, or None when it has no price.
Lookup = Callable[[str, str], Price | None]


def _component(price: Any, prompt: int) -> float | None:
    """One price of the database (a Decimal, or tiers by prompt size) at a prompt size."""
    if price is None:
        return None
    if isinstance(price, Decimal):
        return float(price)
    applicable = price.base
    for tier in price.tiers:
        if prompt > tier.start:
            applicable = tier.price
    return float(applicable)


def _rates(prices: Any, prompt: int) -> Rates | None:
    inp = _component(prices.input_mtok or prices.input_text_mtok, prompt)
    out = _component(prices.output_mtok or prices.output_text_mtok, prompt)
    if inp is None or out is None:
        return None
    write = _or(_component(prices.cache_write_mtok, prompt), inp)
    read = _or(_component(prices.cache_read_mtok, prompt), inp)
    return Rates(
        input=inp,
        output=out,
        cached_input=read,
        cached_audio_input=_or(_component(prices.cache_audio_read_mtok, prompt), read),
        cache_write=write,
        cache_write_1h=_or(_component(prices.cache_write_1h_mtok, prompt), write),
        reasoning=_or(_component(prices.output_reasoning_mtok, prompt), out),
        audio_input=_or(_component(prices.input_audio_mtok, prompt), inp),
        audio_output=_or(_component(prices.output_audio_mtok, prompt), out),
        image_output=_or(_component(prices.output_image_mtok, prompt), out),
        # (USD per thousand calls in the price list)
        web_search=_or(
            _thousandth(_component(prices.web_searches_kcount, prompt)), UNKNOWN_SEARCH_PRICE
        ),
    )


def _thousandth(value: float | None) -> float | None:
    return None if value is None else value / 1000


def _from_database(prices: Any) -> Price | None:
    """A `genai_prices` ModelPrice as a `Price` (its tiers flattened: one set of rates for
    each prompt size at which any of its prices changes)."""
    starts = sorted(
        {tier.start for value in vars(prices).values() for tier in getattr(value, "tiers", ())}
    )
    base = _rates(prices, 0)
    if base is None:
        return None
    tiers = tuple((start, rates) for start in starts if (rates := _rates(prices, start + 1)))
    return Price(base, tiers, source="genai-prices")


def _sane(price: Price) -> bool:
    """Whether every rate is a number from zero to `MAX_PRICE_PER_MTOK`. The price data may
    come from the network (`[prices] update`): a negative rate would give keys' budgets back
    with every request, and NaN or a cost past a float (infinite) would break them (config
    prices are bounded the same way as loaded)."""
    return all(
        0 <= value <= MAX_PRICE_PER_MTOK  # (NaN compares false, infinity is above)
        for rates in (price.base, *(r for _, r in price.tiers))
        for value in astuple(rates)
    )


def load_database() -> tuple[Lookup, Callable[[], object], frozenset[str]]:
    """The bundled (or last fetched) `genai-prices` database: a lookup, a function whose
    result changes whenever the database is replaced by an update, and its provider ids.
    Imports take ~0.4 s, so call this off the event loop, once."""
    from genai_prices import data_snapshot  # heavy: imported only when serving

    def lookup(provider_id: str, model: str) -> Price | None:
        snapshot = data_snapshot.get_snapshot()
        provider = data_snapshot.find_provider_by_id(snapshot.providers, provider_id)
        if provider is None:
            return None
        # Provider.find_model, not the snapshot's lookups: those cache every model name they
        # are asked about, without a bound.
        found = provider.find_model(model, all_providers=snapshot.providers)
        if found is None:
            return None
        now = datetime.now(tz=UTC)
        price = _from_database(found.get_prices(now))
        if price is not None and not _sane(price):
            # (once a model a day at most: the answer is cached by `PriceBook`)
            log.warning("price_refused", provider=provider_id, model=model[:200])
            return None
        if price is not None and found.price_variants and any(found is m for m in provider.models):
            # (A model of another provider the list falls back to keeps its standard prices:
            # its tiers are that provider's, as `genai_prices`' own pricing has it.)
            tiers = []
            for tier, context in _tiers_in_force(found.price_variants, now):
                priced = _from_database(found.get_prices(now, context))
                if priced is not None and _sane(priced):
                    tiers.append((tier, priced))
            if tiers:
                price = replace(price, service_tiers=tuple(tiers))
        return price

    ids = frozenset(p.id for p in data_snapshot.get_snapshot().providers)
    return lookup, data_snapshot.get_snapshot, ids


def _tiers_in_force(variants: Any, now: datetime) -> list[tuple[str, dict[str, str]]]:
    """The processing tiers a model's price variants price now, in order: each as its name
    (a `service_tier`, or `speed=<value>`) and the request context that selects it."""
    tiers: list[tuple[str, dict[str, str]]] = []
    for variant in variants:
        when = variant.when
        active = variant.constraint is None or variant.constraint.active(now)
        if not active or len(when) != 1:
            continue
        ((key, value),) = when.items()
        prefix = _VARIANT_KEYS.get(key)
        if prefix is not None and isinstance(value, str):
            tier = prefix + value
            if all(tier != name for name, _ in tiers):
                tiers.append((tier, {key: value}))
    return tiers


def open_book(settings: Settings) -> PriceBook:
    """The price book `settings` ask for: the price database's, with every provider's
    `pricing` checked against it, or config prices only. Blocking (the database's imports
    take ~0.4 s): off the event loop.

    Raises:
        ConfigError: a provider's `pricing` the database does not have (`PriceBook.check`).
    """
    if not settings.prices.database:
        return PriceBook()
    lookup, version, provider_ids = load_database()
    book = PriceBook(lookup, version, provider_ids=provider_ids)
    book.check(settings)
    return book


def start_price_updates(settings: PriceSettings) -> Any:
    """Start genai-prices' own background updater (a thread that fetches the price data
    every `update_interval` seconds; a failed fetch keeps the prices it had). Returns it, for
    `stop()`. Blocks while the first fetch starts, so call it off the event loop."""
    from genai_prices import UpdatePrices  # heavy: imported only when serving

    options: dict[str, Any] = {"update_interval": settings.update_interval}
    if settings.update_url is not None:
        options["url"] = settings.update_url
    updater = UpdatePrices(**options)
    updater.start()
    return updater


class PriceBook:
    """Every model's price, from its config or the database, looked up once per model.

    Config prices come with the model config a request resolved to (so a reloaded config's
    prices apply at once); the database's are cached here.
    """

    def __init__(
        self,
        lookup: Lookup | None = None,
        version: Callable[[], object] = lambda: None,
        *,
        provider_ids: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lookup = lookup
        self._provider_ids = provider_ids
        self._version = version
        self._clock = clock
        self._found: dict[tuple[str, str], Price | None] = {}
        self._seen_version: object = version()
        self._expires = clock() + _DAY

    def check(self, settings: Settings) -> None:
        """Refuse a config whose providers name a price list the database does not have.

        Raises:
            ConfigError: naming the first such provider.
        """
        if self._lookup is None:
            return
        for p in settings.providers:
            if p.pricing not in (None, "free", "none", *self._provider_ids):
                raise ConfigError(
                    f"providers.{p.name}.pricing: {p.pricing!r} is not a provider of the price"
                    " database (use one of its ids, 'free' or 'none')"
                )

    def pricing_id(self, provider: ProviderConfig) -> str | None:
        """The database provider id for `provider` ('free' and 'none' are not ids)."""
        if provider.pricing is not None:
            return provider.pricing
        return "free" if provider.type == "demo" else DEFAULT_PRICING.get(provider.type)

    def price(self, model: ModelConfig, provider: ProviderConfig, upstream: str) -> Price | None:
        """The price of `model` served by `provider` as `upstream`, or None if unknown."""
        configured = _config_price(model)
        if configured is not None:
            return configured
        return self._listed(provider, upstream)

    def searches_cost(
        self,
        searches: int,
        model: ModelConfig,
        provider: ProviderConfig,
        upstream: str,
        price: Price,
    ) -> float:
        """What `searches` web searches cost on `price` (the model's), a call each: the config's
        search price, else the price list's for the upstream model (a model priced in its
        config keeps the list's search price), else `UNKNOWN_SEARCH_PRICE`."""
        return searches * self._search_price(model, provider, upstream, price) if searches else 0.0

    def _search_price(
        self, model: ModelConfig, provider: ProviderConfig, upstream: str, price: Price
    ) -> float:
        if price.source != "config" or model.web_search_price_per_call is not None:
            return price.base.web_search
        listed = self._listed(provider, upstream)
        if listed is None or listed.source != "genai-prices":  # (none, or a free provider's)
            return UNKNOWN_SEARCH_PRICE
        return listed.base.web_search

    def image_rate(self, image_model: str, provider: ProviderConfig) -> float:
        """USD a million image output tokens of `image_model` (a Responses image tool's) on
        `provider`: the price list's, else `tool_fees.UNKNOWN_IMAGE_RATE` (the most it asks;
        a free provider's images too, as its searches; "" is a name not looked up)."""
        listed = self._listed(provider, image_model) if image_model else None
        if listed is None and image_model and base_model(image_model) != image_model:
            listed = self._listed(provider, base_model(image_model))  # (a dated snapshot)
        if listed is None or listed.source != "genai-prices":
            return UNKNOWN_IMAGE_RATE
        return listed.base.image_output

    def _listed(self, provider: ProviderConfig, upstream: str) -> Price | None:
        """The price list's price of `upstream` on `provider` (its `pricing`)."""
        source = self.pricing_id(provider)
        if source == "free":
            return FREE
        if source in (None, "none") or self._lookup is None:
            return None
        self._expire()
        key = (source, upstream)
        if key in self._found:
            return self._found[key]
        if len(self._found) >= _CACHE_LIMIT:
            del self._found[next(iter(self._found))]  # the oldest lookup goes first
        found = self._found[key] = self._lookup(source, upstream)
        return found

    def _expire(self) -> None:
        now = self._clock()
        version = self._version()
        if now >= self._expires or version is not self._seen_version:
            self._found.clear()
            self._expires, self._seen_version = now + _DAY, version
