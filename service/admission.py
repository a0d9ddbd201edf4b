"""Admission before work: images in flight (decoding, queued, encoding) against a capacity.

A request is admitted or refused (429 + ``Retry-After``) *before* any of its images is decoded.
Unless a fixed ``max_images_in_flight`` is set, the capacity follows from the latency an admitted image is
promised: ``target_latency_s`` (never more than the request deadline) divided by the measured
service time per image. Decoding (a pool of ``decode_workers`` threads) and encoding (one batch at a
time, or one per lane side by side: a lane batch's seconds count divided by the lanes, all of which
are busy at full load) overlap, so that time is the slower stage's: the encoder's seconds per image,
or a decode's seconds divided by the decode workers (both exponentially averaged, both measured under whatever
contention the load causes; seeded at start-up by timing the readiness probe). Summing the two
stages would count the time they overlap twice. What the server cannot finish in time is refused
at once, so a crowd of clients gets fast refusals instead of everyone getting slow answers.
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
    decode_workers: int  # threads decoding + preprocessing side by side
    retry_after_s: int  # the least Retry-After sent


class _Rate:
    """Seconds per image, exponentially weighted per observation; safe to update from worker threads.

    Seconds and images are averaged apart and divided (not the per-batch quotients averaged), so a big
    batch weighs by its images: the value is the time per image the stage actually delivered.
    """

    def __init__(self, seconds_per_image: float) -> None:
        self._seconds, self._images = seconds_per_image, 1.0
        self._lock = threading.Lock()

    @property
    def value(self) -> float:
        return self._seconds / self._images

    def observe(self, seconds: float, images: int = 1) -> None:
        with self._lock:
            self._seconds += EWMA_WEIGHT * (seconds - self._seconds)
            self._images += EWMA_WEIGHT * (max(images, 1) - self._images)


class Admission:
    """Counts images in flight; lives on the event loop (``admit`` is not thread-safe by design)."""

    def __init__(self, cfg: AdmissionCfg, encode_s: float, decode_s: float) -> None:
        self.cfg = cfg
        self.in_flight = 0
        self.refused = 0
        self._encode = _Rate(encode_s)
        self._decode = _Rate(decode_s)

    @property
    def image_s(self) -> float:
        """Estimated seconds per image at full load: the slower of the two overlapping stages."""
        return max(self._encode.value, self._decode.value / max(self.cfg.decode_workers, 1), 1e-4)

    @property
    def capacity(self) -> int:
        if self.cfg.capacity is not None:
            return self.cfg.capacity
        budget = min(self.cfg.target_latency_s, self.cfg.deadline_s)
        return max(self.cfg.min_capacity, int(budget / self.image_s))

    def observe_encode(self, batch_seconds: float, batch_size: int) -> None:
        self._encode.observe(batch_seconds, batch_size)

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
