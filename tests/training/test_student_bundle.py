"""A PromptKD student bundle stands on its own: no path into the teacher's run folder survives
in it, and a bundle that still refers to a missing weights file fails the serving preflight with
one line and exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.backbone import load_backbone
from models.bundle import bundle_space, load_bundle
from models.class_vectors import encode_class_names
from models.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptCfg, VisualPromptCfg
from models.towers import build_towers
from promptdistill.cli import main
from training.benchmark import digits_benchmark
from training.export import write_bundle
from training.promptsrc import LEARNED_TEMPLATES
from training.teacher import load_teacher, prompted_teacher_bundle, teacher_bundle_dir

pytestmark = pytest.mark.slow  # a short distillation run


def _teacher_run(root: Path, tiny_config: Path) -> Path:
    """A teacher run folder whose bundle embeds its random-init backbone (as `train teacher` does)."""
    torch.manual_seed(0)
    bb = load_backbone(str(tiny_config))
    image = PromptedImageEncoder(bb.model, VisualPromptCfg(n_tokens=2, depth=2))
    text = PromptedTextEncoder(bb.model, bb.tokenizer, TextPromptCfg(n_tokens=2, depth=2))
    names = digits_benchmark(bb.preprocess.size[0]).class_names
    bundle = prompted_teacher_bundle(bb, image, text, names, 5, 100.0, {"method": "test"}, {})
    write_bundle(bundle, root / "bundle")
    assert load_bundle(root / "bundle").manifest.backbones["teacher"].weights_file is not None
    return root


def _distill(teacher: Path, out: Path, tiny_config: Path, *extra: str) -> Path:
    sets = [f"student.name={tiny_config}", f"teacher_dir={teacher}", "distill.vision_depth=2", "data.kind=digits",
            "optim.epochs=1", "loop.max_steps_per_epoch=1", "loop.progress=false", "loop.tensorboard=false",
            "data.batch_size=8", *extra]  # fmt: skip
    assert main(["train", "distill", *[a for s in sets for a in ("--set", s)], "--out", str(out)]) == 0
    return out / "bundle"


def test_student_bundle_serves_new_classes_after_the_teacher_run_is_gone(
    tmp_path: Path, tiny_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher_dir = _teacher_run(tmp_path / "runs" / "teacher", tiny_config)
    monkeypatch.chdir(tmp_path)  # the CLI is run from the project folder, with relative paths
    student = _distill(Path("runs/teacher"), Path("runs/student"), tiny_config)
    want = encode_class_names(load_teacher(teacher_dir).text_encoder, ["brick wall"], list(LEARNED_TEMPLATES))
    teacher_space = bundle_space(load_bundle(teacher_bundle_dir(teacher_dir)))
    assert bundle_space(load_bundle(student)) == teacher_space  # the teacher's space, though the files differ

    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(student, moved)
    shutil.rmtree(tmp_path / "runs")
    monkeypatch.chdir(tmp_path / "elsewhere")

    bundle = load_bundle(moved)
    ref = bundle.manifest.backbones["teacher"]
    assert ref.towers == "text" and ref.weights_file is not None
    embedded = load_file(moved / ref.weights_file)
    assert embedded and not any(k.startswith("visual.") for k in embedded)  # the text tower only
    _tower, text = build_towers(bundle)
    assert text is not None
    assert torch.allclose(text.class_vectors(["brick wall"]), want, atol=1e-5)


def test_preflight_refuses_a_missing_weights_reference_with_one_line(
    tmp_path: Path, tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher_dir = _teacher_run(tmp_path / "teacher", tiny_config)
    weights = tmp_path / "student.safetensors"  # the student's own weights: a file that stays
    save_file(load_backbone(str(tiny_config)).model.state_dict(), weights)
    extra = ("export.embed_weights=false", f"student.pretrained={weights}")
    student = _distill(teacher_dir, tmp_path / "student", tiny_config, *extra)
    ref = load_bundle(student).manifest.backbones["teacher"]
    assert ref.weights_file is None and ref.pretrained is not None  # asked for: a reference to the teacher's file
    shutil.rmtree(teacher_dir)
    code = main(["serve", "--bundle", str(student), "--state-dir", str(tmp_path / "state"), "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "does not exist here" in err and "teacher" in err
