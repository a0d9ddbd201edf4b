"""The bundle's text side at serving time: class names -> vectors, through the text tower's engine.

Only two things run the text encoder: label-set writes (creating a set, adding classes: the
curator sends them *urgent*), and anonymous requests that bring their own candidate labels or ask
for text embeddings. Both go through a second :class:`service.engine.Engine`, so anonymous text work
gets what images get (the request's deadline, dropped when its client leaves, drain on SIGTERM, a
bounded queue with 429 + Retry-After, batching across requests), plus one thing images do not: a
running batch stops at its next transformer block once every request it serves has gone (a forward
pre-hook installed here, so clients that leave cost at most one block). A write waits for at most
the one anonymous batch running when it arrives (normal batches are sized to take about
``ANONYMOUS_BATCH_S``). Recently encoded candidate labels come from an LRU cache.

``calls`` counts encoder invocations so tests (and /metrics) can prove the query path never
touches it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.towers import TextSide
from service.engine import Abandoned, Engine, EngineCfg, EngineHooks
from service.errors import InvalidInput, NoTextSide

ANONYMOUS_BATCH_S = 0.03  # an anonymous batch takes about this long, so a write waits about that much
MAX_BATCH_PROMPTS = 256  # forward-pass rows per batch at most (what one exporter forward pass takes)
CACHE_SIZE = 4096  # encoded candidate labels kept (LRU)
WARM_UP_ROWS = 32  # forward-pass rows timed at start-up: the text engine's first rate estimate
QUEUED_REQUESTS = 4  # the anonymous queue holds this many maximal candidate-label requests (then 429)
Disconnected = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class Prompt:
    """One class name to encode, with the templates it is encoded with (None: the bundle's)."""

    name: str
    templates: tuple[str, ...] | None


class TextTower:
    """Class names -> normalised class vectors [N, D], exactly as the bundle's exporter computed them."""

    def __init__(
        self,
        side: TextSide | None,
        learned_prompts: bool,
        *,
        max_candidate_prompts: int,
        retry_after_s: int,
        hooks: EngineHooks | None = None,
        on_call: Callable[[int], None] | None = None,
    ) -> None:
        self.side = side
        self.learned_prompts = learned_prompts
        self.calls = 0
        self._on_call = on_call
        cfg = EngineCfg(
            max_batch_size=MAX_BATCH_PROMPTS,
            max_queued=max_candidate_prompts * QUEUED_REQUESTS,
            retry_after_s=retry_after_s,
            target_batch_s=ANONYMOUS_BATCH_S,
            tower="text",
        )
        self.engine: Engine[Prompt] = Engine(self._encode_batch, cfg, hooks, collate=list)
        if side is not None:  # a batch every client of which has left stops at the next transformer block
            for block in side.encoder.clip.transformer.resblocks:
                block.register_forward_pre_hook(self._stop_if_abandoned)
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[tuple[tuple[str, ...], str], np.ndarray] = OrderedDict()

    def _stop_if_abandoned(self, _module: object, _args: object) -> None:
        if self.engine.abandoned.is_set():
            raise Abandoned("every request of this text batch has gone")

    def warm_up(self) -> float:
        """Time one forward pass at start-up and give the engine its rate, so that the first anonymous
        batch is already sized to ``ANONYMOUS_BATCH_S`` (not the maximum, which on a big text side would
        hold a write, or run on for clients that left, for seconds). Not counted in ``calls``."""
        if self.side is None:
            return 0.0
        names = ["a warm-up"] * max(1, WARM_UP_ROWS // self._per_name(None))
        start = time.perf_counter()
        self.side.class_vectors(names, None)
        seconds = time.perf_counter() - start
        self.engine.seed_rate(seconds / self.prompts(len(names), None))
        return seconds

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
        return n_names * self._per_name(templates)

    def _per_name(self, templates: Sequence[str] | None) -> int:
        n_templates = len(templates) if templates else len(self.side.templates) if self.side is not None else 1
        return max(n_templates, 1)

    async def encode(
        self,
        names: Sequence[str],
        templates: Sequence[str] | None = None,
        *,
        urgent: bool,
        timeout_s: float,
        is_disconnected: Disconnected | None = None,
    ) -> np.ndarray:
        """[N, D] class vectors through the text engine (``urgent``: a label-set write)."""
        if self.side is None:
            raise NoTextSide("this bundle has no text side, so class names cannot be encoded at runtime")
        self.check_templates(templates)
        key = tuple(templates) if templates else None
        return await self.engine.embed(
            [Prompt(n, key) for n in names],
            timeout_s=timeout_s,
            is_disconnected=is_disconnected,
            urgent=urgent,
            cost=self._per_name(templates),
        )

    async def encode_cached(
        self,
        names: Sequence[str],
        templates: Sequence[str] | None,
        *,
        timeout_s: float,
        is_disconnected: Disconnected | None = None,
    ) -> np.ndarray:
        """Anonymous labels (normal priority): names seen recently with the same templates come from the LRU."""
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
            fresh = await self.encode(
                missing, templates, urgent=False, timeout_s=timeout_s, is_disconnected=is_disconnected
            )
            with self._cache_lock:
                for n, vec in zip(missing, fresh, strict=True):
                    out[n] = vec
                    self._cache[(key_t, n)] = vec
                    self._cache.move_to_end((key_t, n))
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return np.stack([out[n] for n in names])  # [N, D]

    def _encode_batch(self, batch: list[Prompt]) -> np.ndarray:
        """The engine's tower (on its thread): one forward pass per group of names sharing templates."""
        assert self.side is not None
        self.calls += 1
        if self._on_call is not None:
            self._on_call(len(batch))
        out: list[np.ndarray | None] = [None] * len(batch)
        groups: dict[tuple[str, ...] | None, list[int]] = {}
        for i, p in enumerate(batch):
            groups.setdefault(p.templates, []).append(i)
        for templates, rows in groups.items():
            names = [batch[i].name for i in rows]
            vectors = self.side.class_vectors(names, list(templates) if templates else None)
            for i, vec in zip(rows, vectors.detach().cpu().numpy().astype(np.float32), strict=True):
                out[i] = vec
        return np.stack(out)  # type: ignore[arg-type]  # [B, D], every row filled above
