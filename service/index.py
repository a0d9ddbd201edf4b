"""Immutable label-set snapshots and their search: exact (flat) or approximate (IVF) per label set.

A snapshot is never mutated: a change builds a new one and the registry swaps the reference, so a
request that already holds a snapshot finishes on it (and reports its version).

Scores are a softmax over *every* class of the set (``logit_scale * cosine``). Nothing materialises a
sorted N-list:

* ``flat`` (exact): one pass of FAISS's SIMD inner products per image writes all N cosines into a
  reused per-thread buffer; the top-k is selected from it, and the same buffer gives the exact
  softmax denominator ``sum(exp(s * (cos - max)))`` (no sorted N-list, no N-sized allocation).
* ``ivf`` (approximate, for >= 100k classes): FAISS ``IndexIVFFlat`` finds the ``IVF_HEAD`` best
  candidates (exact cosines, probably-best ids); the denominator is exact over those and
  *estimated* for the rest from a fixed uniform sample of the set (``TAIL_SAMPLE`` rows), so scores
  carry a small sampling error (bench/labelsets.py measures it, and recall@k, against ``flat``).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.settings import IVF_MIN_CLASSES  # below it an IVF set is searched exactly
from service.store import SetRows

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf")
IVF_HEAD = 256  # candidates whose softmax terms are computed exactly on an IVF set
TAIL_SAMPLE = 16_384  # rows that estimate the rest of an IVF set's softmax denominator
_CHUNK = 8192  # columns per top-k selection step (its temporaries stay on the heap)
_BLOCK = 8_000_000  # cosines computed at once (32 MB per searching thread): 16 images x 1M classes are split


@dataclass(frozen=True)
class SearchCfg:
    """How snapshots are built and searched (service settings; one per registry)."""

    default_kind: IndexKind = "flat"  # for sets created without an explicit kind
    nprobe: int = 32  # IVF lists visited per query
    faiss_threads: int = 1  # OpenMP threads of the searching thread (one query per image: 1 is fastest)
    use_gpu: bool = False


def _faiss() -> Any:
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and int(getattr(faiss, "get_num_gpus", lambda: 0)()) > 0


_GPU_RESOURCES: Any = None
_THREAD = threading.local()


def set_search_threads(n: int) -> None:
    """OpenMP's thread count is a per-thread setting: apply it on the thread that searches (once)."""
    if getattr(_THREAD, "faiss_threads", None) != n:
        _faiss().omp_set_num_threads(n)
        _THREAD.faiss_threads = n


def limit_blas_threads(n: int) -> None:
    """numpy's BLAS (the softmax denominator's GEMM) is one process-wide pool: one query per image gains
    nothing from fan-out, and on a loaded 2-core machine 2 threads measured ~10x slower than 1."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")


def normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Ranked:
    """Per image, best first: ids [B, k], cosines [B, k], softmax scores [B, k]."""

    ids: np.ndarray
    cosines: np.ndarray
    scores: np.ndarray


def _top_k(cos: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest per row, best first (ties: lower index first). cos [B, N]."""
    n = cos.shape[1]
    part = np.argpartition(-cos, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(cos), 1))
    vals = np.take_along_axis(cos, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)  # primary: cosine descending; then index
    return np.take_along_axis(part, order, axis=1)


def _scores(top_cos: np.ndarray, log_denominator: np.ndarray, top_max: np.ndarray, scale: float) -> np.ndarray:
    """softmax terms of the top-k: exp(s * (cos - max) - log Z'), Z' = sum exp(s * (cos - max))."""
    logits = scale * (top_cos.astype(np.float64) - top_max[:, None])
    return np.exp(logits - log_denominator[:, None])


def _workspace(rows: int, cols: int) -> np.ndarray:
    """A per-thread float32 [rows, cols] buffer, reused: fresh multi-MB arrays cost a page fault per 4 kB."""
    buf: np.ndarray | None = getattr(_THREAD, "buffer", None)
    if buf is None or buf.size < rows * cols:
        buf = np.empty(rows * cols, dtype=np.float32)
        _THREAD.buffer = buf
    return buf[: rows * cols].reshape(rows, cols)


