"""Stage 2: distill a stored teacher into a prompted student on unlabeled images, evaluate, export.

Evaluation (algorithms.md §1.5): after every epoch the base-test accuracy is computed (the
official "val"); the reported protocol takes the epoch with the best base-test accuracy and its
novel accuracy ("best"), and the plain last epoch is reported too ("last"). The bundle holds the
weights chosen by ``export.weights`` (default ``last``: no selection on test data).

Unlabeled images: the train split (labels unused), ``data.unlabeled_root`` and, with
``data.capture_dir``, the training part of a service's capture folder (training/data.py
:class:`~training.data.CaptureSet`: never its held-out tenth; the list is fixed at the run's start in
``captures.txt`` so a resumed run reads the same images).

Output folder: results.json, history.csv, tb/, loss.png, base_novel.png, checkpoint.pt,
config.yaml, captures.txt (with a capture folder), and the bundle (``bundle/`` unless
``export.bundle_dir`` says otherwise).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import ConcatDataset, Dataset

from models.backbone import Backbone
from models.bundle import bundle_space, load_bundle
from models.card import bundle_version
from models.class_vectors import encode_class_names
from training.benchmark import Benchmark
from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg
from training.data import CaptureSet, Subset, Transform, capture_set
from training.evaluate import plot_base_novel, predict
from training.export import (
    ImageParts,
    TextParts,
    add_calibration,
    assemble_bundle,
    image_tower,
    label_set,
    write_bundle,
)
from training.loop import CHECKPOINT, BestState, EvalCallback, load_trainable_state, trainable_state
from training.promptkd import DistillCfg, PromptKDStudent, batchmean_equivalent_weight
from training.promptsrc import LEARNED_TEMPLATES
from training.protocols import EvalProtocol, evaluate_classifier, headline
from training.run import Run
from training.teacher import Teacher, load_teacher, teacher_bundle_dir

log = logging.getLogger(__name__)
CAPTURE_LIST = "captures.txt"


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
    teacher_dir: Path  # a teacher bundle, or the `train teacher` folder holding one (bundle/)
    data: DataCfg
    optim: OptimCfg = OptimCfg()
    loop: LoopCfg = LoopCfg()
    distill: DistillCfg = DistillCfg()
    export: ExportCfg = ExportCfg()
    # base2novel: the teacher's own classes, base/novel/HM. cross_dataset: a source (ImageNet)
    # teacher; the target dataset's names are re-encoded through its text side, all-class accuracy.
    protocol: Literal["base2novel", "cross_dataset"] = "base2novel"
    out_dir: Path


def evaluate_student(
    model: PromptKDStudent,
    bench: Benchmark,
    transform: Any,
    device: torch.device,
    subsets: tuple[Subset, ...] | None = None,
    batch_size: int = 100,
    protocol: EvalProtocol = "base2novel",
) -> dict[str, Any]:
    """The student through THE evaluation: its tower against the (teacher's) class vectors."""
    was = model.training
    model.eval()
    out = evaluate_classifier(
        model.tower, model.class_vectors, model.student_logit_scale, bench, transform, device,
        protocol=protocol, subsets=subsets, batch_size=batch_size,
    )  # fmt: skip
    model.train(was)
    return out


@torch.no_grad()
def agreement(model: PromptKDStudent, dataset: Any, device: torch.device, batch_size: int = 100) -> float:
    """Share of test images (all classes) where student and teacher top-1 over all N classes agree."""
    was = model.training
    model.eval()
    s, _ = predict(model.logits, dataset, device=device, batch_size=batch_size, desc="student on test")
    t, _ = predict(model.teacher_logits, dataset, device=device, batch_size=batch_size, desc="teacher on test")
    model.train(was)
    return float((s.argmax(-1) == t.argmax(-1)).float().mean())


def _check_compatible(teacher: Teacher, student: Backbone, bench: Benchmark, protocol: str) -> None:
    if protocol == "base2novel" and teacher.class_names != bench.class_names:
        raise ValueError(
            "the teacher's class names differ from the dataset's; distill on the data the teacher was trained "
            "for, or set protocol=cross_dataset to re-encode this dataset's names through the teacher's text side"
        )
    t, s = teacher.backbone.preprocess, student.preprocess
    if (t.size, t.mean, t.std) != (s.size, s.mean, s.std):
        raise ValueError(f"teacher and student must see the same view: preprocess {t} vs {s}")


def run_distill(cfg: DistillRunConfig, student: Backbone | None = None) -> dict[str, Any]:
    """Distill, evaluate (best-base-epoch and last-epoch protocols), export the bundle."""
    captures = None  # read (and checked) before any model is built, as the rest of the data
    if cfg.data.capture_dir is not None:
        resuming = cfg.loop.resume and (Path(cfg.out_dir) / CHECKPOINT).is_file()
        captures = capture_set(cfg.data.capture_dir, Path(cfg.out_dir) / CAPTURE_LIST, reuse=resuming)
    run = Run.start(cfg, cfg.out_dir, student or cfg.student, cfg.data, cfg.loop)
    bench, sbb, device = run.bench, run.backbone, run.device
    teacher = load_teacher(cfg.teacher_dir)
    _check_compatible(teacher, sbb, bench, cfg.protocol)
    if cfg.protocol == "cross_dataset":
        teacher = retarget(teacher, bench.class_names)
    unlabeled = unlabeled_images(bench, captures, run.transform(train=True))
    test_tf = run.transform(train=False)
    torch.manual_seed(cfg.loop.seed)  # prompt and projector initialisation
    model = PromptKDStudent(sbb, teacher.image_encoder, teacher.class_vectors, cfg.distill, teacher.logit_scale)

    all_test = bench.dataset("test", "all", test_tf)
    protocol: EvalProtocol = "base2novel" if cfg.protocol == "base2novel" else "all"
    watched: Subset = "base" if protocol == "base2novel" else "all"
    metric = "base_acc" if protocol == "base2novel" else "acc"

    def base_acc(m: Any) -> dict[str, float]:
        r = evaluate_student(m, bench, test_tf, device, (watched,), cfg.data.test_batch_size, protocol)
        return {metric: r["base" if watched == "base" else "accuracy"]}

    best = BestState(metric)
    trainer = run.trainer(model, unlabeled, cfg.optim, [EvalCallback(base_acc, cfg.loop.eval_every), best])
    log.info("teacher vs student top-1 agreement on %d test images before distillation", len(all_test))  # type: ignore[arg-type]
    agreement_before = agreement(model, all_test, device, cfg.data.test_batch_size)
    state = trainer.fit()
    results = _protocol_results(model, best, bench, test_tf, device, cfg, state.epoch)
    results |= {
        "protocol": cfg.protocol,
        "agreement": {
            "before": agreement_before,
            "after": agreement(model, all_test, device, cfg.data.test_batch_size),
        },
        "exported_weights": cfg.export.weights,
        "seed": cfg.loop.seed,
        "n_unlabeled_images": len(unlabeled),  # type: ignore[arg-type]
        **({"captures": captures.summary()} if captures is not None else {}),
        "kd_weight": cfg.distill.kd_weight,
        "kd_weight_batchmean_equivalent": batchmean_equivalent_weight(cfg.distill.kd_weight, len(bench.class_names)),
        "teacher": _teacher_results(cfg.teacher_dir),
    }
    bundle_dir = cfg.export.bundle_dir or run.out / "bundle"
    calibration = unlabeled_images(bench, captures, test_tf)
    export_student(model, sbb, teacher, bundle_dir, cfg, results, calibration=calibration)
    results["bundle"] = str(bundle_dir)
    run.finish(results, state.history, "PromptKD distillation")
    _plot_base_novel(results, run.out)
    log.info("student (last epoch): %s; bundle -> %s", headline(results["last"]), bundle_dir)
    return results


def unlabeled_images(bench: Benchmark, captures: CaptureSet | None, transform: Transform) -> Dataset[Any]:
    """The train split (labels unused) and ``unlabeled_root`` (Benchmark.unlabeled), then the captures."""
    pool = bench.unlabeled(transform)
    return pool if captures is None else ConcatDataset([pool, captures.dataset(transform)])


def retarget(teacher: Teacher, class_names: list[str]) -> Teacher:
    """The cross-dataset teacher: the target's names re-encoded through the teacher's text side
    (as the official xd mode builds the teacher's prompt learner over the target classnames)."""
    vectors = encode_class_names(teacher.text_encoder, class_names, LEARNED_TEMPLATES).to(teacher.class_vectors.device)
    return replace(teacher, class_vectors=vectors, class_names=list(class_names), n_base=len(class_names))


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
    protocol: EvalProtocol = "base2novel" if cfg.protocol == "base2novel" else "all"
    bs = cfg.data.test_batch_size
    results: dict[str, Any] = {
        "last": evaluate_student(model, bench, transform, device, batch_size=bs, protocol=protocol) | {"epoch": epochs}
    }
    if best.state is not None:
        load_trainable_state(model, best.state)
        b = evaluate_student(model, bench, transform, device, batch_size=bs, protocol=protocol)
        results["best"] = b | {"epoch": best.best_epoch}
    if cfg.export.weights == "last" or best.state is None:
        load_trainable_state(model, last_state)
    return results


def _plot_base_novel(results: dict[str, Any], out: Path) -> None:
    if "hm" not in results["last"]:  # all-class protocol: one number per run, the loss plot suffices
        return
    bars = {"student (last)": results["last"]}
    if "best" in results:
        bars["student (best base ep.)"] = results["best"]
    if results.get("teacher") and "hm" in results["teacher"]:
        bars = {"teacher": results["teacher"], **bars}
    plot_base_novel(bars, out / "base_novel.png")


def _teacher_results(teacher_dir: Path) -> dict[str, float]:
    """The teacher's own metrics: its run's results.json, else those its bundle records."""
    import json

    path = Path(teacher_dir) / "results.json"
    if path.is_file():
        r = json.loads(path.read_text())
    else:
        try:
            r = load_bundle(teacher_bundle_dir(teacher_dir), verify=False).manifest.extra.get("metrics", {})
        except (FileNotFoundError, ValueError):
            return {}
    return {k: float(r[k]) for k in ("base", "novel", "hm", "accuracy") if k in r}


def export_student(
    model: PromptKDStudent,
    student: Backbone,
    teacher: Teacher,
    out: Path,
    cfg: DistillRunConfig,
    results: dict[str, Any],
    calibration: Any = None,
) -> None:
    """The PromptKD bundle: student tower + teacher class vectors + teacher text side (+ the calibration
    sample: a bounded draw of ``calibration``, the unlabeled images distillation read, embedded by the student)."""
    m = teacher.n_base
    provenance = ["promptkd:base"] * m + ["promptkd:novel"] * (len(teacher.class_names) - m)
    if cfg.protocol == "cross_dataset":
        provenance = ["promptkd:cross"] * len(teacher.class_names)
    image = ImageParts(student, model.tower.encoder, model.tower.projector, key="student")
    text = TextParts(teacher.backbone, teacher.text_encoder, list(LEARNED_TEMPLATES), key="teacher")
    summary = {
        k: {kk: results[k][kk] for kk in ("base", "novel", "hm", "accuracy", "epoch") if kk in results[k]}
        for k in ("last", "best")
        if k in results
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
            "protocol": cfg.protocol,
        },
        embed_weights=cfg.export.embed_weights,
    )
    # The class vectors and the text side are the teacher's: so is the embedding space (models.bundle.bundle_space),
    # whatever files the student carries, and a student re-distilled from this teacher later shares it.
    teacher_bundle = load_bundle(teacher_bundle_dir(cfg.teacher_dir), verify=False)
    space = bundle_space(teacher_bundle)
    extra = {**bundle.manifest.extra, "teacher": {"bundle": bundle_version(teacher_bundle), "space": space}}
    bundle.manifest = bundle.manifest.model_copy(update={"space": space, "extra": extra})
    model.eval()
    if calibration is not None:
        add_calibration(bundle, image_tower(image), calibration, "distillation: unlabeled images", seed=cfg.loop.seed)
    write_bundle(
        bundle,
        out,
        onnx=cfg.export.onnx,
        int8=cfg.export.int8,
        int8_min_cosine=cfg.export.int8_min_cosine,
        tower=image_tower(image),
    )
