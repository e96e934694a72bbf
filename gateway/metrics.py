"""Prometheus metrics: what requests did, counted once per request as it ends, and what the
gateway holds now (breakers, open streams, rows waiting), read only when scraped.

`request_context` hands every finished request's trace to `Metrics.observe()`: the one place
where a request's outcome becomes metrics, so the request path pays a few dictionary lookups
and counter increments, never a label parse or a lock of ours. Gauges of state that already
exists elsewhere are not kept in step on the hot path; `gateway.gauges` reads that state at
scrape time. Each app has its own `CollectorRegistry` (never the process-wide default), so
tests and several apps in one process never share counters.

Labels stay bounded: no request ids; endpoints are route patterns; model ids (which clients
choose for `<provider>/<model>`) and keys are capped (`[metrics] max_models`, `max_keys`:
past the cap, new values count as `other`), and per-key series can be switched off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

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


C = TypeVar("C")


class _Series(Generic[C]):
    """A metric's labelled children, cached: `Counter.labels()` checks and converts its
    arguments and takes a lock on every call; a dict lookup does not."""

    __slots__ = ("_children", "_labels")

    def __init__(self, labels: Callable[..., C]) -> None:
        self._labels = labels
        self._children: dict[tuple[str, ...], C] = {}

    def __call__(self, *values: str) -> C:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._labels(*values)
        return child


class _Spend:
    """The tokens and cost counters of one model or key, found with one lookup."""

    __slots__ = ("cost", "input", "output")

    def __init__(self, tokens: Counter, cost: Counter, label: str) -> None:
        self.input = tokens.labels(label, "input")
        self.output = tokens.labels(label, "output")
        self.cost = cost.labels(label)

    def add(self, tokens_in: int, tokens_out: int, cost: float) -> None:
        self.input.inc(tokens_in)
        self.output.inc(tokens_out)
        if cost:
            self.cost.inc(cost)


class _Cap:
    """The first `limit` distinct values keep their name; later ones become `other`. Values
    in `keep` always keep theirs (and do not count)."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int, keep: Iterable[str] = ()) -> None:
        self._seen: set[str] = set(keep)
        self._limit = limit + len(self._seen)

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value

    def __contains__(self, value: str) -> bool:
        return value in self._seen


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
        # Without `_created` series: in the text format each counter would get a second
        # family of creation times that no dashboard reads (the flag is process-wide).
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.per_key = settings.per_key
        self.models = _Cap(settings.max_models, models)
        self.keys = _Cap(settings.max_keys)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> _Series[Any]:
            return _Series(Counter(f"{PREFIX}_{name}", doc, labels, registry=registry).labels)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: Any) -> _Series[Any]:
            metric = Histogram(f"{PREFIX}_{name}", doc, labels, registry=registry, buckets=buckets)
            return _Series(metric.labels)

        route = ("endpoint", "model", "provider")
        self.requests = counter(
            "requests", "Requests answered, by final status.", (*route, "status")
        )
        self.duration = histogram(
            "request_duration_seconds",
            "Time from a request's arrival to its end (a stream's last byte).",
            route,
            _DURATION_BUCKETS,
        )
        # (endpoint, model, provider, status) -> its request counter and duration histogram.
        self._routes: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Streams: time from the call upstream to its first event (a usage row's ttft_ms).",
            ("model", "provider"),
            _TTFT_BUCKETS,
        )

        def spend(prefix: str, label: str) -> Callable[[str], _Spend]:
            tokens = Counter(
                f"{PREFIX}_{prefix}tokens", "Tokens used, input or output.", (label, "type"),
                registry=registry,
            )  # fmt: skip
            cost = Counter(
                f"{PREFIX}_{prefix}cost_usd", "Cost in US dollars at the configured prices.",
                (label,), registry=registry,
            )  # fmt: skip
            found: dict[str, _Spend] = {}

            def of(value: str) -> _Spend:
                spent = found.get(value)
                if spent is None:
                    spent = found[value] = _Spend(tokens, cost, value)
                return spent

            return of

        self.by_model = spend("", "model")
        self.by_key = spend("key_", "key")
        self.refusals = counter(
            "refusals",
            "Requests the gateway refused for a key's rate limits or budget.",
            ("key", "reason"),
        )
        self.attempts = counter(
            "upstream_attempts",
            "Upstream attempts, by provider, account (its API key's index) and outcome.",
            ("provider", "account", "outcome"),
        )
        self.retries = counter("retries", "Upstream attempts after a request's first.", ("model",))
        self.failovers = counter(
            "failovers", "Retries that went to another account or provider.", ("model",)
        )
        self.state = _StateCollector(gauges)
        self.rendering: asyncio.Future[bytes] | None = None  # the scrape being made
        registry.register(self.state)

    def observe(self, trace: Finished, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished request. Called once per request, by `request_context`."""
        model = self.models(trace.model_id) if trace.model_id else ""
        provider = trace.provider or ""
        route = self._routes.get((endpoint, model, provider, status))
        if route is None:
            route = self._routes[(endpoint, model, provider, status)] = (
                self.requests(endpoint, model, provider, str(status)),
                self.duration(endpoint, model, provider),
            )
        route[0].inc()
        route[1].observe(seconds)
        if trace.stream and trace.ttft_ms is not None:
            self.ttft(model, provider).observe(trace.ttft_ms / 1000)
        # A counter refuses a negative step: whatever an upstream reported, never one.
        tokens_in, tokens_out = max(0, trace.prompt_tokens), max(0, trace.completion_tokens)
        cost = trace.cost_usd if trace.cost_usd > 0 else 0.0
        spent = tokens_in or tokens_out or cost
        if spent:
            self.by_model(model).add(tokens_in, tokens_out, cost)
        if trace.attempts:
            self._attempts(trace.attempts, model)
        if trace.key_id is None:
            return
        if not self.per_key:  # refusals still count by reason, with an empty key
            if trace.refused is not None:
                self.refusals("", trace.refused).inc()
            return
        key = self.keys(trace.key_id)
        if spent:
            self.by_key(key).add(tokens_in, tokens_out, cost)
        if trace.refused is not None:
            self.refusals(key, trace.refused).inc()

    def _attempts(self, attempts: list[dict[str, object]], model: str) -> None:
        previous = None
        for attempt in attempts:
            account = (str(attempt["provider"]), str(attempt["account"]))
            status = attempt["status"]
            self.attempts(*account, outcome(status if isinstance(status, int) else 500)).inc()
            if previous is not None:
                self.retries(model).inc()
                if account != previous:
                    self.failovers(model).inc()
            previous = account


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
        pending = asyncio.ensure_future(asyncio.to_thread(generate_latest, metrics.registry))
        metrics.rendering = pending
    return await asyncio.shield(pending)  # a scrape that hangs up leaves it to the others
