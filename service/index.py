"""Immutable label-set snapshots: FAISS ``IndexIDMap2(IndexFlatIP)`` over normalised class vectors.

A snapshot is never mutated: a change builds a new one and the registry swaps the reference, so a
request that already holds a snapshot finishes on it (and reports its version).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.store import SetRows

log = logging.getLogger(__name__)


def _faiss() -> Any:
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and int(getattr(faiss, "get_num_gpus", lambda: 0)()) > 0


_GPU_RESOURCES: Any = None


def build_index(ids: np.ndarray, vectors: np.ndarray, use_gpu: bool) -> tuple[Any, bool]:
    """Exact inner-product index with our class ids; on the GPU when asked and possible."""
    global _GPU_RESOURCES
    faiss = _faiss()
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    if use_gpu and gpu_available():
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index), True
    return index, False


def normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Ranked:
    """Per image, best first: ids [B, k], cosines [B, k], softmax scores [B, k]."""

    ids: np.ndarray
    cosines: np.ndarray
    scores: np.ndarray


def rank(cosines_all: np.ndarray, ids_all: np.ndarray, logit_scale: float, top_k: int) -> Ranked:
    """Softmax over every class (with the bundle's logit scale) and the top-k of it.

    ``cosines_all`` [B, N] in descending order per row with matching ``ids_all`` [B, N].
    """
    logits = logit_scale * cosines_all.astype(np.float64)  # [B, N]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(top_k, cosines_all.shape[1])
    return Ranked(ids=ids_all[:, :k], cosines=cosines_all[:, :k], scores=probs[:, :k])


@dataclass(frozen=True)
class Snapshot:
    """One version of one label set: rows + the FAISS index built from exactly those rows."""

    name: str
    version: int
    ids: np.ndarray  # [N] int64
    names: list[str]
    provenance: list[str]
    vectors: np.ndarray  # [N, D] float32, L2-normalised
    index: Any
    on_gpu: bool = False
    _by_id: dict[int, int] = field(default_factory=dict)
    _gpu_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_rows(cls, rows: SetRows, use_gpu: bool = False) -> Snapshot:
        vectors = normalise(rows.vectors) if len(rows.ids) else rows.vectors
        index, on_gpu = build_index(rows.ids, vectors, use_gpu)
        by_id = {int(i): k for k, i in enumerate(rows.ids)}
        return cls(rows.name, rows.version, rows.ids, rows.names, rows.provenance, vectors, index, on_gpu, by_id)

    def __len__(self) -> int:
        return len(self.ids)

    def label(self, class_id: int) -> str:
        return self.names[self._by_id[class_id]]

    def index_ids(self) -> np.ndarray:
        """The ids the FAISS index holds (CPU indexes), for consistency checks."""
        if self.on_gpu:
            return self.ids
        return np.sort(_faiss().vector_to_array(self.index.id_map).astype(np.int64))

    def search(self, embeddings: np.ndarray, top_k: int, logit_scale: float) -> Ranked:
        """embeddings [B, D] (normalised) -> top-k with softmax over the whole set."""
        n = int(self.index.ntotal)
        query = np.ascontiguousarray(embeddings, dtype=np.float32)
        if self.on_gpu:  # GPU indexes are not thread-safe
            with self._gpu_lock:
                cos, ids = self.index.search(query, n)
        else:
            cos, ids = self.index.search(query, n)  # [B, N] each, best first
        return rank(cos, ids, logit_scale, top_k)


def adhoc_rank(embeddings: np.ndarray, vectors: np.ndarray, logit_scale: float, top_k: int) -> Ranked:
    """Request-local candidate labels (no index): ids are positions in the candidate list."""
    cos = embeddings.astype(np.float32) @ vectors.T  # [B, C]
    order = np.argsort(-cos, axis=1, kind="stable")
    return rank(np.take_along_axis(cos, order, axis=1), order.astype(np.int64), logit_scale, top_k)
