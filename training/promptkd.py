"""PromptKD student distillation (algorithms.md §1.4, official trainers/promptkd.py).

Per unlabeled batch x (teacher and student see the *same* augmented view)::

    z_t = s_t · normalize(teacher_image(x)) @ W_tᵀ           (no grad)   [B, N]
    z_s = s_s · normalize(P(student_image(x))) @ W_tᵀ                     [B, N]
    loss = KD_WEIGHT · τ² · Σ_{b,c} p_t (log p_t − log p_s) / (B·N)

W_t are the teacher's class vectors for all N classes (base then novel), s = exp(logit_scale)
of each model (100 for OpenAI CLIP). Labels are never used.

Normalisation (follows the official code, not the paper's batch-mean KL): the summed KL is
divided by B·N, the number of logit entries. The equivalent weight for a batch-mean KL
(``F.kl_div(..., reduction="batchmean")``) is ``KD_WEIGHT / N`` — e.g. ImageNet (N=1000) with
KD_WEIGHT 1000 -> 1.0, Caltech101 (N=100) -> 10. See :func:`batchmean_equivalent_weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.backbone import Backbone
from models.heads import Projector, ProjectorCfg
from models.prompts import PromptedImageEncoder, VisualPromptCfg
from models.towers import ImageTower
from training.config import Cfg


class DistillCfg(Cfg):
    """Defaults = configs/trainers/PromptKD/vit_b16_c2_ep20_batch8_4+4ctx.yaml + base2new script."""

    kd_weight: float = Field(default=1000.0, ge=0)  # 1000 for most datasets, 200 for FGVCAircraft/Flowers102/DTD
    temperature: float = Field(default=1.0, gt=0)  # tau
    vision_tokens: int = Field(default=4, ge=1)
    vision_depth: int = Field(default=9, ge=1)  # 9 for base-to-novel, 3 for the cross-dataset setting


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """τ² · Σ KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) / (B·N), as the official code computes it.

    The teacher is a constant target: its logits are detached here, so no caller can train the
    teacher through this loss by forgetting a ``no_grad``.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl * temperature**2 / student_logits.numel()


def batchmean_equivalent_weight(kd_weight: float, n_classes: int) -> float:
    """The weight giving the same objective with a batch-mean KL: KD_WEIGHT / N."""
    return kd_weight / n_classes


class PromptKDStudent(nn.Module):
    """Student image tower (deep visual prompts + projector) distilled from a frozen teacher tower."""

    class_vectors: torch.Tensor  # buffer [N, D]

    def __init__(
        self,
        student: Backbone,
        teacher_image: PromptedImageEncoder,
        class_vectors: torch.Tensor,  # [N, D] teacher class vectors, base rows then novel rows
        cfg: DistillCfg,
        teacher_logit_scale: float,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        encoder = PromptedImageEncoder(
            student.model, VisualPromptCfg(n_tokens=cfg.vision_tokens, depth=cfg.vision_depth)
        )
        dim = int(class_vectors.shape[1])
        self.tower = ImageTower(encoder, Projector(ProjectorCfg(in_dim=encoder.output_dim, out_dim=dim)))
        self.teacher = ImageTower(teacher_image)  # normalised teacher features
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.register_buffer("class_vectors", class_vectors.detach().float().clone())
        self.student_logit_scale = float(student.model.logit_scale.exp().item())
        self.teacher_logit_scale = float(teacher_logit_scale)

    def train(self, mode: bool = True) -> PromptKDStudent:
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode
        return self

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"tower.{k}": v for k, v in self.tower.trainable_parameters().items()}

    def logits(self, images: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """[B, N'] student logits against the class vectors (``rows`` = base / novel block)."""
        w = self.class_vectors if rows is None else self.class_vectors[rows]
        feats: torch.Tensor = self.tower(images)  # [B, D] normalised
        return self.student_logit_scale * feats.float() @ w.t()

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        w = self.class_vectors if rows is None else self.class_vectors[rows]
        feats: torch.Tensor = self.teacher(images)  # [B, D] normalised
        return self.teacher_logit_scale * feats.float() @ w.t()

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        del labels  # label-free distillation: the CE weight is 0 in the official code
        z_t = self.teacher_logits(images)  # [B, N]
        z_s = self.logits(images)  # [B, N]
        kd = kd_loss(z_s, z_t, self.cfg.temperature)
        return {"loss": self.cfg.kd_weight * kd, "kd": kd}
