"""Backbone factory: every local weights format, config files, and fast offline failures."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.backbone import BackboneError, load_backbone


@pytest.fixture(scope="module")
def reference(tiny_config: Path):  # type: ignore[no-untyped-def]
    torch.manual_seed(123)
    bb = load_backbone(str(tiny_config))
    pixels = torch.randn(2, 3, 64, 64)
    tokens = bb.tokenizer(["a photo of a cat.", "a diagram"])
    with torch.no_grad():
        return bb, pixels, tokens, bb.model.encode_image(pixels), bb.model.encode_text(tokens)


def _outputs(bb, pixels, tokens):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return bb.model.encode_image(pixels), bb.model.encode_text(tokens)


def _write(fmt: str, bb, tmp: Path, tiny_config: Path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """Save the reference weights in one format; return (name, pretrained) to load them back."""
    state = {k: v.clone().contiguous() for k, v in bb.model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, tmp / "w.safetensors")
        return str(tiny_config), str(tmp / "w.safetensors")
    if fmt == "state_dict":
        torch.save(state, tmp / "w.pt")
        return str(tiny_config), str(tmp / "w.pt")
    if fmt == "checkpoint":  # training-style: {"state_dict": {"module.*": ...}, "epoch": ...}
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp / "ckpt.pt")
        return str(tiny_config), str(tmp / "ckpt.pt")
    if fmt == "torchscript":  # OpenAI-style TorchScript archive
        pixels, tokens = torch.randn(1, 3, 64, 64), bb.tokenizer(["x"])
        traced = torch.jit.trace(bb.model, (pixels, tokens), check_trace=False)
        torch.jit.save(traced, str(tmp / "ViT-tiny.pt"))
        return str(tiny_config), str(tmp / "ViT-tiny.pt")
    if fmt == "local-dir":
        d = tmp / "hubdir"
        d.mkdir()
        cfg = json.loads(tiny_config.read_text())
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
        save_file(state, d / "open_clip_model.safetensors")
        return f"local-dir:{d}", ""
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict", "checkpoint", "torchscript", "local-dir"])
def test_each_local_weights_format_loads_identically(fmt, reference, tmp_path, tiny_config) -> None:  # type: ignore[no-untyped-def]
    bb, pixels, tokens, ref_img, ref_txt = reference
    name, pretrained = _write(fmt, bb, tmp_path, tiny_config)
    loaded = load_backbone(name, pretrained or None)
    img, txt = _outputs(loaded, pixels, tokens)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)
    if fmt in ("safetensors", "state_dict"):
        assert loaded.spec.weights_sha256 is not None and len(loaded.spec.weights_sha256) == 64


def test_config_file_needs_no_registration_and_config_travels(tiny_config, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "my-arch.json"
    shutil.copy(tiny_config, copy)
    bb = load_backbone(str(copy))
    copy.unlink()  # a bundle rebuilds from the stored config, not from the file
    again = load_backbone("anything", model_config=bb.spec.model_config)
    assert again.model.visual.conv1.weight.shape == bb.model.visual.conv1.weight.shape


def test_quickgelu_names_build_offline() -> None:
    bb = load_backbone("ViT-B-32-quickgelu")
    assert bb.spec.model_config.get("quick_gelu") is True
    assert bb.preprocess.size == (224, 224)


@pytest.mark.parametrize(
    ("name", "pretrained", "match"),
    [
        ("ViT-B-16", "openai", "unreachable"),
        ("ViT-L-14-quickgelu", "openai", "local file"),
        ("hf-hub:timm/vit_base_patch16_clip_224.openai", None, "cache"),
    ],
)
def test_offline_tag_fails_fast_naming_alternatives(name, pretrained, match, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the socket guard alone must be enough
    t0 = time.monotonic()
    with pytest.raises(BackboneError, match=match) as err:
        load_backbone(name, pretrained)
    assert time.monotonic() - t0 < 10
    assert "local-dir:" in str(err.value) or "cache" in str(err.value)


def test_offline_env_fails_at_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE"):
        load_backbone("ViT-B-32", "laion2b_s34b_b79k")


@pytest.mark.parametrize(
    ("name", "pretrained", "match"),
    [
        ("ViT-Nope-99", None, "unknown architecture"),
        ("ViT-B-32", "/no/such/weights.safetensors", "not found"),
        ("ViT-B-32", "not-a-tag", "neither a file nor a pretrained tag"),
        ("/no/such/config.json", None, "not found"),
    ],
)
def test_bad_references_say_what_is_wrong(name, pretrained, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackboneError, match=match):
        load_backbone(name, pretrained)


def test_weights_of_another_architecture_are_rejected(reference, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bb = reference[0]
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, tmp_path / "tiny.safetensors")
    with pytest.raises(BackboneError, match="do not fit"):
        load_backbone("ViT-B-32", str(tmp_path / "tiny.safetensors"))


def test_hub_reference_with_offline_env_names_alternatives(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(BackboneError, match="local-dir:"):
        load_backbone("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_text_only_load_of_a_full_checkpoint_encodes_like_the_full_model(tiny_config, tmp_path, fmt) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    full = load_backbone(str(tiny_config))
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    state = {k: v.contiguous() for k, v in full.model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    text = load_backbone(str(tiny_config), str(path), text_only=True)
    assert isinstance(text.model.visual, torch.nn.Identity)
    tokens = full.tokenizer(["a photo of a bee.", "brick wall"])
    with torch.no_grad():
        assert torch.allclose(text.model.encode_text(tokens), full.model.encode_text(tokens), atol=1e-6)
