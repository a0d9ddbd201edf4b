"""Evaluation of an exported bundle (student, teacher, MoPD, zero-shot), through ``models/`` only.

Protocols (training/protocols.py): ``base2novel`` needs the bundle's label set to list the
dataset's classes in label-id order (base block then novel block, as every trainer writes it).
``all`` (cross-dataset, domain generalisation) classifies every test image among the dataset's
classes; their rows are taken from the bundle *by name* — ImageNet-A/-R's 200 classes are rows of
an ImageNet bundle's 1000 (that is the index mapping) — and names the bundle lacks are encoded
through its text side, the way the service adds a class.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from models.bundle import DEFAULT_LABEL_SET, Bundle, load_bundle
from models.towers import build_image_tower, build_text_side, load_bundle_backbone
from training.benchmark import load_benchmark
from training.config import Cfg, DataCfg
from training.data import build_transform
from training.loop import pick_device
from training.protocols import EvalProtocol, evaluate_classifier, headline

log = logging.getLogger(__name__)


class EvalRunConfig(Cfg):
    """``promptdistill evaluate``: a bundle on a dataset's test images under a protocol."""

    bundle: Path
    data: DataCfg
    protocol: EvalProtocol = "base2novel"
    device: str = "auto"
    label_set: str = DEFAULT_LABEL_SET


def class_rows(bundle: Bundle, label_set: str, names: list[str], encode: Any) -> tuple[torch.Tensor, dict[str, int]]:
    """[len(names), D] rows for ``names``: the bundle's row where it has the name, else ``encode``d.

    Returns the rows and the mapping name -> bundle row index (the classes found in the bundle).
    """
    have = {c.name: i for i, c in enumerate(bundle.label_set(label_set).classes)}
    vectors = bundle.class_vectors[label_set]
    missing = [n for n in names if n not in have]
    extra = {}
    if missing:
        if encode is None:
            raise ValueError(f"bundle has no text side to encode the dataset's classes {missing[:5]}")
        extra = dict(zip(missing, encode(missing), strict=True))
    rows = torch.stack([vectors[have[n]] if n in have else extra[n] for n in names])
    return rows, {n: have[n] for n in names if n in have}


def evaluate_bundle(cfg: EvalRunConfig) -> dict[str, Any]:
    """The protocol's metrics (+ per class) of ``cfg.bundle`` on ``cfg.data``'s test split."""
    device = pick_device(cfg.device)
    bundle = load_bundle(cfg.bundle)
    spec = bundle.manifest.image_encoder.preprocess.to_config()
    bench = load_benchmark(cfg.data, image_size=spec.size[0])
    names = [c.name for c in bundle.label_set(cfg.label_set).classes]
    if cfg.protocol == "base2novel" and names != bench.class_names:
        raise ValueError(
            f"bundle label set {cfg.label_set!r} has classes {names[:5]}..., the dataset {bench.class_names[:5]}...; "
            "base2novel needs the dataset the bundle was trained for (protocol=all evaluates on other class sets)"
        )
    m = bundle.manifest
    image_bb = load_bundle_backbone(bundle, m.image_encoder.backbone, device)
    tower = build_image_tower(bundle, device, image_bb)
    if bench.source_ids is not None and len(names) == bench.source_size:
        # an ImageNet variant on an ImageNet bundle: the official index mapping, not a name lookup
        vectors = bundle.class_vectors[cfg.label_set][bench.source_ids]
        found = {n: i for n, i in zip(bench.class_names, bench.source_ids, strict=True)}
    else:

        def encode(ns: list[str]) -> torch.Tensor:  # the text side is loaded only if a name is missing
            assert m.text_encoder is not None
            shared = image_bb if m.text_encoder.backbone == m.image_encoder.backbone else None
            return build_text_side(bundle, device, shared).class_vectors(ns)

        vectors, found = class_rows(bundle, cfg.label_set, bench.class_names, encode if m.text_encoder else None)
    result = evaluate_classifier(
        tower, vectors, bundle.manifest.logit_scale, bench, build_transform(spec, train=False), device,
        protocol=cfg.protocol, batch_size=cfg.data.test_batch_size,
    )  # fmt: skip
    result |= {"protocol": cfg.protocol, "n_classes": len(bench.class_names), "classes_from_bundle": len(found)}
    if len(found) < len(bench.class_names):
        result["classes_encoded"] = len(bench.class_names) - len(found)
    log.info("bundle %s: %s", cfg.bundle, headline(result))
    return result
