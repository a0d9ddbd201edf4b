"""Calibration samples: a bounded draw of in-domain image embeddings stored in a bundle.

Exporters embed images of the domain with the bundle's own image tower (PromptKD: the unlabeled
images distillation read; zero-shot: held-out images given at export) and store at most
:data:`models.bundle.MAX_CALIBRATION` of them (``calibration.safetensors``, see
:class:`models.bundle.CalibrationSpec`). The service derives score thresholds from them (the
calibrated "unknown", service/calibration.py) and a quality check of added classes; the sample's
centroid is the in-domain image mean (e.g. for modality-gap corrections).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from models.bundle import MAX_CALIBRATION, Bundle, CalibrationSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def draw(n_available: int, limit: int = MAX_CALIBRATION, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of at most ``limit`` of ``n_available`` items, drawn uniformly without replacement."""
    if not 1 <= limit <= MAX_CALIBRATION:
        raise ValueError(f"calibration sample size must be within [1, {MAX_CALIBRATION}], got {limit}")
    if n_available <= limit:
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).choice(n_available, limit, replace=False))


@torch.no_grad()
def embed_batches(tower: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """[M, D] L2-normalised embeddings of pixel batches [B, 3, H, W] (the tower in eval mode, on its device)."""
    parts = []
    for pixels in batches:
        parts.append(torch.nn.functional.normalize(tower(pixels).float(), dim=-1).cpu())
    if not parts:
        raise ValueError("no calibration images")
    return torch.cat(parts)


def attach(
    bundle: Bundle,
    sample: torch.Tensor,
    source: str,
    *,
    seed: int | None = None,
    dtype: Literal["float16", "float32"] = "float16",
) -> Bundle:
    """Put ``sample`` [M, D] (M <= MAX_CALIBRATION) into ``bundle`` and its manifest (before saving)."""
    if sample.ndim != 2 or sample.shape[1] != bundle.manifest.embed_dim:
        raise ValueError(f"calibration sample has shape {tuple(sample.shape)}; want [M, {bundle.manifest.embed_dim}]")
    spec = CalibrationSpec(count=int(sample.shape[0]), dtype=dtype, source=source, seed=seed)
    bundle.calibration = torch.nn.functional.normalize(sample.float(), dim=-1)
    bundle.manifest = bundle.manifest.model_copy(update={"calibration": spec})
    return bundle


def centroid(sample: torch.Tensor | np.ndarray) -> np.ndarray:
    """The sample's image centroid [D]: the mean of its (normalised) rows, itself not normalised."""
    rows = sample.numpy() if isinstance(sample, torch.Tensor) else np.asarray(sample)
    return rows.astype(np.float32).mean(axis=0)


def image_files(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` or below it, in a stable (sorted) order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration images: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"calibration images: no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def chunks(items: Sequence[int], size: int) -> list[Sequence[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
