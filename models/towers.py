"""Assemble serving-ready encoders from a bundle (and bundle pieces from live modules).

``ImageTower`` = prompted image encoder (+ PromptKD projector) + L2 normalisation: exactly what
the exporter's evaluation computed, what the ONNX export contains, and what the service runs.
``TextSide`` = prompted text encoder + templates: what the service runs to add a class name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import Backbone, load_backbone
from models.bundle import BackboneRef, Bundle, BundleMissingFile, PromptSpec
from models.class_vectors import encode_class_names
from models.heads import Projector, ProjectorCfg
from models.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptCfg, VisualPromptCfg

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".tar")


class ImageTower(nn.Module):
    """pixels [B, 3, H, W] -> L2-normalised embeddings [B, embed_dim] in class-vector space."""

    def __init__(self, encoder: PromptedImageEncoder, projector: Projector | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        params = {f"encoder.{k}": v for k, v in self.encoder.trainable_parameters().items()}
        if self.projector is not None:
            params |= {f"projector.{k}": v for k, v in self.projector.trainable_parameters().items()}
        return params

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.encoder(pixels)
        if self.projector is not None:
            x = self.projector(x)
        return F.normalize(x, dim=-1)


@dataclass
class TextSide:
    """Encodes class names exactly as the bundle's exporter did."""

    encoder: PromptedTextEncoder
    templates: list[str]

    def class_vectors(
        self,
        names: list[str],
        templates: list[str] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """[N, D] class vectors; ``templates`` overrides the bundle's (only for prompt-free text sides)."""
        return encode_class_names(self.encoder, names, templates or self.templates, progress=progress)


def backbone_ref(backbone: Backbone) -> BackboneRef:
    """The manifest entry for a live backbone."""
    spec = backbone.spec
    return BackboneRef(
        name=spec.name,
        open_clip_config=spec.model_config,
        pretrained=spec.pretrained,
        weights_sha256=spec.weights_sha256,
    )


def needs_embedded_weights(backbone: Backbone) -> bool:
    """Random-init or in-memory-trained weights can only be reproduced if they travel in the bundle."""
    return backbone.spec.pretrained is None


def has_local_weights(backbone: Backbone) -> bool:
    """Random init, or weights from a local file (another run's folder, a bundle): nothing a
    machine elsewhere could fetch by name, unlike a public tag or an ``hf-hub:`` model."""
    pretrained = backbone.spec.pretrained
    return pretrained is None or (":" not in backbone.spec.name and Path(pretrained).is_file())


def load_bundle_backbone(
    bundle: Bundle, key: str, device: str | torch.device = "cpu", *, text_only: bool = False
) -> Backbone:
    """Rebuild a bundle's backbone (embedded weights win over the original reference); with
    ``text_only`` its text tower alone (``model.visual`` is ``nn.Identity``)."""
    ref = bundle.manifest.backbones[key]
    weights = str(bundle.path(ref.weights_file)) if ref.weights_file else ref.pretrained
    if ref.weights_file is None and ref.pretrained is None:
        raise ValueError(f"bundle backbone {key!r} has neither embedded weights nor a weights reference")
    text_only = text_only or ref.towers == "text"
    cfg = ref.open_clip_config or None
    return load_backbone(ref.name, weights, device=device, model_config=cfg, text_only=text_only)


def check_backbone_weights(bundle: Bundle, keys: list[str]) -> None:
    """Raise :class:`BundleMissingFile` (one line) when a backbone refers to a local weights file
    that is not there (e.g. a path into the training run folder of another machine)."""
    for key in keys:
        ref = bundle.manifest.backbones[key]
        if ref.weights_file is not None:
            continue  # embedded: load_bundle already checked it against the manifest
        if ref.pretrained is None:
            raise BundleMissingFile(f"backbone {key!r} has neither embedded weights nor a weights reference")
        looks_like_path = any(sep in ref.pretrained for sep in ("/", "\\")) or ref.pretrained.endswith(_WEIGHT_SUFFIXES)
        if looks_like_path and ":" not in ref.name and not Path(ref.pretrained).is_file():
            raise BundleMissingFile(
                f"backbone {key!r} refers to the weights file {ref.pretrained}, which does not exist here; "
                "re-export the bundle with its weights embedded (export.embed_weights=true) "
                "or serve it where that file is"
            )


def needed_backbones(bundle: Bundle, image_tower: bool = True) -> list[str]:
    """Backbone keys a server loads: the text side's, and the image encoder's unless ONNX runs it."""
    m = bundle.manifest
    keys = [m.image_encoder.backbone] if image_tower else []
    if m.text_encoder is not None and m.text_encoder.backbone not in keys:
        keys.append(m.text_encoder.backbone)
    return keys


def _visual_cfg(spec: PromptSpec) -> VisualPromptCfg:
    return VisualPromptCfg(n_tokens=spec.n_tokens, depth=spec.depth)


def build_image_tower(
    bundle: Bundle, device: str | torch.device = "cpu", backbone: Backbone | None = None
) -> ImageTower:
    """The bundle's image tower in eval mode on ``device``."""
    spec = bundle.manifest.image_encoder
    bb = backbone or load_bundle_backbone(bundle, spec.backbone, device)
    encoder = PromptedImageEncoder(bb.model, _visual_cfg(spec.prompts))
    if encoder.prompts is not None:
        _load_rows(encoder.prompts, bundle.prompts["image"], "image")
    projector = None
    if spec.projector is not None and bundle.projector is not None:
        projector = Projector(ProjectorCfg(spec.projector.in_dim, spec.projector.out_dim))
        projector.load_state_dict(bundle.projector)
    tower = ImageTower(encoder, projector).to(device).eval()
    tower.requires_grad_(False)
    return tower


def build_text_side(bundle: Bundle, device: str | torch.device = "cpu", backbone: Backbone | None = None) -> TextSide:
    """The bundle's text side in eval mode on ``device``."""
    spec = bundle.manifest.text_encoder
    if spec is None:
        raise ValueError("this bundle has no text side: class names cannot be encoded at runtime")
    bb = backbone or load_bundle_backbone(bundle, spec.backbone, device)
    cfg = TextPromptCfg(n_tokens=spec.prompts.n_tokens, depth=spec.prompts.depth)
    encoder = PromptedTextEncoder(bb.model, bb.tokenizer, cfg).to(device).eval()
    if encoder.prompts is not None:
        _load_rows(encoder.prompts, bundle.prompts["text"], "text")
    encoder.requires_grad_(False)
    return TextSide(encoder, list(spec.templates))


def build_towers(bundle: Bundle, device: str | torch.device = "cpu") -> tuple[ImageTower, TextSide | None]:
    """Both sides, loading a shared backbone once when image and text use the same one."""
    m = bundle.manifest
    image_bb = load_bundle_backbone(bundle, m.image_encoder.backbone, device)
    tower = build_image_tower(bundle, device, image_bb)
    if m.text_encoder is None:
        return tower, None
    if m.text_encoder.backbone == m.image_encoder.backbone:
        return tower, build_text_side(bundle, device, image_bb)
    text_bb = load_bundle_backbone(bundle, m.text_encoder.backbone, device, text_only=True)  # never runs images
    return tower, build_text_side(bundle, device, text_bb)


def prompt_spec(cfg: Any) -> PromptSpec:
    """PromptSpec from a TextPromptCfg / VisualPromptCfg."""
    return PromptSpec(n_tokens=cfg.n_tokens, depth=cfg.depth, init=getattr(cfg, "init", None))


def _load_rows(param: nn.Parameter, rows: torch.Tensor, side: str) -> None:
    if param.shape != rows.shape:
        from models.bundle import BundleDimensionError

        raise BundleDimensionError(
            f"{side} prompts: bundle has {tuple(rows.shape)}, backbone needs {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(rows.to(param.dtype))
