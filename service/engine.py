"""The batching engine between routes and the image encoder.

Requests put their preprocessed images into one queue; a single worker task takes up to
``max_batch_size`` images and runs the encoder on a dedicated thread. An image that finds the
encoder idle is encoded at once: batches form only from what queued while the encoder was busy,
unless ``max_wait_ms`` > 0 asks the first image to wait that long for company.

With ``lanes`` > 1 (CPU ONNX: see service/encoders.py) an idle encoder runs what waits on ``encode``,
which uses every thread (lowest latency), unless the backlog can fill every lane: then the engine
runs up to ``lanes`` batches side by side on ``encode_lane``, one thread each, and keeps a lane
running only while the backlog fills every free lane (a few images never run on one thread each
while the other cores idle; with 2 lanes: a lone image runs wide, two or more share the lanes). On
2 cores two single-thread runs of ViT-B/32 delivered 2-15 % more images per second than one
two-thread run (whose threads wait on each other at every operator); end to end, from -1 % to
+20 % more answers at 4 and 16 clients, varying from run to run. Only 2-core machines were measured. A wide
run and lane runs never overlap, so the cores are never oversubscribed.
Admission (service/admission.py) decides what enters before any decoding; ``queue_size`` here is
only a backstop (429 + Retry-After). Work whose client disconnected or whose deadline passed is
dropped before it reaches the encoder.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import ClientGone, DeadlineExceeded, Overloaded
from service.tracing import batch_span, current

log = logging.getLogger(__name__)
POLL_S = 0.05  # how often a waiting request checks whether its client is still there


@dataclass(frozen=True)
class EngineCfg:
    max_batch_size: int = 16
    max_wait_ms: float = 0.0
    queue_size: int = 4096  # backstop only: admission keeps the queue far below this
    retry_after_s: int = 1
    lanes: int = 1  # batches encoded side by side on ``encode_lane`` (1: one batch at a time)


@dataclass
class _Item:
    pixels: np.ndarray  # [3, H, W]
    future: asyncio.Future[np.ndarray]
    enqueued: float
    deadline: float
    trace: Any = field(default_factory=current)  # the request's trace context (None: tracing off)


class EngineHooks:
    """Observers (metrics); the defaults do nothing."""

    def batch(self, size: int, seconds: float, lanes: int) -> None:
        """A batch of ``size`` took ``seconds``; ``lanes``: how many such batches the encoder runs side by side."""

    def depth(self, depth: int) -> None: ...
    def dropped(self, reason: str, n: int) -> None: ...
    def rejected(self, reason: str) -> None: ...


class Engine:
    """Dynamic micro-batching over ``encode(pixels [B, 3, H, W]) -> [B, D]``."""

    def __init__(
        self,
        encode: Callable[[np.ndarray], np.ndarray],
        cfg: EngineCfg,
        hooks: EngineHooks | None = None,
        encode_lane: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if cfg.lanes > 1 and encode_lane is None:
            raise ValueError("lanes > 1 needs an encode_lane (a single-thread encoder safe to call concurrently)")
        self.encode = encode
        self.encode_lane = encode_lane
        self.cfg = cfg
        self.hooks = hooks or EngineHooks()
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=cfg.lanes, thread_name_prefix="encoder")
        self._wide = False  # a batch is running on ``encode`` (all threads)
        self._lanes_busy = 0  # batches running on ``encode_lane``
        self._runs: set[asyncio.Task[None]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done() and not self._closing

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batching-engine")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work (503), finish what is queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout_s)
            except TimeoutError:
                log.warning("engine drain timed out with %d images queued", len(self._pending))
                self._worker.cancel()
        self._executor.shutdown(wait=True)

    async def embed(
        self,
        pixels: np.ndarray,
        *,
        timeout_s: float,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        bypass_capacity: bool = False,
    ) -> np.ndarray:
        """pixels [B, 3, H, W] -> embeddings [B, D], batched with other requests' images."""
        if self._closing or self._worker is None:
            self.hooks.rejected("draining")
            raise Overloaded(
                "the server is shutting down; retry on another replica",
                retry_after_s=self.cfg.retry_after_s,
                status=503,
            )
        n = len(pixels)
        if not bypass_capacity and len(self._pending) + n > self.cfg.queue_size:
            self.hooks.rejected("queue_full")
            raise Overloaded(
                f"the inference queue is full ({len(self._pending)} of {self.cfg.queue_size} images waiting); "
                "retry later",
                retry_after_s=self.cfg.retry_after_s,
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures: list[asyncio.Future[np.ndarray]] = [loop.create_future() for _ in range(n)]
        for p, f in zip(pixels, futures, strict=True):
            self._pending.append(_Item(p, f, now, now + timeout_s))
        self.hooks.depth(len(self._pending))
        self._wakeup.set()
        try:
            await self._wait(futures, now + timeout_s, is_disconnected)
        finally:
            for f in futures:
                f.cancel()  # no-op for finished ones; the worker skips cancelled items
        return np.stack([f.result() for f in futures])  # [B, D]

    async def _wait(
        self,
        futures: list[asyncio.Future[np.ndarray]],
        deadline: float,
        is_disconnected: Callable[[], Awaitable[bool]] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed before its images were encoded")
            _, pending = await asyncio.wait(futures, timeout=min(POLL_S, remaining))
            if not pending:
                return
            if is_disconnected is not None and await is_disconnected():
                raise ClientGone("client disconnected; its queued images were dropped")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._plan()[0]:
                if self._closing and not self._pending and not self._runs:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            fill_by = self._pending[0].enqueued + self.cfg.max_wait_ms / 1000.0
            while not self._runs and self.cfg.max_wait_ms > 0 and len(self._pending) < self.cfg.max_batch_size:
                remaining = fill_by - loop.time()
                if remaining <= 0 or self._closing:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            size, wide = self._plan()
            batch = self._take(loop.time(), size)
            self.hooks.depth(len(self._pending))
            if batch:
                self._start(batch, wide)

    def _plan(self) -> tuple[int, bool]:
        """(images the next batch may take now, whether it runs wide).

        Size 0: wait (nothing queued, a wide run busy, no free lane, or too few images to fill the free lanes).
        """
        if not self._pending or self._wide:
            return 0, False
        if not self._runs and (self.cfg.lanes == 1 or len(self._pending) < self.cfg.lanes):
            return self.cfg.max_batch_size, True  # an idle encoder, too little to fill the lanes: every thread
        free = self.cfg.lanes - self._lanes_busy
        if free <= 0 or len(self._pending) < free:
            return 0, False  # lanes only while the backlog fills every free one; else wait for a wide run
        return min(self.cfg.max_batch_size, -(-len(self._pending) // free)), False  # backlog shared by free lanes

    def _start(self, batch: list[_Item], wide: bool) -> None:
        if wide:
            self._wide = True
        else:
            self._lanes_busy += 1
        run = asyncio.get_running_loop().create_task(self._encode(batch, wide))
        self._runs.add(run)

        def done(task: asyncio.Task[None]) -> None:
            self._runs.discard(task)
            if wide:
                self._wide = False
            else:
                self._lanes_busy -= 1
            self._wakeup.set()

        run.add_done_callback(done)

    def _take(self, now: float, size: int) -> list[_Item]:
        batch: list[_Item] = []
        gone = late = 0
        while self._pending and len(batch) < size:
            item = self._pending.popleft()
            if item.future.done():  # cancelled: client gone, deadline, or a sibling image failed
                gone += 1
            elif now > item.deadline:
                late += 1
                item.future.cancel()
            else:
                batch.append(item)
        if gone:
            self.hooks.dropped("cancelled", gone)
        if late:
            self.hooks.dropped("deadline", late)
        return batch

    async def _encode(self, batch: list[_Item], wide: bool) -> None:
        loop = asyncio.get_running_loop()
        pixels = np.stack([it.pixels for it in batch])  # [B, 3, H, W]
        encode = self.encode if wide or self.encode_lane is None else self.encode_lane
        start = loop.time()
        try:
            with batch_span("encode", [it.trace for it in batch], batch_size=len(batch)):
                out = await loop.run_in_executor(self._executor, encode, pixels)
        except Exception as e:
            log.exception("image encoder failed on a batch of %d", len(batch))
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        self.batches += 1
        self.hooks.batch(len(batch), loop.time() - start, 1 if wide else self.cfg.lanes)
        for it, row in zip(batch, out, strict=True):
            if not it.future.done():
                it.future.set_result(row)
