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
with custom templates gets the bundle's in the new space). Classes made from example images are
rebuilt from their kept examples, re-embedded by the new image tower (``rebuild``: service/examples.py),
combined with their name's new text vector when they have one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from service.errors import ServiceError, UnknownLabelSet
from service.registry import Registry
from service.text import TextTower

log = logging.getLogger(__name__)
BATCH = 64  # names encoded and committed together: a kill -9 redoes at most this many
RETRY_S = 1.0  # after a failed batch (database down, engine draining), try again this much later
NO_DEADLINE = float("inf")
EXAMPLES = "examples"  # provenance of a class made from examples alone (service/examples.py); "...+examples": both
# (set, class id, the name's new text vector or None) -> the class vector rebuilt from its kept examples
Rebuild = Callable[[str, int, np.ndarray | None], Awaitable[np.ndarray]]


@dataclass
class Progress:
    done: int = 0  # vectors stored by this process
    started: float = 0.0
    problem: str | None = None  # why encoding cannot go on (no text side), for /readyz


class Migrator:
    """One background task per process; woken by the registry whenever a set lacks vectors."""

    def __init__(self, registry: Registry, text: TextTower, rebuild: Rebuild | None = None) -> None:
        self.registry = registry
        self.text = text
        self.rebuild = rebuild
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
        if not self.text.available and any(
            p != EXAMPLES for p in (await asyncio.to_thread(store.missing, name, BATCH))[2]
        ):
            self.progress.problem = (
                f"label set {name!r} has classes with no vector in space {store.space}, and this bundle has no "
                "text side to encode them"
            )
            log.error("%s", self.progress.problem)
            return
        if not self.progress.started:
            self.progress.started = time.monotonic()
        left = self.registry.pending().get(name, 0)
        after = -1  # the last id encoded in this pass (ids only grow: classes added meanwhile come later)
        while True:
            ids, names, provenance = await asyncio.to_thread(store.missing, name, BATCH, after)
            if not ids and after >= 0:  # the end of a pass: one more from the start finds anything passed over
                after = -1
                continue
            if not ids:
                break
            after = ids[-1]
            vectors, texts = await self._vectors(name, ids, names, provenance)
            stored = await asyncio.to_thread(self._commit, name, ids, vectors, texts)
            self.progress.done += stored
            left = max(0, left - len(ids))
            self._log(name, left)
        await asyncio.to_thread(self.registry.refresh, name)  # the complete snapshot, installed

    async def _vectors(
        self, name: str, ids: list[int], names: list[str], provenance: list[str]
    ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """[B, D] vectors of one batch: names through the text engine, example classes from their examples."""
        named = [k for k, p in enumerate(provenance) if p != EXAMPLES]
        text = np.zeros((0, 0), np.float32)
        if named:
            text = await self.text.encode([names[k] for k in named], None, urgent=True, timeout_s=NO_DEADLINE)
        text_of = {k: text[j] for j, k in enumerate(named)}  # row in this batch -> [D]
        out, texts = [], {}
        for k, (class_id, prov) in enumerate(zip(ids, provenance, strict=True)):
            if prov != EXAMPLES and not prov.endswith("+" + EXAMPLES):
                out.append(text_of[k])
                continue
            if self.rebuild is None:
                raise OSError(f"class {names[k]!r} of {name!r} is made of examples, and nothing here re-embeds them")
            out.append(await self.rebuild(name, class_id, text_of.get(k)))
            if k in text_of:
                texts[class_id] = text_of[k]
        return np.stack(out), texts

    def _commit(self, name: str, ids: list[int], vectors: np.ndarray, texts: dict[int, np.ndarray]) -> int:
        store = self.registry.store
        with store.transaction() as db:
            return store.put_vectors(db, name, ids, vectors, texts)

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
