"""`promptdistill convert promptkd-teacher`: a synthetic Dassl checkpoint with the official key
names (tiny dims) becomes a teacher bundle whose logits equal an independent forward pass that
places the prompts as the official IVLP code does (sequence-first, written here from scratch)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.bundle import load_bundle
from models.towers import build_towers, load_bundle_backbone
from promptdistill.cli import main
from training.teacher import load_teacher

TINY = Path(__file__).resolve().parents[2] / "models" / "configs" / "tiny-clip.json"
NAMES = ["apple pie", "ankle boot", "tench", "golden retriever", "bee"]
N_CTX, DEPTH = 4, 2  # tiny-clip has 2 layers per tower: row 0 + one deep row (resblocks.1)


def _checkpoint(path: Path, text_width: int, vision_width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    state = {
        "prompt_learner.ctx": torch.randn(N_CTX, text_width, generator=g).half(),
        "image_encoder.VPT": torch.randn(N_CTX, vision_width, generator=g).half(),
        "prompt_learner.token_prefix": torch.randn(3, 1, text_width, generator=g).half(),  # ignored
        "prompt_learner.token_suffix": torch.randn(3, 72, text_width, generator=g).half(),  # ignored
        "image_encoder.conv1.weight": torch.randn(2, 2, generator=g),  # frozen CLIP: ignored
    }
    for i in range(1, DEPTH):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(
            N_CTX, text_width, generator=g
        ).half()
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.randn(
            N_CTX, vision_width, generator=g
        ).half()
    torch.save({"state_dict": state, "epoch": 20, "optimizer": None, "val_result": 0.0}, path)
    return state


def _blocks_seq_first(blocks, x, deep, n, where, mask=None):  # type: ignore[no-untyped-def]
    """x [L, B, W]; before block i>=1 put deep[i] at the prompt positions (official IVLP order)."""
    for i, block in enumerate(blocks):
        if i in deep:
            ctx = deep[i].float().unsqueeze(1).expand(-1, x.shape[1], -1)  # [n, B, W]
            x = torch.cat([x[:1], ctx, x[1 + n :]]) if where == "text" else torch.cat([x[: x.shape[0] - n], ctx])
        x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)  # open_clip blocks are batch-first
    return x


def _reference_logits(clip, tokenizer, state, images, names):  # type: ignore[no-untyped-def]
    deep_t = {i: state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in range(1, DEPTH)}
    deep_i = {i: state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in range(1, DEPTH)}
    # text: "X X X X {name}." with positions 1..4 = ctx, EOT feature @ text_projection
    tokens = tokenizer([" ".join(["X"] * N_CTX) + " " + n + "." for n in names])
    x = clip.token_embedding(tokens)
    x = torch.cat([x[:, :1], state["prompt_learner.ctx"].float().expand(len(names), -1, -1), x[:, 1 + N_CTX :]], 1)
    x = (x + clip.positional_embedding).permute(1, 0, 2)
    x = _blocks_seq_first(clip.transformer.resblocks, x, deep_t, N_CTX, "text", clip.attn_mask).permute(1, 0, 2)
    x = clip.ln_final(x)
    text = x[torch.arange(len(names)), tokens.argmax(dim=-1)] @ clip.text_projection
    # image: [CLS] + patches + pos, then the VPT tokens appended, ln_pre, blocks, ln_post(CLS) @ proj
    v = clip.visual
    p = v.conv1(images).flatten(2).permute(0, 2, 1)
    p = torch.cat([v.class_embedding.expand(p.shape[0], 1, -1), p], 1) + v.positional_embedding
    p = torch.cat([p, state["image_encoder.VPT"].float().expand(p.shape[0], -1, -1)], 1)
    p = v.ln_pre(p).permute(1, 0, 2)
    p = _blocks_seq_first(v.transformer.resblocks, p, deep_i, N_CTX, "image").permute(1, 0, 2)
    image = v.ln_post(p[:, 0]) @ v.proj
    text, image = text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * image @ text.t()


def test_converted_teacher_logits_equal_the_official_forward(tmp_path: Path) -> None:
    ckpt = tmp_path / "model-best.pth.tar"
    names_file = tmp_path / "classnames.txt"
    names_file.write_text("\n".join(n.replace(" ", "_") for n in NAMES) + "\n")  # underscores as in CoOp files
    state = _checkpoint(ckpt, text_width=64, vision_width=64)
    out = tmp_path / "teacher"
    rc = main(["convert", "promptkd-teacher", str(ckpt), "--classnames", str(names_file), "--out", str(out),
               "--backbone", str(TINY), "--pretrained", "none"])  # fmt: skip
    assert rc == 0
    bundle = load_bundle(out)
    classes = bundle.label_set().classes
    assert [c.name for c in classes] == NAMES
    m = math.ceil(len(NAMES) / 2)
    assert [c.provenance for c in classes] == ["promptsrc:base"] * m + ["promptsrc:novel"] * (len(NAMES) - m)
    assert bundle.manifest.extra["n_base"] == m and bundle.manifest.extra["role"] == "teacher"
    assert torch.equal(bundle.prompts["text"][0], state["prompt_learner.ctx"].float())
    tower, _ = build_towers(bundle)
    bb = load_bundle_backbone(bundle, bundle.manifest.image_encoder.backbone)  # the same (embedded) weights
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = bundle.manifest.logit_scale * tower(images) @ bundle.class_vectors["default"].t()
        want = _reference_logits(bb.model, bb.tokenizer, state, images, NAMES)
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    teacher = load_teacher(out)  # distillation reads the same bundle
    assert teacher.class_names == NAMES and teacher.n_base == m
    assert torch.allclose(teacher.class_vectors, bundle.class_vectors["default"])


def test_checkpoint_without_ivlp_prompts_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pth.tar-20"
    torch.save({"state_dict": {"prompt_learner.ctx": torch.zeros(4, 64)}}, ckpt)
    from training.convert import convert_promptkd_teacher

    with pytest.raises(ValueError, match="image_encoder.VPT"):
        convert_promptkd_teacher(ckpt, NAMES, tmp_path / "o", backbone=str(TINY), pretrained=None)


def test_legacy_teacher_folder_converts_to_the_same_teacher(tmp_path: Path) -> None:
    """The pre-bundle format (teacher.json + teacher.safetensors) -> a bundle with the same class vectors."""
    import json

    from safetensors.torch import save_file

    from models.backbone import load_backbone
    from models.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptCfg, VisualPromptCfg

    torch.manual_seed(0)
    bb = load_backbone(str(TINY))
    text = PromptedTextEncoder(bb.model, bb.tokenizer, TextPromptCfg(4, 2, "a photo of a"))
    image = PromptedImageEncoder(bb.model, VisualPromptCfg(4, 2))
    from models.class_vectors import encode_class_names

    vectors = encode_class_names(text, NAMES, ["{}."])
    old = tmp_path / "old"
    old.mkdir()
    assert text.prompts is not None and image.prompts is not None
    tensors = {"text_prompts": text.prompts.detach(), "image_prompts": image.prompts.detach(), "class_vectors": vectors}
    save_file(tensors, old / "teacher.safetensors")
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, old / "backbone.safetensors")
    info = {"backbone": {"name": str(TINY), "pretrained": None, "open_clip_config": bb.spec.model_config},
            "embedded_weights": "backbone.safetensors", "promptsrc": {}, "class_names": NAMES, "n_base": 3,
            "logit_scale": 100.0}  # fmt: skip
    (old / "teacher.json").write_text(json.dumps(info))
    with pytest.raises(FileNotFoundError, match="convert legacy-teacher"):
        load_teacher(old)
    assert main(["convert", "legacy-teacher", str(old), "--out", str(old / "bundle")]) == 0
    teacher = load_teacher(old)  # finds old/bundle
    assert teacher.class_names == NAMES and teacher.n_base == 3 and teacher.logit_scale == 100.0
    assert torch.allclose(teacher.class_vectors, vectors, atol=1e-5)
