"""Counters and histograms kept as plain numbers on the event loop, turned into Prometheus
families only when scraped (`gateway.metrics`).

prometheus-client's `Counter.inc()` and `Histogram.observe()` check their argument and take a
`threading.Lock` on every call, so that any thread may update them. Every update of ours runs on
the event loop's thread, one at a time: a float in a `__slots__` object is enough, and a
request's ten updates cost ten additions. The price is paid at scrape time instead: `read()`
copies the numbers on the loop (the worker thread that makes the text must never read what the
loop is changing), and `metric()` builds prometheus-client's own `CounterMetricFamily` /
`HistogramMetricFamily` from that copy, so the text is written by the library as before.

What prometheus-client does, these do alike: a counter is a float from 0.0; a histogram counts a
value in the first bucket whose upper bound is >= it (`le` is inclusive; `+Inf` is always the
last bound) and adds it to the sum, and a NaN goes in no bucket but into the sum; the text shows
buckets cumulative, and the count is the `+Inf` bucket. A family's series come out in the order
they were first used, as the library's labelled children do.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from itertools import accumulate
from typing import TypeAlias

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = [
    "Copy",
    "Count",
    "CounterFamily",
    "Families",
    "Family",
    "HistogramFamily",
    "Observed",
    "text",
]

Labels: TypeAlias = tuple[str, ...]


class Count:
    """One counter series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class Observed:
    """One histogram series: how many values fell in each bucket (not cumulative), and their
    sum. The list has one slot more than there are bounds, for NaN (never shown)."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        # bisect_left: the first bound >= value. A NaN compares false with every bound (its
        # bisect would say the first): prometheus-client counts it in no bucket.
        self.counts[bisect_left(self._bounds, value) if value == value else -1] += 1


class CounterFamily:
    """A counter's labelled series, each made on first use (`family(*values)`)."""

    __slots__ = ("_doc", "_labels", "_name", "series")

    def __init__(self, name: str, doc: str, labels: Labels) -> None:
        self._name, self._doc, self._labels = name, doc, labels
        self.series: dict[Labels, Count] = {}

    def __call__(self, *values: str) -> Count:
        found = self.series.get(values)
        if found is None:
            found = self.series[values] = Count()
        return found

    def read(self) -> Callable[[], Metric]:
        """The series' values now; called, what makes their family from those."""
        return partial(
            self._metric, [(labels, count.value) for labels, count in self.series.items()]
        )

    def _metric(self, read: list[tuple[Labels, float]]) -> Metric:
        metric = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for labels, value in read:
            metric.add_metric(labels, value)
        return metric


class HistogramFamily:
    """A histogram's labelled series, each made on first use (`family(*values)`)."""

    __slots__ = ("_bounds", "_doc", "_labels", "_les", "_name", "series")

    def __init__(self, name: str, doc: str, labels: Labels, buckets: Sequence[float]) -> None:
        self._name, self._doc, self._labels = name, doc, labels
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets not in increasing order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        # `le` as prometheus-client writes it (untyped in the library).
        self._les = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        self.series: dict[Labels, Observed] = {}

    def __call__(self, *values: str) -> Observed:
        found = self.series.get(values)
        if found is None:
            found = self.series[values] = Observed(self._bounds)
        return found

    def read(self) -> Callable[[], Metric]:
        """The series' values now; called, what makes their family from those."""
        return partial(
            self._metric, [(labels, list(s.counts), s.sum) for labels, s in self.series.items()]
        )

    def _metric(self, read: list[tuple[Labels, list[int], float]]) -> Metric:
        metric = HistogramMetricFamily(self._name, self._doc, labels=self._labels)
        for labels, counts, total in read:
            cumulative = accumulate(counts[:-1])  # the last slot is NaN's
            buckets = [(le, float(n)) for le, n in zip(self._les, cumulative, strict=True)]
            metric.add_metric(labels, buckets, total)
        return metric


Family: TypeAlias = CounterFamily | HistogramFamily


class Copy(Collector):
    """The families as `read()` found them: what the worker thread makes the text from."""

    def __init__(self, read: list[Callable[[], Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        return (metric() for metric in self._read)


class Families(Collector):
    """Families registered as one collector (in a registry, in this order). `read()` copies
    them (on the event loop); `collect()` reads them where it is called, for a caller on the
    loop."""

    def __init__(self, families: Iterable[Family]) -> None:
        self._families = tuple(families)

    def read(self) -> Copy:
        return Copy([family.read() for family in self._families])

    def collect(self) -> Iterator[Metric]:
        return self.read().collect()


def text(*collectors: Collector) -> bytes:
    """The text format of these collectors' families, in this order: what `generate_latest`
    makes of a registry that holds them."""
    return b"".join(generate_latest(collector) for collector in collectors)
