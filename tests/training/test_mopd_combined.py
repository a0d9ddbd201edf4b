"""MoPD-tuned teacher text prompt -> PromptKD student (the beyond-the-papers experiment), tiny and short."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.bundle import DEFAULT_LABEL_SET, load_bundle
from models.towers import build_text_side
from training.config import load_config
from training.mopd.combined import CombinedRunCfg, run_combined


@pytest.mark.slow  # MoPD teacher + PromptKD student runs
def test_mopd_teacher_feeds_promptkd_student(tmp_path: Path) -> None:
    sets = [
        "teacher.name=models/configs/tiny-clip.json", "teacher.pretrained=null",
        "student.name=models/configs/tiny-clip.json", "student.pretrained=null",  # a second random tiny CLIP
        "data.kind=digits", "data.shots=2", "data.batch_size=16", "mopd_batch_size=5",
        "mopd_optim.epochs=1", "distill_optim.epochs=1", "loop.max_steps_per_epoch=2",
        "distill.vision_depth=2", "loop.progress=false", "loop.tensorboard=false", f"out_dir={tmp_path}",
    ]  # fmt: skip
    cfg = load_config(CombinedRunCfg, None, sets)
    assert cfg.mopd_optim.lr == 0.002 and cfg.distill_optim.lr == 0.005
    results = run_combined(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"teacher_mopd", "student"}
    assert {"base", "novel", "hm"} <= set(saved["teacher_mopd"]) and "last" in saved["student"]
    assert results["student"]["teacher"]["hm"] == saved["teacher_mopd"]["hm"]
    for name in ("base_novel.png", "teacher_mopd/gate.png", "student/loss.png"):
        assert (tmp_path / name).is_file(), name
    # The student bundle carries the MoPD teacher's class vectors and its text side reproduces them.
    teacher_bundle = load_bundle(tmp_path / "teacher_mopd" / "bundle")
    student_bundle = load_bundle(tmp_path / "student" / "bundle")
    stored = student_bundle.class_vectors[DEFAULT_LABEL_SET]
    assert (stored - teacher_bundle.class_vectors[DEFAULT_LABEL_SET]).abs().max().item() <= 1e-5
    names = [c.name for c in student_bundle.manifest.label_sets[0].classes]
    text = student_bundle.manifest.text_encoder
    assert text is not None and (text.prompts.n_tokens, text.prompts.depth) == (4, 1)
    assert (build_text_side(student_bundle).class_vectors(names) - stored).abs().max().item() <= 1e-5
