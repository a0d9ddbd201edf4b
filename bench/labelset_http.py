"""Classify latency over HTTP against label sets of 5 / 100k (exact) / 1M (exact and IVF) classes.

The real server (``promptdistill serve``, tiny bundle, ONNX) answers one request at a time (c=1);
requests go round-robin over the sets so load drifts on a shared machine hit every set alike. The
large sets are written straight into the server's SQLite database before it starts (encoding a
million names through the text tower would take hours on 2 cores): synthetic clustered unit
vectors in the bundle's 64-d space. The figure is each set's p50 over the 5-class p50.
In-process, the same 1M-vector IVF snapshot is compared with exact search on queries drawn from
the vectors' distribution: recall@1/@5 and the relative error of the top-1 softmax score (the IVF
denominator is estimated outside the candidates; see service/index.py).
"""

from __future__ import annotations

import gc
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TINY_CONFIG, BenchCfg
from bench.harness import ServerProcess
from bench.http_load import build_bundle, jpegs
from service.client import Client, ServiceClientError

log = logging.getLogger(__name__)

SETS = (("five", 5, "flat"), ("k100", 100_000, "flat"), ("m1", 1_000_000, "ivf"), ("m1flat", 1_000_000, "flat"))
N_CENTRES = 2_000


def _synthetic(n: int, d: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        block = centres[rng.integers(0, len(centres), e - s)]
        block = block + rng.standard_normal((e - s, d), dtype=np.float32) * np.float32(0.6 / np.sqrt(d))
        out[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def seed_sets(
    state: Path, dim: int, space: str, sets: tuple[tuple[str, int, str], ...], seed: int = 0
) -> dict[str, np.ndarray]:
    """Write the label sets into a fresh state directory's database, as vectors of the served bundle's
    embedding ``space`` (else the service would re-encode their names at start-up); returns them."""
    from service.store import LabelSetStore

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CENTRES, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    state.mkdir(parents=True, exist_ok=True)
    store = LabelSetStore(state, dim, space)
    out: dict[str, np.ndarray] = {}
    try:
        for name, n, kind in sets:
            vectors = out.get("m1") if n == 1_000_000 and "m1" in out else _synthetic(n, dim, rng, centres)
            assert vectors is not None
            with store.transaction() as db:
                store.create_set(db, name, [f"class {i}" for i in range(n)], vectors, "bench", index_kind=kind)
            out[name] = vectors
            log.info("seeded %s: %d classes (%s)", name, n, kind)
    finally:
        store.close()
    out["_centres"] = centres
    return out


def _p(lat: list[float], q: float) -> float:
    return float(np.percentile(lat, q)) if lat else float("nan")


def classify_round_robin(client: Client, names: list[str], images: list[bytes], n_each: int) -> dict[str, Any]:
    """c=1: ``n_each`` requests per set, interleaved; latency per set and the top-1 id per photo."""
    import time

    lat: dict[str, list[float]] = {n: [] for n in names}
    top1: dict[str, dict[int, int]] = {n: {} for n in names}
    errors = 0
    for i in range(n_each):
        for name in names:
            t0 = time.perf_counter()
            try:
                out = client.classify_bytes([images[i % len(images)]], top_k=5, label_set=name)
            except ServiceClientError:
                errors += 1
                continue
            lat[name].append((time.perf_counter() - t0) * 1000.0)
            top1[name][i % len(images)] = int(out["results"][0]["predictions"][0]["class_id"])
    return {
        "errors": errors,
        "per_set": {
            n: {"n": len(v), "p50_ms": _p(v, 50), "p95_ms": _p(v, 95), "min_ms": min(v, default=0.0)}
            for n, v in lat.items()
        },
        "top1": top1,
    }


def ivf_quality(vectors: np.ndarray, centres: np.ndarray, n_queries: int, nprobe: int) -> dict[str, Any]:
    """Recall@1/@5 and top-1 score error of the service's IVF snapshot against its exact search."""
    import time

    from service.index import SearchCfg, Snapshot
    from service.store import SetRows

    rng = np.random.default_rng(7)
    queries = _synthetic(n_queries, vectors.shape[1], rng, centres)
    ids = np.arange(len(vectors), dtype=np.int64)
    names = [""] * len(vectors)
    t0 = time.perf_counter()
    ivf = Snapshot.from_rows(SetRows("q", 1, ids, names, names, vectors, "ivf"), cfg=SearchCfg(nprobe=nprobe))
    build_s = time.perf_counter() - t0
    flat = Snapshot.from_rows(SetRows("q", 1, ids, names, names, vectors, "flat"))
    a, e = ivf.search(queries, 5, 100.0), flat.search(queries, 5, 100.0)
    hit = a.ids[:, 0] == e.ids[:, 0]
    rel = np.abs(a.scores[:, 0] - e.scores[:, 0]) / e.scores[:, 0]
    return {
        "n_queries": n_queries,
        "nprobe": nprobe,
        "nlist": int(ivf.index.nlist),
        "build_s": build_s,
        "recall_at_1": float(hit.mean()),
        "recall_at_5": float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(a.ids, e.ids, strict=True)])),
        "top1_score_rel_error_median": float(np.median(rel)),
        "top1_score_rel_error_max": float(rel.max()),
    }


def run(cfg: BenchCfg) -> dict[str, Any]:
    from models.bundle import bundle_space, load_bundle

    sets = tuple((n, min(size, 20_000) if cfg.quick else size, k) for n, size, k in SETS)
    n_each = 3 if cfg.quick else 60
    with tempfile.TemporaryDirectory(prefix="pd-bench-sets-") as tmp:
        bundle_dir = build_bundle(str(TINY_CONFIG), Path(tmp) / "bundle")
        bundle = load_bundle(bundle_dir)
        dim, space = bundle.manifest.embed_dim, bundle_space(bundle)
        vectors = seed_sets(Path(tmp) / "state", dim, space, sets)
        big = next(n for n, _, k in sets if k == "ivf")
        quality = ivf_quality(vectors[big], vectors["_centres"], 20 if cfg.quick else 200, 32)
        log.info("IVF quality: %s", quality)
        del vectors
        gc.collect()
        server = ServerProcess.serve(bundle_dir, Path(tmp) / "state", threads=cfg.threads)
        server.start()
        try:
            server.wait_ready(timeout_s=600.0)
            images = jpegs()
            names = [n for n, _, _ in sets]
            with server.client(retries=0, timeout_s=120.0) as client:
                classify_round_robin(client, names, images, 2)  # warm-up
                res = classify_round_robin(client, names, images, n_each)
        finally:
            exit_code = server.stop()
    base = res["per_set"]["five"]["p50_ms"]
    for name, size, kind in sets:
        rec = res["per_set"][name]
        rec.update(n_classes=size, index=kind, ratio_vs_5=rec["p50_ms"] / base)
    agree = [res["top1"]["m1"].get(i) == v for i, v in res["top1"]["m1flat"].items()]
    return {
        "http": {
            "model": "tiny zero-shot bundle (64-d), random init, ONNX fp32; promptdistill serve defaults",
            "request": "POST /v1/classify, one base64 JPEG photo, top_k 5, c=1, sets interleaved",
            "goals": "100k exact p50 <= 1.5x the 5-class p50; 1M IVF p50 <= 2x, recall@1 >= 0.99",
            "sets": res["per_set"],
            "errors": res["errors"],
            "photos_top1_agreement_ivf_vs_exact": float(np.mean(agree)) if agree else None,
            "server_exit_code": exit_code,
        },
        "ivf_quality": quality,
    }
