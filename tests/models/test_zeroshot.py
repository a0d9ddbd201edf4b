"""Zero-shot bundles: class vectors equal open_clip's reference; ONNX equals torch on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from models.backbone import load_backbone
from models.bundle import load_bundle
from models.class_vectors import encode_class_names
from models.heads import Projector, ProjectorCfg
from models.onnx_export import export_image_tower
from models.preprocess import preprocess_batch
from models.prompts import PromptedImageEncoder, PromptedTextEncoder, VisualPromptCfg
from models.towers import ImageTower, build_image_tower
from models.zeroshot import named_templates, read_class_names
from promptdistill.cli import main

NAMES = ["cat", "dog", "coffee mug", "{weird} name", "naïve café 猫"]


def test_class_vectors_equal_open_clip_zero_shot_classifier(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    templates = named_templates("imagenet")
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    names = NAMES[:3]  # open_clip's str.format would choke on braces in names; ours does not
    ours = encode_class_names(PromptedTextEncoder(tiny_backbone.model, tiny_backbone.tokenizer), names, templates)
    with torch.no_grad():
        ref = build_zero_shot_classifier(tiny_backbone.model, tiny_backbone.tokenizer, names, templates).T
    assert (ours - ref).abs().max().item() <= 1e-5


def test_names_with_braces_and_unicode_encode(tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    enc = PromptedTextEncoder(tiny_backbone.model, tiny_backbone.tokenizer)
    vecs = encode_class_names(enc, NAMES, ["a photo of a {}."])
    assert vecs.shape == (5, 64)
    assert torch.allclose(vecs.norm(dim=-1), torch.ones(5), atol=1e-5)


def _onnx_vs_torch(tower: ImageTower, pixels: torch.Tensor, out: Path) -> float:
    spec = export_image_tower(tower, out, pixels)
    session = ort.InferenceSession(str(out / spec.file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels.numpy()})[0]
    with torch.no_grad():
        want = tower(pixels).numpy()
    diff = float(np.abs(got - want).max())
    assert abs(diff - spec.max_abs_diff) < 1e-6  # the manifest records what was measured
    return diff


@pytest.mark.slow  # an ONNX export of a prompted tower
def test_onnx_prompted_tower_matches_torch_on_real_photos(tiny_backbone, photos, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(5)
    tower = ImageTower(
        PromptedImageEncoder(tiny_backbone.model, VisualPromptCfg(4, 2)), Projector(ProjectorCfg(64, 32))
    )
    tower.eval()
    pixels = torch.from_numpy(preprocess_batch(photos, tiny_backbone.preprocess))
    assert _onnx_vs_torch(tower, pixels, tmp_path) <= 1e-4


@pytest.mark.slow
def test_onnx_vit_b16_matches_torch_on_real_photos(photos, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(6)
    bb = load_backbone("ViT-B-16")
    tower = ImageTower(PromptedImageEncoder(bb.model, VisualPromptCfg(4, 9))).eval()
    pixels = torch.from_numpy(preprocess_batch(photos[:4], bb.preprocess))
    assert _onnx_vs_torch(tower, pixels, tmp_path) <= 1e-4


@pytest.mark.slow  # a second ONNX export (the CLI's); the session bundle covers the builder in the fast set
def test_cli_builds_a_servable_bundle(tmp_path, tiny_config, photos) -> None:  # type: ignore[no-untyped-def]
    classes = tmp_path / "classes.txt"
    classes.write_text("# pets\ncat\ndog\n\nrocket\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na drawing of a {}.\n")
    out = tmp_path / "bundle"
    rc = main(
        [
            "bundle",
            "zeroshot",
            "--model",
            str(tiny_config),
            "--pretrained",
            "none",
            "--classes",
            str(classes),
            "--templates",
            str(templates),
            "--out",
            str(out),
            "--onnx",
        ]
    )
    assert rc == 0
    b = load_bundle(out)
    assert [c.name for c in b.label_set().classes] == read_class_names(classes) == ["cat", "dog", "rocket"]
    assert b.manifest.text_encoder is not None and len(b.manifest.text_encoder.templates) == 2
    onnx = b.manifest.image_encoder.onnx[0]
    session = ort.InferenceSession(str(out / onnx.file), providers=["CPUExecutionProvider"])
    pixels = preprocess_batch(photos, b.manifest.image_encoder.preprocess.to_config())
    with torch.no_grad():
        want = build_image_tower(b)(torch.from_numpy(pixels)).numpy()
    assert np.abs(session.run(None, {"pixels": pixels})[0] - want).max() <= 1e-4


def test_cli_reports_bad_input_without_traceback(tmp_path, tiny_config, capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(
        [
            "bundle",
            "zeroshot",
            "--model",
            str(tiny_config),
            "--classes",
            str(tmp_path / "nope.txt"),
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert rc == 2
    assert "class file not found" in capsys.readouterr().err


def test_template_without_placeholder_is_rejected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a cat.\n")
    with pytest.raises(ValueError, match="exactly one"):
        named_templates(str(bad))


def test_duplicate_class_names_are_rejected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "c.txt"
    f.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_class_names(f)


def test_bundle_from_file_loads_with_models_only(tiny_bundle_dir) -> None:  # type: ignore[no-untyped-def]
    assert load_bundle(tiny_bundle_dir).manifest.producer["method"] == "zeroshot"
