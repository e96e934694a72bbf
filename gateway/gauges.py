"""The gauges of `/metrics` that are read from the app's state when scraped (open streams,
requests in flight, rows waiting to be written, breakers, key names) rather than kept up to
date on the request path (`gateway.metrics`)."""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.metrics import PREFIX
from gateway.state import (
    INFLIGHT_KEY,
    KEYS_KEY,
    LIVE_KEY,
    METRICS_KEY,
    REFUSALS_KEY,
    STREAMS_KEY,
    USAGE_KEY,
)

__all__ = ["app_gauges"]


def app_gauges(app: web.Application) -> Iterator[Metric]:
    """Every gauge of `app`'s state now (a resource not started yet is left out)."""
    streams = GaugeMetricFamily(f"{PREFIX}_open_streams", "Event streams open to clients.")
    streams.add_metric([], sum(1 for task in app.get(STREAMS_KEY, ()) if not task.done()))
    yield streams
    inflight = GaugeMetricFamily(f"{PREFIX}_requests_in_flight", "Requests being served.")
    inflight.add_metric([], len(app.get(INFLIGHT_KEY, ())))
    yield inflight
    if USAGE_KEY in app:
        usage = app[USAGE_KEY]
        pending = GaugeMetricFamily(
            f"{PREFIX}_usage_rows_pending", "Usage rows waiting to be written."
        )
        pending.add_metric([], usage.pending)
        yield pending
        dropped = CounterMetricFamily(
            f"{PREFIX}_usage_rows_dropped",
            "Usage rows given up on while the database failed, since the start.",
        )
        dropped.add_metric([], usage.dropped)
        yield dropped
    if REFUSALS_KEY in app:
        counts = GaugeMetricFamily(
            f"{PREFIX}_refusal_counts_pending",
            "Refused requests counted in memory, not yet written.",
        )
        counts.add_metric([], app[REFUSALS_KEY].pending)
        yield counts
    if LIVE_KEY in app:
        yield from _breakers(app)
    if KEYS_KEY in app and METRICS_KEY in app and app[METRICS_KEY].per_key:
        info = GaugeMetricFamily(
            f"{PREFIX}_key_info",
            "The name of each key that has per-key series.",
            labels=("key", "name"),
        )
        tracked = app[METRICS_KEY].keys
        for key in app[KEYS_KEY].records():
            if key.id in tracked:
                info.add_metric([key.id, key.name], 1)
        yield info


_STATES = ("closed", "half-open", "open", "disabled")


def _breakers(app: web.Application) -> Iterator[Metric]:
    breakers = app[LIVE_KEY].current.router.breakers
    state = GaugeMetricFamily(
        f"{PREFIX}_upstream_breaker_state",
        "1 for the current state of each upstream account's breaker "
        "(closed, half-open, open, disabled).",
        labels=("provider", "account", "state"),
    )
    wait = GaugeMetricFamily(
        f"{PREFIX}_upstream_breaker_retry_in_seconds",
        "Seconds until an account out of rotation is tried again (0: in rotation).",
        labels=("provider", "account"),
    )
    for provider, index in breakers.accounts():
        now = breakers.state((provider, index))
        for name in _STATES:
            state.add_metric([provider, str(index), name], 1 if name == now else 0)
        wait.add_metric([provider, str(index)], breakers.remaining((provider, index)))
    yield state
    yield wait
