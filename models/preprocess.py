"""open_clip's eval transform re-implemented on PIL + numpy (no torchvision on the serving path).

Mirrors ``open_clip.transform.image_transform(..., is_train=False)`` for square targets:
RGB -> resize (shortest side, or squash) -> center crop -> [0, 1] -> normalise. Parity with
open_clip's own transform is a test (tests/models/test_preprocess.py).

The shortest-side resize is never materialised: only the centre crop's *source box* is resampled
(``Image.resize(..., box=...)``), with the same scale and sample positions as resizing the whole
image and cropping afterwards, so the work is bounded by the output size, not by the input's
aspect ratio. Before the RGB conversion the image is cut down to that box plus the filter's
support (:func:`source_region`), so a huge palette or 1-bit image is never converted whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.backbone import PreprocessConfig

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# Pillow's filter support (in output pixels) per resampling filter, widened by the scale when downsampling.
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0, "nearest": 0.5}


@dataclass(frozen=True)
class CropPlan:
    """Where the network's input comes from in the source image.

    ``box`` (x0, y0, x1, y1) in source pixels (floats) is resampled to ``size`` (width, height);
    ``region`` is the integer window of source pixels that resampling can touch.
    """

    size: tuple[int, int]
    box: tuple[float, float, float, float]
    region: tuple[int, int, int, int]


def check_config(cfg: PreprocessConfig) -> None:
    if cfg.interpolation not in _INTERPOLATION:
        raise ValueError(f"unsupported interpolation {cfg.interpolation!r}")
    height, width = cfg.size
    if cfg.resize_mode == "squash" or (cfg.resize_mode == "shortest" and height == width):
        return
    raise ValueError(
        f"resize_mode {cfg.resize_mode!r} with size {cfg.size} is not supported by the numpy "
        "preprocessor (supported: 'shortest' with a square size, 'squash')"
    )


def crop_plan(width: int, height: int, cfg: PreprocessConfig) -> CropPlan:
    """The source box whose resampling equals resize-then-centre-crop (torchvision's arithmetic)."""
    out_h, out_w = cfg.size
    if cfg.resize_mode == "squash":
        new_w, new_h, left, top = out_w, out_h, 0, 0
    else:
        # torchvision resize with an int size: short side -> size, long side -> int(size * long / short)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = out_h, int(out_h * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        # torchvision's centre crop offsets: int(round(...)); the resize never leaves a side short
        top, left = round((new_h - out_h) / 2.0), round((new_w - out_w) / 2.0)
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, min(width, (left + out_w) * sx), min(height, (top + out_h) * sy))
    reach_x = _SUPPORT[cfg.interpolation] * max(sx, 1.0) + 1.0
    reach_y = _SUPPORT[cfg.interpolation] * max(sy, 1.0) + 1.0
    region = (
        max(0, math.floor(box[0] - reach_x)),
        max(0, math.floor(box[1] - reach_y)),
        min(width, math.ceil(box[2] + reach_x)),
        min(height, math.ceil(box[3] + reach_y)),
    )
    return CropPlan((out_w, out_h), box, region)


def resample_rgb(image: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Any PIL image -> the RGB network input (``cfg.size``), touching only the crop's source region."""
    check_config(cfg)
    plan = crop_plan(image.width, image.height, cfg)
    if plan.box == (0.0, 0.0, float(image.width), float(image.height)) and image.size == plan.size:
        return image.convert("RGB")
    x0, y0, x1, y1 = plan.region
    if (x0, y0, x1, y1) != (0, 0, image.width, image.height):
        # Same pixels for every output sample: the region holds the whole filter footprint, and
        # the origin shift is an integer, so Pillow's coefficients are computed from the same offsets.
        image = image.crop(plan.region)
    box = (plan.box[0] - x0, plan.box[1] - y0, plan.box[2] - x0, plan.box[3] - y0)
    return image.convert("RGB").resize(plan.size, _INTERPOLATION[cfg.interpolation], box=box)


def normalise(rgb: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> float32 [3, H, W] with the backbone's mean and std."""
    arr = np.asarray(rgb, dtype=np.float32) / 255.0  # [H, W, 3]
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1))


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One PIL image -> float32 array [3, H, W], normalised as the backbone expects."""
    return normalise(resample_rgb(image, cfg), cfg)


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """PIL images -> float32 array [B, 3, H, W]."""
    return np.stack([preprocess_image(im, cfg) for im in images])
