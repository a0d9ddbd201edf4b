"""HTTP load against the real service (``promptdistill serve`` in a subprocess, loopback only).

At concurrency 1, 4 and 16 (threads with keep-alive connections, each POSTing one real photo as
base64 JSON to ``/v1/classify``): throughput, p50/p95/p99 latency. In the same run, before and after
the server, the raw ONNX Runtime encoder on the same graph with the same thread count: images/s at
batch 1 and 8. The ratio service / raw says what decoding, preprocessing, batching, search and
HTTP cost. On a 2-core machine the client, the server's event loop and the encoder share the
cores, so the ratio is a lower bound of what a dedicated server achieves.
"""

from __future__ import annotations

import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    TINY_CONFIG,
    BenchCfg,
    ort_session,
    photo_jpegs,
    real_photos,
    save_figure,
    time_call,
    write_result,
)
from bench.harness import Classify, ServerProcess, closed_loop

log = logging.getLogger(__name__)

CONCURRENCY = (1, 4, 16)
ARCH = "ViT-B-32"  # realistic encoder cost (random init); --quick uses the tiny model


def build_bundle(arch: str, out: Path) -> Path:
    """A zero-shot bundle with ONNX (random weights), 100 ImageNet class names."""
    import torch
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from models.zeroshot import build_zeroshot_bundle, named_templates

    torch.manual_seed(0)
    names = list(IMAGENET_CLASSNAMES[:100])
    build_zeroshot_bundle(arch, None, names, named_templates("simple"), out, onnx=True, progress=False)
    return out


def jpegs() -> list[bytes]:
    """The real photos as JPEG (quality 90), one request's image each."""
    return photo_jpegs(mirror=False)


def raw_encoder(onnx_path: Path, pixels: np.ndarray, cfg: BenchCfg) -> dict[str, float]:
    """Images/s of the bare ONNX Runtime session at batch 1 and 8 (no decoding, no HTTP)."""
    session = ort_session(onnx_path, cfg.threads)
    out = {}
    for b in (1, 8):
        x = np.ascontiguousarray(pixels[:b])
        iters = 2 if cfg.quick else (40 if b == 1 else 10)
        t = time_call(partial(session.run, None, {"pixels": x}), iters=iters, max_seconds=cfg.max_seconds)
        out[f"b{b}_images_per_s"] = b * 1000.0 / t.median_ms
    return out


def run(cfg: BenchCfg) -> dict[str, Any]:
    from models.bundle import load_bundle
    from models.preprocess import preprocess_batch

    arch = str(TINY_CONFIG) if cfg.quick else ARCH
    with tempfile.TemporaryDirectory(prefix="pd-bench-http-") as tmp:
        bundle_dir = build_bundle(arch, Path(tmp) / "bundle")
        bundle = load_bundle(bundle_dir)
        pixels = preprocess_batch(real_photos(mirror=False)[:8], bundle.manifest.image_encoder.preprocess.to_config())
        onnx_path = bundle_dir / bundle.manifest.image_encoder.onnx[0].file
        raw_before = raw_encoder(onnx_path, pixels, cfg)
        images = jpegs()
        with ServerProcess.serve(bundle_dir, Path(tmp) / "state", threads=cfg.threads) as server:
            send = partial(Classify, server.url, images, top_k=5)
            closed_loop(send, 2, requests=4)  # warm-up
            levels = []
            for c in CONCURRENCY:
                n = 4 * c if cfg.quick else max(40, 8 * c)
                levels.append(closed_loop(send, c, requests=n, max_seconds=3 * cfg.max_seconds))
                log.info("c=%d: %s", c, {k: round(v, 2) for k, v in levels[-1].items() if isinstance(v, float)})
        exit_code = server.proc.returncode if server.proc else None
    raw_after = raw_encoder(onnx_path, pixels, cfg)
    raw = {k: (raw_before[k] + raw_after[k]) / 2 for k in raw_before}
    best = max(raw.values())
    for lv in levels:
        lv["ratio_vs_raw_b1"] = lv["throughput_rps"] / raw["b1_images_per_s"]
        lv["ratio_vs_raw_best"] = lv["throughput_rps"] / best
    payload = {
        "goal": "service throughput >= 0.9x raw ONNX Runtime encoder throughput",
        "model": f"{Path(arch).stem if cfg.quick else arch} zero-shot bundle, random init, ONNX fp32, 100 classes",
        "request": "POST /v1/classify, JSON, one base64 JPEG photo (real, 300-1411 px), top_k 5",
        "server": "promptdistill serve, defaults (max_batch_size 16, max_wait_ms 5), PROMPTDISTILL_THREADS",
        "raw_encoder": {"before": raw_before, "after": raw_after, "mean": raw},
        "levels": levels,
        "server_exit_code": exit_code,
    }
    write_result("http", payload, cfg)
    _plot(levels, raw, cfg)
    return payload


def _plot(levels: list[dict[str, Any]], raw: dict[str, float], cfg: BenchCfg) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [lv["concurrency"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(cs, [lv["throughput_rps"] for lv in levels], marker="o", label="service (requests/s = images/s)")
    for k, v in raw.items():
        a.axhline(v, linestyle="--", color="gray" if "b1" in k else "black", label=f"raw ORT {k.split('_')[0]}")
    a.set(xscale="log", xlabel="concurrency", ylabel="images / s", title="throughput")
    a.set_xticks(cs, [str(c) for c in cs])
    a.legend(fontsize=8)
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        b.plot(cs, [lv[q] for lv in levels], marker="o", label=q[:3])
    b.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="latency ms", title="latency")
    b.set_xticks(cs, [str(c) for c in cs])
    b.legend()
    return save_figure(fig, "http", cfg)
