"""The calibrated "unknown": a score threshold per label-set version, derived from the bundle's
calibration sample (in-domain image embeddings stored at export, models/calibration.py).

For a set (or a request's candidate labels) and an acceptance rate ``a`` (default 0.95), the
threshold is the ``1 - a`` quantile of the sample's top-1 scores against the set's current vectors
(numpy's weighted ``method="inverted_cdf"``: sample images of at least ``a`` of the weight score at
or above it), so the operating point stays calibrated as classes are added or removed. An image
whose top-1 score is below the threshold is answered ``unknown``.

Which sample images count, and how much: the sample covers the whole domain, and a set usually
names only part of it (5 of 10 digits). A threshold accepting 95 % of *all* sample images would
also accept 95 % of the images of classes the set lacks. So each sample image is weighted by the
probability that its class is one of the set's: the model's own softmax (the bundle's logit
scale) over the set's classes plus the bundle's vocabulary (its stored label sets) less the
vocabulary classes the set already has. The weighted quantile then estimates the score
distribution of the set's own in-domain images. (Counting only the images whose top-1 is one of
the set's was measured too: it keeps the confidently classified images only and sets the
threshold too high; see docs/experiments.md.) A set that covers the vocabulary weighs every image 1.

The score is the top-1 cosine (``SCORE``): it is what the raw ``unknown_threshold`` compares, it
does not depend on the other classes, and the open-set figures in BENCHMARKS.md compare it with
the top-1 softmax probability.

Computing a version's scores is one search of the sample (<= 2,000 images) and of the vocabulary
against the set; it is
done once per (set, version) — thresholds for every acceptance rate come from the same sorted
scores — off the event loop for big sets, and shared by concurrent requests.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.bundle import Bundle
from models.calibration import centroid
from service import schemas
from service.errors import InvalidInput
from service.index import Ranked, Snapshot, adhoc_rank, normalise

ScoreKind = Literal["cosine", "softmax"]
SCORE: ScoreKind = "cosine"
DEFAULT_ACCEPTANCE = 0.95
MIN_ROWS = 20  # expected sample images of the set's classes a threshold must rest on (fewer: refused)
MAX_WORK = 20_000_000_000  # multiply-adds one version's calibration may cost (a few seconds on 2 cores)
MIN_SAMPLE = 256  # sample images searched at least, however large the set
CACHE_ENTRIES = 64  # (set, version) and candidate-label entries kept
DUPLICATE_COSINE = 1.0 - 1e-5  # a vocabulary class the set already has (float error apart)


class NoCalibrationSample(InvalidInput):
    """The bundle has no calibration sample (or too little of it concerns this set)."""

    code = "no_calibration_sample"


def threshold(scores: np.ndarray, acceptance: float, weights: np.ndarray | None = None) -> float:
    """The ``1 - acceptance`` quantile (numpy's method "inverted_cdf", optionally weighted) of
    ``scores`` [M]: at least ``acceptance`` of the (weighted) scores are >= the result."""
    if not 0.0 < acceptance <= 1.0:
        raise InvalidInput(f"acceptance: must be within (0, 1], got {acceptance}")
    return float(np.quantile(scores, 1.0 - acceptance, method="inverted_cdf", weights=weights))


def top1(ranked: Ranked, kind: ScoreKind) -> np.ndarray:
    """The top-1 score per row [M] of a ranking."""
    return (ranked.cosines if kind == "cosine" else ranked.scores)[:, 0].astype(np.float64)


@dataclass(frozen=True)
class SetScores:
    """The sample against one version of one set (or one candidate list)."""

    scores: np.ndarray  # [M] top-1 scores
    weights: np.ndarray  # [M] probability that the image's class is one of the set's
    sample_size: int  # M

    @property
    def rows(self) -> int:
        """Expected number of sample images of the set's classes."""
        return round(float(self.weights.sum()))

    def threshold(self, acceptance: float) -> float:
        return threshold(self.scores, acceptance, self.weights)


@dataclass(frozen=True)
class OperatingPoint:
    """What a calibrated answer used; reported with it."""

    threshold: float
    acceptance: float
    score: ScoreKind
    rows: int  # expected sample images of the set's classes the threshold rests on
    sample_size: int

    def rejects(self, cosine: float, softmax: float) -> bool:
        """Whether an image whose top-1 has these scores is answered 'unknown'."""
        return (cosine if self.score == "cosine" else softmax) < self.threshold

    def describe(self, version: int | None) -> schemas.OperatingPoint:
        return schemas.OperatingPoint(
            score=self.score,
            threshold=self.threshold,
            acceptance=self.acceptance,
            version=version,
            calibration_images=self.rows,
        )


def bundle_calibrator(bundle: Bundle) -> Calibrator:
    """The calibrator of a loaded bundle: its sample (if any), its stored class vectors as vocabulary."""
    sample = None if bundle.calibration is None else bundle.calibration.float().numpy()
    vectors = [v.float().numpy() for v in bundle.class_vectors.values() if len(v)]
    vocabulary = np.unique(np.concatenate(vectors), axis=0) if vectors else None
    return Calibrator(sample, vocabulary, float(bundle.manifest.logit_scale))


def check_unknown_policy(
    unknown: str | None, acceptance: float | None, unknown_threshold: float | None, calibrator: Calibrator
) -> None:
    """The request's unknown policy is consistent (422 otherwise) and possible with this bundle."""
    if unknown is None:
        if acceptance is not None:
            raise InvalidInput("acceptance applies to unknown='calibrated' only")
        return
    if unknown != "calibrated":
        raise InvalidInput(f"unknown: {unknown[:40]!r} is not a policy; the one policy is 'calibrated'")
    if unknown_threshold is not None:
        raise InvalidInput("send either unknown='calibrated' or a raw unknown_threshold, not both")
    if acceptance is not None and not 0.0 < acceptance <= 1.0:
        raise InvalidInput(f"acceptance: must be within (0, 1], got {acceptance}")
    calibrator.require()


def membership(
    ranked: Ranked, vocabulary_logits: np.ndarray | None, duplicated: np.ndarray | None, scale: float
) -> np.ndarray:
    """P(class in the set) per sample image [M]: the softmax mass of the set's classes among (the set's
    classes + the vocabulary classes not ``duplicated`` in it).

    ``ranked``: the sample against the set (top-1 cosine and softmax probability give the set's
    partition function, also for sets too large to score in full); ``vocabulary_logits`` [M, V]:
    ``scale * cosine`` of the sample and the vocabulary.
    """
    if vocabulary_logits is None:
        return np.ones(len(ranked.cosines), dtype=np.float64)
    rest = vocabulary_logits if duplicated is None else vocabulary_logits[:, ~duplicated]
    if rest.shape[1] == 0:
        return np.ones(len(ranked.cosines), dtype=np.float64)
    # log Z_set = s * cos_top - log p_top  (p_top = exp(s * cos_top) / Z_set)
    log_z_set = scale * ranked.cosines[:, 0].astype(np.float64) - np.log(ranked.scores[:, 0].astype(np.float64))
    peak = rest.max(1)
    log_z_rest = peak + np.log(np.exp(rest - peak[:, None]).sum(1))
    return 1.0 / (1.0 + np.exp(np.clip(log_z_rest - log_z_set, -700, 700)))


def set_scores(ranked: Ranked, weights: np.ndarray, kind: ScoreKind = SCORE) -> SetScores:
    """The sample's ranking against a set (top-1 at least) and each image's membership weight."""
    return SetScores(top1(ranked, kind), weights, len(weights))


class Calibrator:
    """Per-version thresholds from one bundle's calibration sample (``None``: the bundle has none).

    ``vocabulary`` [V, D]: the bundle's stored class vectors (what the sample's images are of).
    """

    def __init__(
        self,
        sample: np.ndarray | None,
        vocabulary: np.ndarray | None,
        logit_scale: float,
        kind: ScoreKind = SCORE,
        inline_work: int = 1 << 20,
    ) -> None:
        self.inline_work = inline_work  # searches up to this many multiply-adds run on the event loop
        self.sample = None if sample is None else normalise(np.asarray(sample, dtype=np.float32))  # [M, D]
        self.logit_scale = logit_scale
        self.kind = kind
        #: the in-domain image centroid [D] (mean of the sample's rows; not normalised), e.g. for modality-gap
        #: corrections of classes built from example images
        self.centroid = None if self.sample is None else centroid(self.sample)
        # a fixed uniform order of the sample: huge sets search a prefix of it (rows_within)
        self._order = np.random.default_rng(0).permutation(0 if self.sample is None else len(self.sample))
        self.vocabulary: np.ndarray | None = None  # [V, D]
        self.vocabulary_logits: np.ndarray | None = None  # [M, V] scale * cosine, float64
        if self.sample is not None and vocabulary is not None and len(vocabulary):
            self.vocabulary = normalise(np.asarray(vocabulary, dtype=np.float32))
            self.vocabulary_logits = logit_scale * (self.sample @ self.vocabulary.T).astype(np.float64)
        self._cache: OrderedDict[Hashable, SetScores] = OrderedDict()
        self._pending: dict[Hashable, asyncio.Future[SetScores]] = {}

    @property
    def available(self) -> bool:
        return self.sample is not None

    def require(self) -> np.ndarray:
        """The sample, or a 422 saying why a calibrated answer is impossible here."""
        if self.sample is None:
            raise NoCalibrationSample(
                "unknown='calibrated' needs a calibration sample, and this bundle has none; re-export it with "
                "one (PromptKD / MoPD exports store it; zero-shot: promptdistill bundle zeroshot "
                "--calibration-images DIR), or send a raw unknown_threshold"
            )
        return self.sample

    def work(self, n_classes: int) -> int:
        """Multiply-adds of one calibration search against ``n_classes`` classes."""
        return 0 if self.sample is None else self.sample.size * n_classes

    async def point(
        self,
        key: Hashable,
        search: Callable[[np.ndarray], Ranked],
        n_classes: int,
        acceptance: float,
        pool: Executor | None = None,
    ) -> OperatingPoint:
        """The operating point for ``key`` (e.g. (set, version)) at ``acceptance``.

        ``search(sample)`` ranks the sample against the set's ``n_classes`` classes (top-1 suffices).
        Computed once per key, in ``pool`` unless small; concurrent requests for one key share it.
        """
        self.require()
        rows = self.rows_within(n_classes)
        inline = self.work(n_classes) <= self.inline_work
        scores = await self._scores(key, lambda: self.scores_for(search, rows=rows), None if inline else pool)
        if scores.rows < MIN_ROWS:
            raise NoCalibrationSample(
                f"only about {scores.rows} of the {scores.sample_size} calibration images are of this set's classes "
                f"(at least {MIN_ROWS} are needed to calibrate); send a raw unknown_threshold instead"
            )
        return OperatingPoint(scores.threshold(acceptance), acceptance, self.kind, scores.rows, scores.sample_size)

    def rows_within(self, n_classes: int) -> int:
        """Sample images searched against a set of ``n_classes``: all of them unless that would cost more
        than ``MAX_WORK`` multiply-adds (a huge exact set), then fewer, never below ``MIN_SAMPLE``."""
        sample = self.require()
        per_row = max(1, n_classes * sample.shape[1])
        return int(min(len(sample), max(MIN_SAMPLE, MAX_WORK // per_row)))

    def scores_for(
        self, search: Callable[[np.ndarray], Ranked], kind: ScoreKind | None = None, rows: int | None = None
    ) -> SetScores:
        """The sample's top-1 scores against a set and their membership weights (blocking).

        ``search(queries)`` ranks queries [Q, D] against the set (top-1 suffices). ``rows``: use a seeded
        uniform draw of that many sample images (default: all).
        """
        sample = self.require()
        pick = None if rows is None or rows >= len(sample) else self._order[:rows]
        if pick is not None:
            sample = sample[pick]
        ranked = search(sample)
        duplicated = None
        if self.vocabulary is not None:
            duplicated = search(self.vocabulary).cosines[:, 0] >= DUPLICATE_COSINE  # [V] the set has them
        logits = self.vocabulary_logits
        if logits is not None and pick is not None:
            logits = logits[pick]
        weights = membership(ranked, logits, duplicated, self.logit_scale)
        return set_scores(ranked, weights, kind or self.kind)

    async def for_request(
        self,
        acceptance: float | None,
        snapshot: Snapshot | None,
        candidates: tuple[Sequence[str], Sequence[str] | None, np.ndarray] | None,
        pool: Executor | None = None,
    ) -> OperatingPoint:
        """The operating point of a classify request: against a label set's snapshot, or against
        ``candidates`` (labels, templates, their vectors [C, D])."""
        rate = DEFAULT_ACCEPTANCE if acceptance is None else acceptance
        scale = self.logit_scale
        if snapshot is not None:
            snap = snapshot
            key: Hashable = ("set", snap.name, snap.version)
            return await self.point(key, lambda s: snap.search(s, 1, scale), len(snap), rate, pool)
        assert candidates is not None
        names, templates, vectors = candidates
        key = ("labels", tuple(names), tuple(templates or ()))
        return await self.point(key, lambda s: adhoc_rank(s, vectors, scale, 1), len(vectors), rate, pool)

    async def _scores(self, key: Hashable, compute: Callable[[], SetScores], pool: Executor | None) -> SetScores:
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[SetScores] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            scores = compute() if pool is None else await asyncio.get_running_loop().run_in_executor(pool, compute)
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._pending[key]
        future.set_result(scores)
        self._cache[key] = scores
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return scores
