"""``promptdistill demo --out DIR``: the whole PromptKD pipeline offline, on real images, in ~1 minute.

Steps (2 CPU cores, no weights or datasets needed):

1. Two tiny CLIPs stand in for the pretrained ones: a teacher (models/configs/tiny-clip.json,
   64-d) and a smaller student (training/configs/tiny-student-clip.json, 32-d). Each is briefly
   pre-trained CLIP-style (image vs caption contrastive loss over the 10 digit captions) on the
   train split of scikit-learn's handwritten digits, upscaled to 64x64. This replaces web-scale
   CLIP pre-training, which cannot happen here.
2. PromptSRC prompt tuning of the teacher on the 16-shot *base* digits (zero..four).
3. Teacher class vectors for all ten digits (base then novel).
4. PromptKD distillation of the student on the unlabeled train images (all classes, no labels).
5. Base / novel / HM of teacher and student on held-out digits; top-1 agreement student vs teacher.
6. A bundle the service can load, with a parity-checked ONNX image tower (the service default).

Output layout (stable; the README serves ``DIR/bundle``)::

    DIR/bundle/       the PromptKD bundle (student tower + teacher class vectors + text side)
    DIR/teacher/      teacher run: bundle/ (the teacher bundle), results.json, loss.png, history.csv, tb/
    DIR/student/      distillation run: results.json, loss.png, base_novel.png, history.csv, tb/
    DIR/summary.json  every number printed at the end, plus wall times
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from models.backbone import Backbone, load_backbone
from training.benchmark import Benchmark, digits_benchmark
from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg
from training.data import build_transform
from training.distill import DistillRunConfig, ExportCfg, run_distill
from training.evaluate import predict, save_json
from training.promptkd import DistillCfg
from training.promptsrc import PromptSRCCfg
from training.teacher import TeacherRunConfig, load_teacher, run_teacher

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = ROOT / "models" / "configs" / "tiny-clip.json"
STUDENT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny-student-clip.json"
CAPTIONS = ["a photo of the digit {}.", "a handwritten {}.", "the number {}."]
PRETRAIN_BATCH = 32
PRETRAIN_LOGIT_SCALE = 50.0


class DemoCfg(Cfg):
    seed: int = 1
    pretrain_epochs: int = Field(default=40, ge=1)  # over the 1,258 train digits, batch 32
    pretrain_lr: float = 3e-3  # one-cycle peak
    teacher_epochs: int = Field(default=20, ge=1)  # the paper's schedule
    distill_epochs: int = Field(default=20, ge=1)  # the paper's schedule
    batch_size: int = Field(default=16, ge=1)  # distillation batch
    onnx: bool = True  # the service's default backend is ONNX
    progress: bool = True


def pretrain_clip(bb: Backbone, bench: Benchmark, cfg: DemoCfg, what: str, captions: list[str] | None = None) -> None:
    """Brief CLIP-style pre-training of the image tower against the frozen text tower.

    Contrastive image-to-caption loss over the ten digit captions (mean of ``CAPTIONS``), with
    the text tower locked at its random initialisation (LiT with the roles swapped). Training the
    text tower from scratch too is far slower on 2 CPU cores (its 49408-row token embedding gets
    a dense gradient every step) and did not leave chance level within the demo's time budget.
    """
    model: Any = bb.model
    with torch.no_grad():
        caption_sets = [bb.tokenizer([t.format(n) for n in bench.class_names]) for t in captions or CAPTIONS]
        text = F.normalize(
            torch.stack([F.normalize(model.encode_text(c), dim=-1) for c in caption_sets]).mean(0), dim=-1
        )
    visual = model.visual
    visual.requires_grad_(True)
    visual.train()
    ds = bench.dataset("train", "all", build_transform(bb.preprocess, train=True, min_scale=0.6, hflip=False))
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(ds) // PRETRAIN_BATCH  # type: ignore[arg-type]
    total = cfg.pretrain_epochs * steps_per_epoch
    opt = torch.optim.AdamW(visual.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=total, pct_start=0.15)
    scale = PRETRAIN_LOGIT_SCALE
    for epoch in range(cfg.pretrain_epochs):
        loader = torch.utils.data.DataLoader(ds, batch_size=PRETRAIN_BATCH, shuffle=True, generator=gen, drop_last=True)
        for images, labels in loader:
            image = F.normalize(visual(images), dim=-1)  # [B, D]
            loss = F.cross_entropy(scale * image @ text.t(), labels)  # [B, 10] logits
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
        log.info("pre-training %s: epoch %d/%d loss %.3f", what, epoch + 1, cfg.pretrain_epochs, loss.item())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(scale))  # the scale the towers were aligned at
    visual.requires_grad_(False)
    model.eval()


def _agreement(folder: Path, bench: Benchmark, student_bundle: Path) -> dict[str, float]:
    """Top-1 agreement (all 10 classes) of the bundle's student and the teacher on held-out digits."""
    from models.bundle import load_bundle
    from models.towers import build_image_tower

    teacher = load_teacher(folder)
    bundle = load_bundle(student_bundle)
    tower = build_image_tower(bundle)
    vectors = bundle.class_vectors["default"]
    tf = build_transform(teacher.backbone.preprocess, train=False)
    ds = bench.dataset("test", "all", tf)
    t_logits, _ = predict(lambda x: F.normalize(teacher.image_encoder(x), dim=-1) @ vectors.t(), ds)
    s_logits, _ = predict(lambda x: tower(x) @ vectors.t(), ds)
    agree = float((t_logits.argmax(-1) == s_logits.argmax(-1)).float().mean())
    return {"agreement_top1": agree}


