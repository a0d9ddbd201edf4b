"""Base-to-novel evaluation of an exported bundle, through ``models/`` only (what the service runs).

The bundle's "default" label set must list the dataset's classes in label-id order (base block
then novel block, as ``train distill`` writes it). Each subset is classified among its own rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from models.bundle import DEFAULT_LABEL_SET, load_bundle
from models.towers import build_image_tower
from training.benchmark import load_benchmark
from training.config import Cfg, DataCfg
from training.data import Subset, build_transform
from training.evaluate import accuracy, base_novel_result, per_class_accuracy, predict
from training.loop import pick_device

log = logging.getLogger(__name__)


class EvalRunConfig(Cfg):
    """``promptdistill evaluate``: a bundle on a dataset's base and novel test images."""

    bundle: Path
    data: DataCfg
    device: str = "auto"
    label_set: str = DEFAULT_LABEL_SET


def evaluate_bundle(cfg: EvalRunConfig) -> dict[str, Any]:
    """Base / novel / HM (+ per-class) of ``cfg.bundle`` on ``cfg.data``'s test split."""
    device = pick_device(cfg.device)
    bundle = load_bundle(cfg.bundle)
    spec = bundle.manifest.image_encoder.preprocess.to_config()
    tower = build_image_tower(bundle, device)
    names = [c.name for c in bundle.label_set(cfg.label_set).classes]
    vectors = bundle.class_vectors[cfg.label_set].to(device)  # [N, D]
    bench = load_benchmark(cfg.data, image_size=spec.size[0])
    if names != bench.class_names:
        raise ValueError(
            f"bundle label set {cfg.label_set!r} has classes {names[:5]}..., the dataset {bench.class_names[:5]}...; "
            "evaluate on the dataset the bundle was trained for"
        )
    scale = bundle.manifest.logit_scale
    transform = build_transform(spec, train=False)
    out: dict[str, Any] = {}
    subsets: list[tuple[Subset, str]] = [("base", "base"), ("new", "novel")]
    for subset, key in subsets:
        w = vectors[bench.rows(subset)]

        def logits_fn(x: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
            feats: torch.Tensor = tower(x)  # [B, D] normalised
            return scale * feats.float() @ w.t()

        logits, labels = predict(
            logits_fn, bench.dataset("test", subset, transform), device=device, batch_size=cfg.data.test_batch_size
        )
        out[key] = accuracy(logits, labels)
        out[f"{key}_per_class"] = per_class_accuracy(logits, labels)
    result = base_novel_result(out.pop("base"), out.pop("novel"), **out)
    log.info("bundle %s: base %.2f novel %.2f HM %.2f", cfg.bundle, result["base"], result["novel"], result["hm"])
    return result
