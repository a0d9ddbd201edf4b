"""PromptKD / PromptSRC losses against independent references written here (plain loops / numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.promptkd import batchmean_equivalent_weight, kd_loss
from training.promptsrc import gpa_weights, promptsrc_losses


def _softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def _reference_kd(z_s: np.ndarray, z_t: np.ndarray, tau: float) -> float:
    """The paper's equation with the official normalisation: tau^2 * sum_b sum_c KL terms / (B*N)."""
    b, n = z_s.shape
    total = 0.0
    for i in range(b):
        p_t = _softmax(z_t[i] / tau)
        p_s = _softmax(z_s[i] / tau)
        for c in range(n):
            total += p_t[c] * (math.log(p_t[c]) - math.log(p_s[c]))
    return tau**2 * total / (b * n)


@pytest.mark.parametrize(("b", "n", "tau"), [(8, 10, 1.0), (5, 37, 2.0), (3, 4, 0.5)])
def test_kd_loss_equals_reference(b: int, n: int, tau: float) -> None:
    g = torch.Generator().manual_seed(b * n)
    z_s = torch.randn(b, n, generator=g, dtype=torch.float64) * 5
    z_t = torch.randn(b, n, generator=g, dtype=torch.float64) * 5
    got = kd_loss(z_s, z_t, tau).item()
    assert got == pytest.approx(_reference_kd(z_s.numpy(), z_t.numpy(), tau), rel=1e-10, abs=1e-12)


def test_kd_weight_batchmean_equivalent() -> None:
    g = torch.Generator().manual_seed(0)
    z_s, z_t = (
        torch.randn(8, 100, generator=g, dtype=torch.float64),
        torch.randn(8, 100, generator=g, dtype=torch.float64),
    )
    batchmean = torch.nn.functional.kl_div(
        z_s.log_softmax(1), z_t.log_softmax(1), reduction="batchmean", log_target=True
    )
    assert (1000 * kd_loss(z_s, z_t)).item() == pytest.approx(
        (batchmean_equivalent_weight(1000, 100) * batchmean).item()
    )
    assert batchmean_equivalent_weight(1000, 1000) == 1.0


def test_kd_loss_zero_iff_equal_and_gradient_only_to_student() -> None:
    z = torch.randn(4, 6)
    assert kd_loss(z, z).item() == pytest.approx(0.0, abs=1e-7)
    # No no_grad here on purpose: kd_loss itself must keep the teacher a constant target.
    z_s = torch.randn(4, 6, requires_grad=True)
    z_t = torch.randn(4, 6, requires_grad=True)
    kd_loss(z_s, z_t).backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    assert z_t.grad is None  # before the fix: a non-zero gradient (~0.13 in the audit) reached the teacher
    # ... also when the teacher logits come out of a module with trainable weights
    w = torch.randn(6, 6, requires_grad=True)
    kd_loss(torch.randn(4, 6, requires_grad=True), torch.randn(4, 6) @ w).backward()
    assert w.grad is None


def test_promptsrc_terms_equal_references() -> None:
    g = torch.Generator().manual_seed(1)
    b, c, d = 6, 5, 16
    norm = torch.nn.functional.normalize
    text, zs_text = norm(torch.randn(c, d, generator=g), dim=-1), norm(torch.randn(c, d, generator=g), dim=-1)
    image, zs_image = norm(torch.randn(b, d, generator=g), dim=-1), norm(torch.randn(b, d, generator=g), dim=-1)
    logits, zs_logits = 100 * image @ text.t(), 100 * zs_image @ zs_text.t()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    out = promptsrc_losses(logits, labels, text, zs_text, image, zs_image, zs_logits, 25.0, 10.0)

    lg, zl = logits.double().numpy(), zs_logits.double().numpy()
    ce = np.mean([-math.log(_softmax(lg[i])[labels[i]]) for i in range(b)])
    l1_text = 25.0 * np.abs(text.numpy() - zs_text.numpy()).mean()
    l1_image = 10.0 * np.abs(image.numpy() - zs_image.numpy()).mean()
    kl = sum(
        _softmax(zl[i])[k] * (math.log(_softmax(zl[i])[k]) - math.log(_softmax(lg[i])[k]))
        for i in range(b)
        for k in range(c)
    ) / (b * c)  # KL(zero-shot || prompted), summed, / number of logits
    assert out["ce"].item() == pytest.approx(ce, rel=1e-4)
    assert out["l1_text"].item() == pytest.approx(l1_text, rel=1e-5)
    assert out["l1_image"].item() == pytest.approx(l1_image, rel=1e-5)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-3)
    assert out["loss"].item() == pytest.approx(ce + l1_text + l1_image + kl, rel=1e-4)


def test_gpa_weights_sum_to_one_and_peak_at_15_of_20() -> None:
    w = gpa_weights(20, 15.0, 1.0)
    assert w.shape == (20,)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert int(np.argmax(w)) + 1 == 15
    assert w[13] == pytest.approx(w[15])  # symmetric around epoch 15
    assert w[0] < 1e-20  # early epochs contribute (numerically) nothing
