"""Prometheus metrics (one registry per app, so tests can run several apps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric


class _QueueCollector(Collector):
    def __init__(self, depths: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self._depths = depths

    def collect(self) -> list[Metric]:
        waiting = GaugeMetricFamily("easel_queue_depth", "Jobs waiting per model", labels=["model"])
        running = GaugeMetricFamily("easel_jobs_running", "Jobs running per model", labels=["model"])
        for model, (w, r) in self._depths().items():
            waiting.add_metric([model], w)
            running.add_metric([model], r)
        return [waiting, running]


class Metrics:
    def __init__(self, depths: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_QueueCollector(depths))
        self.jobs = Counter("easel_jobs", "Jobs by final status", ["model", "task", "status"], registry=self.registry)
        self.submitted = Counter("easel_jobs_submitted", "Jobs accepted", ["model", "task"], registry=self.registry)
        self.duration = Histogram(
            "easel_job_run_seconds",
            "Worker time per job",
            ["model", "task"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            registry=self.registry,
        )
        self.wait = Histogram(
            "easel_job_wait_seconds",
            "Time from submission to start",
            ["model"],
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
            registry=self.registry,
        )
        self.forecast_error = Histogram(
            "easel_forecast_abs_pct_error",
            "Absolute error of expected_time_seconds at submission, as a fraction of the real time",
            ["model"],
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=self.registry,
        )
        self.loaded = Gauge("easel_model_loaded", "1 when the model is loaded", ["model"], registry=self.registry)

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised (prometheus_client's look-up costs
        microseconds, and every job makes several)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
