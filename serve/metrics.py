"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests and latency by route and status, batch sizes, queue depth and inference latency by model; the
    versions served and the model repository's reloads (serve/repo.py)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("serve_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("serve_request_duration_seconds", "HTTP request latency by route template",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("serve_images", "images classified or predicted, by model", ["model"], registry=r)
        self.batch_size = Histogram("serve_batch_size", "images per inference batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("serve_queue_depth", "images waiting for inference", ["model"],
                                 multiprocess_mode="livesum", registry=r)
        self.inference = Histogram("serve_inference_duration_seconds", "ONNX Runtime time per batch", ["model"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.model_info = Gauge("serve_model_info", "1 for each model version served, labelled with the sha256 of "
                                "its manifest.json", ["model", "version", "manifest_sha256"],
                                multiprocess_mode="max", registry=r)
        self.reloads = Counter("serve_model_reloads", "exports of the model repository loaded while serving (added "
                               "or replaced)", ["model"], registry=r)
        self.reload_failures = Counter("serve_model_reload_failures", "exports of the model repository that failed "
                                       "to load while serving (the previous one kept serving)", ["model"],
                                       registry=r)
        self._request_children: dict[tuple[str, str, int], tuple] = {}
        self.rejected = Counter("serve_rejected", "requests refused before inference, by reason", ["reason"],
                                registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency (label children cached: this runs on every request)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route, method))
            self._request_children[key] = children  # bounded: routes are templates, statuses a few dozen
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The text exposition; across worker processes when PROMETHEUS_MULTIPROC_DIR is set."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
