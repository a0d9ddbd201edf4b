"""Stage 2: distill a stored teacher into a prompted student on unlabeled images, evaluate, export.

Evaluation (algorithms.md §1.5): after every epoch the base-test accuracy is computed (the
official "val"); the reported protocol takes the epoch with the best base-test accuracy and its
novel accuracy ("best"), and the plain last epoch is reported too ("last"). The bundle holds the
weights chosen by ``export.weights`` (default ``last``: no selection on test data).

Output folder: results.json, history.csv, tb/, loss.png, base_novel.png, checkpoint.pt,
config.yaml, and the bundle (``bundle/`` unless ``export.bundle_dir`` says otherwise).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from models.backbone import Backbone, load_backbone
from training.benchmark import Benchmark, load_benchmark
from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg, save_config
from training.data import Subset, build_transform
from training.evaluate import (
    accuracy,
    base_novel_result,
    per_class_accuracy,
    plot_base_novel,
    plot_history,
    predict,
    save_json,
)
from training.export import ImageParts, TextParts, assemble_bundle, image_tower, label_set, write_bundle
from training.loop import BestState, EvalCallback, Trainer, load_trainable_state, pick_device, trainable_state
from training.promptkd import DistillCfg, PromptKDStudent, batchmean_equivalent_weight
from training.promptsrc import LEARNED_TEMPLATES
from training.teacher import Teacher, load_teacher

log = logging.getLogger(__name__)


class ExportCfg(Cfg):
    bundle_dir: Path | None = None  # default: <out_dir>/bundle
    onnx: bool = False  # also export the prompted student image tower (parity-checked)
    int8: bool = False  # also a dynamically quantised int8 graph (implies onnx) with its parity report
    int8_min_cosine: float = 0.99  # refuse the int8 graph if any check photo's cosine vs fp32 is lower
    weights: Literal["last", "best"] = "last"  # "best" = the official best base-test epoch
    embed_weights: bool | None = None  # store backbones inside the bundle; None = only random-init ones


class DistillRunConfig(Cfg):
    """``promptdistill train distill``: PromptKD student on the unlabeled train split."""

    student: BackboneCfg
    teacher_dir: Path
    data: DataCfg
    optim: OptimCfg = OptimCfg()
    loop: LoopCfg = LoopCfg()
    distill: DistillCfg = DistillCfg()
    export: ExportCfg = ExportCfg()
    out_dir: Path


def evaluate_student(
    model: PromptKDStudent,
    bench: Benchmark,
    transform: Any,
    device: torch.device,
    subsets: tuple[Subset, ...] = ("base", "new"),
    batch_size: int = 100,
) -> dict[str, Any]:
    """Accuracy per subset among that subset's class vectors; keys base / novel (+ per class)."""
    was = model.training
    model.eval()
    out: dict[str, Any] = {}
    for subset in subsets:
        rows = bench.rows(subset)

        def logits_fn(x: torch.Tensor, r: slice = rows) -> torch.Tensor:
            return model.logits(x, r)

        logits, labels = predict(
            logits_fn,
            bench.dataset("test", subset, transform),
            device=device,
            batch_size=batch_size,
        )
        key = "novel" if subset == "new" else subset
        out[key] = accuracy(logits, labels)
        out[f"{key}_per_class"] = per_class_accuracy(logits, labels)
    model.train(was)
    return out


@torch.no_grad()
def agreement(model: PromptKDStudent, dataset: Any, device: torch.device, batch_size: int = 100) -> float:
    """Share of test images (all classes) where student and teacher top-1 over all N classes agree."""
    was = model.training
    model.eval()
    s, _ = predict(model.logits, dataset, device=device, batch_size=batch_size)
    t, _ = predict(model.teacher_logits, dataset, device=device, batch_size=batch_size)
    model.train(was)
    return float((s.argmax(-1) == t.argmax(-1)).float().mean())


def _check_compatible(teacher: Teacher, student: Backbone, bench: Benchmark) -> None:
    if teacher.class_names != bench.class_names:
        raise ValueError(
            "the teacher's class names differ from the dataset's; distill on the data the teacher was trained for"
        )
    t, s = teacher.backbone.preprocess, student.preprocess
    if (t.size, t.mean, t.std) != (s.size, s.mean, s.std):
        raise ValueError(f"teacher and student must see the same view: preprocess {t} vs {s}")


