"""The batching engine between routes and a model tower; one instance per tower (image, text).

Requests put their items (an image's pixels, a class name to encode) into a queue; a single worker
task takes a batch and runs the tower's ``encode`` on a dedicated thread, one batch at a time. An
item that finds the tower idle is encoded at once: batches form only from what queued while the
tower was busy, unless ``max_wait_ms`` > 0 asks the first item to wait that long for company.

Two queues: *urgent* items (label-set writes, authenticated and already bounded per request) are
always taken before normal ones, so a write waits for at most the one batch running when it
arrives; urgent requests share each batch in turns (one item of each in round), so a small write
is not held behind a large one. A batch holds items up to a *cost* (an image costs 1; a name costs one forward-pass row
per template); with ``target_batch_s`` the normal queue's batches are also sized to take about that
long at the measured rate, which bounds that one batch's duration on any hardware (big batches on a
GPU, small ones on a CPU).

Admission (service/admission.py) decides which images enter before any decoding; the engine's own
bound on queued cost (``max_queued``) refuses the rest with 429 + Retry-After (urgent work is
never refused for it). Work whose client disconnected or whose deadline passed is dropped before
it reaches the tower (and a tower may stop a running batch once none of its requests is left: see
``Engine.abandoned``); on SIGTERM the engine refuses new work (503) and drains what is queued.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from service.errors import ClientGone, DeadlineExceeded, Overloaded
from service.tracing import batch_span, current

log = logging.getLogger(__name__)
POLL_S = 0.05  # how often a waiting request checks whether its client is still there
RATE_WEIGHT = 0.2  # EWMA weight of one batch in the measured seconds per unit of cost
Item = TypeVar("Item")


class Abandoned(Exception):
    """Raised by a tower (on the encoder thread) that stopped a batch whose every request has gone."""


@dataclass(frozen=True)
class EngineCfg:
    max_batch_size: int = 16  # cost per batch at most (images; or forward-pass rows for text)
    max_wait_ms: float = 0.0
    max_queued: int = 4096  # queued cost at most for normal work (429 beyond it)
    retry_after_s: int = 1
    target_batch_s: float | None = None  # size normal batches to take about this long (None: max_batch_size)
    tower: str = "image"  # the metrics' label


@dataclass
class _Entry(Generic[Item]):
    item: Item
    cost: int
    future: asyncio.Future[np.ndarray]
    enqueued: float
    deadline: float
    trace: Any = field(default_factory=current)  # the request's trace context (None: tracing off)


class EngineHooks:
    """Observers (metrics); the defaults do nothing. ``tower`` says which engine reports."""

    def batch(self, tower: str, size: int, seconds: float) -> None: ...
    def depth(self, tower: str, depth: int) -> None: ...
    def dropped(self, tower: str, reason: str, n: int) -> None: ...
    def rejected(self, tower: str, reason: str) -> None: ...


def stack(items: list[Any]) -> Any:
    """The image tower's collation: rows [3, H, W] -> one array [B, 3, H, W]."""
    return np.stack(items)


