"""`promptdistill train teacher` -> `train distill --onnx` -> `evaluate`, on tiny models and real digits.

The exported bundle must load with models/ alone and give the trainer's logits on the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import load_bundle
from models.towers import build_towers
from promptdistill.cli import main
from tests.conftest import ACCEPT_ANY_INT8
from training.benchmark import digits_benchmark
from training.config import load_config
from training.data import build_transform
from training.distill import DistillRunConfig
from training.promptkd import PromptKDStudent
from training.teacher import load_teacher

pytestmark = pytest.mark.slow


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    root = tmp_path_factory.mktemp("promptkd")
    common = _sets("data.kind=digits", "loop.progress=false", "optim.epochs=2", "data.crop_scale_min=0.5")
    teacher = _sets(f"backbone.name={tiny_config}", "promptsrc.text_depth=2", "promptsrc.vision_depth=2")
    teacher += _sets("promptsrc.zs_templates=simple")
    assert main(["train", "teacher", *common, *teacher, "--out", str(root / "teacher")]) == 0
    student = _sets(f"student.name={tiny_config}", f"teacher_dir={root / 'teacher'}", "distill.vision_depth=2")
    student += _sets("distill.kd_weight=10", "data.batch_size=32")
    # How close int8 comes to fp32 depends on the CPU's int8 kernels (0.99 on one machine, 0.85 on
    # another for this tiny tower): this run checks the --int8 wiring and accepts any graph; the
    # floor itself is tested in tests/models/test_int8.py.
    student += _sets(f"export.int8_min_cosine={ACCEPT_ANY_INT8}")
    assert main(["train", "distill", *common, *student, "--out", str(root / "student"), "--onnx", "--int8"]) == 0
    return root


def test_run_outputs(runs: Path) -> None:
    teacher = json.loads((runs / "teacher" / "results.json").read_text())
    assert {"base", "novel", "hm", "base_per_class"} <= set(teacher)
    assert len(teacher["base_per_class"]) == 5 and teacher["n_base"] == 5
    student = json.loads((runs / "student" / "results.json").read_text())
    assert student["last"]["epoch"] == 2 and student["best"]["epoch"] in (1, 2)
    assert student["kd_weight_batchmean_equivalent"] == pytest.approx(1.0)  # 10 / N=10
    for f in ("history.csv", "loss.png", "base_novel.png", "checkpoint.pt", "config.yaml"):
        assert (runs / "student" / f).is_file(), f
    assert any((runs / "student" / "tb").iterdir())
    assert (runs / "teacher" / "loss.png").is_file()


def test_bundle_loads_and_matches_trainer_logits(runs: Path) -> None:
    bundle = load_bundle(runs / "student" / "bundle")
    m = bundle.manifest
    assert m.producer["method"] == "promptkd"
    classes = bundle.label_set("default").classes
    assert [c.name for c in classes][:2] == ["zero", "one"]
    assert [c.provenance for c in classes] == ["promptkd:base"] * 5 + ["promptkd:novel"] * 5
    assert m.text_encoder is not None and m.text_encoder.templates == ["{}."]
    assert set(m.backbones) == {"student", "teacher"}
    assert [o.quantization for o in m.image_encoder.onnx] == ["none", "dynamic-int8"]  # --onnx --int8
    assert -1.0 <= m.image_encoder.onnx[1].parity["cosine_min"] <= 1.0 + 1e-6  # the report is there
    tower, text = build_towers(bundle)

    # Trainer-side model rebuilt from the run (teacher store + exported student weights).
    cfg = load_config(DistillRunConfig, runs / "student" / "config.yaml")
    teacher = load_teacher(cfg.teacher_dir)
    from models.backbone import load_backbone

    student_bb = load_backbone(cfg.student.name)
    model = PromptKDStudent(student_bb, teacher.image_encoder, teacher.class_vectors, cfg.distill, teacher.logit_scale)
    ckpt = torch.load(runs / "student" / "checkpoint.pt", weights_only=False)
    model.load_state_dict(ckpt["model"], strict=False)  # last epoch = exported weights
    student_bb.model.load_state_dict({k: v for k, v in bundle_backbone(runs).items()})
    model.eval()

    bench = digits_benchmark(64)
    pixels = torch.stack([build_transform(student_bb.preprocess, train=False)(bench.test_items[i]) for i in range(16)])
    with torch.no_grad():
        want = model.logits(pixels)  # the trainer's evaluation path, all 10 classes
        got = m.logit_scale * tower(pixels) @ bundle.class_vectors["default"].t()
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

    # The text side re-encodes the class names exactly as the stored teacher class vectors.
    assert text is not None
    names = [c.name for c in classes]
    assert torch.allclose(text.class_vectors(names), bundle.class_vectors["default"], atol=1e-5)
    assert torch.allclose(teacher.class_vectors, bundle.class_vectors["default"], atol=1e-6)

    # The ONNX graph agrees with torch on these images.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle.path(m.image_encoder.onnx[0].file)), providers=["CPUExecutionProvider"])
    onnx_emb = sess.run(["embedding"], {"pixels": pixels.numpy()})[0]
    assert np.abs(onnx_emb - tower(pixels).detach().numpy()).max() < 1e-4

    # The calibration sample: the unlabeled train images distillation read, embedded by the exported student.
    assert bundle.calibration is not None and m.calibration is not None
    train = bench.train_items
    assert bundle.calibration.shape == (len(train), m.embed_dim) and m.calibration.count == len(train)
    first = torch.stack([build_transform(student_bb.preprocess, train=False)(train[i]) for i in range(8)])
    with torch.no_grad():
        assert torch.allclose(bundle.calibration[:8], tower(first), atol=2e-3)  # stored as float16


def bundle_backbone(runs: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(runs / "student" / "bundle" / "backbones" / "student.safetensors")


def test_evaluate_command_reproduces_last_epoch(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.towers
    import training.bundle_eval

    loaded: list[str] = []
    real = models.towers.load_bundle_backbone

    def recording(bundle, key, device="cpu"):  # type: ignore[no-untyped-def]
        loaded.append(key)
        return real(bundle, key, device)

    monkeypatch.setattr(models.towers, "load_bundle_backbone", recording)
    monkeypatch.setattr(training.bundle_eval, "load_bundle_backbone", recording)
    out = runs / "eval.json"
    rc = main(
        ["evaluate", "--bundle", str(runs / "student" / "bundle"), "--set", "data.kind=digits", "--out", str(out)]
    )
    assert rc == 0
    got = json.loads(out.read_text())
    want = json.loads((runs / "student" / "results.json").read_text())["last"]
    assert got["base"] == pytest.approx(want["base"], abs=1e-6)
    assert got["novel"] == pytest.approx(want["novel"], abs=1e-6)
    assert loaded == ["student"]  # the bundle holds every class: its (teacher's) text side stays unloaded
    summary_file = runs / "summary.json"
    files = [str(runs / "student" / "results.json")] * 2
    assert main(["evaluate", "--summarize", *files, "--out", str(summary_file)]) == 0
    summary = json.loads(summary_file.read_text())
    assert summary["last"]["base"]["mean"] == pytest.approx(want["base"]) and summary["last"]["base"]["std"] == 0.0


def test_teacher_is_a_bundle_evaluable_and_servable(runs: Path) -> None:
    """`train teacher` writes a bundle; `evaluate` on it reproduces the teacher's own results."""
    bundle = load_bundle(runs / "teacher" / "bundle")
    m = bundle.manifest
    assert m.extra["role"] == "teacher" and m.extra["n_base"] == 5
    assert [c.provenance for c in bundle.label_set().classes] == ["promptsrc:base"] * 5 + ["promptsrc:novel"] * 5
    assert set(m.backbones) == {"teacher"} and m.text_encoder is not None and m.text_encoder.backbone == "teacher"
    assert not (runs / "teacher" / "teacher.json").exists()  # the private format is gone
    out = runs / "teacher_eval.json"
    rc = main(
        ["evaluate", "--bundle", str(runs / "teacher" / "bundle"), "--set", "data.kind=digits", "--out", str(out)]
    )
    assert rc == 0
    got = json.loads(out.read_text())
    want = json.loads((runs / "teacher" / "results.json").read_text())
    assert got["base"] == pytest.approx(want["base"], abs=1e-6) and got["novel"] == pytest.approx(
        want["novel"], abs=1e-6
    )
    # servable: the real app (torch backend: the teacher has no ONNX graph) classifies a digit with it
    import base64
    import io

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    buf = io.BytesIO()
    digits_benchmark(64).test_items[0].save(buf, format="PNG")  # type: ignore[union-attr]
    settings = Settings(
        bundle=runs / "teacher" / "bundle", backend="torch", state_dir=runs / "teacher_state", threads=1
    )
    with TestClient(create_app(settings)) as http:
        resp = http.post("/v1/classify", json={"images": [base64.b64encode(buf.getvalue()).decode()], "top_k": 3})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["results"][0]["predictions"]) == 3
