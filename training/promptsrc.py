"""PromptSRC on IVLP prompts: the PromptKD teacher (algorithms.md §1.2, official trainers/promptsrc.py).

Loss per labeled batch (the official ``forward_backward``, fp32 path)::

    L = CE(s·û·ŵᵀ, y) + 25·L1(ŵ, w̄_zs) + 10·L1(û, û_zs) + KL(softmax(z_zs) ‖ softmax(z)) / (B·C)

ŵ: prompted normalised class text features; w̄_zs: frozen text features averaged over the
zero-shot templates, normalised after averaging (the official code averages the *unnormalised*
per-template features); û / û_zs: prompted / frozen normalised image features; z / z_zs: their
logits against ŵ / w̄_zs; s = exp(logit_scale). L1 is mean-reduced; the KL is summed and divided
by the number of logit entries. After each epoch e the prompts are added to a running sum with
Gaussian weight g(e) ~ N(15, 1) normalised over the epochs (GPA); the final teacher is that sum.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm import tqdm

from models.backbone import Backbone
from models.class_vectors import encode_class_names, format_template, validate_templates
from models.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptCfg, VisualPromptCfg
from training.config import Cfg
from training.loop import Callback, Trainer

log = logging.getLogger(__name__)

LEARNED_TEMPLATES = ["{}."]  # the text after the learned context: "<ctx x n> {classname}."


class PromptSRCCfg(Cfg):
    """Defaults = configs/trainers/PromptSRC/vit_l14_c2_ep20_batch8_4+4ctx.yaml."""

    text_tokens: int = Field(default=4, ge=1)
    text_depth: int = Field(default=9, ge=1)  # J: input row + 8 deep rows (text layers 1..8)
    ctx_init: str | None = "a photo of a"  # row 0 of the text prompts
    vision_tokens: int = Field(default=4, ge=1)
    vision_depth: int = Field(default=9, ge=1)
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    gpa_mean: float = 15.0
    gpa_std: float = Field(default=1.0, gt=0)
    # Zero-shot text targets: "promptsrc" = the official 60 ImageNet templates
    # (trainers/imagenet_templates.py, models/template_sets.py); "imagenet" = OpenAI's 80
    # (open_clip); or "simple" / a file with one template per line.
    zs_templates: str = "promptsrc"


def gpa_weights(epochs: int, mean: float = 15.0, std: float = 1.0) -> np.ndarray:
    """Gaussian pdf at epochs 1..E, normalised to sum 1 (index e-1 = weight of epoch e)."""
    e = np.arange(1, epochs + 1, dtype=np.float64)
    g = np.exp(-0.5 * ((e - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
    if g.sum() == 0:
        raise ValueError(f"GPA N({mean}, {std}) puts no weight on epochs 1..{epochs}")
    out: np.ndarray = g / g.sum()
    return out


def promptsrc_losses(
    logits: torch.Tensor,  # [B, C] prompted
    labels: torch.Tensor,  # [B]
    text_features: torch.Tensor,  # [C, D] prompted, normalised
    zs_text_features: torch.Tensor,  # [C, D] frozen template mean, normalised
    image_features: torch.Tensor,  # [B, D] prompted, normalised
    zs_image_features: torch.Tensor,  # [B, D] frozen, normalised
    zs_logits: torch.Tensor,  # [B, C] frozen
    text_weight: float = 25.0,
    image_weight: float = 10.0,
) -> dict[str, torch.Tensor]:
    """The four PromptSRC terms and their sum (``"loss"``)."""
    ce = F.cross_entropy(logits, labels)
    l1_text = F.l1_loss(text_features, zs_text_features, reduction="mean") * text_weight
    l1_image = F.l1_loss(image_features, zs_image_features, reduction="mean") * image_weight
    # KL(p_zs || p) summed over all entries, divided by B*C (the official "/ logits.numel()").
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zs_logits, dim=1), reduction="sum", log_target=True)
    kl = kl / logits.numel()
    return {"loss": ce + l1_text + l1_image + kl, "ce": ce, "l1_text": l1_text, "l1_image": l1_image, "kl": kl}


@torch.no_grad()
def zero_shot_text_targets(
    encoder: PromptedTextEncoder, names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """[C, D]: normalise(mean over templates of the frozen, *unnormalised* text features)."""
    templates = validate_templates(templates)
    bar = tqdm(templates, desc="zero-shot text targets", unit="template", disable=None, leave=False)  # terminal only
    feats = torch.stack([encoder.encode([format_template(t, n) for n in names]).float() for t in bar], dim=1)
    return F.normalize(feats.mean(dim=1), dim=-1)  # [C, T, D] -> [C, D]


class PromptSRC(nn.Module):
    """IVLP-prompted CLIP (text + vision deep prompts) with the frozen CLIP as regulariser."""

    zs_text: torch.Tensor  # buffer [C, D]
    tokens: torch.Tensor  # buffer [C, L]

    def __init__(
        self, backbone: Backbone, class_names: Sequence[str], cfg: PromptSRCCfg, zs_templates: Sequence[str]
    ) -> None:
        super().__init__()
        clip = backbone.model
        self.cfg = cfg
        self.class_names = list(class_names)
        self.text = PromptedTextEncoder(
            clip, backbone.tokenizer, TextPromptCfg(n_tokens=cfg.text_tokens, depth=cfg.text_depth, init=cfg.ctx_init)
        )
        self.image = PromptedImageEncoder(clip, VisualPromptCfg(n_tokens=cfg.vision_tokens, depth=cfg.vision_depth))
        self.zs_image = PromptedImageEncoder(clip)  # no prompts: exactly clip.encode_image
        self.zs_text_encoder = PromptedTextEncoder(clip, backbone.tokenizer)  # exactly clip.encode_text
        self.register_buffer("zs_text", zero_shot_text_targets(self.zs_text_encoder, self.class_names, zs_templates))
        self.register_buffer(
            "tokens", self.text.tokenize([format_template(LEARNED_TEMPLATES[0], n) for n in self.class_names])
        )
        self.logit_scale = float(clip.logit_scale.exp().item())  # frozen (100 for OpenAI CLIP)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        params = {f"text.{k}": v for k, v in self.text.trainable_parameters().items()}
        return params | {f"image.{k}": v for k, v in self.image.trainable_parameters().items()}

    def text_features(self) -> torch.Tensor:
        """[C, D] normalised prompted class features of the training classes."""
        feats: torch.Tensor = self.text(self.tokens, normalize=True)
        return feats

    def logits(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C] prompted logits; pass ``text_features`` to classify among other classes."""
        w = self.text_features() if text_features is None else text_features
        feats: torch.Tensor = self.image(images, normalize=True)  # [B, D]
        return self.logit_scale * feats.float() @ w.t().float()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        text = self.text_features().float()  # [C, D]
        image = self.image(images, normalize=True).float()  # [B, D]
        logits = self.logit_scale * image @ text.t()  # [B, C]
        zs_text = self.zs_text.float()
        with torch.no_grad():
            zs_image = self.zs_image(images, normalize=True).float()
            zs_logits = self.logit_scale * zs_image @ zs_text.t()
        c = self.cfg
        return promptsrc_losses(
            logits, labels, text, zs_text, image, zs_image, zs_logits, c.text_loss_weight, c.image_loss_weight
        )

    @torch.no_grad()
    def class_vectors(self, names: Sequence[str]) -> torch.Tensor:
        """[N, D] teacher class vectors via THE class-vector function (templates ``["{}."]``)."""
        return encode_class_names(self.text, list(names), LEARNED_TEMPLATES)


