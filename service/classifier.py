"""The one classify pipeline every request walks, in this order:

1. cheap checks (top_k, image count, candidate labels clean, template allowed, label set exists);
2. candidate labels only: their vectors from the text tower's engine (bounded text work per request;
   the engine's deadline, client-gone drop and 429 like images; label-set writes go first);
3. admission: the request's images are admitted or refused (429 + Retry-After) before decoding;
4. decode + preprocess in a bounded pool (the image encoder's own preprocessor);
5. the image tower's batching engine (the encoder thread);
6. search in a worker thread (only a small one, up to ``INLINE_SEARCH_WORK``, on the event loop);
7. the response.

Every refusal is a domain exception from :mod:`service.errors`; routes only parse and call
:meth:`Classifier.classify`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.admission import Admission
from service.calibration import Calibrator, OperatingPoint, check_unknown_policy
from service.capture import Capture
from service.engine import Engine, EngineHooks
from service.errors import EmptyLabelSet, InvalidInput
from service.images import EncodedImage, ImagePreprocessor, decode_base64_image
from service.index import Ranked, Snapshot, adhoc_rank
from service.names import clean_names, clean_templates
from service.registry import Registry
from service.schemas import ClassifyResponse, ImageResult, Prediction
from service.settings import Settings
from service.text import TextTower

UNKNOWN = "unknown"
# Searches up to this many multiply-adds (e.g. one image x 512 dims x 2,048 classes) run on the event
# loop: ~0.1 ms, less than handing them to a thread and back. Bigger ones (large label sets, batches,
# IVF) go to the search pool and never block other requests.
INLINE_SEARCH_WORK = 1 << 20
RETIRE_POLL_S = 0.01  # how often a retired image engine checks whether its last request has finished
Disconnected = Callable[[], Awaitable[bool]]


@dataclass
class ClassifyJob:
    """A parsed classify request (JSON or multipart), not yet checked."""

    images: list[EncodedImage | str]  # uploads, or base64 / data: URI strings from JSON
    label_set: str = "default"
    top_k: int = 5
    candidate_labels: list[str] | None = None
    hypothesis_template: str | None = None
    unknown_threshold: float | None = None
    min_version: int | None = None  # answer from the label set at least this new
    hf_single: bool | None = None  # Hugging Face request shape: answer in it (True: one image, flat list)
    unknown: str | None = None  # "calibrated": threshold from the bundle's calibration sample
    acceptance: float | None = None  # with unknown="calibrated" (default 0.95)
    capture: bool = True  # False: none of these images is kept for re-distillation (service/capture.py)


@dataclass
class _Plan:
    """What the cheap checks established."""

    snapshot: Snapshot | None  # label-set requests
    names: list[str] | None  # candidate-label requests
    templates: list[str] | None


class PipelineHooks(EngineHooks):
    """Image-engine observations go to the metrics and to admission's service-time estimate."""

    def __init__(self, metrics: EngineHooks, admission: Admission) -> None:
        self.metrics = metrics
        self.admission = admission

    def batch(self, tower: str, size: int, seconds: float) -> None:
        self.metrics.batch(tower, size, seconds)
        self.admission.observe_encode(seconds, size)

    def depth(self, tower: str, depth: int) -> None:
        self.metrics.depth(tower, depth)

    def dropped(self, tower: str, reason: str, n: int) -> None:
        self.metrics.dropped(tower, reason, n)

    def rejected(self, tower: str, reason: str) -> None:
        self.metrics.rejected(tower, reason)


