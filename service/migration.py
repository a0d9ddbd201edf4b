"""Encodes, in the background, the classes whose vectors the served embedding space lacks.

That happens when a bundle of a new space (a new teacher, another CLIP) serves a database of
runtime classes, and in a fleet during a rolling upgrade, when a replica of another space added a
class. The registry finds such classes when it reads a set (``Registry.on_missing``) and keeps
serving the set's last complete snapshot, if it has one. The migrator then reads the missing
classes a batch at a time, encodes their names through the text engine (urgent: ahead of anonymous
text work, behind nothing else) and commits each batch's vectors at once, so a restart after
``kill -9`` redoes at most one batch; when a set has no missing class left, the registry installs its
complete snapshot. Progress goes to the log and to ``/readyz``.

Runtime classes are re-encoded with the new bundle's text side and its templates (a class added
with custom templates gets the bundle's in the new space).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from service.errors import ServiceError, UnknownLabelSet
from service.registry import Registry
from service.text import TextTower

log = logging.getLogger(__name__)
BATCH = 64  # names encoded and committed together: a kill -9 redoes at most this many
RETRY_S = 1.0  # after a failed batch (database down, engine draining), try again this much later
NO_DEADLINE = float("inf")


@dataclass
class Progress:
    done: int = 0  # vectors stored by this process
    started: float = 0.0
    problem: str | None = None  # why encoding cannot go on (no text side), for /readyz


class Migrator:
    """One background task per process; woken by the registry whenever a set lacks vectors."""

    def __init__(self, registry: Registry, text: TextTower) -> None:
        self.registry = registry
        self.text = text
        self.progress = Progress()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.registry.on_missing = self._notify
        self._task = self._loop.create_task(self._run(), name="vector-migration")
        if self.registry.pending():
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def status(self) -> str | None:
        """One line for /readyz while classes wait for vectors; None when there are none."""
        pending = self.registry.pending()
        if self.progress.problem:
            return self.progress.problem
        if not pending:
            return None
        return (
            f"encoding class vectors for space {self.registry.store.space}: {sum(pending.values())} left in "
            f"{sorted(pending)[:5]}, {self.progress.done} done"
        )

    def _notify(self, name: str) -> None:  # any thread
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for name in self.registry.pending():
                try:
                    await self._encode_set(name)
                except UnknownLabelSet:
                    continue  # deleted meanwhile: nothing to encode
                except (ServiceError, OSError) as e:
                    log.warning("encoding vectors of label set %r paused: %s; retrying", name, e)
                    await asyncio.sleep(RETRY_S)
                    self._wake.set()

    async def _encode_set(self, name: str) -> None:
        store = self.registry.store
        if not self.text.available:
            self.progress.problem = (
                f"label set {name!r} has classes with no vector in space {store.space}, and this bundle has no "
                "text side to encode them"
            )
            log.error("%s", self.progress.problem)
            return
        if not self.progress.started:
            self.progress.started = time.monotonic()
        left = self.registry.pending().get(name, 0)
        while True:
            ids, names = await asyncio.to_thread(store.missing, name, BATCH)
            if not ids:
                break
            vectors = await self.text.encode(names, None, urgent=True, timeout_s=NO_DEADLINE)  # [B, D]
            stored = await asyncio.to_thread(self._commit, name, ids, vectors)
            self.progress.done += stored
            left = max(0, left - len(ids))
            self._log(name, left)
        await asyncio.to_thread(self.registry.refresh, name)  # the complete snapshot, installed

    def _commit(self, name: str, ids: list[int], vectors: np.ndarray) -> int:
        store = self.registry.store
        with store.transaction() as db:
            return store.put_vectors(db, name, ids, vectors)

    def _log(self, name: str, left: int) -> None:
        elapsed = max(time.monotonic() - self.progress.started, 1e-6)
        rate = self.progress.done / elapsed
        eta = f", {left} left, about {left / rate:.0f} s" if rate > 0 and left else ""
        log.info(
            "space %s: %d class vectors encoded (%.1f names/s; label set %r%s)",
            self.registry.store.space,
            self.progress.done,
            rate,
            name,
            eta,
        )
