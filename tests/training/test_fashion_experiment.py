"""`promptdistill experiment fashion-mnist` reduced to a few images of tiny IDX files written here:
the pipeline (pre-training cache, every method, the data ablation, the claims, table, plots), not
the numbers (those are in docs/experiments.md); and the pieces it is built from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError

from tests.training.test_fashion_data import _write
from training.contrastive import augment, unicl_loss
from training.fashion import ALL, FashionCfg, cache_path, depth, paired, pool_name, pretrained, run_fashion

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_unicl_equals_clip_loss_when_every_label_is_distinct() -> None:
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    labels = torch.arange(6)
    logits = 10.0 * image @ text.t()
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert torch.allclose(unicl_loss(image, text, labels, labels, torch.tensor(10.0)), clip, atol=1e-6)


def test_unicl_targets_spread_over_same_class_pairs() -> None:
    image, text = torch.eye(3)[[0, 0, 1]], torch.eye(3)[[0, 1, 2]]  # caption 2's class has no image
    labels, text_labels = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])
    logits = 5.0 * image @ text.t()
    i2t = F.cross_entropy(logits, labels)
    t2i = -(torch.tensor([0.5, 0.5, 0.0]) * F.log_softmax(logits[:, 0], 0)).sum() - F.log_softmax(logits[:, 1], 0)[2]
    expected = 0.5 * (i2t + t2i / 2)
    assert torch.allclose(unicl_loss(image, text, labels, text_labels, torch.tensor(5.0)), expected, atol=1e-6)


def test_augment_crops_and_flips_per_image() -> None:
    constant = torch.full((3, 12, 12), 51, dtype=torch.uint8)
    out = augment(constant, torch.Generator().manual_seed(0), MEAN, STD)
    assert out.shape == (3, 3, 12, 12)
    assert torch.allclose(out, torch.full_like(out, (51 / 255 - 0.5) / 0.25), atol=1e-5)  # any crop of a flat image
    left_bright = torch.zeros(200, 12, 12, dtype=torch.uint8)
    left_bright[:, :, :6] = 255

    def left_brighter(x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, :, :6].mean((1, 2)) > x[:, 0, :, 6:].mean((1, 2))

    kept = augment(left_bright, torch.Generator().manual_seed(0), MEAN, STD, min_scale=1.0, hflip=False)
    assert bool(left_brighter(kept).all())
    flipped = left_brighter(augment(left_bright, torch.Generator().manual_seed(0), MEAN, STD, min_scale=1.0))
    assert 60 < int(flipped.sum()) < 140  # about half flipped


def test_prompt_depth_follows_the_papers_share_of_layers() -> None:
    assert depth(9, 12, 12) == 9 and depth(9, 24, 24) == 9
    assert depth(9, 12, 2) == 2 and depth(9, 24, 4) == 2 and depth(9, 24, 1) == 1


def test_paired_verdict_follows_the_seed_spread() -> None:
    assert paired([5.0, 6.0, 7.0], [1.0, 1.0, 1.0])["holds"] is True
    assert paired([5.0, -3.0, 1.0], [1.0, 1.0, 1.0])["holds"] is False  # mean +0 inside the spread
    one = paired([5.0], [1.0])
    assert one["holds"] is None and math.isclose(one["mean"], 4.0)


@pytest.mark.slow  # ~25 s of CPU
def test_pipeline_end_to_end_on_tiny_idx_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    _write(root, 24)  # 240 train / 240 test random 28x28 images
    cfg = FashionCfg(
        root=root, seeds=[1, 2], train_per_class=20, test_per_class=4, pretrain_epochs=1, teacher_epochs=1,
        prompt_epochs=1, distill_epochs=1, pools=[16, ALL], cache_dir=tmp_path / "cache", progress=False, jobs=2,
    )  # fmt: skip
    summary = run_fashion(tmp_path / "out", cfg)

    table = summary["table"]
    assert sorted(r["seed"] for r in summary["runs"]["CoOp"]) == [1, 2]  # the seeds ran in two processes
    for row in ("zero-shot (student CLIP)", "zero-shot (teacher CLIP)", "CoOp", "MoPD", "PromptSRC teacher",
                "PromptKD student", pool_name(16), pool_name(ALL)):  # fmt: skip
        assert table[row]["hm"]["n"] == 2, row
    assert len(summary["claims"]) == 5 and all(c["holds"] is not None for c in summary["claims"])
    pre = summary["pretrained"]
    assert 0 < pre["flops_ratio_student_to_teacher"] < 1 and 0 < pre["params_ratio_student_to_teacher"] < 1
    assert -1 <= pre["student"]["cos_same_class_across_templates"] <= 1
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["table"] == table
    assert "PromptKD student" in (tmp_path / "out" / "table.md").read_text()
    assert "does not hold" in (tmp_path / "out" / "claims.md").read_text() or "holds" in saved["claims"][0].values()
    for plot in ("fashion_mnist.png", "fashion_mnist_pools.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 1000
    for seed in (1, 2):
        assert (tmp_path / "out" / f"seed{seed}" / "student" / "bundle").is_dir()
        assert (tmp_path / "out" / f"seed{seed}" / "student-16pc" / "results.json").is_file()

    # both CLIPs were pre-trained once and cached; loading again gives the same weights
    for config in (cfg.teacher_config, cfg.student_config):
        cache = cache_path(config, cfg)
        assert cache.is_file()
        again = pretrained(config, cfg=cfg)
        from safetensors.torch import load_file

        stored = load_file(cache)
        assert all(torch.equal(v, stored[k]) for k, v in again.model.state_dict().items())
    assert cache_path(cfg.student_config, cfg) != cache_path(
        cfg.student_config, cfg.model_copy(update={"pretrain_seed": 1})
    )

    # the student stage alone, distilled from the run above's teacher with other visual prompts
    again_cfg = cfg.model_copy(
        update={"seeds": [1], "jobs": 1, "pools": [ALL], "stages": ["student"], "teacher_from": tmp_path / "out",
                "student_tokens": 2, "student_depth": 1}
    )  # fmt: skip
    student_only = run_fashion(tmp_path / "student-only", again_cfg)
    assert set(student_only["runs"]) == {"PromptSRC teacher", "PromptKD student", pool_name(ALL)}
    teacher_seed1 = next(r for r in summary["runs"]["PromptSRC teacher"] if r["seed"] == 1)
    assert student_only["runs"]["PromptSRC teacher"] == [teacher_seed1]  # read back, not re-trained
    assert sorted(p.name for p in (tmp_path / "student-only" / "seed1").iterdir()) == ["student"]
    used = yaml.safe_load((tmp_path / "student-only" / "seed1" / "student" / "config.yaml").read_text())
    assert Path(used["teacher_dir"]) == tmp_path / "out" / "seed1" / "teacher"
    assert (used["distill"]["vision_tokens"], used["distill"]["vision_depth"]) == (2, 1)
    assert [c["n"] for c in student_only["claims"]] == [1]  # student vs 0.95x teacher, one seed


def test_stages_without_the_teacher_need_an_earlier_one(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs a teacher"):
        FashionCfg(stages=["student"])
    with pytest.raises(ValidationError, match="leave 'teacher' out"):
        FashionCfg(teacher_from=tmp_path)
    assert FashionCfg(stages=["coop", "mopd"]).teacher_from is None  # no student: no teacher needed
    assert FashionCfg(stages=["student"], teacher_from=tmp_path).stages == ["student"]


@pytest.mark.parametrize("changed", [{"pretrain_epochs": 2}, {"train_per_class": 30}])
def test_cache_key_changes_with_what_the_pretraining_saw(tmp_path: Path, changed: dict[str, int]) -> None:
    cfg = FashionCfg(cache_dir=tmp_path, train_per_class=20)
    assert cache_path(cfg.teacher_config, cfg) != cache_path(cfg.teacher_config, cfg.model_copy(update=changed))
