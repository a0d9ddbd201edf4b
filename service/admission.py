"""Admission before work: images in flight (decoding, queued, encoding) against a capacity.

A request is admitted or refused (429 + ``Retry-After``) *before* any of its images is decoded.
Unless a fixed ``queue_size`` is set, the capacity follows from the latency an admitted image is
promised: ``target_latency_s`` (never more than the request deadline) divided by the measured
service time per image (decode + preprocess + encode, exponentially averaged; seeded at start-up
by timing the readiness probe). What the server cannot finish in time is refused at once, so a
crowd of clients gets fast refusals instead of everyone getting slow answers.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from service.errors import Overloaded

EWMA_WEIGHT = 0.1  # per observation: ~10 batches to follow a change in load or image mix


@dataclass(frozen=True)
class AdmissionCfg:
    capacity: int | None  # fixed number of images in flight; None: derived from the latency target
    target_latency_s: float  # an admitted image should be answered within this
    deadline_s: float  # the request deadline; the derived capacity never exceeds what fits in it
    min_capacity: int  # keeps every stage busy (decode workers + the image in the encoder)
    retry_after_s: int  # the least Retry-After sent


class _Average:
    """Exponentially weighted mean, safe to update from worker threads."""

    def __init__(self, value: float) -> None:
        self.value = value
        self._lock = threading.Lock()

    def observe(self, sample: float) -> None:
        with self._lock:
            self.value += EWMA_WEIGHT * (sample - self.value)


class Admission:
    """Counts images in flight; lives on the event loop (``admit`` is not thread-safe by design)."""

    def __init__(self, cfg: AdmissionCfg, encode_s: float, decode_s: float) -> None:
        self.cfg = cfg
        self.in_flight = 0
        self.refused = 0
        self._encode = _Average(encode_s)
        self._decode = _Average(decode_s)

    @property
    def image_s(self) -> float:
        """Estimated service time of one image: decode + preprocess + encode (stages share the CPU)."""
        return max(self._encode.value + self._decode.value, 1e-4)

    @property
    def capacity(self) -> int:
        if self.cfg.capacity is not None:
            return self.cfg.capacity
        budget = min(self.cfg.target_latency_s, self.cfg.deadline_s)
        return max(self.cfg.min_capacity, int(budget / self.image_s))

    def observe_encode(self, batch_seconds: float, batch_size: int) -> None:
        self._encode.observe(batch_seconds / max(batch_size, 1))

    def observe_decode(self, seconds: float) -> None:
        self._decode.observe(seconds)

    @contextmanager
    def admit(self, n: int) -> Iterator[None]:
        """Hold ``n`` image slots for the body of the ``with``; 429 at once when they are not free.

        An idle server always admits one request, however large, so that a request bigger than the
        capacity is slow rather than refused forever.
        """
        capacity = self.capacity
        if self.in_flight and self.in_flight + n > capacity:
            self.refused += 1
            wait = math.ceil((self.in_flight + n - capacity) * self.image_s)
            raise Overloaded(
                f"the server is at capacity ({self.in_flight} images in flight, {capacity} allowed: about "
                f"{self.cfg.target_latency_s:g} s of work); retry after the Retry-After delay",
                retry_after_s=max(self.cfg.retry_after_s, wait),
            )
        self.in_flight += n
        try:
            yield
        finally:
            self.in_flight -= n
