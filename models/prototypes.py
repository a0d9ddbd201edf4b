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

A class with a name *and* examples combines both (:func:`combine`): the normalised weighted sum
of the unit text vector and the unit (gap-corrected) prototype, ``text_weight`` 0.5 by default
(the two equally).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

GapMode = Literal["centroid", "none"]
_EPS = 1e-12


@dataclass(frozen=True)
class Gap:
    """What moves image prototypes into the text cone: ``shift`` [D] = text - image centroid."""

    mode: GapMode
    text_centroid: np.ndarray  # [D] mean of the unit text class vectors
    image_centroid: np.ndarray | None  # [D] mean of unit in-domain image embeddings; None: unknown

    @property
    def shift(self) -> np.ndarray:
        """[D] added to an image mean to cross the gap; zeros when the image centroid is unknown."""
        if self.image_centroid is None:
            return np.zeros_like(self.text_centroid)
        return self.text_centroid - self.image_centroid

    @classmethod
    def between(cls, text_vectors: np.ndarray, image_embeddings: np.ndarray | None) -> Gap:
        """The gap between unit text vectors [N, D] and unit in-domain image embeddings [M, D] (or None)."""
        images = None if image_embeddings is None or len(image_embeddings) == 0 else centroid(image_embeddings)
        return cls.from_centroids(centroid(text_vectors), images)

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
    """[D] unit class vector from one class's example embeddings [K, D], moved across the gap.

    ``scale`` multiplies the class's own offset from the image centroid,
    ``normalise(text_centroid + scale * (mean - image_centroid))``; 1 is Liang et al.'s shift exactly.
    Smaller values pull the prototype toward the text centroid (measured in docs/experiments.md).
    """
    mean = centroid(embeddings)
    if gap.image_centroid is None:
        return normalise(mean).astype(np.float32)
    return normalise(gap.text_centroid + scale * (mean - gap.image_centroid)).astype(np.float32)


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
