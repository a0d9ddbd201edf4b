"""Image encoder: torch eager vs ONNX Runtime fp32 vs ONNX Runtime dynamic int8.

For each architecture (random init: no weights exist offline; speed does not depend on the
values) the real exporter writes the fp32 graph and the real quantiser the int8 graph
(``models.onnx_export``); int8 is compared with fp32 on real photos (cosine, top-1 agreement over
random-text-tower class vectors for ImageNet class names — with random weights the agreement says
how stable the arg-max is under quantisation noise, not anything about accuracy).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    TINY_CONFIG,
    BenchCfg,
    ort_session,
    real_photos,
    save_figure,
    set_threads,
    time_call,
    write_result,
)

log = logging.getLogger(__name__)

ARCHS = (str(TINY_CONFIG), "ViT-B-32", "ViT-B-16")
BATCHES = (1, 8)
N_CLASSES = 100  # ImageNet class names encoded by the (random) text tower for the top-1 check


def _label(arch: str) -> str:
    return "tiny" if arch.endswith("tiny-clip.json") else arch


def _class_vectors(backbone: Any, n: int) -> np.ndarray:
    """[n, D] class vectors for the first ``n`` ImageNet class names through the real function."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from models.class_vectors import encode_class_names
    from models.prompts import PromptedTextEncoder

    text = PromptedTextEncoder(backbone.model, backbone.tokenizer)
    return encode_class_names(text, list(IMAGENET_CLASSNAMES[:n]), ["a photo of a {}."]).numpy()


def bench_arch(arch: str, cfg: BenchCfg, work: Path) -> dict[str, Any]:
    """Export, quantise and time one architecture; returns its result record."""
    import torch

    import models  # noqa: F401  (torchvision shim before open_clip)
    from models.backbone import load_backbone
    from models.onnx_export import export_image_tower, quantize_image_tower
    from models.preprocess import preprocess_batch
    from models.prompts import PromptedImageEncoder
    from models.towers import ImageTower

    torch.manual_seed(0)
    backbone = load_backbone(arch)
    tower = ImageTower(PromptedImageEncoder(backbone.model)).eval()
    photos = real_photos()
    pixels = torch.from_numpy(preprocess_batch(photos, backbone.preprocess))  # [P, 3, H, W]
    out = work / _label(arch)
    fp32 = export_image_tower(tower, out, pixels[:8])
    n_classes = 10 if cfg.quick else N_CLASSES
    vectors = torch.from_numpy(_class_vectors(backbone, n_classes))
    int8 = quantize_image_tower(out / fp32.file, out / "int8.onnx", pixels, vectors, min_cosine=-1.0)
    sessions = {
        "ort_fp32": ort_session(out / fp32.file, cfg.threads),
        "ort_int8": ort_session(out / "int8.onnx", cfg.threads),
    }
    timings: dict[str, dict[str, Any]] = {}
    for batch in BATCHES:
        x = pixels[:batch].contiguous()  # [batch, 3, H, W]
        x_np = x.numpy()
        iters = 2 if cfg.quick else (30 if batch == 1 else 8)
        runners: dict[str, Callable[[], Any]] = {"torch_eager": partial(_torch_forward, tower, x)}
        for k, s in sessions.items():
            runners[k] = partial(s.run, ["embedding"], {"pixels": x_np})
        for runtime, fn in runners.items():
            t = time_call(fn, iters=iters, warmup=1, max_seconds=cfg.max_seconds)
            rec = t.summary()
            rec["images_per_s"] = batch * 1000.0 / t.median_ms
            timings[f"{runtime}@b{batch}"] = rec
            log.info("%s %s b%d: %.1f ms (%.1f img/s)", _label(arch), runtime, batch, t.median_ms, rec["images_per_s"])
    params = sum(p.numel() for p in tower.parameters())
    sizes = {
        "fp32_bytes": sum(f.stat().st_size for f in out.iterdir() if f.name.startswith(fp32.file)),
        "int8_bytes": (out / "int8.onnx").stat().st_size,
    }
    speedup = {
        f"b{b}": timings[f"ort_fp32@b{b}"]["median_ms"] / timings[f"ort_int8@b{b}"]["median_ms"] for b in BATCHES
    }
    return {
        "arch": _label(arch),
        "weights": "random init (seed 0)",
        "image_size": list(backbone.preprocess.size),
        "params": params,
        "onnx_fp32_max_abs_diff_vs_torch": fp32.max_abs_diff,
        "int8_parity_vs_fp32": int8.parity,
        "int8_speedup_vs_fp32": speedup,
        "sizes": sizes,
        "timings": timings,
    }


def _torch_forward(tower: Any, x: Any) -> Any:
    import torch

    with torch.inference_mode():
        return tower(x)


def plot(records: list[dict[str, Any]], cfg: BenchCfg) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = ("torch_eager", "ort_fp32", "ort_int8")
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(11, 4))
    for ax, batch in zip(np.atleast_1d(axes), BATCHES, strict=True):
        width = 0.25
        xs = np.arange(len(records))
        for i, rt in enumerate(runtimes):
            vals = [r["timings"][f"{rt}@b{batch}"]["images_per_s"] for r in records]
            ax.bar(xs + (i - 1) * width, vals, width, label=rt)
        ax.set_xticks(xs, [r["arch"] for r in records])
        ax.set_yscale("log")
        ax.set_ylabel("images / s (log)")
        ax.set_title(f"image tower, batch {batch}, {cfg.threads} threads")
        ax.legend()
    return save_figure(fig, "encoders", cfg)


def run(cfg: BenchCfg, archs: tuple[str, ...] = ARCHS) -> dict[str, Any]:
    set_threads(cfg.threads)
    if cfg.quick:
        archs = archs[:1]
    with tempfile.TemporaryDirectory(prefix="pd-bench-enc-") as tmp:
        records = [bench_arch(a, cfg, Path(tmp)) for a in archs]
    payload = {
        "goal": "ORT int8 >= 2.5x ORT fp32 with >= 99% top-1 agreement on real photos",
        "photos": "18 real photos from scikit-learn/scikit-image + mirror images = 36",
        "results": records,
    }
    write_result("encoders", payload, cfg)
    plot(records, cfg)
    return payload
