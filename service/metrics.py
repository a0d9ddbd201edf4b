"""Prometheus metrics, one registry per app (several apps can live in one test process)."""

from __future__ import annotations

import contextlib
from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.engine import EngineHooks

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics(EngineHooks):
    """All service metrics; also the engine's hooks."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._label_sets: set[str] = set()  # names with label-set series (prometheus_client cannot list them)
        p = "promptdistill_"
        self.requests = Counter(p + "requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            p + "request_seconds", "HTTP request latency", ["method", "route"], buckets=LATENCY_BUCKETS, registry=r
        )
        tower = ["tower"]  # image or text: the two batching engines
        self.batch_size = Histogram(
            p + "batch_size", "items (images, names) per encoder call", tower, buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            p + "batch_seconds", "encoder time per batch", tower, buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(p + "queue_depth", "items waiting for the encoder", tower, registry=r)
        self.dropped_total = Counter(
            p + "dropped_images", "queued items dropped before encoding", [*tower, "reason"], registry=r
        )
        self.rejected_total = Counter(
            p + "rejected_requests", "requests refused by an engine", [*tower, "reason"], registry=r
        )
        self.label_set_version = Gauge(
            p + "label_set_version", "version served per label set", ["label_set"], registry=r
        )
        self.label_set_classes = Gauge(p + "label_set_classes", "classes per label set", ["label_set"], registry=r)
        self.text_calls = Counter(p + "text_encoder_calls", "text encoder invocations", registry=r)
        self.text_names = Counter(p + "text_encoder_names", "names encoded by the text encoder", registry=r)
        self.images = Counter(p + "images_classified", "images classified", registry=r)
        self.admission_capacity = Gauge(
            p + "admission_capacity",
            "images admitted in flight at most (the latency target / seconds_per_image)",
            registry=r,
        )
        self.admission_in_flight = Gauge(p + "admission_in_flight", "images decoding, queued or encoding", registry=r)
        self.admission_image_seconds = Gauge(
            p + "admission_seconds_per_image", "admission's estimate of the time per image at full load", registry=r
        )
        self.capture_active = Gauge(p + "capture_active", "1 while classified images are being captured", registry=r)
        self.capture_images = Gauge(
            p + "capture_images", "images in the capture folder (this process's count)", registry=r
        )
        self.capture_errors = Gauge(
            p + "capture_write_errors", "capture writes that failed (capture then stops)", registry=r
        )
        self.capture_skipped = Gauge(
            p + "capture_skipped", "sampled images not kept: the writer was behind (never waited for)", registry=r
        )
        self.info = Gauge(p + "image_encoder_info", "image encoder in use", ["backend", "provider"], registry=r)

    # engine hooks
    def batch(self, tower: str, size: int, seconds: float) -> None:
        self.batch_size.labels(tower).observe(size)
        self.batch_seconds.labels(tower).observe(seconds)

    def depth(self, tower: str, depth: int) -> None:
        self.queue_depth.labels(tower).set(depth)

    def dropped(self, tower: str, reason: str, n: int) -> None:
        self.dropped_total.labels(tower, reason).inc(n)

    def rejected(self, tower: str, reason: str) -> None:
        self.rejected_total.labels(tower, reason).inc()

    # registry / text hooks
    def version(self, label_set: str, version: int, n_classes: int) -> None:
        if version < 0:
            self._forget(label_set)
            return
        self._label_sets.add(label_set)
        self.label_set_version.labels(label_set).set(version)
        self.label_set_classes.labels(label_set).set(n_classes)

    def prune_label_sets(self, existing: Collection[str]) -> None:
        """Drop the series of sets that are gone: a set deleted through another worker or replica never
        reaches this process's delete hook, and its gauges would stay for ever (one series per deleted set)."""
        for name in self._label_sets - set(existing):
            self._forget(name)

    def _forget(self, label_set: str) -> None:
        self._label_sets.discard(label_set)
        for gauge in (self.label_set_version, self.label_set_classes):
            with contextlib.suppress(KeyError):
                gauge.remove(label_set)

    def text_call(self, n_names: int) -> None:
        self.text_calls.inc()
        self.text_names.inc(n_names)

    def render(self) -> bytes:
        return generate_latest(self.registry)
