"""Image preprocessing: crop-box resampling and JPEG DCT-domain decoding (``draft``) vs the exact transform.

Per real photo (JPEG quality 90; the photos as shipped, 300-1411 px, and the same photos upscaled
3x to phone-camera sizes, 900-4233 px), the reference is open_clip's own eval transform on the
full-resolution decode. Variants: the old path (resize the whole photo, then crop), the service's
crop-box path with a full decode (``jpeg_draft_factor 0``) and with draft factors 1, 2 and 4
(decode at the smallest 1/2, 1/4, 1/8 scale whose short side keeps factor x the input size).
Reported: decode + preprocess time per image, pixel error vs the reference (max, mean, PSNR) and
the cosine between embeddings of the variant and of the reference for two random-weight image
towers (the tiny 64 px model and ViT-B-32 at 224 px).
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np

from bench.common import TINY_CONFIG, BenchCfg, real_photos, set_threads, write_result

log = logging.getLogger(__name__)
FACTORS = (0.0, 1.0, 2.0, 4.0)


def _jpeg(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _old_path(data: bytes, cfg: Any) -> np.ndarray:
    """What the service did before: decode, RGB, resize the whole image, crop, normalise."""
    from PIL import Image

    from models.preprocess import normalise

    img = Image.open(io.BytesIO(data)).convert("RGB")
    size = cfg.size[0]
    w, h = img.size
    scale = size / min(w, h)
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize(new if scale != 1 else img.size, Image.Resampling.BICUBIC)
    left, top = round((img.width - size) / 2), round((img.height - size) / 2)
    return normalise(img.crop((left, top, left + size, top + size)), cfg)


def _model(arch: str) -> tuple[Any, Any]:
    import open_clip
    import torch

    from models.backbone import PreprocessConfig

    if arch == "tiny":
        open_clip.add_model_config(str(TINY_CONFIG))
        arch = TINY_CONFIG.stem
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(arch)
    model.eval()
    cfg = PreprocessConfig.from_open_clip(dict(model.visual.preprocess_cfg))
    return (model, transform), cfg


def _embed(model: Any, pixels: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        emb = model.encode_image(torch.from_numpy(pixels))
    return torch.nn.functional.normalize(emb, dim=-1).numpy()  # [B, D]


def _time(fn: Any, data: list[bytes], reps: int) -> float:
    best = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for d in data:
            fn(d)
        best.append((time.perf_counter() - t0) * 1000.0 / len(data))
    return float(np.median(best))


def _one_model(arch: str, sets: dict[str, list[Any]], cfg: BenchCfg) -> dict[str, Any]:
    from PIL import Image

    from service.images import ImageLimits, ImagePreprocessor

    (model, transform), pcfg = _model(arch)
    limits = ImageLimits(64 << 20, 100_000_000, 16, 1e9, 1 << 34)
    out: dict[str, Any] = {"input_size": pcfg.size[0]}
    for set_name, photos in sets.items():
        data = [_jpeg(p) for p in photos]
        ref = np.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")).numpy() for d in data])
        ref_emb = _embed(model, ref)
        variants: dict[str, Any] = {"resize_then_crop": lambda d, c=pcfg: _old_path(d, c)}
        for f in FACTORS:
            variants[f"crop_box_draft_{f:g}"] = ImagePreprocessor(pcfg, limits, f)
        rows = {}
        reps = 1 if cfg.quick else 3
        for name, fn in variants.items():
            px = np.stack([fn(d) for d in data])
            err = np.abs(px - ref)
            mse = float(((px - ref) ** 2).mean())
            cos = np.sum(_embed(model, px) * ref_emb, axis=1)
            rows[name] = {
                "ms_per_image": _time(fn, data, reps),
                "max_abs": float(err.max()),
                "mean_abs": float(err.mean()),
                "psnr_db": float(10 * np.log10((2.0 / min(pcfg.std)) ** 2 / max(mse, 1e-12))),
                "min_cosine": float(cos.min()),
                "median_cosine": float(np.median(cos)),
            }
            log.info("%s %s %s: %s", arch, set_name, name, {k: round(v, 6) for k, v in rows[name].items()})
        # how different two *different* photos look to this random tower: the scale for the cosines above
        others = np.sum(ref_emb * np.roll(ref_emb, 1, axis=0), axis=1)
        out[set_name] = {
            "n_photos": len(data),
            "sizes": sorted({p.size for p in photos})[:3] + sorted({p.size for p in photos})[-2:],
            "variants": rows,
            "cosine_between_different_photos_median": float(np.median(others)),
        }
    return out


def run(cfg: BenchCfg) -> dict[str, Any]:
    from PIL import Image

    set_threads(cfg.threads)
    photos = real_photos(mirror=False)
    if cfg.quick:
        photos = photos[:3]
    upscaled = [p.resize((p.width * 3, p.height * 3), Image.Resampling.BICUBIC) for p in photos]
    sets = {"as_shipped": photos, "upscaled_3x": upscaled}
    payload = {
        "what": "decode + preprocess per JPEG (q90) photo; pixel error and embedding cosine vs open_clip's "
        "transform on the full decode",
        "models": {arch: _one_model(arch, sets, cfg) for arch in ("tiny", "ViT-B-32")},
    }
    write_result("preprocess", payload, cfg)
    return payload
