"""The shared training loop: Dassl schedule, checkpoint resume, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.backbone import load_backbone
from models.prompts import PromptedImageEncoder, VisualPromptCfg
from training.benchmark import digits_benchmark
from training.config import LoopCfg, OptimCfg, load_config
from training.data import build_transform
from training.distill import DistillRunConfig
from training.loop import CHECKPOINT, Callback, Trainer, build_scheduler, read_history, trainable_state
from training.promptkd import DistillCfg, PromptKDStudent
from training.promptsrc import PromptSRC, PromptSRCCfg
from training.teacher import TeacherRunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs" / "promptkd"


def test_scheduler_is_dassl_constant_warmup_then_cosine() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.005)
    sched = build_scheduler(opt, OptimCfg())
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-5)
    for e in range(1, 20):  # Dassl: successor cosine stepped with (epoch - warmup), T_max = max_epoch
        assert lrs[e] == pytest.approx(0.005 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 20)), rel=1e-6)


class _Interrupt(Callback):
    def __init__(self, at_epoch: int) -> None:
        self.at = at_epoch

    def on_epoch_end(self, trainer, metrics) -> None:  # type: ignore[no-untyped-def]
        if metrics["epoch"] == self.at:
            raise KeyboardInterrupt  # after epoch at-1's checkpoint, before epoch at's


def _student(tiny_config):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    bb = load_backbone(str(tiny_config))
    teacher = PromptedImageEncoder(bb.model, VisualPromptCfg(n_tokens=2, depth=2))
    vectors = F.normalize(torch.randn(10, 64), dim=-1)
    return PromptKDStudent(bb, teacher, vectors, DistillCfg(kd_weight=10.0, vision_tokens=2, vision_depth=2), 100.0)


def _teacher(tiny_config):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    bb = load_backbone(str(tiny_config))
    cfg = PromptSRCCfg(text_depth=2, vision_depth=2)
    return PromptSRC(bb, ["zero", "one", "two", "three", "four"], cfg, ["a photo of {}.", "{}"])


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_resume_gives_bit_identical_weights(tiny_config, tmp_path: Path, which: str) -> None:  # type: ignore[no-untyped-def]
    bench = digits_benchmark(64)
    tf = build_transform(load_backbone(str(tiny_config)).preprocess, train=True)  # random crops + flips
    subset = "all" if which == "student" else "base"
    data = torch.utils.data.Subset(bench.dataset("train", subset, tf), list(range(48)))
    optim = OptimCfg(epochs=3, lr=0.05)
    loop = LoopCfg(progress=False, tensorboard=False, seed=3)
    make = _student if which == "student" else _teacher

    def callbacks():  # type: ignore[no-untyped-def]
        if which == "teacher":  # a stateful callback must round-trip too
            from training.promptsrc import GaussianPromptAggregation

            return [GaussianPromptAggregation(3, 2.0, 1.0)]
        return []

    full = make(tiny_config)
    Trainer(full, data, optim, loop, tmp_path / "full", batch_size=16, callbacks=callbacks()).fit()

    first = make(tiny_config)
    with pytest.raises(KeyboardInterrupt):
        Trainer(
            first, data, optim, loop, tmp_path / "resumed", batch_size=16, callbacks=[*callbacks(), _Interrupt(3)]
        ).fit()
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["epoch"] == 2
    second = make(tiny_config)  # a fresh process would rebuild the model the same way
    state = Trainer(second, data, optim, loop, tmp_path / "resumed", batch_size=16, callbacks=callbacks()).fit()
    assert state.epoch == 3

    a, b = trainable_state(full), trainable_state(second)
    assert set(a) == set(b) and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["epoch"] for h in read_history(tmp_path / "resumed" / "history.csv")] == [1, 2, 3]


def test_config_overrides_and_validation(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("student: {name: ViT-B-16}\nteacher_dir: t\ndata: {kind: digits}\nout_dir: o\noptim: {lr: 0.1}\n")
    cfg = load_config(DistillRunConfig, f, ["optim.lr=0.01", "distill.kd_weight=200", "export.onnx=true"])
    assert cfg.optim.lr == 0.01 and cfg.distill.kd_weight == 200 and cfg.export.onnx is True
    assert cfg.optim.epochs == 20 and cfg.data.batch_size == 8  # paper defaults
    with pytest.raises(ValueError, match="optim.lrr|lrr"):
        load_config(DistillRunConfig, f, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="data.root"):
        load_config(DistillRunConfig, f, ["data.kind=coop_split"])
    with pytest.raises(ValueError, match="section.field=value"):
        load_config(DistillRunConfig, f, ["optim.lr"])


def test_shipped_dataset_configs_validate() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    datasets = [p for p in files if not p.name.startswith(("_", "teacher"))]
    assert len(datasets) == 11
    weights = {}
    for path in datasets:
        cfg = load_config(DistillRunConfig, path, ["data.root=/data"])
        weights[path.stem] = cfg.distill.kd_weight
        assert cfg.optim.lr == 0.005 and cfg.data.batch_size == 8 and cfg.optim.epochs == 20
        assert cfg.data.kind == ("image_folder" if path.stem == "imagenet" else "coop_split")
        assert cfg.distill.vision_depth == 9
    assert {k for k, v in weights.items() if v == 200} == {"fgvc_aircraft", "oxford_flowers", "dtd"}
    teacher = load_config(TeacherRunConfig, CONFIGS / "teacher.yaml", ["data.root=/d", "data.split_file=/d/s.json"])
    assert teacher.promptsrc.text_depth == 9 and teacher.data.shots == 16
