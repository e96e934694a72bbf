"""Prometheus metrics: what requests did, counted once per request as it ends, and what the
gateway holds now (breakers, open streams, rows waiting), read only when scraped.

`middleware.gateway` hands every finished request's trace to `Metrics.observe()`: the one place
where a request's outcome becomes metrics, so the request path pays a few dictionary lookups
and additions to plain numbers (`gateway.series`: no lock, no label parse, no call into
prometheus-client); a scrape copies them on the loop and prometheus-client writes the text
from the copy. Gauges of state that already exists elsewhere are not kept in step on the hot
path; `gateway.gauges` reads that state at scrape time. Each app has its own
`CollectorRegistry` (never the process-wide default), so tests and several apps in one
process never share counters.

Labels stay bounded: no request ids; endpoints are route patterns; model ids (which clients
choose for `<provider>/<model>`) and keys are capped (`[metrics] max_models`, `max_keys`:
past the cap, new values count as `other`), and per-key series can be switched off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from gateway.series import Count, CounterFamily, Families, HistogramFamily, Observed, text
from gateway.settings import MetricsSettings

__all__ = ["CONTENT_TYPE", "OTHER", "PREFIX", "Metrics", "outcome", "render"]

# `generate_latest` writes names with legacy characters only (ours have no others), which is
# the 0.0.4 text format every Prometheus version reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
OTHER = "other"  # the label value of everything past a cap
PREFIX = "tokenkiosk"

# LLM requests take from milliseconds (refusals, cached answers) to minutes (long outputs).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


CLIENT_CLOSED = 499  # as `gateway.trace` records a request whose client hung up


class Finished(Protocol):
    """What `observe()` reads of a finished request: `gateway.trace.RequestTrace` (not
    imported: the trace depends on the app state, which holds these metrics)."""

    @property
    def key_id(self) -> str | None: ...
    @property
    def model_id(self) -> str | None: ...
    @property
    def provider(self) -> str | None: ...
    @property
    def stream(self) -> bool: ...
    @property
    def ttft_ms(self) -> float | None: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def cost_usd(self) -> float: ...
    @property
    def refused(self) -> str | None: ...
    @property
    def attempts(self) -> list[dict[str, object]]: ...


class _Spend:
    """The tokens and cost counters of one model or key, found with one lookup."""

    __slots__ = ("cost", "input", "output")

    def __init__(self, tokens: CounterFamily, cost: CounterFamily, label: str) -> None:
        self.input = tokens(label, "input")
        self.output = tokens(label, "output")
        self.cost = cost(label)


class _Spending:
    """The tokens and cost counters by model or by key: a `_Spend` per label, made when first
    used (`found` holds those made, for the request path to look up without a call)."""

    __slots__ = ("_cost", "_tokens", "found")

    def __init__(self, tokens: CounterFamily, cost: CounterFamily) -> None:
        self._tokens, self._cost = tokens, cost
        self.found: dict[str, _Spend] = {}

    def __call__(self, label: str) -> _Spend:
        spend = self.found.get(label)
        if spend is None:
            spend = self.found[label] = _Spend(self._tokens, self._cost, label)
        return spend


class _Route:
    """The series one (endpoint, model, provider, status) updates, found with one lookup; those
    of its model are looked up on first use (a series appears when first counted)."""

    __slots__ = ("duration", "model", "provider", "requests", "spend", "ttft")

    def __init__(self, requests: Count, duration: Observed, model: str, provider: str) -> None:
        self.requests, self.duration = requests, duration
        self.model, self.provider = model, provider
        self.ttft: Observed | None = None
        self.spend: _Spend | None = None


class _Cap(set[str]):
    """The first `limit` distinct values keep their name; later ones become `other`. Values
    in `keep` always keep theirs (and do not count). A set of the values that keep their name,
    so the request path asks `value in cap` before calling it."""

    __slots__ = ("_limit",)

    def __init__(self, limit: int, keep: Iterable[str] = ()) -> None:
        super().__init__(keep)
        self._limit = limit + len(self)

    def __call__(self, value: str) -> str:
        if value in self:
            return value
        if len(self) >= self._limit:
            return OTHER
        self.add(value)
        return value


def outcome(status: int) -> str:
    """An upstream attempt's outcome label, from the status `failover` recorded for it."""
    if status < 400:
        return "success"
    if status == 429:
        return "rate_limited"
    if status == 504:
        return "timeout"
    if status == CLIENT_CLOSED:
        return "cancelled"
    return "client_error" if status < 500 else "error"