class GaussianPromptAggregation(Callback):
    """GPA: after epoch e add g(e)·θ_e to a running sum; at the end load the sum into the model.

    Only the trainable prompts are aggregated. The official code weights the whole state dict,
    but the frozen entries are the same every epoch and the weights sum to 1, so it is the same.
    """

    def __init__(self, epochs: int, mean: float, std: float) -> None:
        self.weights = gpa_weights(epochs, mean, std)
        self.sum: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        w = float(self.weights[int(metrics["epoch"]) - 1])
        params = {k: p.detach().float() for k, p in trainer.method.named_parameters() if p.requires_grad}
        if self.sum is None:
            self.sum = {k: w * v for k, v in params.items()}
        else:
            self.sum = {k: self.sum[k] + w * v for k, v in params.items()}

    def on_train_end(self, trainer: Trainer) -> None:
        if self.sum is None or trainer.state.epoch != len(self.weights):
            return
        named = dict(trainer.method.named_parameters())
        with torch.no_grad():
            for k, v in self.sum.items():
                named[k].copy_(v.to(named[k].dtype))
        log.info("loaded the Gaussian-aggregated prompts (weights peak at epoch %d)", int(np.argmax(self.weights)) + 1)

    def state_dict(self) -> dict[str, object]:
        return {"sum": self.sum}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.sum = state["sum"]  # type: ignore[assignment]
