"""Our numpy preprocessing equals open_clip's own eval transform on real photos."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest

from models.backbone import PreprocessConfig
from models.preprocess import preprocess_image

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


@pytest.mark.parametrize("size", [64, 224, 336])
@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_matches_open_clip_transform(photos, size: int, mode: str, interpolation: str) -> None:  # type: ignore[no-untyped-def]
    cfg = PreprocessConfig(size=(size, size), mean=MEAN, std=STD, interpolation=interpolation, resize_mode=mode)
    ref_tf = open_clip.image_transform(
        size, is_train=False, mean=MEAN, std=STD, interpolation=interpolation, resize_mode=mode
    )
    for im in [*photos, photos[0].convert("L"), photos[1].convert("RGBA"), photos[2].resize((size, size // 2))]:
        ours = preprocess_image(im, cfg)
        ref = ref_tf(im).numpy()
        assert ours.shape == ref.shape == (3, size, size)
        assert np.abs(ours - ref).max() <= 1e-5


def test_unsupported_mode_is_explicit() -> None:
    cfg = PreprocessConfig(size=(224, 224), mean=MEAN, std=STD, resize_mode="longest")
    from PIL import Image

    with pytest.raises(ValueError, match="not supported"):
        preprocess_image(Image.new("RGB", (10, 10)), cfg)
