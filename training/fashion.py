"""``promptdistill experiment fashion-mnist --out DIR``: a base-to-novel benchmark with meaningful
class names, offline, on 2 CPU cores.

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
base = T-shirt/top, trouser, pullover, dress, coat; novel = sandal, shirt, sneaker, bag, ankle
boot. To fit a shared 2-core machine the run subsamples (default 100 train / 100 test images per
class, the same images for every method and seed) and uses the tiny CLIPs of the demo, upscaled
images 64x64.

Steps:

1. "Pre-training" (once, cached): the demo's CLIP-style alignment of each tiny CLIP's image tower
   to its frozen random text tower on the train subsample with captions over all ten names
   (training/demo.py). It stands in for web-scale pre-training, which cannot happen here; like
   real CLIP it has seen every class, so "novel" means unseen by the prompt tuning only.
2. For each seed, on the *student-sized* backbone (as the papers' ViT-B/16 rows): zero-shot
   ("a photo of a {}."), CoOp (MoPD's student with w = 1, w2 = 0: CE only) and MoPD (generic
   12-template pool); on the teacher backbone the PromptSRC teacher (16 shots of the base
   classes); then the PromptKD student distilled from it on the unlabeled train subsample.
3. ``DIR/summary.json`` (every run's base / novel / HM, mean ± sample std over seeds, wall
   times), ``DIR/table.md`` and ``DIR/fashion_mnist.png``; each run's own outputs under
   ``DIR/seed<N>/<method>/``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from models.backbone import Backbone, load_backbone
from models.class_vectors import encode_class_names
from models.prompts import PromptedImageEncoder, PromptedTextEncoder
from models.staging import staged_file
from training.benchmark import Benchmark, load_benchmark
from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg, deep_merge, parse_overrides
from training.data import build_transform
from training.evaluate import mean_std, pyplot, save_figure, save_json
from training.protocols import evaluate_classifier
from training.variants import FASHION_MNIST_ROOT

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = ROOT / "models" / "configs" / "tiny-clip.json"
STUDENT_CONFIG = ROOT / "training" / "configs" / "tiny-student-clip.json"
CAPTIONS = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]
METHODS = ["zero-shot", "CoOp", "MoPD", "PromptSRC teacher", "PromptKD student"]


class FashionCfg(Cfg):
    root: Path = FASHION_MNIST_ROOT
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    train_per_class: int = Field(default=100, ge=16)
    test_per_class: int = Field(default=100, ge=1)
    pretrain_epochs: int = Field(default=20, ge=1)
    prompt_epochs: int = Field(default=20, ge=1)  # PromptSRC, CoOp, MoPD (16 shots x 5 base classes)
    distill_epochs: int = Field(default=10, ge=1)
    progress: bool = False


def _data(cfg: FashionCfg, **update: Any) -> DataCfg:
    base = DataCfg(
        kind="fashion_mnist", root=cfg.root, subsample_train=cfg.train_per_class, subsample_test=cfg.test_per_class,
        shots=16, batch_size=8, crop_scale_min=0.6, num_workers=0,
    )  # fmt: skip
    return base.model_copy(update=update)


def pretrained(config: Path, bench: Benchmark, cfg: FashionCfg, cache: Path, what: str) -> Backbone:
    """A tiny CLIP aligned on the train subsample (cached as safetensors)."""
    from safetensors.torch import load_file, save_file

    from training.demo import DemoCfg, pretrain_clip

    torch.manual_seed(0)
    bb = load_backbone(str(config))
    if cache.is_file():
        bb.model.load_state_dict(load_file(cache))
        bb.model.eval()
        return bb
    pretrain_clip(bb, bench, DemoCfg(seed=0, pretrain_epochs=cfg.pretrain_epochs, progress=False), what, CAPTIONS)
    with staged_file(cache) as tmp:  # a reader never sees a half-written cache; mode follows the umask
        save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, tmp)
    return bb


def zero_shot(bb: Backbone, bench: Benchmark) -> dict[str, Any]:
    text = PromptedTextEncoder(bb.model, bb.tokenizer)
    image = PromptedImageEncoder(bb.model).eval()
    vectors = encode_class_names(text, bench.class_names, ["a photo of a {}."])
    scale = float(bb.model.logit_scale.exp())
    tf = build_transform(bb.preprocess, train=False)
    return evaluate_classifier(lambda x: image(x, normalize=True), vectors, scale, bench, tf)


def _mopd(bb: Backbone, cfg: FashionCfg, seed: int, out: Path, coop: bool) -> dict[str, Any]:
    from training.mopd.config import MoPDRunCfg
    from training.mopd.trainer import train

    data = _data(cfg, batch_size=16)
    sets = [f"backbone.name={STUDENT_CONFIG}", "backbone.pretrained=null", "mopd.pool=generic",
            f"optim.epochs={cfg.prompt_epochs}", "optim.lr=0.002", f"loop.seed={seed}", "loop.resume=false",
            f"loop.eval_every={cfg.prompt_epochs}", f"loop.progress={str(cfg.progress).lower()}"]  # fmt: skip
    sets += ["mopd.w=1.0", "mopd.w2=0.0"] if coop else []
    raw = deep_merge(parse_overrides(sets), {"data": data.model_dump(mode="json")})
    run_cfg = MoPDRunCfg.model_validate(raw)
    return train(run_cfg, out, backbone=bb).results


def _promptkd(teacher_bb: Backbone, student_bb: Backbone, cfg: FashionCfg, seed: int, out: Path) -> tuple[Any, Any]:
    from training.distill import DistillRunConfig, ExportCfg, run_distill
    from training.promptkd import DistillCfg
    from training.promptsrc import PromptSRCCfg
    from training.teacher import TeacherRunConfig, run_teacher

    loop = LoopCfg(seed=seed, progress=cfg.progress, tensorboard=False, resume=False)
    tcfg = TeacherRunConfig(
        backbone=BackboneCfg(name=str(TEACHER_CONFIG)), data=_data(cfg),
        optim=OptimCfg(epochs=cfg.prompt_epochs, lr=0.02),
        loop=loop.model_copy(update={"eval_every": cfg.prompt_epochs}),
        promptsrc=PromptSRCCfg(text_depth=2, vision_depth=2, gpa_mean=0.75 * cfg.prompt_epochs),
        out_dir=out / "teacher",
    )  # fmt: skip
    teacher = run_teacher(tcfg, backbone=teacher_bb)
    dcfg = DistillRunConfig(
        student=BackboneCfg(name=str(STUDENT_CONFIG)), teacher_dir=out / "teacher", data=_data(cfg, batch_size=16),
        optim=OptimCfg(epochs=cfg.distill_epochs, lr=0.05), loop=loop,
        distill=DistillCfg(kd_weight=10.0, vision_depth=2), export=ExportCfg(onnx=False), out_dir=out / "student",
    )  # fmt: skip
    return teacher, run_distill(dcfg, student=student_bb)


def run_fashion(out: str | Path, cfg: FashionCfg | None = None) -> dict[str, Any]:
    """The whole experiment (see module docstring); single-threaded like the demo."""
    cfg = cfg or FashionCfg()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        bench = load_benchmark(_data(cfg), image_size=64)
        teacher_bb = pretrained(TEACHER_CONFIG, bench, cfg, out / "pretrained-teacher.safetensors", "teacher")
        student_bb = pretrained(STUDENT_CONFIG, bench, cfg, out / "pretrained-student.safetensors", "student")
        seconds: dict[str, float] = {"pretrain": time.perf_counter() - t0}
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for seed in cfg.seeds:
            t = time.perf_counter()
            d = out / f"seed{seed}"
            runs["zero-shot"].append(zero_shot(student_bb, bench))
            runs["CoOp"].append(_mopd(student_bb, cfg, seed, d / "coop", coop=True))
            runs["MoPD"].append(_mopd(student_bb, cfg, seed, d / "mopd", coop=False))
            teacher, student = _promptkd(teacher_bb, student_bb, cfg, seed, d)
            runs["PromptSRC teacher"].append(teacher)
            runs["PromptKD student"].append(student["last"])
            seconds[f"seed{seed}"] = time.perf_counter() - t
            log.info("fashion-mnist seed %d done in %.0f s", seed, seconds[f"seed{seed}"])
            _write(out, cfg, runs, seconds | {"total": time.perf_counter() - t0})  # partial results survive
    finally:
        torch.set_num_threads(threads)
    return _write(out, cfg, runs, seconds | {"total": time.perf_counter() - t0})


def _write(
    out: Path, cfg: FashionCfg, runs: dict[str, list[dict[str, Any]]], seconds: dict[str, float]
) -> dict[str, Any]:
    table = {m: {k: mean_std([r[k] for r in rs]) for k in ("base", "novel", "hm")} for m, rs in runs.items() if rs}
    per_run = {m: [{k: r[k] for k in ("base", "novel", "hm")} for r in rs] for m, rs in runs.items()}
    summary = {"config": cfg.model_dump(mode="json"), "table": table, "runs": per_run, "seconds": seconds,
               "load_average_at_end": list(os.getloadavg())}  # fmt: skip
    save_json(summary, out / "summary.json")
    (out / "table.md").write_text(format_table(table, len(next(iter(runs.values())))))
    if table:
        plot_table(table, out / "fashion_mnist.png")
    return summary


def format_table(table: dict[str, Any], n_seeds: int) -> str:
    lines = [f"| method | base | novel | HM |  (mean ± std over {n_seeds} seeds, top-1 %)", "|---|---|---|---|"]
    for m, r in table.items():
        cells = [f"{r[k]['mean']:.2f} ± {r[k]['std']:.2f}" for k in ("base", "novel", "hm")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_table(table: dict[str, Any], path: Path) -> Path:
    import numpy as np

    plt = pyplot()
    names = list(table)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(names))
    for i, key in enumerate(("base", "novel", "hm")):
        means = [table[n][key]["mean"] for n in names]
        stds = [table[n][key]["std"] for n in names]
        bars = ax.bar(x + (i - 1) * 0.25, means, 0.25, yerr=stds, capsize=3, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.set_title("Fashion-MNIST base-to-novel (tiny CLIPs, mean ± std over seeds)")
    return save_figure(fig, path)