class Metrics:
    """Every metric of one app, and how a finished request updates them."""

    def __init__(
        self,
        settings: MetricsSettings,
        models: Iterable[str] = (),
        gauges: Callable[[], Iterable[Metric]] = tuple,
    ) -> None:
        """Args:
        models: the configured model ids, named whatever ids clients send first.
        gauges: the gauges of the app's state, read at each scrape (`gateway.gauges`).
        """
        self.per_key = settings.per_key
        self.models = _Cap(settings.max_models, models)
        self.keys = _Cap(settings.max_keys)
        route = ("endpoint", "model", "provider")
        self.requests = CounterFamily(
            f"{PREFIX}_requests", "Requests answered, by final status.", (*route, "status")
        )
        self.duration = HistogramFamily(
            f"{PREFIX}_request_duration_seconds",
            "Time from a request's arrival to its end (a stream's last byte).",
            route,
            _DURATION_BUCKETS,
        )
        # (endpoint, model, provider, status) -> the series a request of that route updates.
        self._routes: dict[tuple[str, str, str, int], _Route] = {}
        self.ttft = HistogramFamily(
            f"{PREFIX}_time_to_first_token_seconds",
            "Streams: time from the call upstream to its first event (a usage row's ttft_ms).",
            ("model", "provider"),
            _TTFT_BUCKETS,
        )
        tokens = "Tokens used, input or output."
        cost = "Cost in US dollars at the configured prices."
        spent = [
            CounterFamily(f"{PREFIX}_tokens", tokens, ("model", "type")),
            CounterFamily(f"{PREFIX}_cost_usd", cost, ("model",)),
            CounterFamily(f"{PREFIX}_key_tokens", tokens, ("key", "type")),
            CounterFamily(f"{PREFIX}_key_cost_usd", cost, ("key",)),
        ]
        self.by_model, self.by_key = _Spending(*spent[:2]), _Spending(*spent[2:])
        self.refusals = CounterFamily(
            f"{PREFIX}_refusals",
            "Requests the gateway refused for a key's rate limits or budget.",
            ("key", "reason"),
        )
        self.attempts = CounterFamily(
            f"{PREFIX}_upstream_attempts",
            "Upstream attempts, by provider, account (its API key's index) and outcome.",
            ("provider", "account", "outcome"),
        )
        # (provider, account, status) as `failover` records them -> their series.
        self._attempts: dict[tuple[object, object, object], Count] = {}
        self.retries = CounterFamily(
            f"{PREFIX}_retries", "Upstream attempts after a request's first.", ("model",)
        )
        self.failovers = CounterFamily(
            f"{PREFIX}_failovers", "Retries that went to another account or provider.", ("model",)
        )
        # Each app has its own registry (never the process-wide default): tests and several
        # apps in one process never share series. Nothing here has a `_created` series.
        self.registry = CollectorRegistry(auto_describe=False)
        self.counted = Families(
            (
                self.requests, self.duration, self.ttft, *spent, self.refusals, self.attempts,
                self.retries, self.failovers,
            )
        )  # fmt: skip
        self.state = _StateCollector(gauges)
        self.rendering: asyncio.Future[bytes] | None = None  # the scrape being made
        self.registry.register(self.counted)
        self.registry.register(self.state)

    def observe(self, trace: Finished, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished request. Called once per request, by `middleware.gateway`, on the
        event loop (as every update of these series is: they take no lock)."""
        model = trace.model_id or ""
        if model and model not in self.models:
            model = self.models(model)
        provider = trace.provider or ""
        route = self._routes.get((endpoint, model, provider, status))
        if route is None:
            route = self._route(endpoint, model, provider, status)
        route.requests.value += 1
        route.duration.observe(seconds)
        if trace.stream and trace.ttft_ms is not None:
            ttft = route.ttft
            if ttft is None:
                ttft = route.ttft = self.ttft(model, provider)
            ttft.observe(trace.ttft_ms / 1000)
        # Counters never go down: whatever an upstream reported, never a negative step.
        tokens_in, tokens_out = trace.prompt_tokens, trace.completion_tokens
        if tokens_in < 0:
            tokens_in = 0
        if tokens_out < 0:
            tokens_out = 0
        cost = trace.cost_usd if trace.cost_usd > 0 else 0.0
        spent = tokens_in or tokens_out or cost
        if spent:
            spend = route.spend
            if spend is None:
                spend = route.spend = self.by_model(model)
            spend.input.value += tokens_in
            spend.output.value += tokens_out
            spend.cost.value += cost
        attempts = trace.attempts
        if attempts:
            for attempt in attempts:
                tried = (attempt["provider"], attempt["account"], attempt["status"])
                count = self._attempts.get(tried)
                (count if count is not None else self._attempt(tried)).value += 1
            if len(attempts) > 1:
                self._retried(attempts, model)
        key = trace.key_id
        if key is None:
            return
        if not self.per_key:  # refusals still count by reason, with an empty key
            if trace.refused is not None:
                self.refusals("", trace.refused).value += 1
            return
        if key not in self.keys:
            key = self.keys(key)
        if spent:
            spend = self.by_key.found.get(key) or self.by_key(key)
            spend.input.value += tokens_in
            spend.output.value += tokens_out
            spend.cost.value += cost
        if trace.refused is not None:
            self.refusals(key, trace.refused).value += 1

    def _route(self, endpoint: str, model: str, provider: str, status: int) -> _Route:
        route = self._routes[(endpoint, model, provider, status)] = _Route(
            self.requests(endpoint, model, provider, str(status)),
            self.duration(endpoint, model, provider),
            model,
            provider,
        )
        return route

    def _attempt(self, tried: tuple[object, object, object]) -> Count:
        provider, account, status = tried
        label = outcome(status if isinstance(status, int) else 500)
        count = self._attempts[tried] = self.attempts(str(provider), str(account), label)
        return count

    def _retried(self, attempts: list[dict[str, object]], model: str) -> None:
        """Every attempt after the first is a retry; one to another account, a failover."""
        self.retries(model).value += len(attempts) - 1
        moved, previous = 0, None
        for attempt in attempts:
            account = (str(attempt["provider"]), str(attempt["account"]))
            if previous is not None and account != previous:
                moved += 1
            previous = account
        if moved:
            self.failovers(model).value += moved


class _StateCollector(Collector):
    """Gauges read from state kept elsewhere, when scraped: nothing to keep in step per request.

    That state belongs to the event loop, so `read()` takes it there; the text is then made in
    a worker thread (`render`) from what was read."""

    def __init__(self, gauges: Callable[[], Iterable[Metric]]) -> None:
        self._gauges = gauges
        self._read: list[Metric] = []

    def read(self) -> None:
        self._read = list(self._gauges())

    def collect(self) -> Iterator[Metric]:
        return iter(self._read)


async def render(metrics: Metrics) -> bytes:
    """The text exposition of every metric. The state gauges are read on the event loop; the
    text is made in a thread: with a thousand keys it takes tens of milliseconds, which the
    loop would otherwise stop for (prometheus-client's metrics take their own locks). Scrapes
    that arrive while one is being made share it, so a flood of them costs one at a time."""
    pending = metrics.rendering
    if pending is None or pending.done():
        metrics.state.read()
        copy = metrics.counted.read()  # the loop goes on counting while the text is made
        pending = asyncio.ensure_future(asyncio.to_thread(text, copy, metrics.state))
        metrics.rendering = pending
    return await asyncio.shield(pending)  # a scrape that hangs up leaves it to the others