class Engine(Generic[Item]):
    """Dynamic micro-batching over ``encode(collate(items)) -> [B, D]``."""

    def __init__(
        self,
        encode: Callable[[Any], np.ndarray],
        cfg: EngineCfg,
        hooks: EngineHooks | None = None,
        collate: Callable[[list[Item]], Any] = stack,
    ) -> None:
        self.encode = encode  # an attribute: tests swap in a slow or gated model
        self.collate = collate
        self.cfg = cfg
        self.hooks = hooks or EngineHooks()
        self._urgent: deque[deque[_Entry[Item]]] = deque()  # one queue per urgent request, served in turns
        self._normal: deque[_Entry[Item]] = deque()
        self._queued_cost = 0  # normal queue only
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{cfg.tower}-encoder")
        self._seconds_per_cost: float | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        # set while the running batch has no request left waiting for it: a tower may check it between
        # its layers and raise Abandoned (service/text.py does, so clients that leave cost no more work)
        self.abandoned = threading.Event()

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self._urgent) + len(self._normal)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done() and not self._closing

    def seed_rate(self, seconds_per_cost: float) -> None:
        """A first measured rate (a warm-up), so the first normal batch is already sized to ``target_batch_s``."""
        if self._seconds_per_cost is None and seconds_per_cost > 0:
            self._seconds_per_cost = seconds_per_cost

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"{self.cfg.tower}-engine")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work (503), finish what is queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout_s)
            except TimeoutError:
                log.warning("%s engine drain timed out with %d items queued", self.cfg.tower, self.depth)
                self._worker.cancel()
        self._executor.shutdown(wait=True)

    async def embed(
        self,
        items: Sequence[Item] | np.ndarray,
        *,
        timeout_s: float,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        urgent: bool = False,
        cost: int = 1,
    ) -> np.ndarray:
        """items (e.g. pixels [B, 3, H, W]) -> embeddings [B, D], batched with other requests' items.

        ``cost``: of each item (batch and queue bounds count it). ``urgent``: taken before normal work
        and never refused for a full queue.
        """
        if self._closing or self._worker is None:
            self.hooks.rejected(self.cfg.tower, "draining")
            raise Overloaded(
                "the server is shutting down; retry on another replica",
                retry_after_s=self.cfg.retry_after_s,
                status=503,
            )
        total = len(items) * cost
        if not urgent and self._queued_cost and self._queued_cost + total > self.cfg.max_queued:
            self.hooks.rejected(self.cfg.tower, "queue_full")
            raise Overloaded(
                f"the {self.cfg.tower} encoder's queue is full ({self._queued_cost} of {self.cfg.max_queued} "
                "units of work waiting); retry later",
                retry_after_s=self.cfg.retry_after_s,
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures: list[asyncio.Future[np.ndarray]] = [loop.create_future() for _ in range(len(items))]
        entries = [_Entry(item, cost, f, now, now + timeout_s) for item, f in zip(items, futures, strict=True)]
        if urgent:
            self._urgent.append(deque(entries))
        else:
            self._normal.extend(entries)
            self._queued_cost += total
        self.hooks.depth(self.cfg.tower, self.depth)
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
        if not futures:
            return
        loop = asyncio.get_running_loop()
        # one future for all items, so each poll costs O(1), not one callback per item (a 5,000-name
        # add polled with asyncio.wait(futures) spent most of its time on the event loop, not encoding)
        all_done: asyncio.Future[None] = loop.create_future()
        left = len(futures)

        def one_done(_: asyncio.Future[np.ndarray]) -> None:
            nonlocal left
            left -= 1
            if left == 0 and not all_done.done():
                all_done.set_result(None)

        for f in futures:
            f.add_done_callback(one_done)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"the request's deadline passed before the {self.cfg.tower} encoder reached it")
            done, _ = await asyncio.wait([all_done], timeout=min(POLL_S, remaining))
            if done:
                return
            if is_disconnected is not None and await is_disconnected():
                raise ClientGone("client disconnected; its queued work was dropped")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.depth:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill(loop)
            batch = self._take(loop.time())
            self.hooks.depth(self.cfg.tower, self.depth)
            if batch:
                await self._encode(batch)  # one batch at a time: the tower has the machine to itself

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """With ``max_wait_ms``, let the first queued item wait that long for company."""
        if self.cfg.max_wait_ms <= 0:
            return
        first = self._urgent[0][0] if self._urgent else self._normal[0]
        fill_by = first.enqueued + self.cfg.max_wait_ms / 1000.0
        while self.depth < self.cfg.max_batch_size and not self._closing:
            remaining = fill_by - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _budget(self, urgent: bool) -> int:
        """Cost the next batch may hold: the maximum, or for normal work what fits ``target_batch_s``."""
        target, rate = self.cfg.target_batch_s, self._seconds_per_cost
        if urgent or target is None or rate is None or rate <= 0:
            return self.cfg.max_batch_size
        return max(1, min(self.cfg.max_batch_size, math.floor(target / rate)))

    def _take(self, now: float) -> list[_Entry[Item]]:
        """The next batch: from the urgent requests (in turns) if there are any, else the normal queue."""
        urgent = bool(self._urgent)
        budget = self._budget(urgent)
        batch: list[_Entry[Item]] = []
        cost = gone = late = 0
        while True:
            entry = self._next(urgent, budget - cost if batch else None)
            if entry is None:
                break
            if entry.future.done():  # cancelled: client gone, deadline, or a sibling item failed
                gone += 1
            elif now > entry.deadline:
                late += 1
                entry.future.cancel()
            else:
                batch.append(entry)
                cost += entry.cost
        if gone:
            self.hooks.dropped(self.cfg.tower, "cancelled", gone)
        if late:
            self.hooks.dropped(self.cfg.tower, "deadline", late)
        return batch

    def _next(self, urgent: bool, room: int | None) -> _Entry[Item] | None:
        """Pop the next item that fits in ``room`` (None: anything), or None. Urgent: one per request in turn."""
        if not urgent:
            if not self._normal or (room is not None and self._normal[0].cost > room):
                return None
            entry = self._normal.popleft()
            self._queued_cost -= entry.cost
            return entry
        if not self._urgent or (room is not None and self._urgent[0][0].cost > room):
            return None
        queue = self._urgent.popleft()
        entry = queue.popleft()
        if queue:
            self._urgent.append(queue)  # its next item waits for the other requests' turns
        return entry

    async def _encode(self, batch: list[_Entry[Item]]) -> None:
        loop = asyncio.get_running_loop()
        payload = self.collate([e.item for e in batch])
        self.abandoned = abandoned = threading.Event()
        left = len(batch)

        def cancelled(future: asyncio.Future[np.ndarray]) -> None:
            nonlocal left
            if future.cancelled():
                left -= 1
                if left == 0:
                    abandoned.set()

        for entry in batch:
            entry.future.add_done_callback(cancelled)
        start = loop.time()
        try:
            with batch_span("encode", [e.trace for e in batch], tower=self.cfg.tower, batch_size=len(batch)):
                out = await loop.run_in_executor(self._executor, self.encode, payload)
        except Abandoned:
            self.hooks.dropped(self.cfg.tower, "cancelled", len(batch))
            return
        except Exception as e:
            log.exception("%s encoder failed on a batch of %d", self.cfg.tower, len(batch))
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(e)
            return
        seconds = loop.time() - start
        cost = sum(e.cost for e in batch)
        rate = seconds / max(cost, 1)
        old = self._seconds_per_cost
        self._seconds_per_cost = rate if old is None else old + RATE_WEIGHT * (rate - old)
        self.batches += 1
        self.hooks.batch(self.cfg.tower, len(batch), seconds)
        for entry, row in zip(batch, out, strict=True):
            if not entry.future.done():
                entry.future.set_result(row)
