"""Prometheus metrics of one node (``prometheus_client``, one registry per app so
tests can run several apps in a process).

Each node (API or worker process) exports its own counters: a worker counts the
jobs it ran, an API node the jobs it accepted.  Queue depths come from the broker,
so every node shows the same shared queue.  Scrape every node; sum in Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("easel_jobs", "Jobs by final status (on the worker that ran them)", ["model", "task", "status"], registry=r)
        self.submitted = Counter("easel_jobs_submitted", "Jobs accepted (on the API node that accepted them)", ["model", "task"], registry=r)
        self.duration = Histogram(
            "easel_job_run_seconds", "Worker time per job", ["model", "task"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
        )  # fmt: skip
        self.wait = Histogram(
            "easel_job_wait_seconds", "Time from submission to start", ["model"], registry=r,
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
        )  # fmt: skip
        self.forecast_error = Histogram(
            "easel_forecast_abs_pct_error",
            "Absolute error of expected_time_seconds at submission, as a fraction of the real time",
            ["model"], registry=r, buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )  # fmt: skip
        self.gpu_seconds = Counter(
            "easel_gpu_seconds", "Worker time of finished jobs, by the key id that submitted them", ["key", "model"], registry=r
        )
        self.loaded = Gauge("easel_model_loaded", "1 when the model is loaded on this node", ["model"], registry=r)
        self.queue_depth = Gauge("easel_queue_depth", "Jobs waiting per model (the broker's shared queue)", ["model"], registry=r)
        self.running = Gauge("easel_jobs_running", "Jobs running per model (on every worker)", ["model"], registry=r)

    def render(self, depths: dict[str, tuple[int, int]], *, key_ids: bool = True) -> bytes:
        """The exposition text; ``key_ids`` False (an anonymous scrape of a public
        /metrics): GPU-seconds per model only, never labelled with key ids."""
        for model, (waiting, running) in depths.items():
            self.queue_depth.labels(model).set(waiting)
            self.running.labels(model).set(running)
        return generate_latest(self.registry if key_ids else WithoutKeys(self.registry))


class WithoutKeys:
    """A registry's metrics with the ``key`` label summed away."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            if not any("key" in sample.labels for sample in metric.samples):
                yield metric
                continue
            sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in metric.samples:
                if sample.name.endswith("_created"):
                    continue  # a creation time per key: no meaning summed
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "key"))
                sums[(sample.name, labels)] = sums.get((sample.name, labels), 0.0) + sample.value
            out = Metric(metric.name, metric.documentation, metric.type)
            for (name, labels), value in sums.items():
                out.add_sample(name, dict(labels), value)
            yield out
