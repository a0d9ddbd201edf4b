"""A bundle's model card: what it is, how it was trained and evaluated, and its embedding space.

Built from the manifest alone (the exporters record training facts and evaluation in ``producer``
and ``extra``), so ``promptdistill bundle inspect`` and the service's ``GET /v1/model`` say the same.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from models.bundle import Bundle, bundle_space

# extra keys that are evaluation results, not training facts
_EVALUATION = ("metrics", "agreement", "parity", "shadow")


def bundle_version(bundle: Bundle) -> str:
    """A short, stable name of this exact bundle: its folder and a digest of every file's sha256."""
    digest = hashlib.sha256(json.dumps(bundle.manifest.files, sort_keys=True).encode()).hexdigest()[:12]
    name = bundle.root.resolve().name if bundle.root is not None else "in-memory"  # a symlink: its target
    return f"{name}@{digest}"


def model_card(bundle: Bundle) -> dict[str, Any]:
    """The card as plain JSON-able data."""
    m = bundle.manifest
    extra = dict(m.extra)
    evaluation = {k: extra.pop(k) for k in _EVALUATION if k in extra}
    parity = {o.file: {"max_abs_diff": o.max_abs_diff, "quantization": o.quantization, **o.parity}
              for o in m.image_encoder.onnx}  # fmt: skip
    if parity:
        evaluation["onnx"] = parity
    return {
        "version": bundle_version(bundle),
        "method": m.producer.get("method", "unknown"),
        "created_at": m.created_at,
        "producer": m.producer,
        "space": bundle_space(bundle),
        "embed_dim": m.embed_dim,
        "image_tower": {
            "backbone": m.backbones[m.image_encoder.backbone].name,
            "prompts": m.image_encoder.prompts.model_dump(),
            "projector": m.image_encoder.projector is not None,
            "onnx": [o.file for o in m.image_encoder.onnx],
        },
        "text_side": None
        if m.text_encoder is None
        else {
            "backbone": m.backbones[m.text_encoder.backbone].name,
            "prompts": m.text_encoder.prompts.model_dump(),
            "templates": len(m.text_encoder.templates),
        },
        "label_sets": {ls.name: len(ls.classes) for ls in m.label_sets},
        "training": extra,
        "evaluation": evaluation,
    }
