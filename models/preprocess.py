"""open_clip's eval transform re-implemented on PIL + numpy (no torchvision on the serving path).

Mirrors ``open_clip.transform.image_transform(..., is_train=False)`` for square targets:
RGB -> resize (shortest side, or squash) -> center crop -> [0, 1] -> normalise. Parity with
open_clip's own transform is a test (tests/models/test_preprocess.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from models.backbone import PreprocessConfig

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One PIL image -> float32 array [3, H, W], normalised as the backbone expects."""
    if cfg.interpolation not in _INTERPOLATION:
        raise ValueError(f"unsupported interpolation {cfg.interpolation!r}")
    height, width = cfg.size
    img = image.convert("RGB")
    resample = _INTERPOLATION[cfg.interpolation]
    if cfg.resize_mode == "squash":
        if img.size != (width, height):
            img = img.resize((width, height), resample)
    elif cfg.resize_mode == "shortest" and height == width:
        img = _resize_shortest(img, height, resample)
        img = _center_crop(img, height, width)
    else:
        raise ValueError(
            f"resize_mode {cfg.resize_mode!r} with size {cfg.size} is not supported by the numpy "
            "preprocessor (supported: 'shortest' with a square size, 'squash')"
        )
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1))


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """PIL images -> float32 array [B, 3, H, W]."""
    return np.stack([preprocess_image(im, cfg) for im in images])


def _resize_shortest(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    # torchvision.transforms.functional.resize with an int size: short side -> size,
    # long side -> int(size * long / short); unchanged when already that size.
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def _center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    w, h = img.size
    if w < width or h < height:  # torchvision pads with zeros before cropping
        padded = Image.new("RGB", (max(w, width), max(h, height)))
        padded.paste(img, ((max(w, width) - w) // 2, (max(h, height) - h) // 2))
        img, (w, h) = padded, padded.size
    top = round((h - height) / 2.0)  # torchvision: int(round(...)); round() of a float is an int
    left = round((w - width) / 2.0)
    return img.crop((left, top, left + width, top + height))
