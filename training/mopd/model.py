"""MoPD model: a CoOp soft prompt on a frozen CLIP, taught by a gated mixture of hard prompts.

Trainable: the student's context vectors ``[1, n_ctx, width]`` and the gate ``W_g [P, D]``.
Frozen: both CLIP towers and the hard-prompt bank ``H [P, N, D]`` (one zero-shot classifier per
template, encoded once by the same frozen text tower). Inference is plain CoOp: the gate and the
bank are only used by the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import Backbone
from models.class_vectors import encode_class_names, format_template, validate_templates
from models.heads import Gate, GateCfg
from models.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptCfg
from training.mopd.loss import MoPDLossCfg, mopd_loss

if TYPE_CHECKING:
    from training.mopd.diagnostics import GateStats

STUDENT_TEMPLATES = ["{}."]  # CoOp: "<ctx x n> {name}."


@dataclass(frozen=True)
class MoPDModelCfg:
    """Student and gate shapes."""

    n_ctx: int = 4  # CoOp context tokens
    ctx_init: str | None = "a photo of a"  # phrase the context starts from (None: N(0, 0.02))
    top_k: int = 2  # teachers kept per image
    logit_scale: float | None = None  # None: the backbone's exp(logit_scale) (100 for OpenAI CLIP)

    def text_prompt_cfg(self) -> TextPromptCfg:
        return TextPromptCfg(n_tokens=self.n_ctx, depth=1, init=self.ctx_init)


@torch.no_grad()
def build_prompt_bank(
    text_encoder: PromptedTextEncoder, names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Hard-prompt bank [P, N, D]: row p = normalised zero-shot class vectors of template p."""
    templates = validate_templates(templates)
    return torch.stack([encode_class_names(text_encoder, list(names), [t]) for t in templates])


class MoPDModel(nn.Module):
    """Student (CoOp) + gate + frozen teacher bank; ``forward`` returns the loss dict.

    Args:
        backbone: frozen CLIP whose text tower hosts the soft prompt.
        class_names: training (base) class names, in label order.
        bank: [P, N, D] hard-prompt class vectors for ``class_names`` (see build_prompt_bank).
        cfg: student / gate shapes.
        loss_cfg: term weights.
        image_encoder: image tower for the gate and all logits; default = the backbone's plain
            frozen image tower. A prompted tower (e.g. a stored PromptSRC teacher's) is frozen
            here and used as is.
    """

    def __init__(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        bank: torch.Tensor,
        cfg: MoPDModelCfg | None = None,
        loss_cfg: MoPDLossCfg | None = None,
        image_encoder: PromptedImageEncoder | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or MoPDModelCfg()
        if cfg.n_ctx < 1:
            raise ValueError("MoPD's student needs a soft prompt: n_ctx must be >= 1")
        if bank.ndim != 3 or bank.shape[1] != len(class_names):
            raise ValueError(f"bank must be [P, {len(class_names)}, D], got {tuple(bank.shape)}")
        self.cfg = cfg
        self.loss_cfg = loss_cfg or MoPDLossCfg()
        self.class_names = list(class_names)
        self.image_encoder = image_encoder or PromptedImageEncoder(backbone.model)
        self.image_encoder.requires_grad_(False)
        self.text = PromptedTextEncoder(backbone.model, backbone.tokenizer, cfg.text_prompt_cfg())
        self.bank: torch.Tensor
        self.register_buffer("bank", F.normalize(bank.float(), dim=-1))  # [P, N, D]
        self.gate = Gate(GateCfg(embed_dim=int(bank.shape[2]), n_prompts=int(bank.shape[0]), top_k=cfg.top_k))
        scale = cfg.logit_scale or float(backbone.model.logit_scale.exp().item())
        self.logit_scale = scale
        self.gate_stats: GateStats | None = None  # set by the trainer to record training-time choices

    @property
    def n_prompts(self) -> int:
        return int(self.bank.shape[0])

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        params = {f"text.{k}": v for k, v in self.text.trainable_parameters().items()}
        return params | {f"gate.{k}": v for k, v in self.gate.trainable_parameters().items()}

    def train(self, mode: bool = True) -> MoPDModel:
        # The backbone stays in eval mode (no dropout drift); only the bookkeeping flag changes.
        super().train(mode)
        self.image_encoder.eval()
        self.text.clip.eval()
        return self

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen, L2-normalised image features [B, D]."""
        return F.normalize(self.image_encoder(pixels).float(), dim=-1)

    def student_class_vectors(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """Normalised student class vectors [N, D] (with gradients into the context)."""
        texts = [format_template(STUDENT_TEMPLATES[0], n) for n in (names or self.class_names)]
        return self.text.encode(texts, normalize=True).float()

    def losses_from_features(self, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss dict from precomputed normalised image features [B, D] (frozen tower)."""
        w_student = self.student_class_vectors()  # [N, D]
        student_logits = self.logit_scale * feats @ w_student.t()  # [B, N]
        teacher_logits = self.logit_scale * torch.einsum("bd,pnd->bpn", feats, self.bank)  # [B, P, N]
        weights, indices = self.gate(feats)  # [B, k], [B, k]
        out = mopd_loss(student_logits, teacher_logits, weights, indices, labels, self.loss_cfg)
        if self.training and self.gate_stats is not None:
            self.gate_stats.update(weights, indices)
        out["gate_weights"] = weights.detach()
        out["gate_indices"] = indices
        return out

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [B, 3, H, W], labels [B] -> {"loss", "ce", "mpd", "mps", "acc", "gate_weights", "gate_indices"}."""
        return self.losses_from_features(self.image_features(pixels), labels)

    @torch.no_grad()
    def class_vectors(self, names: Sequence[str]) -> torch.Tensor:
        """[N, D] student class vectors via models.class_vectors (what the bundle's text side computes)."""
        return encode_class_names(self.text, list(names), STUDENT_TEMPLATES)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Inference (plain CoOp): logits [B, len(names)] among ``names`` only."""
        return self.logit_scale * self.image_features(pixels) @ self.student_class_vectors(names).t()
