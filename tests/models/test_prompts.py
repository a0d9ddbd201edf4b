"""Prompted encoders: parity with open_clip when prompts are off, and prompts that really act."""

from __future__ import annotations

import pytest
import torch

from models.backbone import load_backbone
from models.heads import Gate, GateCfg, Projector, ProjectorCfg
from models.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptCfg, VisualPromptCfg

NAMES = ["lion", "coffee cup", "golden retriever", "x-ray of a lung"]


@pytest.fixture(scope="module")
def vit_b16():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return load_backbone("ViT-B-16")


def _assert_parity(bb, image_size: int) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, image_size, image_size)
    texts = [f"a photo of a {n}." for n in NAMES]
    tokens = bb.tokenizer(texts)
    with torch.no_grad():
        ours_img = PromptedImageEncoder(bb.model)(pixels)
        ours_txt = PromptedTextEncoder(bb.model, bb.tokenizer).encode(texts)
        ref_img = bb.model.encode_image(pixels)
        ref_txt = bb.model.encode_text(tokens)
    assert (ours_img - ref_img).abs().max().item() <= 1e-5
    assert (ours_txt - ref_txt).abs().max().item() <= 1e-5


def test_prompts_off_equal_open_clip_tiny(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    _assert_parity(tiny_backbone, 64)


@pytest.mark.slow
def test_prompts_off_equal_open_clip_vit_b16(vit_b16) -> None:  # type: ignore[no-untyped-def]
    _assert_parity(vit_b16, 224)


@pytest.mark.parametrize("depth", [1, 2])
def test_coop_init_reproduces_handwritten_prompt(tiny_backbone, depth: int) -> None:  # type: ignore[no-untyped-def]
    bb = tiny_backbone
    enc = PromptedTextEncoder(bb.model, bb.tokenizer, TextPromptCfg(n_tokens=4, depth=depth, init="a photo of a"))
    if depth > 1:  # deep rows must equal what block 1 would otherwise see at those positions
        with torch.no_grad():
            enc.prompts[1:] = 0.0
    with torch.no_grad():
        ours = enc.encode([f"{n}." for n in NAMES])
        ref = bb.model.encode_text(bb.tokenizer([f"a photo of a {n}." for n in NAMES]))
    if depth == 1:
        assert (ours - ref).abs().max().item() <= 1e-5
    else:  # replacing block-1 inputs with other values must change the result
        assert (ours - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("n_tokens,depth", [(0, 1), (4, 1), (2, 2)])
def test_trimmed_context_equals_full_context(tiny_backbone, n_tokens: int, depth: int) -> None:  # type: ignore[no-untyped-def]
    """Running only the prefix up to the longest EOT gives the full-context features (and gradients)."""
    bb = tiny_backbone
    torch.manual_seed(2)
    enc = PromptedTextEncoder(bb.model, bb.tokenizer, TextPromptCfg(n_tokens=n_tokens, depth=depth))
    texts = ["x.", "a photo of a golden retriever lying on the grass in the park.", *NAMES]
    tokens = enc.tokenize(texts)
    assert int(enc.pooled_positions(tokens).max()) + 1 < tokens.shape[1] // 2  # the trim is real
    trimmed, full = enc(tokens), enc(tokens, trim=False)
    assert (trimmed - full).abs().max().item() <= 1e-5
    if enc.prompts is not None:
        (g_trim,) = torch.autograd.grad(trimmed.square().sum(), enc.prompts)
        (g_full,) = torch.autograd.grad(full.square().sum(), enc.prompts)
        assert (g_trim - g_full).abs().max().item() <= 1e-5 * max(1.0, g_full.abs().max().item())


def test_coop_init_phrase_length_is_checked(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="n_tokens=4"):
        PromptedTextEncoder(
            tiny_backbone.model, tiny_backbone.tokenizer, TextPromptCfg(n_tokens=3, init="a photo of a")
        )


def test_depth_beyond_layers_is_rejected(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="depth"):
        PromptedImageEncoder(tiny_backbone.model, VisualPromptCfg(n_tokens=2, depth=3))


def _each_row_matters(encoder, run) -> None:  # type: ignore[no-untyped-def]
    base = run().detach()
    for i in range(encoder.prompts.shape[0]):
        saved = encoder.prompts.data[i].clone()
        encoder.prompts.data[i] += torch.randn_like(saved)  # a constant shift would vanish in LayerNorm
        changed = (run().detach() - base).abs().max().item()
        encoder.prompts.data[i] = saved
        assert changed > 1e-4, f"prompt row {i} has no effect"


def test_every_deep_visual_prompt_row_changes_the_output(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    enc = PromptedImageEncoder(tiny_backbone.model, VisualPromptCfg(n_tokens=3, depth=2))
    pixels = torch.randn(2, 3, 64, 64)
    _each_row_matters(enc, lambda: enc(pixels))


def test_every_deep_text_prompt_row_changes_the_output(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    enc = PromptedTextEncoder(tiny_backbone.model, tiny_backbone.tokenizer, TextPromptCfg(n_tokens=4, depth=2))
    _each_row_matters(enc, lambda: enc.encode(["lion.", "tiger."]))


def test_gradients_reach_only_prompts_projector_and_gate(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(4)
    clip = tiny_backbone.model
    image = PromptedImageEncoder(clip, VisualPromptCfg(n_tokens=2, depth=2))
    text = PromptedTextEncoder(clip, tiny_backbone.tokenizer, TextPromptCfg(n_tokens=4, depth=2, init="a photo of a"))
    projector = Projector(ProjectorCfg(64, 32))
    gate = Gate(GateCfg(embed_dim=64, n_prompts=5, top_k=2))
    with torch.no_grad():
        gate.linear.weight.normal_()  # break the zero-init tie so top-k weights depend on the gate
    feats = image(torch.randn(4, 3, 64, 64))
    weights, _ = gate(feats)
    loss = (
        projector(feats).pow(2).mean() + text.encode(["lion.", "cat."]).pow(2).mean() + (weights * feats[:, :2]).sum()
    )
    loss.backward()
    trainable = {id(p) for m in (image, text, projector, gate) for p in m.trainable_parameters().values()}
    for name, p in clip.named_parameters():
        assert not p.requires_grad and p.grad is None, f"backbone parameter {name} got a gradient"
    for m in (image, text, projector, gate):
        for name, p in m.trainable_parameters().items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{type(m).__name__}.{name} got no gradient"
    everything = {id(p) for m in (image, text, projector, gate) for p in m.parameters() if p.grad is not None}
    assert everything <= trainable
