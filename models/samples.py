"""Real photos that ship inside PyPI packages, for export-time parity checks and tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def sample_photos() -> list[Image.Image]:
    """scikit-learn's two sample photos (china, flower), plus scikit-image's when installed."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(np.asarray(a)) for a in load_sample_images().images]
    try:
        from skimage import data
    except ImportError:
        return photos
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        photos.append(Image.fromarray(getattr(data, name)()))
    return photos
