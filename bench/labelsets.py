"""Label sets: search time and add-class latency at 1k / 10k / 100k / 1M classes (d = 512).

Three ways to find the best classes for an image embedding:
  * numpy: ``X @ q`` + ``argpartition`` (the baseline; adding a class copies the matrix),
  * FAISS exact: ``IndexIDMap2(IndexFlatIP)`` (what the service uses), also with 1 OpenMP thread,
  * FAISS IVF: ``IndexIVFFlat`` (inner product), nlist ~ 4 sqrt(N) (<= 1024), nprobe 8 and 32,
    with recall@1 / recall@5 against the exact answer.
Vectors are synthetic (no real million-class vocabulary exists offline): unit vectors drawn around
2,000 random cluster centres, queries from the same distribution — uniform random vectors would
make IVF look worse than on real, clustered CLIP text embeddings.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np

from bench.common import BenchCfg, save_figure, set_threads, time_call, write_result

log = logging.getLogger(__name__)

DIM = 512
SIZES = (1_000, 10_000, 100_000, 1_000_000)
TOP_K = 5
N_CENTRES = 2_000
NPROBES = (8, 32)


def synthetic(n: int, rng: np.random.Generator, centres: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """[n, DIM] float32 unit vectors: a random centre plus noise, built in chunks to bound memory."""
    out = np.empty((n, DIM), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        which = rng.integers(0, len(centres), e - s)
        block = centres[which] + rng.standard_normal((e - s, DIM), dtype=np.float32) * np.float32(0.6 / math.sqrt(DIM))
        out[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _numpy_search(x: np.ndarray, q: np.ndarray, k: int = TOP_K) -> np.ndarray:
    scores = q @ x.T  # [Q, N]
    part = np.argpartition(-scores, k, axis=1)[:, :k]  # [Q, k] unordered
    order = np.take_along_axis(scores, part, 1).argsort(1)[:, ::-1]
    return np.take_along_axis(part, order, 1)


def _add_latency(add_one: Any, vectors: np.ndarray, repeats: int) -> dict[str, float]:
    """Latency of adding one class at a time: the first add and the median of the following ones."""
    samples = []
    for i in range(repeats):
        t0 = time.perf_counter()
        add_one(vectors[i : i + 1], i)
        samples.append((time.perf_counter() - t0) * 1000.0)
    rest = samples[1:] if len(samples) > 1 else samples
    return {"first_ms": samples[0], "median_ms": float(np.median(rest)), "n": repeats}


def _one_query(queries: np.ndarray) -> Callable[[], np.ndarray]:
    """Each call returns the next query as [1, DIM] (cycling), so no run hits a warm cache twice."""
    state = {"i": 0}

    def nxt() -> np.ndarray:
        state["i"] += 1
        return np.asarray(queries[state["i"] % len(queries)][None])

    return nxt


def _search_timing(search: Callable[[np.ndarray], Any], queries: np.ndarray, cfg: BenchCfg) -> dict[str, float]:
    nxt = _one_query(queries)
    return time_call(lambda: search(nxt()), iters=len(queries), warmup=1, max_seconds=cfg.max_seconds).summary()


def _bench_numpy(x: np.ndarray, queries: np.ndarray, new: np.ndarray, adds: int, cfg: BenchCfg) -> dict[str, Any]:
    rec: dict[str, Any] = {"numpy_search_1": _search_timing(lambda q: _numpy_search(x, q), queries, cfg)}
    rec["numpy_search_8"] = time_call(
        lambda: _numpy_search(x, queries[:8]), iters=len(queries), max_seconds=cfg.max_seconds
    ).summary()
    state = {"x": x}
    rec["numpy_add"] = _add_latency(lambda v, i: state.update(x=np.concatenate([state["x"], v])), new, adds)
    return rec


def _bench_flat(
    x: np.ndarray, queries: np.ndarray, new: np.ndarray, exact_top: np.ndarray, adds: int, cfg: BenchCfg
) -> dict[str, Any]:
    import faiss

    n = len(x)
    t0 = time.perf_counter()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    flat.add_with_ids(x, np.arange(n, dtype=np.int64))
    rec: dict[str, Any] = {"flat_build_s": time.perf_counter() - t0}
    rec["flat_search_1"] = _search_timing(lambda q: flat.search(q, TOP_K), queries, cfg)
    with _one_thread():  # one query: OpenMP start-up/barriers can cost more than they save
        rec["flat_search_1_1thread"] = _search_timing(lambda q: flat.search(q, TOP_K), queries, cfg)
    rec["flat_search_8"] = time_call(
        lambda: flat.search(queries[:8], TOP_K), iters=len(queries), max_seconds=cfg.max_seconds
    ).summary()
    _, top = flat.search(queries, TOP_K)
    rec["flat_recall_at_1_vs_numpy"] = float((top[:, 0] == exact_top[:, 0]).mean())
    rec["flat_add"] = _add_latency(lambda v, i: flat.add_with_ids(v, np.array([n + i], dtype=np.int64)), new, adds)
    return rec


def bench_size(n: int, cfg: BenchCfg, rng: np.random.Generator, centres: np.ndarray) -> dict[str, Any]:
    x = synthetic(n, rng, centres)  # [n, 512]
    n_q = 3 if cfg.quick else (10 if n >= 1_000_000 else 50)
    queries = synthetic(n_q, rng, centres)  # [Q, 512]
    new = synthetic(32, rng, centres)  # classes added one by one
    adds = 3 if cfg.quick else (6 if n >= 1_000_000 else 20)
    exact_top = _numpy_search(x, queries)  # [Q, k] ground truth
    rec: dict[str, Any] = {"n_classes": n, "n_queries": n_q}
    rec.update(_bench_numpy(x, queries, new, adds, cfg))
    gc.collect()
    rec.update(_bench_flat(x, queries, new, exact_top, adds, cfg))
    gc.collect()
    rec.update(_bench_ivf(x, queries, new, exact_top, adds, cfg))
    gc.collect()
    rec.update(_bench_service(x, queries, exact_top, cfg))
    gc.collect()
    log.info(
        "N=%d: numpy %.2f ms, flat %.2f ms, ivf(nprobe %d) %.3f ms; add: numpy %.2f ms, flat %.3f ms",
        n,
        rec["numpy_search_1"]["median_ms"],
        rec["flat_search_1"]["median_ms"],
        NPROBES[0],
        rec[f"ivf_nprobe{NPROBES[0]}_search_1"]["median_ms"],
        rec["numpy_add"]["median_ms"],
        rec["flat_add"]["median_ms"],
    )
    return rec


def _bench_ivf(
    x: np.ndarray, queries: np.ndarray, new: np.ndarray, exact_top: np.ndarray, adds: int, cfg: BenchCfg
) -> dict[str, Any]:
    import faiss

    n, n_q = len(x), len(queries)
    nlist = max(16, min(1024, int(4 * math.sqrt(n))))
    train_n = min(n, 64 * nlist)
    t0 = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 5  # 1k classes: fewer than 39 points per list, fine for a benchmark
    ivf.train(x[np.random.default_rng(1).choice(n, train_n, replace=False)])
    ivf.add_with_ids(x, np.arange(n, dtype=np.int64))
    rec: dict[str, Any] = {"ivf_nlist": nlist, "ivf_train_points": train_n, "ivf_build_s": time.perf_counter() - t0}
    for nprobe in NPROBES:
        ivf.nprobe = nprobe
        rec[f"ivf_nprobe{nprobe}_search_1"] = _search_timing(lambda q: ivf.search(q, TOP_K), queries, cfg)
        _, top = ivf.search(queries, TOP_K)
        rec[f"ivf_nprobe{nprobe}_recall_at_1"] = float((top[:, 0] == exact_top[:, 0]).mean())
        hits = [len(set(top[i]) & set(exact_top[i])) / TOP_K for i in range(n_q)]
        rec[f"ivf_nprobe{nprobe}_recall_at_5"] = float(np.mean(hits))
    rec["ivf_add"] = _add_latency(lambda v, i: ivf.add_with_ids(v, np.array([n + i], dtype=np.int64)), new, adds)
    with _one_thread():
        rec["ivf_add_1thread"] = _add_latency(
            lambda v, i: ivf.add_with_ids(v, np.array([n + 1000 + i], dtype=np.int64)), new, adds
        )
    return rec


def _bench_service(x: np.ndarray, queries: np.ndarray, exact_top: np.ndarray, cfg: BenchCfg) -> dict[str, Any]:
    """The service's own search (top-5 *with* the softmax over all N): exact, IVF, and the old k=N path."""
    from service.index import SearchCfg, Snapshot, limit_blas_threads
    from service.store import SetRows

    limit_blas_threads(1)  # as the service does (faiss_threads=1)
    n = len(x)
    ids = np.arange(n, dtype=np.int64)
    names = [""] * n
    rec: dict[str, Any] = {}
    for kind in ("flat", "ivf"):
        snap = Snapshot.from_rows(SetRows("b", 1, ids, names, names, x, kind), cfg=SearchCfg(faiss_threads=1))
        rec[f"service_{kind}_search_1"] = _search_timing(
            partial(snap.search, top_k=TOP_K, logit_scale=100.0), queries, cfg
        )
        top = snap.search(queries, TOP_K, 100.0).ids
        rec[f"service_{kind}_recall_at_1"] = float((top[:, 0] == exact_top[:, 0]).mean())
        rec[f"service_{kind}_approximate"] = snap.approximate
        if kind == "ivf" and snap.approximate:
            rec.update(_ivf_next_version(snap, x, ids))
        if kind == "flat" and n <= 100_000:  # before: FAISS asked for all N results to build the softmax
            with _one_thread():
                rec["old_search_all_n_1"] = _search_timing(partial(snap.index.search, k=n), queries, cfg)
        del snap
        gc.collect()
    return rec


