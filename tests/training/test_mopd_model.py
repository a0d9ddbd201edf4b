"""MoPD model on the tiny CLIP: shapes and gradients, step-0 gate, the noisy-pool claim in miniature."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from models.prompts import PromptedTextEncoder
from training.mopd.loss import MoPDLossCfg
from training.mopd.model import MoPDModel, MoPDModelCfg, build_prompt_bank
from training.pools import pool_for_dataset

log = logging.getLogger(__name__)
NAMES = ["cat", "dog", "car", "tree", "boat", "lamp"]


def test_forward_through_pixels_trains_prompt_and_gate_only(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    pool = pool_for_dataset("oxford_pets")
    bank = build_prompt_bank(PromptedTextEncoder(tiny_backbone.model, tiny_backbone.tokenizer), NAMES, pool)
    assert bank.shape == (12, len(NAMES), 64)
    assert torch.allclose(bank.norm(dim=-1), torch.ones(12, len(NAMES)), atol=1e-5)
    model = MoPDModel(tiny_backbone, NAMES, bank, MoPDModelCfg(top_k=3), MoPDLossCfg(w=0.8, w2=0.5))
    assert set(model.trainable_parameters()) == {"text.prompts", "gate.linear.weight"}
    assert model.text.prompts is not None and model.text.prompts.shape == (1, 4, 64)
    model.train()
    pixels = torch.randn(4, 3, 64, 64)
    out = model(pixels, torch.tensor([0, 1, 2, 3]))
    assert {"loss", "ce", "mpd", "mps"} <= set(out)
    # Step 0: zero gate -> the first k templates with weight 1/k for every image.
    assert out["gate_indices"].tolist() == [[0, 1, 2]] * 4
    assert torch.allclose(out["gate_weights"], torch.full((4, 3), 1 / 3))
    out["loss"].backward()
    assert model.text.prompts.grad is not None and model.text.prompts.grad.abs().sum() > 0
    assert model.gate.linear.weight.grad is not None and model.gate.linear.weight.grad.abs().sum() > 0
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and n not in model.trainable_parameters()]
    assert frozen == []
    assert all(p.grad is None for n, p in model.text.clip.named_parameters())
    assert not model.bank.requires_grad
    # Inference is plain CoOp over any names (no gate, no bank).
    assert model.logits(pixels, ["fox", "owl"]).shape == (4, 2)


def _noisy_task(n_classes: int, dim: int, n_clean: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class prototypes, features around them, and a bank: noisy templates first, then clean ones.

    Clean template p: the prototypes plus a small template-specific perturbation. Noisy template:
    a clean one with its class rows cyclically shifted, so it names the wrong class for every image.
    """
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    jitter = 0.3 / dim**0.5
    clean = [F.normalize(protos + jitter * torch.randn(n_classes, dim, generator=g), dim=-1) for _ in range(n_clean)]
    noisy = [c[torch.roll(torch.arange(n_classes), 1 + i % (n_classes - 1))] for i, c in enumerate(clean)]
    labels = torch.randint(0, n_classes, (384,), generator=g)
    feats = F.normalize(protos[labels] + 0.6 * torch.randn(384, dim, generator=g) / dim**0.5, dim=-1)
    return torch.stack(noisy + clean), feats, labels


def _clean_mass(model: MoPDModel, feats: torch.Tensor, n_noisy: int) -> float:
    """Share of the gate's mixture mass on clean templates (pool index >= n_noisy), over images."""
    with torch.no_grad():
        a, idx = model.gate(feats)
    return float((a * (idx >= n_noisy)).sum() / len(feats))


def test_gate_learns_to_avoid_noisy_templates(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    bank, feats, labels = _noisy_task(len(NAMES), 64, n_clean=4, seed=0)
    train_x, train_y, test_x = feats[:256], labels[:256], feats[256:]
    model = MoPDModel(tiny_backbone, NAMES, bank, MoPDModelCfg(top_k=2, logit_scale=20.0), MoPDLossCfg(w=0.8, w2=0.1))
    assert _clean_mass(model, test_x, 4) == 0.0  # step 0: the first k templates are the noisy ones
    opt = torch.optim.SGD(list(model.trainable_parameters().values()), lr=0.002, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        batch = torch.randperm(256, generator=g)[:64]
        out = model.losses_from_features(train_x[batch], train_y[batch])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    mass = _clean_mass(model, test_x, 4)
    log.info("clean-template selection mass after 40 steps: %.4f", mass)
    assert mass >= 0.8, f"gate put only {mass:.1%} of its selection mass on the clean templates"
