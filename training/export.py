"""Assemble bundles (models.bundle) from trained parts, and write them (optionally with ONNX).

A trainer hands over live modules; this module turns them into a self-describing folder that
``models/`` alone can load. Any method (PromptKD, MoPD, ...) uses the same two calls::

    bundle = assemble_bundle(ImageParts(...), {"default": vectors}, [label_set(...)],
                             text=TextParts(...), producer={"method": "promptkd"})
    write_bundle(bundle, out_dir, onnx=True)        # parity-checked ONNX of the image tower

Backbones are stored by reference (name + pretrained tag / file + resolved config). Random-init
or trained-from-scratch backbones (``pretrained is None``) must travel inside the bundle;
``embed_weights=None`` decides that automatically. A text side on its own backbone (PromptKD's
teacher text tower) travels as its text tower alone unless it is a public checkpoint (a tag):
weights from a local file, such as the teacher bundle's, would otherwise tie the bundle to that
file's path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from models import __version__
from models.backbone import Backbone, text_tower_state
from models.bundle import (
    BackboneRef,
    Bundle,
    ClassEntry,
    ImageEncoderSpec,
    LabelSetSpec,
    Manifest,
    PreprocessSpec,
    ProjectorSpec,
    TextEncoderSpec,
    load_bundle,
    save_bundle,
)
from models.class_vectors import validate_templates
from models.heads import Projector
from models.precision import add_probes
from models.prompts import PromptedImageEncoder, PromptedTextEncoder
from models.towers import ImageTower, backbone_ref, has_local_weights, needs_embedded_weights, prompt_spec
from models.zeroshot import add_onnx

log = logging.getLogger(__name__)


@dataclass
class ImageParts:
    """The image side of a bundle: backbone + prompted encoder (+ projector)."""

    backbone: Backbone
    encoder: PromptedImageEncoder
    projector: Projector | None = None
    key: str = "student"  # backbone key in the manifest


@dataclass
class TextParts:
    """The text side: how new class names are encoded (must reproduce the stored vectors)."""

    backbone: Backbone
    encoder: PromptedTextEncoder
    templates: list[str] = field(default_factory=lambda: ["{}."])
    key: str = "teacher"


def label_set(name: str, class_names: Sequence[str], provenance: Sequence[str] | str = "bundle") -> LabelSetSpec:
    """A label set with ids ``0..N-1`` in row order; ``provenance`` per class or one for all."""
    provs = [provenance] * len(class_names) if isinstance(provenance, str) else list(provenance)
    if len(provs) != len(class_names):
        raise ValueError(f"{len(class_names)} class names but {len(provs)} provenance entries")
    return LabelSetSpec(
        name=name,
        classes=[
            ClassEntry(id=i, name=n, provenance=p) for i, (n, p) in enumerate(zip(class_names, provs, strict=True))
        ],
    )


def image_tower(parts: ImageParts) -> ImageTower:
    """The serving image tower for these parts (shares the live modules)."""
    return ImageTower(parts.encoder, parts.projector)


def assemble_bundle(
    image: ImageParts,
    class_vectors: dict[str, torch.Tensor],
    label_sets: list[LabelSetSpec],
    *,
    text: TextParts | None = None,
    logit_scale: float | None = None,
    producer: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    embed_weights: bool | None = None,
) -> Bundle:
    """An in-memory bundle from trained parts (nothing is written).

    Args:
        image: image side; its backbone's exp(logit_scale) is the default ``logit_scale``.
        class_vectors: label-set name -> [N, D] L2-normalised rows (row i = class id i).
        label_sets: one spec per entry of ``class_vectors``.
        text: text side for runtime class addition (None: the service cannot add classes).
        producer: e.g. ``{"method": "promptkd"}``; the promptdistill version is added.
        extra: method facts (metrics, configs) kept in the manifest.
        embed_weights: store backbone weights inside the bundle; None = only when the backbone
            has no weights reference (random init / trained here).
    """
    embed_dim = int(next(iter(class_vectors.values())).shape[1])
    out_dim = image.projector.cfg.out_dim if image.projector is not None else image.encoder.output_dim
    if out_dim != embed_dim:
        raise ValueError(f"image side outputs {out_dim}-d features but class vectors are {embed_dim}-d")
    backbones = {image.key: image.backbone}
    prompts = {}
    if image.encoder.prompts is not None:
        prompts["image"] = image.encoder.prompts.detach().float().cpu()
    text_spec = None
    if text is not None:
        text_spec, text_rows = _text_side(image, text, embed_dim)
        backbones[text_spec.backbone] = text.backbone
        prompts |= text_rows
    projector_state, projector_spec = _projector(image.projector)
    scale = logit_scale if logit_scale is not None else float(image.backbone.model.logit_scale.exp().item())
    refs, states = _backbones(backbones, image.key, embed_weights)
    manifest = Manifest(
        producer={"promptdistill": __version__, **(producer or {})},
        backbones=refs,
        embed_dim=embed_dim,
        logit_scale=scale,
        image_encoder=ImageEncoderSpec(
            backbone=image.key,
            preprocess=PreprocessSpec.from_config(image.backbone.preprocess),
            prompts=prompt_spec(image.encoder.cfg),
            projector=projector_spec,
            output_dim=embed_dim,
        ),
        text_encoder=text_spec,
        label_sets=label_sets,
        extra=extra or {},
    )
    return Bundle(
        manifest=manifest,
        class_vectors={k: v.detach().float().cpu() for k, v in class_vectors.items()},
        prompts=prompts,
        projector=projector_state,
        backbone_states=states,
    )


def _backbones(
    backbones: dict[str, Backbone], image_key: str, embed_weights: bool | None
) -> tuple[dict[str, BackboneRef], dict[str, dict[str, torch.Tensor]]]:
    """Manifest references and the weights to embed. The image side's backbone is embedded whole
    when asked or random; a separate text side's backbone as its text tower alone, unless it
    is a public checkpoint (serving never runs that backbone's image tower)."""
    refs, states = {}, {}
    for key, bb in backbones.items():
        ref = backbone_ref(bb)
        if key == image_key:
            if embed_weights if embed_weights is not None else needs_embedded_weights(bb):
                states[key] = {n: t.detach().cpu() for n, t in bb.model.state_dict().items()}
        elif embed_weights if embed_weights is not None else has_local_weights(bb):
            states[key] = {n: t.detach().cpu() for n, t in text_tower_state(bb.model).items()}
            ref = ref.model_copy(update={"towers": "text"})
        refs[key] = ref
    return refs, states


def _text_side(image: ImageParts, text: TextParts, embed_dim: int) -> tuple[TextEncoderSpec, dict[str, torch.Tensor]]:
    """Manifest entry and prompt rows of the text side (shares the image key when the backbone is shared)."""
    key = image.key if text.backbone is image.backbone else text.key
    if key == image.key and text.backbone is not image.backbone:
        raise ValueError("image and text sides use different backbones but the same key")
    spec = TextEncoderSpec(
        backbone=key,
        prompts=prompt_spec(text.encoder.cfg),
        templates=validate_templates(text.templates),
        output_dim=embed_dim,
    )
    rows = {} if text.encoder.prompts is None else {"text": text.encoder.prompts.detach().float().cpu()}
    return spec, rows


def _projector(projector: Projector | None) -> tuple[dict[str, torch.Tensor] | None, ProjectorSpec | None]:
    if projector is None:
        return None, None
    state = {k: v.detach().cpu() for k, v in projector.state_dict().items()}
    return state, ProjectorSpec(in_dim=projector.cfg.in_dim, out_dim=projector.cfg.out_dim)


def add_calibration(
    bundle: Bundle, tower: ImageTower, images: Dataset[Any], source: str, *, seed: int = 0, batch_size: int = 100
) -> Bundle:
    """Embed a bounded seeded draw (models.calibration.draw) of ``images`` (pixels, label) with
    ``tower`` (eval mode, its device) as ``bundle``'s calibration sample."""
    from models.calibration import attach, draw, embed_batches

    picked = draw(len(images), seed=seed).tolist()  # type: ignore[arg-type]
    loader = DataLoader(Subset(images, picked), batch_size=batch_size, shuffle=False)
    device = next(tower.parameters()).device
    was_training = tower.training
    sample = embed_batches(tower.eval(), (pixels.to(device) for pixels, _ in loader))
    tower.train(was_training)
    return attach(bundle, sample, f"{source}: {len(picked)} of {len(images)}", seed=seed)  # type: ignore[arg-type]


def write_bundle(
    bundle: Bundle,
    out_dir: str | Path,
    *,
    onnx: bool = False,
    int8: bool = False,
    int8_min_cosine: float | None = None,
    tower: ImageTower | None = None,
    sample_pixels: torch.Tensor | None = None,
) -> Bundle:
    """Save ``bundle`` (and with ``onnx`` the parity-checked ONNX image tower); returns it re-loaded.

    ``int8`` adds a dynamically quantised graph next to the fp32 one (implies ``onnx``), with its
    parity report (cosine and top-1 agreement vs fp32 on real photos) in the manifest.

    ``tower`` is required with ``onnx`` (use :func:`image_tower`); ``sample_pixels``
    [B, 3, H, W] are the images for the parity check (default: the shipped sample photos).
    """
    out = Path(out_dir)
    if (onnx or int8) and tower is None:
        raise ValueError("onnx export needs the image tower")

    def exports(stage: Path) -> dict[str, Path]:
        if not (onnx or int8):
            return add_probes(bundle, stage)  # the precision gate's images (models/precision.py)
        assert tower is not None
        was_training = tower.training
        device = next(tower.parameters()).device
        try:
            return add_onnx(bundle, tower.eval(), stage, sample_pixels, int8=int8, int8_min_cosine=int8_min_cosine)
        finally:
            tower.to(device).train(was_training)  # the exporter moved it to CPU

    save_bundle(bundle, out, exports=exports)
    log.info("wrote bundle to %s", out)
    return load_bundle(out)
