"""The text of `/metrics` is what prometheus-client's own `Counter` and `Histogram` would
write for the same requests, to the byte.

`Metrics` keeps its per-request series as plain numbers (`gateway.series`) and builds the
families only when scraped. `Reference` below counts the same finished requests the way the
gateway did before that, with prometheus-client's labelled metrics; random sequences of
requests (caps, per-key series on and off, refusals, retries, failovers, values on bucket
bounds, negative, infinite and NaN figures) must give the same text after every step, through
the app's registry and through `render()`.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from gateway.metrics import PREFIX, Metrics, outcome, render
from gateway.series import HistogramFamily
from gateway.settings import MetricsSettings
from gateway.trace import RequestTrace

DURATION = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class Reference:
    """The request counting of `gateway.metrics` as it was made with prometheus-client's
    metrics (its `labels()`, `inc()` and `observe()`)."""

    def __init__(self, settings: MetricsSettings, models: tuple[str, ...] = ()) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.settings = settings
        self.models, self.model_limit = set(models), settings.max_models + len(set(models))
        self.keys: set[str] = set()
        route = ("endpoint", "model", "provider")
        self.requests = Counter(f"{PREFIX}_requests", "Requests answered, by final status.",
                                (*route, "status"), registry=r)  # fmt: skip
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from a request's arrival to its end (a stream's last byte).",
            route, registry=r, buckets=DURATION,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Streams: time from the call upstream to its first event (a usage row's ttft_ms).",
            ("model", "provider"), registry=r, buckets=TTFT,
        )  # fmt: skip
        tokens = "Tokens used, input or output."
        cost = "Cost in US dollars at the configured prices."
        self.tokens = Counter(f"{PREFIX}_tokens", tokens, ("model", "type"), registry=r)
        self.cost = Counter(f"{PREFIX}_cost_usd", cost, ("model",), registry=r)
        self.key_tokens = Counter(f"{PREFIX}_key_tokens", tokens, ("key", "type"), registry=r)
        self.key_cost = Counter(f"{PREFIX}_key_cost_usd", cost, ("key",), registry=r)
        self.refusals = Counter(
            f"{PREFIX}_refusals", "Requests the gateway refused for a key's rate limits or budget.",
            ("key", "reason"), registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            f"{PREFIX}_upstream_attempts",
            "Upstream attempts, by provider, account (its API key's index) and outcome.",
            ("provider", "account", "outcome"), registry=r,
        )  # fmt: skip
        self.retries = Counter(f"{PREFIX}_retries", "Upstream attempts after a request's first.",
                               ("model",), registry=r)  # fmt: skip
        self.failovers = Counter(f"{PREFIX}_failovers",
                                 "Retries that went to another account or provider.",
                                 ("model",), registry=r)  # fmt: skip

    def _model(self, value: str) -> str:
        if value in self.models or len(self.models) < self.model_limit:
            self.models.add(value)
            return value
        return "other"

    def _key(self, value: str) -> str:
        if value in self.keys or len(self.keys) < self.settings.max_keys:
            self.keys.add(value)
            return value
        return "other"

    def _spend(
        self, tokens: Counter, cost: Counter, label: str, used: tuple[int, int, float]
    ) -> None:
        tokens.labels(label, "input").inc(used[0])
        tokens.labels(label, "output").inc(used[1])
        cost_of = cost.labels(label)
        if used[2]:
            cost_of.inc(used[2])

    def observe(self, trace: RequestTrace, endpoint: str, status: int, seconds: float) -> None:
        model = self._model(trace.model_id) if trace.model_id else ""
        provider = trace.provider or ""
        self.requests.labels(endpoint, model, provider, str(status)).inc()
        self.duration.labels(endpoint, model, provider).observe(seconds)
        if trace.stream and trace.ttft_ms is not None:
            self.ttft.labels(model, provider).observe(trace.ttft_ms / 1000)
        used = (max(0, trace.prompt_tokens), max(0, trace.completion_tokens),
                trace.cost_usd if trace.cost_usd > 0 else 0.0)  # fmt: skip
        if any(used):
            self._spend(self.tokens, self.cost, model, used)
        previous = None
        for attempt in trace.attempts:
            account = (str(attempt["provider"]), str(attempt["account"]))
            status_of = attempt["status"]
            label = outcome(status_of if isinstance(status_of, int) else 500)
            self.attempts.labels(*account, label).inc()
            if previous is not None:
                self.retries.labels(model).inc()
                if account != previous:
                    self.failovers.labels(model).inc()
            previous = account
        if trace.key_id is None:
            return
        if not self.settings.per_key:
            if trace.refused is not None:
                self.refusals.labels("", trace.refused).inc()
            return
        key = self._key(trace.key_id)
        if any(used):
            self._spend(self.key_tokens, self.key_cost, key, used)
        if trace.refused is not None:
            self.refusals.labels(key, trace.refused).inc()


ON_BOUNDS = [*DURATION, *(b * 1000 for b in TTFT)]
FIGURES = [0.0, -0.5, 1e-9, 0.0049999, 0.0050001, 299.9, 301.0, 1e9, math.inf, math.nan]
MODELS = [None, "", "m", "demo/a", "demo/b", "demo/c", "demo/d", "other", 'x/"q"\\{}\n']


def random_trace(rng: random.Random) -> tuple[RequestTrace, str, int, float]:
    def figure() -> float:
        return rng.choice(ON_BOUNDS + FIGURES) if rng.random() < 0.5 else rng.uniform(0, 400)

    attempts = [
        {
            "provider": rng.choice(["up", "b"]),
            "account": rng.choice([0, 1]),
            "model": "x",
            "status": rng.choice([200, 200, 400, 429, 499, 500, 502, 504]),
            "ms": 1.0,
        }
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3]))
    ]
    trace = RequestTrace(
        request_id="r",
        started=0.0,
        ts=0.0,
        key_id=rng.choice([None, *(f"key_{i}" for i in range(5))]),
        model_id=rng.choice(MODELS),
        provider=rng.choice([None, "up", "b"]),
        stream=rng.random() < 0.5,
        ttft_ms=rng.choice([None, figure(), figure() * 1000]),
        prompt_tokens=rng.choice([-5, 0, 0, 7, 1234, 2**40]),
        completion_tokens=rng.choice([-1, 0, 0, 3, 999]),
        cost_usd=rng.choice([-1.0, 0.0, 0.0, 1e-7, 0.25, math.nan, math.inf]),
        refused=rng.choice([None, None, None, "budget", "requests_per_minute"]),
        attempts=attempts,
    )
    endpoint = rng.choice(["/v1/chat/completions", "/v1/embeddings", "other"])
    status = rng.choice([200, 200, 400, 401, 429, 499, 502])
    return trace, endpoint, status, figure()


SETTINGS = [
    MetricsSettings(),
    MetricsSettings(max_models=2, max_keys=2),
    MetricsSettings(max_models=1, max_keys=1, per_key=False),
]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("seed", range(2))
async def test_the_text_is_prometheus_clients_own(settings: MetricsSettings, seed: int) -> None:
    rng = random.Random(seed)
    configured = ("m",)
    ours, theirs = Metrics(settings, configured), Reference(settings, configured)
    assert generate_latest(ours.registry) == generate_latest(theirs.registry)  # nothing yet
    for step in range(300):
        request = random_trace(rng)
        ours.observe(*request)
        theirs.observe(*request)
        if step % 59 == 0:
            assert generate_latest(ours.registry) == generate_latest(theirs.registry)
    expected = generate_latest(theirs.registry)
    assert generate_latest(ours.registry) == expected
    assert await render(ours) == expected
    assert b"_created" not in expected


async def test_render_shows_the_counts_of_when_it_was_asked() -> None:
    """The text is made in a worker thread from a copy taken on the event loop: requests
    counted while it is being made are not in it, and each histogram's count is its +Inf
    bucket."""
    metrics = Metrics(MetricsSettings())
    trace = RequestTrace(request_id="r", started=0.0, ts=0.0, model_id="m", provider="up")
    chat = "/v1/chat/completions"
    metrics.observe(trace, chat, 200, 0.2)
    first = asyncio.ensure_future(render(metrics))
    await asyncio.sleep(0)  # one turn of the loop: it takes its copy and starts the thread
    assert metrics.rendering is not None
    for _ in range(5):
        metrics.observe(trace, chat, 200, 0.2)
    route = f'endpoint="{chat}",model="m",provider="up"'.encode()
    text = await first
    assert b"tokenkiosk_requests_total{" + route + b',status="200"} 1.0\n' in text
    assert b'tokenkiosk_request_duration_seconds_bucket{endpoint="' in text
    assert b'le="+Inf",model="m",provider="up"} 1.0\n' in text
    assert b"tokenkiosk_request_duration_seconds_count{" + route + b"} 1.0\n" in text
    assert b"tokenkiosk_requests_total{" + route + b',status="200"} 6.0\n' in await render(metrics)


def test_histogram_buckets_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        HistogramFamily("h", "doc", (), (1, 0.5))