def run_distill(
    cfg: DistillRunConfig, student: Backbone | None = None, teacher: Teacher | None = None
) -> dict[str, Any]:
    """Distill, evaluate (best-base-epoch and last-epoch protocols), export the bundle."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    device = pick_device(cfg.loop.device)
    # in-memory teacher: MoPD -> PromptKD (training/mopd/combined.py)
    teacher = teacher or load_teacher(cfg.teacher_dir)
    sbb = student or load_backbone(cfg.student.name, cfg.student.pretrained)
    bench = load_benchmark(cfg.data, image_size=sbb.preprocess.size[0])
    _check_compatible(teacher, sbb, bench)
    train_tf = build_transform(sbb.preprocess, train=True, min_scale=cfg.data.crop_scale_min, hflip=cfg.data.hflip)
    unlabeled = bench.unlabeled(train_tf)
    test_tf = build_transform(sbb.preprocess, train=False)
    torch.manual_seed(cfg.loop.seed)  # prompt and projector initialisation
    model = PromptKDStudent(sbb, teacher.image_encoder, teacher.class_vectors, cfg.distill, teacher.logit_scale)

    all_test = bench.dataset("test", "all", test_tf)

    def base_acc(m: Any) -> dict[str, float]:
        base = evaluate_student(m, bench, test_tf, device, ("base",), cfg.data.test_batch_size)["base"]
        return {"base_acc": base}

    best = BestState("base_acc")
    trainer = Trainer(
        model,
        unlabeled,
        cfg.optim,
        cfg.loop,
        out,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        callbacks=[EvalCallback(base_acc, cfg.loop.eval_every), best],
    )
    model.to(device)
    agreement_before = agreement(model, all_test, device, cfg.data.test_batch_size)
    state = trainer.fit()
    results = _protocol_results(model, best, bench, test_tf, device, cfg, state.epoch)
    results |= {
        "agreement": {
            "before": agreement_before,
            "after": agreement(model, all_test, device, cfg.data.test_batch_size),
        },
        "exported_weights": cfg.export.weights,
        "seed": cfg.loop.seed,
        "n_unlabeled_images": len(unlabeled),  # type: ignore[arg-type]
        "kd_weight": cfg.distill.kd_weight,
        "kd_weight_batchmean_equivalent": batchmean_equivalent_weight(cfg.distill.kd_weight, len(bench.class_names)),
        "teacher": _teacher_results(cfg.teacher_dir),
    }
    bundle_dir = cfg.export.bundle_dir or out / "bundle"
    export_student(model, sbb, teacher, bundle_dir, cfg, results)
    results["bundle"] = str(bundle_dir)
    save_json(results, out / "results.json")
    _plots(results, state.history, out)
    r = results["last"]
    log.info(
        "student (last epoch): base %.2f novel %.2f HM %.2f; bundle -> %s", r["base"], r["novel"], r["hm"], bundle_dir
    )
    return results


def _protocol_results(
    model: PromptKDStudent,
    best: BestState,
    bench: Benchmark,
    transform: Any,
    device: torch.device,
    cfg: DistillRunConfig,
    epochs: int,
) -> dict[str, Any]:
    """``last`` (final weights) and ``best`` (best base-test epoch, the official protocol); leaves
    the model holding the weights ``cfg.export.weights`` selects."""
    last_state = trainable_state(model)
    r = evaluate_student(model, bench, transform, device, batch_size=cfg.data.test_batch_size)
    results: dict[str, Any] = {"last": base_novel_result(r.pop("base"), r.pop("novel"), epoch=epochs, **r)}
    if best.state is not None:
        load_trainable_state(model, best.state)
        b = evaluate_student(model, bench, transform, device, batch_size=cfg.data.test_batch_size)
        results["best"] = base_novel_result(b.pop("base"), b.pop("novel"), epoch=best.best_epoch, **b)
    if cfg.export.weights == "last" or best.state is None:
        load_trainable_state(model, last_state)
    return results


def _plots(results: dict[str, Any], history: list[dict[str, float]], out: Path) -> None:
    plot_history(history, out / "loss.png", title="PromptKD distillation")
    bars = {"student (last)": results["last"]}
    if "best" in results:
        bars["student (best base ep.)"] = results["best"]
    if results.get("teacher"):
        bars = {"teacher": results["teacher"], **bars}
    plot_base_novel(bars, out / "base_novel.png")


def _teacher_results(teacher_dir: Path) -> dict[str, float]:
    import json

    path = Path(teacher_dir) / "results.json"
    if not path.is_file():
        return {}
    r = json.loads(path.read_text())
    return {k: float(r[k]) for k in ("base", "novel", "hm") if k in r}


def export_student(
    model: PromptKDStudent,
    student: Backbone,
    teacher: Teacher,
    out: Path,
    cfg: DistillRunConfig,
    results: dict[str, Any],
) -> None:
    """The PromptKD bundle: student tower + teacher class vectors + teacher text side."""
    m = teacher.n_base
    provenance = ["promptkd:base"] * m + ["promptkd:novel"] * (len(teacher.class_names) - m)
    image = ImageParts(student, model.tower.encoder, model.tower.projector, key="student")
    text = TextParts(teacher.backbone, teacher.text_encoder, list(LEARNED_TEMPLATES), key="teacher")
    summary = {
        k: {kk: results[k][kk] for kk in ("base", "novel", "hm", "epoch")} for k in ("last", "best") if k in results
    }
    bundle = assemble_bundle(
        image,
        {"default": model.class_vectors},
        [label_set("default", teacher.class_names, provenance)],
        text=text,
        logit_scale=model.student_logit_scale,
        producer={"method": "promptkd"},
        extra={
            "metrics": summary,
            "n_base": m,
            "distill": cfg.distill.model_dump(),
            "exported_weights": cfg.export.weights,
        },
        embed_weights=cfg.export.embed_weights,
    )
    model.eval()
    write_bundle(
        bundle,
        out,
        onnx=cfg.export.onnx,
        int8=cfg.export.int8,
        int8_min_cosine=cfg.export.int8_min_cosine,
        tower=image_tower(image),
    )