def run_demo(out: str | Path, cfg: DemoCfg | None = None) -> dict[str, Any]:
    """Run the demo into ``out`` (see module docstring); returns the summary.

    Runs single-threaded: these tiny models are faster on one thread, and two OpenMP threads on a
    busy 2-core machine were measured 60x slower per step (spin-waiting).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(out), cfg or DemoCfg())
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, cfg: DemoCfg) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher_bb = load_backbone(str(TEACHER_CONFIG))
    student_bb = load_backbone(str(STUDENT_CONFIG))
    size = teacher_bb.preprocess.size[0]
    bench = digits_benchmark(size)
    pretrain_clip(teacher_bb, bench, cfg, "teacher")
    pretrain_clip(student_bb, bench, cfg, "student")
    t_pre = time.perf_counter()
    data = DataCfg(kind="digits", shots=16, batch_size=8, crop_scale_min=0.6, hflip=False)
    loop = LoopCfg(seed=cfg.seed, progress=cfg.progress, tensorboard=True, resume=False)
    # GPA peak at 3/4 of the run, as N(15, 1) over 20 epochs in the paper
    gpa_mean = 0.75 * cfg.teacher_epochs
    tiny_prompts = PromptSRCCfg(text_depth=2, vision_depth=2, zs_templates="simple", gpa_mean=gpa_mean)
    tcfg = TeacherRunConfig(
        backbone=BackboneCfg(name=str(TEACHER_CONFIG)),
        data=data,
        optim=OptimCfg(epochs=cfg.teacher_epochs, lr=0.02),
        loop=loop.model_copy(update={"eval_every": cfg.teacher_epochs}),
        promptsrc=tiny_prompts,
        out_dir=out / "teacher",
    )
    teacher = run_teacher(tcfg, backbone=teacher_bb)
    t_teacher = time.perf_counter()
    dcfg = DistillRunConfig(
        student=BackboneCfg(name=str(STUDENT_CONFIG)),
        teacher_dir=out / "teacher",
        data=data.model_copy(update={"batch_size": cfg.batch_size}),
        optim=OptimCfg(epochs=cfg.distill_epochs, lr=0.05),
        loop=loop,
        distill=DistillCfg(kd_weight=10.0, vision_depth=2),
        export=ExportCfg(bundle_dir=out / "bundle", onnx=cfg.onnx, embed_weights=True),
        out_dir=out / "student",
    )
    student = run_distill(dcfg, student=student_bb)
    t_student = time.perf_counter()
    summary = {
        "teacher": {k: teacher[k] for k in ("base", "novel", "hm")},
        "student_last": {k: student["last"][k] for k in ("base", "novel", "hm")},
        "student_best_base_epoch": {k: student["best"][k] for k in ("base", "novel", "hm", "epoch")}
        if "best" in student
        else None,
        **_agreement(out / "teacher", bench, out / "bundle"),
        "agreement_before_distillation": student["agreement"]["before"],
        "bundle": str(out / "bundle"),
        "plots": [
            str(out / "teacher" / "loss.png"),
            str(out / "student" / "loss.png"),
            str(out / "student" / "base_novel.png"),
        ],
        "seconds": {
            "pretrain": t_pre - t0,
            "teacher": t_teacher - t_pre,
            "distill_and_export": t_student - t_teacher,
            "total": time.perf_counter() - t0,
        },
    }
    save_json(summary, out / "summary.json")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    def row(name: str, r: dict[str, float]) -> str:
        return f"  {name:<26} base {r['base']:6.2f}   novel {r['novel']:6.2f}   HM {r['hm']:6.2f}"

    lines = ["PromptKD demo on scikit-learn digits (base: zero..four, novel: five..nine), top-1 %:"]
    lines.append(row("teacher (PromptSRC, tiny)", s["teacher"]))
    lines.append(row("student (last epoch)", s["student_last"]))
    if s.get("student_best_base_epoch"):
        lines.append(row("student (best base epoch)", s["student_best_base_epoch"]))
    lines.append(f"  student/teacher top-1 agreement on held-out digits: {s['agreement_top1']:.3f}")
    lines.append(f"  bundle: {s['bundle']}   (serve it: promptdistill serve --bundle {s['bundle']})")
    lines.append(f"  plots:  {', '.join(s['plots'])}")
    lines.append(f"  wall time: {s['seconds']['total']:.0f} s")
    return "\n".join(lines)


def summary_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=2)
