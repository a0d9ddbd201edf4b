"""Projector and MoPD gate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.heads import Gate, GateCfg, Projector, ProjectorCfg


def test_projector_maps_student_to_teacher_dim() -> None:
    proj = Projector(ProjectorCfg(in_dim=512, out_dim=768))
    kinds = [type(m).__name__ for m in proj.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert proj(torch.randn(8, 512)).shape == (8, 768)
    assert set(proj.trainable_parameters()) == {n for n, _ in proj.named_parameters()}


def test_zero_gate_selects_first_k_with_equal_weights() -> None:
    gate = Gate(GateCfg(embed_dim=16, n_prompts=12, top_k=3))
    weights, idx = gate(torch.randn(5, 16))
    assert torch.equal(idx, torch.tensor([[0, 1, 2]] * 5))
    assert torch.allclose(weights, torch.full((5, 3), 1 / 3))


def test_gate_is_softmax_over_top_k_scores_of_normalised_features() -> None:
    torch.manual_seed(0)
    gate = Gate(GateCfg(embed_dim=8, n_prompts=6, top_k=2))
    with torch.no_grad():
        gate.linear.weight.normal_()
    x = torch.randn(4, 8) * 7
    weights, idx = gate(x)
    scores = F.normalize(x, dim=-1) @ gate.linear.weight.T  # [B, P], bias-free
    ref_vals, ref_idx = scores.sort(dim=-1, descending=True)
    assert torch.equal(idx, ref_idx[:, :2])
    ref = torch.exp(ref_vals[:, :2]) / torch.exp(ref_vals[:, :2]).sum(-1, keepdim=True)
    assert torch.allclose(weights, ref, atol=1e-6)
    assert gate.linear.bias is None


def test_gate_rejects_k_outside_pool() -> None:
    with pytest.raises(ValueError):
        Gate(GateCfg(embed_dim=8, n_prompts=4, top_k=5))