class Classifier:
    """Orchestrates one classify request; owns the decode and search worker pools."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry,
        text: TextTower,
        engine: Engine[np.ndarray],
        preprocess: ImagePreprocessor,
        admission: Admission,
        logit_scale: float,
        on_images: Callable[[int], None] | None = None,
        model_version: str = "",
        calibration: Calibrator | None = None,
        capture: Capture | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.text = text
        self.engine = engine
        self.preprocess = preprocess
        self.model_version = model_version  # the bundle whose image tower serves (models.card.bundle_version)
        self._users: collections.Counter[int] = collections.Counter()  # requests per image engine (by id)
        self.admission = admission
        self.logit_scale = logit_scale
        self._on_images = on_images or (lambda n: None)
        self.calibration = calibration or Calibrator(None, None, logit_scale)
        self.capture = capture or Capture(None)
        self._decode_pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        # searches set their own FAISS / BLAS threads (service/index.py); a pool apart from the default
        # executor, so label-set writes and store reads never queue searches behind them
        self._search_pool = ThreadPoolExecutor(2, thread_name_prefix="search")

    def close(self) -> None:
        for pool in (self._decode_pool, self._search_pool):
            pool.shutdown(wait=True, cancel_futures=True)

    async def classify(self, job: ClassifyJob, is_disconnected: Disconnected | None = None) -> ClassifyResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        tower, model = (self.engine, self.preprocess), self.model_version  # one image tower per request
        with self._using(tower[0]):
            plan = await self._check(job)
            vectors = await self._candidate_vectors(plan, deadline, is_disconnected) if plan.names is not None else None
            point = await self._operating_point(job, plan, vectors) if job.unknown == "calibrated" else None
            emb = await self.embed_images(job.images, deadline, is_disconnected, tower)  # [B, D]
        if job.capture:
            self.capture.offer(job.images)  # a sample, kept off the request path (service/capture.py)
        if plan.snapshot is not None:
            snap = plan.snapshot
            ranked = await self._search(emb.size * len(snap), snap.search, emb, job.top_k, self.logit_scale)
            return self._response(snap.name, snap.version, ranked, snap.label, job, model, point)
        assert vectors is not None and plan.names is not None
        ranked = await self._search(emb.size * len(vectors), adhoc_rank, emb, vectors, self.logit_scale, job.top_k)
        names = plan.names
        return self._response(None, None, ranked, lambda i: names[i], job, model, point)

    async def _operating_point(self, job: ClassifyJob, plan: _Plan, vectors: np.ndarray | None) -> OperatingPoint:
        """The calibrated threshold of this set version (or these candidate labels) at the asked acceptance."""
        labels = (plan.names, plan.templates, vectors) if vectors is not None and plan.names is not None else None
        return await self.calibration.for_request(job.acceptance, plan.snapshot, labels, self._search_pool)

    @contextlib.contextmanager
    def _using(self, engine: Engine[np.ndarray]) -> Iterator[None]:
        """Count the requests that took ``engine``: a retired one stops only when none is left."""
        self._users[id(engine)] += 1
        try:
            yield
        finally:
            self._users[id(engine)] -= 1
            if not self._users[id(engine)]:
                del self._users[id(engine)]

    async def retire(self, engine: Engine[np.ndarray], timeout_s: float) -> None:
        """After a swap (service/reload.py): wait until no request holds ``engine``, then drain and stop it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._users.get(id(engine)) and loop.time() < deadline:
            await asyncio.sleep(RETIRE_POLL_S)
        await engine.stop(max(deadline - loop.time(), 1.0))

    async def _search(self, work: int, rank: Callable[..., Ranked], *args: Any) -> Ranked:
        """A search of ``work`` multiply-adds (images x dim x classes): on the event loop when small (a
        thread hop costs more than it), else in the search pool so that the loop keeps serving."""
        if work <= INLINE_SEARCH_WORK:
            return rank(*args)
        return await asyncio.get_running_loop().run_in_executor(self._search_pool, rank, *args)

    async def embed_images(
        self,
        images: Sequence[EncodedImage | str],
        deadline: float,
        is_disconnected: Disconnected | None = None,
        tower: tuple[Engine[np.ndarray], ImagePreprocessor] | None = None,
    ) -> np.ndarray:
        """Admission, then decode + preprocess in the pool, then the engine: [B, D] embeddings.

        The image tower (preprocessor + engine) is taken once, here: a reload (service/reload.py) that
        swaps it meanwhile never mixes one tower's preprocessing with the other's encoder.
        """
        loop = asyncio.get_running_loop()
        engine, preprocess = tower or (self.engine, self.preprocess)
        with self._using(engine), self.admission.admit(len(images)):
            prepare = functools.partial(self._prepare, preprocess)
            futures = [loop.run_in_executor(self._decode_pool, prepare, im, i) for i, im in enumerate(images)]
            done = await asyncio.gather(*futures, return_exceptions=True)  # all finished: slots stay honest
            errors = [d for d in done if isinstance(d, BaseException)]
            if errors:
                raise errors[0]
            pixels = np.stack([d for d in done if isinstance(d, np.ndarray)])  # [B, 3, H, W]
            return await engine.embed(pixels, timeout_s=deadline - loop.time(), is_disconnected=is_disconnected)

    async def embed_image_inputs(
        self, images: Sequence[str], is_disconnected: Disconnected | None = None
    ) -> np.ndarray:
        """/v1/embeddings images: the same caps, admission, decode and engine as classify; [B, D]."""
        self._check_image_count(len(images))
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        return await self.embed_images(list(images), deadline, is_disconnected)

    async def embed_texts(
        self, texts: Sequence[str], is_disconnected: Disconnected | None = None
    ) -> tuple[np.ndarray, int]:
        """/v1/embeddings texts: the class vectors these names would get, [N, D], as anonymous text work
        (same limits as candidate_labels); also the prompts it cost."""
        unique = list(dict.fromkeys(texts))  # repeated texts are fine here (unlike class names)
        plan = self._text_plan(unique, None)
        assert plan.names is not None
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        vectors = await self._candidate_vectors(plan, deadline, is_disconnected)  # [U, D], in the order of `unique`
        rows = [unique.index(t) for t in texts]
        return vectors[rows], self.text.prompts(len(plan.names), plan.templates)

    def _prepare(self, preprocess: ImagePreprocessor, image: EncodedImage | str, index: int) -> np.ndarray:
        start = time.perf_counter()
        if isinstance(image, str):
            image = decode_base64_image(image, index, self.settings.max_image_bytes)
        pixels = preprocess(image, index)  # [3, H, W]
        self.admission.observe_decode(time.perf_counter() - start)
        return pixels

    def _check_image_count(self, n: int) -> None:
        if n > self.settings.max_images_per_request:
            raise InvalidInput(f"{n} images, at most {self.settings.max_images_per_request} per request")

    def _text_plan(self, labels: Sequence[str], template: str | None) -> _Plan:
        """Clean open-vocabulary labels and bound their text work (labels x templates), before any work."""
        s = self.settings
        names = clean_names(labels, s.max_labels_per_request, s.max_name_length, "candidate_labels")
        templates = clean_templates([template], 1) if template is not None else None
        self.text.check_templates(templates)
        prompts = self.text.prompts(len(names), templates)
        if prompts > s.max_candidate_prompts:
            raise InvalidInput(
                f"candidate_labels: {len(names)} labels x {prompts // len(names)} template(s) = {prompts} "
                f"text prompts, at most {s.max_candidate_prompts} per request (max_candidate_prompts); "
                "send fewer labels, or create a label set for a large vocabulary"
            )
        return _Plan(None, names, templates)

    async def _check(self, job: ClassifyJob) -> _Plan:
        s = self.settings
        if not 1 <= job.top_k <= s.max_top_k:
            raise InvalidInput(f"top_k: must be between 1 and {s.max_top_k}")
        if not job.images:
            raise InvalidInput("no images: send 'images' (JSON), 'inputs' (Hugging Face shape) or multipart 'files'")
        self._check_image_count(len(job.images))
        check_unknown_policy(job.unknown, job.acceptance, job.unknown_threshold, self.calibration)
        if job.candidate_labels is not None:
            return self._text_plan(job.candidate_labels, job.hypothesis_template)
        if job.hypothesis_template is not None:
            raise InvalidInput("hypothesis_template applies to candidate_labels only; label sets are already encoded")
        # this version answers the request (a lagging replica may wait briefly for min_version)
        snap = await asyncio.to_thread(self.registry.get, job.label_set, job.min_version)
        if len(snap) == 0:
            raise EmptyLabelSet(f"label set {job.label_set!r} has no classes; add some first")
        return _Plan(snap, None, None)

    async def _candidate_vectors(
        self, plan: _Plan, deadline: float, is_disconnected: Disconnected | None
    ) -> np.ndarray:
        """Candidate-label vectors [C, D]: anonymous work on the text engine (429 when its queue is full)."""
        assert plan.names is not None
        timeout_s = deadline - asyncio.get_running_loop().time()
        return await self.text.encode_cached(
            plan.names, plan.templates, timeout_s=timeout_s, is_disconnected=is_disconnected
        )

    def _response(
        self,
        label_set: str | None,
        version: int | None,
        ranked: Ranked,
        label: Callable[[int], str],
        job: ClassifyJob,
        model: str,
        point: OperatingPoint | None = None,
    ) -> ClassifyResponse:
        results = []
        for b in range(ranked.ids.shape[0]):
            preds = [
                Prediction(class_id=int(i), label=label(int(i)), score=float(s), cosine=float(c))
                for i, s, c in zip(ranked.ids[b], ranked.scores[b], ranked.cosines[b], strict=True)
            ]
            unknown = job.unknown_threshold is not None and preds[0].cosine < job.unknown_threshold
            unknown = unknown or (point is not None and point.rejects(preds[0].cosine, preds[0].score))
            results.append(
                ImageResult(index=b, label=UNKNOWN if unknown else preds[0].label, unknown=unknown, predictions=preds)
            )
        self._on_images(len(results))
        operating = point.describe(version) if point is not None else None
        return ClassifyResponse(
            label_set=label_set, version=version, model=model, results=results, operating_point=operating
        )
