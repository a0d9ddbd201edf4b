"""MoPD's objective: w·CE + (1 − w)·MPD + w2·MPS (algorithms.md §2.3, official MoPD code).

- CE: the student's cross-entropy on the labels.
- MPD (mixture-of-prompts distillation): for each image, the k teachers the gate picked, each a
  frozen-CLIP zero-shot classifier built from one hard prompt; KL(teacher ‖ student) · T²,
  weighted by the gate's mixture weights ``a``.
- MPS (mixture-of-prompts selection): the teachers' own cross-entropy on the label, weighted by
  ``a``. Teacher logits are constants, so MPS trains only the gate: it moves mass to the templates
  that classify this image correctly.

Gradients: the student logits get CE + MPD (MPD's per-teacher terms scaled by ``a``); the gate gets
MPD + MPS through ``a`` alone (``a`` is deliberately not detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MoPDLossCfg:
    """Weights of the three terms (per-dataset defaults: training.mopd.config.DATASET_DEFAULTS)."""

    w: float = 1.0  # CE weight; MPD gets (1 - w). The official code's default when unset is 1.0
    w2: float = 1.0  # MPS weight
    temperature: float = 1.0  # T of the distillation softmax


def select_teachers(teacher_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather each image's chosen teachers: [B, P, N] x [B, k] -> [B, k, N]."""
    rows = torch.arange(teacher_logits.shape[0], device=teacher_logits.device).unsqueeze(1)  # [B, 1]
    return teacher_logits[rows, indices]


def mopd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor,
    cfg: MoPDLossCfg,
) -> dict[str, torch.Tensor]:
    """MoPD loss terms for one labelled batch.

    Args:
        student_logits: [B, N] scaled cosine logits of the soft-prompt student.
        teacher_logits: [B, P, N] scaled cosine logits of the P hard-prompt teachers (detached here).
        weights: [B, k] gate mixture weights (softmax over the kept scores); gradients flow to the gate.
        indices: [B, k] pool indices the gate kept per image.
        labels: [B] class indices.
        cfg: term weights and temperature.

    Returns:
        {"loss", "ce", "mpd", "mps", "acc"}; all scalars, "acc" detached.
    """
    t = cfg.temperature
    chosen = select_teachers(teacher_logits.detach(), indices)  # [B, k, N]
    ce = F.cross_entropy(student_logits, labels)
    log_p_student = F.log_softmax(student_logits / t, dim=-1).unsqueeze(1)  # [B, 1, N]
    log_p_teacher = F.log_softmax(chosen / t, dim=-1)  # [B, k, N]
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * t * t  # [B, k]
    mpd = (weights * kl).sum(-1).mean()
    k = chosen.shape[1]
    teacher_ce = F.cross_entropy(
        chosen.reshape(-1, chosen.shape[-1]), labels.repeat_interleave(k), reduction="none"
    ).view(-1, k)  # [B, k]
    mps = (weights * teacher_ce).sum(-1).mean()
    loss = cfg.w * ce + (1.0 - cfg.w) * mpd + cfg.w2 * mps
    acc = (student_logits.detach().argmax(-1) == labels).float().mean()
    return {"loss": loss, "ce": ce, "mpd": mpd, "mps": mps, "acc": acc}
