"""Prometheus metrics (one registry per app, so tests can run several apps).

The per-job counters and histograms are plain Python numbers updated on the event
loop and turned into Prometheus families only when ``/metrics`` is scraped:
``prometheus_client``'s own ``Counter`` and ``Histogram`` take a lock per update
and per bucket, which costs more than the rest of a small job's bookkeeping.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]
C = TypeVar("C")


class _CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _GaugeValue(_CounterValue):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = value


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # Prometheus buckets are "<= bound"
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class _Family(Generic[C]):
    """A labelled metric: ``labels(*values)`` returns its child, created on first use."""

    def __init__(self, name: str, doc: str, labels: list[str]) -> None:
        self.name = name
        self.doc = doc
        self.label_names = labels
        self.children: dict[Labels, C] = {}

    def _new_child(self) -> C:
        raise NotImplementedError

    def family(self) -> Metric:
        raise NotImplementedError

    def labels(self, *values: str) -> C:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.label_names):
                raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
            child = self.children[values] = self._new_child()
        return child


def _value_family(metric: _Family[Any], kind: type[CounterMetricFamily] | type[GaugeMetricFamily]) -> Metric:
    out = kind(metric.name, metric.doc, labels=metric.label_names)
    for values, child in metric.children.items():
        out.add_metric(list(values), child.value)
    return out


class Counter(_Family[_CounterValue]):
    def _new_child(self) -> _CounterValue:
        return _CounterValue()

    def family(self) -> Metric:
        return _value_family(self, CounterMetricFamily)


class Gauge(_Family[_GaugeValue]):
    def _new_child(self) -> _GaugeValue:
        return _GaugeValue()

    def family(self) -> Metric:
        return _value_family(self, GaugeMetricFamily)


class Histogram(_Family[_HistogramValue]):
    def __init__(self, name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> None:
        super().__init__(name, doc, labels)
        self.bounds = tuple(sorted(buckets))

    def _new_child(self) -> _HistogramValue:
        return _HistogramValue(self.bounds)

    def family(self) -> Metric:
        out = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        for values, child in self.children.items():
            out.add_metric(list(values), child.buckets(), child.sum)
        return out


class _Collector(Collector):
    def __init__(self, families: list[_Family[Any]], depths: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self._families = families
        self._depths = depths

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily("easel_queue_depth", "Jobs waiting per model", labels=["model"])
        running = GaugeMetricFamily("easel_jobs_running", "Jobs running per model", labels=["model"])
        for model, (w, r) in self._depths().items():
            waiting.add_metric([model], w)
            running.add_metric([model], r)
        yield waiting
        yield running
        for family in self._families:
            yield family.family()


class Metrics:
    def __init__(self, depths: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.jobs = Counter("easel_jobs", "Jobs by final status", ["model", "task", "status"])
        self.submitted = Counter("easel_jobs_submitted", "Jobs accepted", ["model", "task"])
        self.duration = Histogram(
            "easel_job_run_seconds",
            "Worker time per job",
            ["model", "task"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
        )
        self.wait = Histogram(
            "easel_job_wait_seconds",
            "Time from submission to start",
            ["model"],
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
        )
        self.forecast_error = Histogram(
            "easel_forecast_abs_pct_error",
            "Absolute error of expected_time_seconds at submission, as a fraction of the real time",
            ["model"],
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.loaded = Gauge("easel_model_loaded", "1 when the model is loaded", ["model"])
        self.registry = CollectorRegistry()
        families: list[_Family[Any]] = [self.jobs, self.submitted, self.duration, self.wait, self.forecast_error, self.loaded]
        self.registry.register(_Collector(families, depths))

    def render(self) -> bytes:
        return generate_latest(self.registry)
