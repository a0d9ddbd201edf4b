"""Small trainable heads: the PromptKD projector and the MoPD gate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ProjectorCfg:
    """PromptKD's "Feature_Trans_Module_two_layer": student dim -> teacher dim."""

    in_dim: int  # student image embedding (512 for ViT-B/16)
    out_dim: int  # teacher embedding (768 for ViT-L/14)


class Projector(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear (the official 1x1 convs on a 1x1 map are the same)."""

    def __init__(self, cfg: ProjectorCfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(
            nn.Linear(cfg.in_dim, cfg.out_dim),
            nn.BatchNorm1d(cfg.out_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.out_dim, cfg.out_dim),
        )

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in_dim] -> [B, out_dim]
        return self.net(x)


@dataclass(frozen=True)
class GateCfg:
    """MoPD gating network over P teacher prompts."""

    embed_dim: int  # image feature size (512 for ViT-B/16)
    n_prompts: int  # P, size of the hard-prompt pool
    top_k: int = 2


class Gate(nn.Module):
    """Bias-free linear scores over the normalised image feature; keep top-k; softmax over those k.

    Zero-initialised as in the official code, so at step 0 every score ties; here the ties go to
    the first k prompts with equal weight 1/k (see ``forward``).
    """

    def __init__(self, cfg: GateCfg) -> None:
        super().__init__()
        if not 1 <= cfg.top_k <= cfg.n_prompts:
            raise ValueError(f"top_k must be in 1..{cfg.n_prompts}, got {cfg.top_k}")
        self.cfg = cfg
        self.linear = nn.Linear(cfg.embed_dim, cfg.n_prompts, bias=False)
        nn.init.zeros_(self.linear.weight)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {"linear.weight": self.linear.weight}  # type: ignore[dict-item]

    def forward(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_features [B, D] -> (weights [B, k] summing to 1, indices [B, k] into the pool)."""
        scores = self.linear(F.normalize(image_features, dim=-1))  # [B, P]
        # A stable sort, not topk: ties (all of them at step 0) resolve to the lowest prompt
        # index on every device. Which k prompts the official code's CUDA ``topk`` picks on an
        # all-tied row is NOT verified (no GPU was available); it may differ at step 0 only.
        values, indices = scores.sort(dim=-1, descending=True, stable=True)
        k = self.cfg.top_k
        return values[:, :k].softmax(dim=-1), indices[:, :k]
