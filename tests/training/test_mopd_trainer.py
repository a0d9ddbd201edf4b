"""MoPD end to end on real digits with the tiny CLIP: outputs, gate diagnostics, bundle parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.bundle import DEFAULT_LABEL_SET, load_bundle
from models.prompts import PromptedTextEncoder, TextPromptCfg
from models.towers import build_image_tower, build_text_side
from training.config import load_config
from training.mopd.config import MoPDRunCfg
from training.mopd.trainer import MoPDRun, run_mopd

OVERRIDES = [
    "backbone.name=models/configs/tiny-clip.json",
    "backbone.pretrained=null",
    "data.kind=digits",
    "data.shots=3",
    "data.batch_size=5",
    "optim.epochs=2",
    "optim.lr=0.05",
    "loop.progress=false",
    "loop.tensorboard=false",
    "mopd.dataset=Flowers102",
]


@pytest.fixture(scope="module")
def mopd_run(tiny_backbone, tmp_path_factory: pytest.TempPathFactory) -> tuple[MoPDRun, Path]:  # type: ignore[no-untyped-def]
    cfg = load_config(MoPDRunCfg, None, OVERRIDES)
    out = tmp_path_factory.mktemp("mopd")
    return run_mopd(cfg, out, backbone=tiny_backbone), out


def test_config_defaults_follow_the_table() -> None:
    cfg = load_config(MoPDRunCfg, None, ["data.kind=digits", "mopd.dataset=EuroSAT"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup_epochs) == (0.002, 100, 1)
    assert (cfg.data.shots, cfg.data.batch_size) == (16, 128)
    assert cfg.mopd.loss_cfg().w == 0.5 and cfg.mopd.model_cfg().top_k == 2
    cfg = load_config(MoPDRunCfg, None, ["data.kind=digits", "mopd.dataset=Flowers102", "mopd.w2=0.3"])
    assert cfg.mopd.loss_cfg().w2 == 0.3 and cfg.mopd.model_cfg().top_k == 3 and cfg.optim.epochs == 100


@pytest.mark.slow  # a MoPD training run (module fixture)
def test_run_writes_results_plots_and_gate_diagnostics(mopd_run: tuple[MoPDRun, Path]) -> None:
    _, out = mopd_run
    for name in ("results.json", "history.csv", "loss.png", "base_novel.png", "gate.png", "config.yaml"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["n_base"] == 5 and res["n_train_images"] == 15
    for key in ("base", "novel", "hm"):
        assert 0.0 <= res[key] <= 100.0
        assert key in res["zeroshot_pool"]
    gate = res["gate"]["test_base"]
    assert len(gate["templates"]) == 12 and gate["images"] > 0
    assert sum(r["selected"] for r in gate["templates"]) == pytest.approx(3.0)  # k = 3 for Flowers102
    assert sum(r["mass"] for r in gate["templates"]) == pytest.approx(1.0)
    assert sum(res["gate"]["train_last_epoch"]["mass"]) == pytest.approx(1.0)
    assert gate["templates"][0]["template"] == "a photo of a {}, a type of flower."
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "gate/mass_entropy" in history[0] and "train/mps" in history[0]


@pytest.mark.slow  # uses the MoPD training run
def test_bundle_text_side_reproduces_class_vectors(mopd_run: tuple[MoPDRun, Path]) -> None:
    run, out = mopd_run
    bundle = load_bundle(out / "bundle")
    spec = bundle.manifest.text_encoder
    assert spec is not None and spec.templates == ["{}."]
    assert (spec.prompts.n_tokens, spec.prompts.depth) == (4, 1)
    assert run.model.text.prompts is not None
    assert torch.equal(bundle.prompts["text"], run.model.text.prompts.detach().cpu())
    init = PromptedTextEncoder(run.backbone.model, run.backbone.tokenizer, TextPromptCfg(4, 1, "a photo of a")).prompts
    assert init is not None and (bundle.prompts["text"] - init.detach()).abs().max() > 1e-4  # it was trained
    names = [c.name for c in bundle.manifest.label_sets[0].classes]
    assert names == run.bench.class_names
    text_side = build_text_side(bundle)
    stored = bundle.class_vectors[DEFAULT_LABEL_SET]
    diff = (text_side.class_vectors(names) - stored).abs().max().item()
    assert diff <= 1e-5, diff
    # A class added at runtime goes through the learned prompt, not a hand-written template.
    new = text_side.class_vectors(["eleven"])
    assert (new - run.model.class_vectors(["eleven"])).abs().max().item() <= 1e-5
    pixels = torch.randn(3, 3, 64, 64)
    tower = build_image_tower(bundle)
    assert (tower(pixels) - run.model.image_features(pixels)).abs().max().item() <= 1e-5
    # the calibration sample: the train images, embedded by the exported image tower
    assert bundle.calibration is not None and bundle.manifest.calibration is not None
    assert bundle.calibration.shape == (len(run.bench.train_items), bundle.manifest.embed_dim)
    assert bundle.manifest.calibration.source.startswith("mopd: train images")


def test_weights_alone_can_be_overridden() -> None:
    from training.config import load_config
    from training.mopd.combined import CombinedRunCfg

    cfg = load_config(MoPDRunCfg, None, ["backbone.pretrained=none", "data.kind=digits"])
    assert (cfg.backbone.name, cfg.backbone.pretrained) == ("ViT-B-16-quickgelu", "none")
    own = load_config(MoPDRunCfg, None, ["backbone.name=ViT-B-32", "data.kind=digits"])
    assert (own.backbone.name, own.backbone.pretrained) == ("ViT-B-32", None)  # a new name brings no tag
    both = load_config(CombinedRunCfg, None, ["teacher.pretrained=none", "student.pretrained=none", "data.kind=digits"])
    assert (both.teacher.name, both.student.name) == ("ViT-L-14-quickgelu", "ViT-B-16-quickgelu")
