"""MoPD bundle: class vectors from the learned soft prompt; the text side is that same prompt.

Inference is plain CoOp, so the bundle is: the frozen image tower, the student text tower with
the learned context (n_tokens = n_ctx, depth 1, templates ``["{}."]``), and class vectors for every
class name computed through ``models.class_vectors`` — the function the service runs when a class
is added, so runtime additions use the learned prompt and match the stored rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.backbone import Backbone
from models.bundle import DEFAULT_LABEL_SET, Bundle
from training.export import (
    ImageParts,
    TextParts,
    add_calibration,
    assemble_bundle,
    image_tower,
    label_set,
    write_bundle,
)
from training.mopd.model import STUDENT_TEMPLATES, MoPDModel

BACKBONE_KEY = "clip"


def mopd_bundle(
    model: MoPDModel,
    backbone: Backbone,
    class_names: Sequence[str],
    n_base: int,
    *,
    method: str = "mopd",
    extra: dict[str, Any] | None = None,
) -> tuple[Bundle, ImageParts]:
    """An in-memory bundle over ``class_names`` (ids 0..N-1; the first ``n_base`` were trained on)."""
    model.eval()
    names = list(class_names)
    vectors = model.class_vectors(names)  # [N, D], exactly TextSide.class_vectors(names)
    provenance = [f"{method}:base"] * n_base + [f"{method}:novel"] * (len(names) - n_base)
    image = ImageParts(backbone, model.image_encoder, key=BACKBONE_KEY)
    text = TextParts(backbone, model.text, list(STUDENT_TEMPLATES), key=BACKBONE_KEY)
    bundle = assemble_bundle(
        image,
        {DEFAULT_LABEL_SET: vectors},
        [label_set(DEFAULT_LABEL_SET, names, provenance)],
        text=text,
        logit_scale=model.logit_scale,
        producer={"method": method},
        extra=extra,
    )
    return bundle, image


def export_mopd(
    model: MoPDModel,
    backbone: Backbone,
    class_names: Sequence[str],
    n_base: int,
    out_dir: str | Path,
    *,
    onnx: bool = False,
    method: str = "mopd",
    extra: dict[str, Any] | None = None,
    calibration: Any = None,
) -> Bundle:
    """Write the bundle (optionally with the parity-checked ONNX image tower); returns it re-loaded.

    ``calibration``: in-domain images (a dataset of (pixels, label)); a bounded draw is embedded as the
    bundle's calibration sample."""
    bundle, image = mopd_bundle(model, backbone, class_names, n_base, method=method, extra=extra)
    if calibration is not None:
        add_calibration(bundle, image_tower(image), calibration, "mopd: train images")
    return write_bundle(bundle, out_dir, onnx=onnx, tower=image_tower(image) if onnx else None)
