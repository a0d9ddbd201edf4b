"""Class vectors from example images, in the space the class vectors live in (pure numpy).

A class made from examples is the mean of the student's image embeddings of those examples. Image
and text embeddings of CLIP-style models occupy two separate narrow cones (the *modality gap*),
so a plain image mean sits far from every text class vector and does not rank fairly against
them: an image is closer to *every* image prototype than to any text vector.

Correction used here (Liang, Zhang, Kwon, Yeung, Zou, "Mind the Gap: Understanding the Modality
Gap in Multi-modal Contrastive Representation Learning", NeurIPS 2022, sec. 4.2): the gap is the
difference of the two modalities' centroids, ``gap = mean(image embeddings) - mean(text
embeddings)`` (both of unit vectors); shifting image embeddings by ``-gap`` and renormalising
moves them into the text cone. We shift the *prototype* (the mean of the examples, which is the
same as shifting every example first), so queries are compared with it exactly as with text
class vectors:

    p = normalise(mean_k(x_k) - image_centroid + text_centroid)

``text_centroid`` is the mean of the bundle's shipped class vectors; ``image_centroid`` must come
from in-domain images (a bundle's calibration sample). Without one the gap cannot be estimated
and the prototype is the plain normalised mean (``gap="none"``): stated, never guessed.

The shift moves the prototype into the text cone but not onto the text vectors' *score scale*:
its cosines with in-domain images can vary with the image much more than a text vector's do
(image-image agreement is stronger than image-text agreement) or sit higher on average, so a
shifted prototype wins images of named classes (docs/experiments.md has the measurements). With the sample at hand
(``gap="standardised"``, the default where there is one), the prototype's sample scores are also
standardised to those of the shipped text vectors, Z-norm style (Auckenthaler, Carey,
Lloyd-Thomas, "Score Normalization for Text-Independent Speaker Verification Systems", Digital
Signal Processing 10, 2000: each model's scores normalised by their mean and spread over an
impostor cohort; here the cohort is the unlabeled in-domain sample). Scores are compared as raw
cosines with unit vectors, so the normalisation is folded into the vector (:func:`standardise`):
the class offset's scale ``s`` in ``normalise(text_centroid + s * (mean - image_centroid))`` is
chosen so that the standard deviation of the prototype's sample scores equals the text vectors'
median one, then a small component along the image centroid (onto which every in-domain image
projects almost equally) moves their mean to the text vectors' median mean.

A class with a name *and* examples combines both (:func:`combine`): the normalised weighted sum
of the unit text vector and the unit (gap-corrected) prototype, ``text_weight`` 0.5 by default
(the two equally).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

GapMode = Literal["standardised", "centroid", "none"]
_EPS = 1e-12
MAX_COHORT = 2000  # sample images the standardisation keeps (a bundle's calibration sample bound)
MAX_TEXTS = 1000  # text vectors whose sample scores give the target statistics (evenly spaced rows)


@dataclass(frozen=True)
class ScoreStats:
    """What a standardised prototype's scores over the cohort are matched to: the shipped text
    vectors' median mean and median standard deviation of their cosines with the cohort images."""

    mean: float
    std: float

    @classmethod
    def of_texts(cls, text_vectors: np.ndarray, cohort: np.ndarray) -> ScoreStats:
        texts = normalise(text_vectors)
        if len(texts) > MAX_TEXTS:
            texts = texts[np.linspace(0, len(texts) - 1, MAX_TEXTS).astype(int)]
        scores = cohort @ texts.T  # [M, N]
        return cls(float(np.median(scores.mean(0))), float(np.median(scores.std(0))))


@dataclass(frozen=True)
class Gap:
    """What moves image prototypes into the text cone: ``shift`` [D] = text - image centroid."""

    mode: GapMode
    text_centroid: np.ndarray  # [D] mean of the unit text class vectors
    image_centroid: np.ndarray | None  # [D] mean of unit in-domain image embeddings; None: unknown
    cohort: np.ndarray | None = None  # [M, D] unit in-domain images (mode "standardised")
    target: ScoreStats | None = None  # the text vectors' score statistics over the cohort

    @property
    def shift(self) -> np.ndarray:
        """[D] added to an image mean to cross the gap; zeros when the image centroid is unknown."""
        if self.image_centroid is None:
            return np.zeros_like(self.text_centroid)
        return self.text_centroid - self.image_centroid

    @classmethod
    def between(cls, text_vectors: np.ndarray, image_embeddings: np.ndarray | None, standardise: bool = True) -> Gap:
        """The gap between unit text vectors [N, D] and unit in-domain image embeddings [M, D] (or None);
        with images and ``standardise``, prototypes are also standardised (mode "standardised")."""
        if image_embeddings is None or len(image_embeddings) == 0:
            return cls.from_centroids(centroid(text_vectors), None)
        images = normalise(image_embeddings)
        if not standardise:
            return cls.from_centroids(centroid(text_vectors), images.mean(axis=0))
        cohort = images[np.linspace(0, len(images) - 1, min(len(images), MAX_COHORT)).astype(int)]
        target = ScoreStats.of_texts(text_vectors, cohort)
        return cls("standardised", centroid(text_vectors), images.mean(axis=0), cohort, target)

    @classmethod
    def from_centroids(cls, text_centroid: np.ndarray, image_centroid: np.ndarray | None) -> Gap:
        t = np.asarray(text_centroid, dtype=np.float64)
        if image_centroid is None:
            return cls("none", t, None)
        return cls("centroid", t, np.asarray(image_centroid, dtype=np.float64))


def normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), _EPS)


def centroid(vectors: np.ndarray) -> np.ndarray:
    """Mean of the L2-normalised rows of [N, D] (the rows are normalised first, as Liang et al.)."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or len(v) == 0:
        raise ValueError(f"need a non-empty [N, D] array, got shape {v.shape}")
    return normalise(v).mean(axis=0)


def image_prototype(embeddings: np.ndarray, gap: Gap, scale: float = 1.0) -> np.ndarray:
    """[D] unit class vector from one class's example embeddings [K, D], moved across the gap
    (and standardised, mode "standardised": :func:`standardise`).

    Mode "centroid": ``scale`` multiplies the class's own offset from the image centroid,
    ``normalise(text_centroid + scale * (mean - image_centroid))``; 1 is Liang et al.'s shift exactly.
    Smaller values pull the prototype toward the text centroid (measured in docs/experiments.md).
    """
    mean = centroid(embeddings)
    if gap.image_centroid is None:
        return normalise(mean).astype(np.float32)
    if gap.mode == "standardised":
        return standardise(mean - gap.image_centroid, gap).astype(np.float32)
    return normalise(gap.text_centroid + scale * (mean - gap.image_centroid)).astype(np.float32)


def standardise(offset: np.ndarray, gap: Gap, steps: int = 40, mean_steps: int = 4) -> np.ndarray:
    """[D] unit prototype from a class's offset from the image centroid whose cohort scores have the
    target standard deviation and mean (the Z-norm folded into the vector; module docstring).

    The standard deviation of ``cohort @ normalise(text_centroid + s * offset)`` grows with ``s``
    (from the text centroid's spread at 0 toward the offset direction's own); ``s`` is found by
    bisection within [0, 16] (clamped at its ends when the target is out of reach). The mean is then
    moved along the unit image centroid ``u``: ``p + (target - mean) / mean(cohort @ u) * u``, renormalised.
    """
    assert gap.cohort is not None and gap.target is not None and gap.image_centroid is not None
    cohort, target = gap.cohort, gap.target
    lo, hi = 0.0, 16.0
    for _ in range(steps):
        s = 0.5 * (lo + hi)
        spread = float((cohort @ normalise(gap.text_centroid + s * offset)).std())
        lo, hi = (s, hi) if spread < target.std else (lo, s)
    p = normalise(gap.text_centroid + 0.5 * (lo + hi) * offset)
    u = normalise(gap.image_centroid)
    reach = float((cohort @ u).mean())  # every in-domain image's projection on u, about |image centroid|
    for _ in range(mean_steps):
        p = normalise(p + (target.mean - float((cohort @ p).mean())) / reach * u)
    return p


def combine(text_vector: np.ndarray, prototype: np.ndarray, text_weight: float = 0.5) -> np.ndarray:
    """[D] unit vector of a class with a name and examples: normalised weighted sum of both (unit) parts."""
    if not 0.0 <= text_weight <= 1.0:
        raise ValueError(f"text_weight must be within [0, 1], got {text_weight}")
    mixed = text_weight * normalise(text_vector) + (1.0 - text_weight) * normalise(prototype)
    return normalise(mixed).astype(np.float32)


def class_vector(
    text_vector: np.ndarray | None, embeddings: np.ndarray | None, gap: Gap, text_weight: float = 0.5
) -> np.ndarray:
    """[D] the class vector of a name (``text_vector``), examples (``embeddings`` [K, D]) or both."""
    if embeddings is None or len(embeddings) == 0:
        if text_vector is None:
            raise ValueError("a class needs a name (text vector) or examples")
        return normalise(text_vector).astype(np.float32)
    proto = image_prototype(embeddings, gap)
    return proto if text_vector is None else combine(text_vector, proto, text_weight)
