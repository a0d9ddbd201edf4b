"""MoPD loss terms against a plain reference written here (loops, float64, no shared code)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.heads import Gate, GateCfg
from training.mopd.loss import MoPDLossCfg, mopd_loss


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference(zs, zt, a, idx, y, w, w2, t):  # type: ignore[no-untyped-def]
    """Literal §2.3: per image, per kept teacher; all float64 numpy."""
    b_size, k = idx.shape
    ce = mpd = mps = 0.0
    for b in range(b_size):
        ps = _softmax(zs[b])
        ce += -math.log(ps[y[b]])
        ps_t = _softmax(zs[b] / t)
        for j in range(k):
            teacher = zt[b, idx[b, j]]
            pt_t = _softmax(teacher / t)
            kl = sum(pt_t[c] * (math.log(pt_t[c]) - math.log(ps_t[c])) for c in range(len(pt_t)))
            mpd += a[b, j] * t * t * kl
            mps += a[b, j] * -math.log(_softmax(teacher)[y[b]])
    ce, mpd, mps = ce / b_size, mpd / b_size, mps / b_size
    return ce, mpd, mps, w * ce + (1 - w) * mpd + w2 * mps


@pytest.mark.parametrize(("w", "w2", "t", "k"), [(0.8, 0.1, 1.0, 2), (0.5, 0.5, 2.0, 3), (0.0, 1.0, 0.7, 1)])
def test_loss_matches_reference(w: float, w2: float, t: float, k: int) -> None:
    g = torch.Generator().manual_seed(3)
    b, p, n = 5, 6, 7
    zs = torch.randn(b, n, generator=g, dtype=torch.float64) * 5
    zt = torch.randn(b, p, n, generator=g, dtype=torch.float64) * 5
    scores = torch.randn(b, p, generator=g, dtype=torch.float64)
    vals, idx = scores.topk(k, dim=-1)
    a = vals.softmax(-1)
    y = torch.randint(0, n, (b,), generator=g)
    out = mopd_loss(zs, zt, a, idx, y, MoPDLossCfg(w=w, w2=w2, temperature=t))
    ref = _reference(zs.numpy(), zt.numpy(), a.numpy(), idx.numpy(), y.numpy(), w, w2, t)
    for key, want in zip(("ce", "mpd", "mps", "loss"), ref, strict=True):
        assert out[key].item() == pytest.approx(want, rel=1e-9, abs=1e-9), key
    assert set(out) >= {"loss", "ce", "mpd", "mps"}


def _gate_grad(
    zs: torch.Tensor, zt: torch.Tensor, feats: torch.Tensor, y: torch.Tensor, cfg: MoPDLossCfg
) -> torch.Tensor:
    gate = Gate(GateCfg(embed_dim=feats.shape[1], n_prompts=zt.shape[1], top_k=2))
    with torch.no_grad():  # away from the all-zero tie so that top-k is well defined
        gate.linear.weight.normal_()
    a, idx = gate(feats)
    mopd_loss(zs, zt, a, idx, y, cfg)["loss"].backward()
    assert gate.linear.weight.grad is not None
    return gate.linear.weight.grad


def test_gate_learns_only_through_mixture_weights() -> None:
    g = torch.Generator().manual_seed(0)
    b, p, n, d = 8, 5, 4, 16
    feats = torch.randn(b, d, generator=g)
    y = torch.randint(0, n, (b,), generator=g)
    zs = torch.randn(b, n, generator=g, requires_grad=True)
    zt_distinct = torch.randn(b, p, n, generator=g)
    zt_same = torch.randn(b, 1, n, generator=g).expand(b, p, n).contiguous()  # every teacher equal

    # w2 = 0 and every teacher identical: MPD does not depend on a -> zero gate gradient.
    grad = _gate_grad(zs, zt_same, feats, y, MoPDLossCfg(w=0.5, w2=0.0))
    assert grad.abs().max().item() < 1e-6
    # CE alone never reaches the gate.
    grad = _gate_grad(zs, zt_distinct, feats, y, MoPDLossCfg(w=1.0, w2=0.0))
    assert grad.abs().max().item() == 0.0
    # MPD with distinct teachers, and MPS alone, both do.
    assert _gate_grad(zs, zt_distinct, feats, y, MoPDLossCfg(w=0.5, w2=0.0)).abs().max().item() > 1e-4
    assert _gate_grad(zs, zt_distinct, feats, y, MoPDLossCfg(w=1.0, w2=1.0)).abs().max().item() > 1e-4


def test_teacher_logits_get_no_gradient_and_student_gets_weighted_mpd() -> None:
    g = torch.Generator().manual_seed(1)
    b, p, n = 4, 3, 5
    zs = torch.randn(b, n, generator=g, requires_grad=True)
    zt = torch.randn(b, p, n, generator=g, requires_grad=True)  # even if a caller forgot no_grad
    a = torch.tensor([[0.7, 0.3]] * b, requires_grad=True)
    idx = torch.tensor([[0, 2]] * b)
    y = torch.randint(0, n, (b,), generator=g)
    mopd_loss(zs, zt, a, idx, y, MoPDLossCfg(w=0.0, w2=1.0))["loss"].backward()
    assert zt.grad is None
    assert a.grad is not None and a.grad.abs().sum() > 0
    # Student gradient of pure MPD = Σ_j a_j (softmax(zs) - softmax(zt_j)) / B  (T = 1).
    want = sum(a[:, j, None].detach() * (zs.softmax(-1) - zt[:, idx[0, j]].softmax(-1)) for j in range(2)) / b
    assert torch.allclose(zs.grad, want.detach(), atol=1e-6)


def test_zero_gate_picks_first_k_with_equal_weights() -> None:
    gate = Gate(GateCfg(embed_dim=8, n_prompts=12, top_k=3))
    a, idx = gate(torch.randn(6, 8))
    assert idx.tolist() == [[0, 1, 2]] * 6
    assert torch.allclose(a, torch.full((6, 3), 1 / 3))
