"""The bundle's text side at serving time: class names -> vectors, with an LRU cache for ad-hoc labels.

Only two things run the text encoder: adding classes, and requests that bring their own candidate
labels. ``calls`` counts encoder invocations so tests (and /metrics) can prove the query path
never touches it.

Fairness: the encoder runs one forward pass at a time under a :class:`PriorityLock`. Class adds
and label-set creation (authenticated mutations) take it at high priority in one go; anonymous
open-vocabulary work takes it at low priority one chunk of ``chunk_prompts`` prompts at a time,
and between the transformer blocks of a chunk it steps aside for a waiting mutation, so a
mutation waits for at most one block of one chunk however large the anonymous backlog is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from models.towers import TextSide
from service.errors import InvalidInput, NoTextSide


class PriorityLock:
    """Mutual exclusion in which waiting high-priority holders always go before low-priority ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._high_waiting = 0

    @contextmanager
    def hold(self, high: bool) -> Iterator[None]:
        with self._cond:
            self._high_waiting += high
            try:
                while self._held or (not high and self._high_waiting):
                    self._cond.wait()
            finally:
                self._high_waiting -= high
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def step_aside(self) -> None:
        """Called by a low-priority holder at a safe point: let waiting high-priority holders go
        first, then hold the lock again (its own work resumes where it paused)."""
        with self._cond:
            if not self._high_waiting:
                return
            self._held = False
            self._cond.notify_all()
            while self._held or self._high_waiting:
                self._cond.wait()
            self._held = True


class TextEncoder:
    """Thread-safe wrapper around :class:`models.towers.TextSide` (one forward pass at a time)."""

    def __init__(
        self,
        side: TextSide | None,
        learned_prompts: bool,
        cache_size: int,
        on_call: Callable[[int], None] | None = None,
        chunk_prompts: int = 16,
    ) -> None:
        self.side = side
        self.learned_prompts = learned_prompts
        self.calls = 0
        self.chunk_prompts = chunk_prompts
        self._on_call = on_call
        self._encoder_lock = PriorityLock()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[tuple[tuple[str, ...], str], np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    @property
    def available(self) -> bool:
        return self.side is not None

    def check_templates(self, templates: Sequence[str] | None) -> None:
        """Custom templates only make sense for a text side without learned prompts."""
        if templates is not None and self.learned_prompts:
            raise InvalidInput(
                "this bundle's text side uses learned prompts, which replace templates; "
                "send the names without 'templates' / 'hypothesis_template'"
            )

    def prompts(self, n_names: int, templates: Sequence[str] | None) -> int:
        """Forward-pass rows ``n_names`` names cost: one per name and template (fixed context length)."""
        n_templates = len(templates) if templates else len(self.side.templates) if self.side is not None else 1
        return n_names * max(n_templates, 1)

    def encode(
        self, names: Sequence[str], templates: Sequence[str] | None = None, *, priority: bool = True
    ) -> np.ndarray:
        """[N, D] normalised class vectors, exactly as the bundle's exporter computed them.

        ``priority`` (mutations): one pass at high priority. Otherwise chunked at low priority.
        """
        if self.side is None:
            raise NoTextSide("this bundle has no text side, so class names cannot be encoded at runtime")
        self.check_templates(templates)
        if priority:
            return self._encode_locked(list(names), templates, high=True)
        per_chunk = max(1, self.chunk_prompts // max(1, self.prompts(1, templates)))
        parts = [
            self._encode_locked(list(names[i : i + per_chunk]), templates, high=False)
            for i in range(0, len(names), per_chunk)
        ]
        return np.concatenate(parts)

    def _encode_locked(self, names: list[str], templates: Sequence[str] | None, high: bool) -> np.ndarray:
        assert self.side is not None
        with self._encoder_lock.hold(high):
            self.calls += 1
            if self._on_call is not None:
                self._on_call(len(names))
            vectors = self.side.class_vectors(names, list(templates) if templates else None)
        return vectors.detach().cpu().numpy().astype(np.float32)  # [N, D]

    def encode_cached(self, names: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """Open-vocabulary labels (low priority): names seen recently with the same templates come from the LRU."""
        if self.side is None:
            raise NoTextSide("this bundle has no text side, so candidate labels cannot be encoded")
        key_t = tuple(templates) if templates else ()
        out: dict[str, np.ndarray] = {}
        with self._cache_lock:
            for n in names:
                hit = self._cache.get((key_t, n))
                if hit is not None:
                    self._cache.move_to_end((key_t, n))
                    out[n] = hit
        missing = [n for n in names if n not in out]
        if missing:
            fresh = self.encode(missing, templates, priority=False)
            with self._cache_lock:
                for n, vec in zip(missing, fresh, strict=True):
                    out[n] = vec
                    if self._cache_size > 0:
                        self._cache[(key_t, n)] = vec
                        self._cache.move_to_end((key_t, n))
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return np.stack([out[n] for n in names])  # [N, D]
