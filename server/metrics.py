"""Prometheus metrics of one application: a registry per app (tests run several in a process).

Counters and histograms are updated where things happen (the access middleware, the service,
the batcher's batch callback, reloads); gauges of the current state (readiness, requests in
flight, queued items) are read from the server state when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, documentation: str, labels: list[str]) -> Counter:
            return Counter(name, documentation, labels, registry=self.registry)

        def histogram(name: str, documentation: str, labels: list[str], buckets=SECONDS):
            return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

        self.requests = counter(
            "unetpp_requests",
            "HTTP requests answered, by route template, method, status, and the model and graph "
            "that served",
            ["handler", "method", "status", "model", "graph"],
        )
        self.errors = counter(
            "unetpp_request_errors",
            "error answers by route template, status and error code",
            ["handler", "status", "error"],
        )
        self.routes = counter(
            "unetpp_routes",
            "graphs chosen, by routing policy (a mode, level, max_latency_ms, min_iou, graph) "
            "and whether the budget or accuracy floor was missed",
            ["model", "policy", "graph", "missed"],
        )
        self.reloads = counter(
            "unetpp_reloads",
            "model (re)loads, by model and result (ok, failed)",
            ["model", "result"],
        )
        self.request_seconds = histogram(
            "unetpp_request_duration_seconds",
            "time from the request's arrival to the end of its answer",
            ["handler", "method"],
        )
        self.queue_seconds = histogram(
            "unetpp_queue_wait_seconds",
            "per request: time its inputs waited in the batcher before their batch ran",
            ["model", "graph"],
        )
        self.inference_seconds = histogram(
            "unetpp_inference_seconds", "per batch: onnxruntime time", ["model", "graph"]
        )
        self.batch_size = histogram(
            "unetpp_batch_size", "inputs per batch", ["model", "graph"], buckets=BATCH_SIZES
        )

    def batch(self, model: str, graph: str, size: int, run_ms: float) -> None:
        self.batch_size.labels(model, graph).observe(size)
        self.inference_seconds.labels(model, graph).observe(run_ms / 1000.0)

    def watch(self, read: Callable[[], Iterator[Metric]]) -> None:
        """Register gauges computed at scrape time by `read`."""
        self.registry.register(_Gauges(read))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges(Collector):
    def __init__(self, read: Callable[[], Iterator[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        return self._read()


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def info(name: str, documentation: str, labels: dict[str, str]) -> InfoMetricFamily:
    return InfoMetricFamily(name, documentation, value=labels)
