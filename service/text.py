"""The bundle's text side at serving time: class names -> vectors, with an LRU cache for ad-hoc labels.

Only two things run the text encoder: adding classes, and requests that bring their own candidate
labels. ``calls`` counts encoder invocations so tests (and /metrics) can prove the query path
never touches it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from models.towers import TextSide
from service.errors import InvalidInput, NoTextSide


class TextEncoder:
    """Thread-safe wrapper around :class:`models.towers.TextSide` (one encode at a time)."""

    def __init__(
        self,
        side: TextSide | None,
        learned_prompts: bool,
        cache_size: int,
        on_call: Callable[[int], None] | None = None,
    ) -> None:
        self.side = side
        self.learned_prompts = learned_prompts
        self.calls = 0
        self._on_call = on_call
        self._lock = threading.Lock()
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

    def encode(self, names: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """[N, D] normalised class vectors, exactly as the bundle's exporter computed them."""
        if self.side is None:
            raise NoTextSide("this bundle has no text side, so class names cannot be encoded at runtime")
        self.check_templates(templates)
        with self._lock:
            self.calls += 1
            if self._on_call is not None:
                self._on_call(len(names))
            vectors = self.side.class_vectors(list(names), list(templates) if templates else None)
        return vectors.detach().cpu().numpy().astype(np.float32)

    def encode_cached(self, names: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """Like :meth:`encode`, but names seen recently (with the same templates) come from the LRU cache."""
        if self.side is None:
            raise NoTextSide("this bundle has no text side, so candidate labels cannot be encoded")
        key_t = tuple(templates) if templates else ()
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for n in names:
                hit = self._cache.get((key_t, n))
                if hit is not None:
                    self._cache.move_to_end((key_t, n))
                    out[n] = hit
        missing = [n for n in names if n not in out]
        if missing:
            fresh = self.encode(missing, templates)
            with self._lock:
                for n, vec in zip(missing, fresh, strict=True):
                    out[n] = vec
                    if self._cache_size > 0:
                        self._cache[(key_t, n)] = vec
                        self._cache.move_to_end((key_t, n))
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return np.stack([out[n] for n in names])  # [N, D]