def log_partition(query: np.ndarray, vectors: np.ndarray, best: np.ndarray, scale: float) -> np.ndarray:
    """log sum_j exp(scale * (cos_j - best)) per query [B], exact over all N rows of ``vectors``.

    query [B, D] float32, vectors [N, D], best [B] float32 (the top cosine: keeps every term <= 1).
    One GEMM per block of queries into a reused buffer; exp in place in float32, summed in float64.
    """
    out = np.empty(len(query), dtype=np.float64)
    rows = max(1, _BLOCK // max(1, len(vectors)))
    for s in range(0, len(query), rows):
        q = query[s : s + rows]
        cos = np.matmul(q, vectors.T, out=_workspace(len(q), len(vectors)))  # [b, N]
        cos -= best[s : s + rows, None]
        cos *= np.float32(scale)
        np.exp(cos, out=cos)
        out[s : s + rows] = np.log(cos.sum(axis=1, dtype=np.float64))
    return out


def _top_k_row(row: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest of ``row`` [N], best first (ties: lower position first).

    Selected per 8k-column chunk, so no temporary is large enough to be a fresh mmap (page faults).
    """
    n = len(row)
    if n <= _CHUNK:
        cand = np.argpartition(row, n - k)[n - k :] if k < n else np.arange(n)
    else:
        parts = []
        for s in range(0, n, _CHUNK):
            block = row[s : s + _CHUNK]
            kk = min(k, len(block))
            parts.append(np.argpartition(block, len(block) - kk)[len(block) - kk :] + s)
        cand = np.concatenate(parts)
    vals = row[cand]
    return cand[np.lexsort((cand, -vals))[:k]]


def _exact_search(query: np.ndarray, vectors: np.ndarray, ids: np.ndarray, top_k: int, scale: float) -> Ranked:
    """Exact top-k and softmax over all N rows: one pass of FAISS's SIMD inner products per image.

    query [B, D] float32 C-contiguous, vectors [N, D] float32 C-contiguous (the FAISS buffer), ids [N].
    The N cosines land in a reused per-thread buffer; the top-k is read from it, then the same buffer
    becomes the softmax terms in place (float32 exp, float64 sum).
    """
    faiss = _faiss()
    n, d = vectors.shape
    k = min(top_k, n)
    out_pos = np.empty((len(query), k), dtype=np.int64)
    out_cos = np.empty((len(query), k), dtype=np.float32)
    log_z = np.empty(len(query), dtype=np.float64)
    row = _workspace(1, n)[0]  # [N]
    for b in range(len(query)):
        q = np.ascontiguousarray(query[b])
        faiss.fvec_inner_products_ny(faiss.swig_ptr(row), faiss.swig_ptr(q), faiss.swig_ptr(vectors), d, n)
        pos = _top_k_row(row, k)
        out_pos[b], out_cos[b] = pos, row[pos]
        row -= out_cos[b, 0]
        row *= np.float32(scale)
        np.exp(row, out=row)
        log_z[b] = np.log(row.sum(dtype=np.float64))
    return Ranked(ids[out_pos], out_cos, _scores(out_cos, log_z, out_cos[:, 0].astype(np.float64), scale))


def exact_rank(query: np.ndarray, vectors: np.ndarray, logit_scale: float, top_k: int) -> tuple[np.ndarray, Ranked]:
    """Exact top-k and softmax over all rows of ``vectors`` [N, D] (small N: request-local labels).

    Returns (row positions [B, k], Ranked with cosines and scores).
    """
    k = min(top_k, len(vectors))
    cos = query @ vectors.T  # [B, N]
    pos = _top_k(cos, k)
    top = np.take_along_axis(cos, pos, axis=1)  # [B, k]
    log_z = log_partition(query, vectors, top[:, 0].copy(), logit_scale)
    return pos, Ranked(pos, top, _scores(top, log_z, top[:, 0].astype(np.float64), logit_scale))


def _build_flat(ids: np.ndarray, vectors: np.ndarray) -> tuple[Any, np.ndarray]:
    """IndexIDMap2(IndexFlatIP) + a zero-copy [N, D] view of its storage (one copy of the vectors)."""
    faiss = _faiss()
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    if not len(ids):
        return index, vectors
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    flat = faiss.downcast_index(index.index)
    view = faiss.rev_swig_ptr(flat.get_xb(), len(ids) * vectors.shape[1]).reshape(len(ids), vectors.shape[1])
    view.flags.writeable = False  # the snapshot is immutable; FAISS owns the buffer, the snapshot the index
    return index, view


def ivf_nlist(n: int) -> int:
    return max(16, min(1024, int(4 * math.sqrt(n))))


PATCH_MAX_FRACTION = 0.25  # a new IVF version copies and patches the previous index below this much change


def _patch_ivf(previous: Any, previous_ids: np.ndarray, ids: np.ndarray, vectors: np.ndarray, nprobe: int) -> Any:
    """The previous version's index copied, its removed ids dropped and only the new rows assigned.

    A class id names one vector for the set's whole life (the registry builds every version from
    the previous one's rows by id), so the kept rows need no reassignment: a copy of the inverted
    lists instead of a search over every centroid for every row (seconds at 1M classes).
    """
    faiss = _faiss()
    removed = previous_ids[~np.isin(previous_ids, ids)]
    fresh = ~np.isin(ids, previous_ids)
    index = faiss.clone_index(previous)
    if len(removed):
        index.remove_ids(np.ascontiguousarray(removed, dtype=np.int64))
    if fresh.any():
        index.add_with_ids(np.ascontiguousarray(vectors[fresh]), np.ascontiguousarray(ids[fresh], dtype=np.int64))
    index.nprobe = nprobe
    return index


def _build_ivf(
    ids: np.ndarray, vectors: np.ndarray, nprobe: int, previous: Any, previous_ids: np.ndarray | None = None
) -> Any:
    """IndexIVFFlat (inner product); reuses the previous snapshot's trained centroids when it has them,
    and patches the previous index itself when the set changed little."""
    faiss = _faiss()
    d = vectors.shape[1]
    nlist = ivf_nlist(len(ids))
    keeps_centroids = previous is not None and previous.d == d and previous.nlist * 4 >= nlist  # grew < 16x
    if keeps_centroids and previous_ids is not None and previous.ntotal == len(previous_ids):
        changed = len(np.setxor1d(previous_ids, ids, assume_unique=True))
        if changed <= PATCH_MAX_FRACTION * len(ids):
            return _patch_ivf(previous, previous_ids, ids, vectors, nprobe)
    if keeps_centroids:
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(previous.quantizer.reconstruct_n(0, previous.nlist))  # [nlist, D]
        index = faiss.IndexIVFFlat(quantizer, d, previous.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(ids), min(len(ids), 40 * nlist), replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)]))  # k-means on a subsample (seconds at 1M)
    index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(ids, dtype=np.int64))
    index.nprobe = nprobe
    return index


def _ivf_ids(index: Any) -> np.ndarray:
    faiss = _faiss()
    lists = index.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(index.nlist)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class _Tail:
    """A fixed uniform sample of an IVF set's rows: vectors [M, D], ids [M] (sorted)."""

    vectors: np.ndarray
    ids: np.ndarray


def index_kind(value: str | None, default: IndexKind) -> IndexKind:
    """A stored kind (NULL: the service default)."""
    if value == "ivf":
        return "ivf"
    if value == "flat":
        return "flat"
    return default


@dataclass(frozen=True)
class Snapshot:
    """One version of one label set: rows + the index built from exactly those rows."""

    name: str
    version: int
    ids: np.ndarray  # [N] int64
    names: list[str]
    provenance: list[str]
    vectors: np.ndarray  # [N, D] float32, L2-normalised (for flat sets: a view of the FAISS buffer)
    index: Any  # FAISS index; ``index.ntotal`` == N
    on_gpu: bool = False
    kind: IndexKind = "flat"  # how this snapshot is searched ("ivf" below IVF_MIN_CLASSES is searched flat)
    faiss_threads: int = 1
    _tail: _Tail | None = None  # IVF sets: the sample that estimates the softmax mass outside the candidates
    _by_id: dict[int, int] = field(default_factory=dict)
    _gpu_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_rows(
        cls, rows: SetRows, use_gpu: bool = False, cfg: SearchCfg | None = None, previous: Snapshot | None = None
    ) -> Snapshot:
        """Build the snapshot of ``rows``; ``previous`` (same set) lends an IVF set its trained centroids."""
        cfg = cfg or SearchCfg(use_gpu=use_gpu)
        kind = index_kind(rows.index_kind, cfg.default_kind)
        vectors = normalise(rows.vectors) if len(rows.ids) else rows.vectors
        by_id = {int(i): k for k, i in enumerate(rows.ids)}
        if kind == "ivf" and len(rows.ids) >= IVF_MIN_CLASSES:
            usable = previous is not None and previous.approximate and not previous.on_gpu
            prev, prev_ids = (previous.index, previous.ids) if usable and previous is not None else (None, None)
            index = _build_ivf(rows.ids, vectors, cfg.nprobe, prev, prev_ids)
            pick = np.sort(
                np.random.default_rng(0).choice(len(rows.ids), min(len(rows.ids), TAIL_SAMPLE), replace=False)
            )
            tail = _Tail(np.ascontiguousarray(vectors[pick]), np.ascontiguousarray(rows.ids[pick]))
            on_gpu = bool((use_gpu or cfg.use_gpu) and gpu_available())
            index = _to_gpu(index) if on_gpu else index
        else:  # exact: searched on the CPU by one GEMM (a GPU index cannot return the softmax denominator)
            index, vectors = _build_flat(rows.ids, vectors)
            tail, on_gpu = None, False
        return cls(
            rows.name, rows.version, rows.ids, rows.names, rows.provenance, vectors, index, on_gpu, kind,
            cfg.faiss_threads, tail, by_id,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def approximate(self) -> bool:
        return self._tail is not None

    def label(self, class_id: int) -> str:
        return self.names[self._by_id[class_id]]

    def index_ids(self) -> np.ndarray:
        """The ids the FAISS index holds (CPU indexes), sorted, for consistency checks."""
        if self.on_gpu:
            return self.ids
        if self.approximate:
            return np.sort(_ivf_ids(self.index))
        return np.sort(_faiss().vector_to_array(self.index.id_map).astype(np.int64))

    def search(self, embeddings: np.ndarray, top_k: int, logit_scale: float) -> Ranked:
        """embeddings [B, D] (normalised) -> top-k with softmax over the whole set. Thread-safe; blocking."""
        query = np.ascontiguousarray(embeddings, dtype=np.float32)
        set_search_threads(self.faiss_threads)  # OpenMP's setting of *this* thread
        if self._tail is not None:
            return self._search_ivf(query, top_k, logit_scale)
        return _exact_search(query, self.vectors, self.ids, top_k, logit_scale)

    def _search_ivf(self, query: np.ndarray, top_k: int, logit_scale: float) -> Ranked:
        """IVF candidates (exact cosines) + a sampled estimate of the softmax mass outside them."""
        assert self._tail is not None
        n, head = len(self), min(len(self), max(top_k, IVF_HEAD))
        if self.on_gpu:  # GPU indexes are not thread-safe
            with self._gpu_lock:
                cos, ids = self.index.search(query, head)
        else:
            cos, ids = self.index.search(query, head)  # [B, H] best first; id -1 where the probed lists ran short
        best = cos[:, :1].astype(np.float64)  # [B, 1]
        valid = ids >= 0
        head_mass = np.where(valid, np.exp(logit_scale * (cos - best)), 0.0).sum(axis=1)  # [B] exact part
        terms = np.exp(logit_scale * (query @ self._tail.vectors.T - best))  # [B, M] float64
        outside = ~np.stack([np.isin(self._tail.ids, row) for row in ids])  # sample rows not among the candidates
        tail_mean = (terms * outside).sum(axis=1) / np.maximum(outside.sum(axis=1), 1)
        z = head_mass + tail_mean * (n - valid.sum(axis=1))
        k = min(top_k, head)
        return Ranked(ids[:, :k], cos[:, :k], _scores(cos[:, :k], np.log(z), best[:, 0], logit_scale))


def _to_gpu(index: Any) -> Any:
    global _GPU_RESOURCES
    faiss = _faiss()
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


def adhoc_rank(embeddings: np.ndarray, vectors: np.ndarray, logit_scale: float, top_k: int) -> Ranked:
    """Request-local candidate labels (no index): ids are positions in the candidate list."""
    query = np.ascontiguousarray(embeddings, dtype=np.float32)
    pos, ranked = exact_rank(query, np.ascontiguousarray(vectors, dtype=np.float32), logit_scale, top_k)
    return Ranked(pos.astype(np.int64), ranked.cosines, ranked.scores)