def plot(records: list[dict[str, Any]], cfg: BenchCfg) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n_classes"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    series = {
        "numpy matmul": "numpy_search_1",
        "FAISS exact (IDMap2 FlatIP)": "flat_search_1",
        **{f"FAISS IVF nprobe {p}": f"ivf_nprobe{p}_search_1" for p in NPROBES},
    }
    for label, key in series.items():
        a.plot(ns, [r[key]["median_ms"] for r in records], marker="o", label=label)
    a.set(xscale="log", yscale="log", xlabel="classes", ylabel="ms per query (median)", title="search, 1 query, top-5")
    a.legend()
    for label, key in {"numpy (concatenate)": "numpy_add", "FAISS exact": "flat_add", "FAISS IVF": "ivf_add"}.items():
        b.plot(ns, [r[key]["median_ms"] for r in records], marker="o", label=label)
    b.set(xscale="log", yscale="log", xlabel="classes", ylabel="ms per added class (median)", title="add one class")
    b.legend()
    return save_figure(fig, "labelsets", cfg)


def _ivf_next_version(snap: Any, x: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """One class added to an IVF set: the next snapshot's index by patching the previous one (the
    service's path) vs re-adding every vector to the previous centroids (before)."""
    from service.index import _build_ivf

    grown_ids = np.append(ids, ids[-1] + 1)
    grown = np.concatenate([snap.vectors, x[:1]])
    out = {}
    for name, previous_ids in (("patch", snap.ids), ("readd", None)):
        t0 = time.perf_counter()
        index = _build_ivf(grown_ids, grown, 32, snap.index, previous_ids)
        out[f"service_ivf_next_version_{name}_s"] = time.perf_counter() - t0
        assert index.ntotal == len(grown_ids)
        del index
        gc.collect()
    return out


def run(cfg: BenchCfg, sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    set_threads(cfg.threads)
    if cfg.quick:
        sizes = sizes[:2]
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((N_CENTRES, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    records = [bench_size(n, cfg, rng, centres) for n in sizes]
    data = "synthetic clustered unit vectors (2,000 centres)"
    payload: dict[str, Any] = {"dim": DIM, "top_k": TOP_K, "data": data, "results": records}
    from bench.labelset_http import run as run_http

    payload.update(run_http(cfg))  # classify over HTTP against 5 / 100k / 1M-class sets, IVF quality
    write_result("labelsets", payload, cfg)
    plot(records, cfg)
    return payload
