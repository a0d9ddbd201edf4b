"""``promptdistill experiment fashion-mnist --out DIR``: the papers' base-to-novel claims in miniature,
offline, on 2 CPU cores (docs/experiments.md, "Fashion-MNIST base-to-novel").

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
28x28 grey images upscaled (bicubic) to the tiny CLIPs' 32x32 input; base = T-shirt/top, trouser,
pullover, dress, coat; novel = sandal, shirt, sneaker, bag, ankle boot; all 60,000 train and all
10,000 test images (1,000 per class).

Steps:

1. Pre-training (once, cached on disk keyed by config + seed): both tiny CLIPs, teacher-sized
   (training/configs/fashion-teacher-clip.json) and student-sized (fashion-student-clip.json),
   trained from scratch, image AND text towers, with a symmetric label-aware InfoNCE on all
   60,000 train images and captions from PromptSRC's 60 templates over all ten names
   (training/contrastive.py). Like real CLIP it has seen every class: "novel" means unseen by the
   prompt tuning only.
2. For each seed: zero-shot ("a photo of a {}.") of both CLIPs; on the student-sized CLIP CoOp
   (MoPD's student with w = 1, w2 = 0) and MoPD (generic 12-template pool), 16 shots of the base
   classes; on the teacher-sized CLIP the PromptSRC teacher (16 shots of the base classes); then
   the PromptKD student distilled from it on the unlabeled train images of all classes
   (transductive, as the paper), for each unlabeled pool of ``pools`` (the data ablation).
3. ``DIR/summary.json`` (every run, mean ± sample std over seeds, the claims judged against the
   seed spread, image-tower cost, wall times, load average), ``DIR/table.md``, ``DIR/claims.md``,
   ``DIR/fashion_mnist.png`` and ``DIR/fashion_mnist_pools.png``; each run's outputs under
   ``DIR/seed<N>/<method>/``.

Hyper-parameters: the papers' recipes scaled by the rule in :class:`FashionCfg` (docs/experiments.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from models.backbone import Backbone, load_backbone
from models.class_vectors import encode_class_names
from models.prompts import PromptedImageEncoder, PromptedTextEncoder
from models.staging import staged_file
from models.template_sets import PROMPTSRC_TEMPLATES
from training.benchmark import Benchmark, load_benchmark
from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg, deep_merge, parse_overrides
from training.contrastive import ContrastiveCfg, pixels_of, pretrain_contrastive, zero_shot_accuracy
from training.data import build_transform
from training.evaluate import mean_std, pyplot, save_figure, save_json
from training.protocols import evaluate_classifier
from training.variants import FASHION_MNIST_NAMES, FASHION_MNIST_ROOT, fashion_mnist_split

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
TEACHER_CONFIG = CONFIGS / "fashion-teacher-clip.json"
STUDENT_CONFIG = CONFIGS / "fashion-student-clip.json"
ZERO_SHOT_TEMPLATE = "a photo of a {}."
CAPTIONS = list(PROMPTSRC_TEMPLATES)  # pre-training captions: varied, over all ten names
CAPTION_SETS = {"promptsrc": CAPTIONS, "photo": [ZERO_SHOT_TEMPLATE]}  # "photo": the one-template ablation
ALL = 0  # a pool size meaning "every train image"
METHODS = ["zero-shot (student CLIP)", "zero-shot (teacher CLIP)", "CoOp", "MoPD", "PromptSRC teacher",
           "PromptKD student"]  # fmt: skip
Stage = Literal["zero-shot", "coop", "mopd", "teacher", "student"]
STAGES: list[Stage] = ["zero-shot", "coop", "mopd", "teacher", "student"]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "promptdistill" / "fashion-clip"


class FashionCfg(Cfg):
    """The documented run. Scaling rule (docs/experiments.md): the papers' shots, batch sizes,
    epochs, learning rates, prompt tokens and loss weights unchanged for the few-shot stages (per-
    dataset values from EuroSAT's row: 10 classes, 5 base, like Fashion-MNIST); prompt depth = the
    papers' share of the tower's layers (9/12, 9/24), rounded, at least 1; distillation at the
    paper's lr x (batch / 8) (linear scaling) with an epoch cap and no warm-up epoch."""

    root: Path = FASHION_MNIST_ROOT
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    train_per_class: int | None = Field(default=None, ge=16)  # None: all 6,000 per class
    test_per_class: int | None = Field(default=None, ge=1)  # None: all 1,000 per class
    teacher_config: Path = TEACHER_CONFIG
    student_config: Path = STUDENT_CONFIG
    pretrain_epochs: int = Field(default=4, ge=1)  # over the train images, both CLIPs
    pretrain_seed: int = 0
    pretrain_captions: Literal["promptsrc", "photo"] = "promptsrc"  # caption templates (CAPTION_SETS)
    cache_dir: Path | None = None  # pre-trained CLIPs; None: $XDG_CACHE_HOME/promptdistill/fashion-clip
    # PromptSRC teacher (vit_l14_c2_ep20_batch8_4+4ctx): 16 shots, batch 8, lr 0.005, 20 epochs, GPA N(15, 1)
    teacher_epochs: int = Field(default=20, ge=1)
    teacher_lr: float = Field(default=0.005, gt=0)
    # CoOp / MoPD: MoPD's EuroSAT row, the papers' dataset shaped like this one (10 classes, 5 base):
    # 16 shots, batch 128, lr 0.002, 100 epochs, w 0.5, w2 0.1, k 2
    prompt_epochs: int = Field(default=100, ge=1)
    prompt_lr: float = Field(default=0.002, gt=0)
    mopd_w: float = Field(default=0.5, ge=0, le=1)
    mopd_w2: float = Field(default=0.1, ge=0)
    mopd_top_k: int = Field(default=2, ge=1)
    # PromptKD (vit_b16_c2_ep20_batch8_4+4ctx, EuroSAT script): batch 8, lr 0.005, 20 epochs, KD_WEIGHT 1000 / (B*N)
    distill_epochs: int = Field(default=5, ge=1)  # the cap (paper: 20 over the train split)
    distill_batch: int = Field(default=64, ge=1)
    distill_lr: float | None = Field(default=None, gt=0)  # None: 0.005 * distill_batch / 8
    # the paper warms up 1 of 20 epochs (5 %); under the epoch cap that is well under one epoch: none
    distill_warmup_epochs: int = Field(default=0, ge=0)
    kd_weight: float = Field(default=1000.0, ge=0)
    prompt_tokens: int = Field(default=4, ge=1)
    # the student's visual prompts (ablation); None: prompt_tokens, and the depth rule
    student_tokens: int | None = Field(default=None, ge=1)
    student_depth: int | None = Field(default=None, ge=1)
    # unlabeled pools per class for the data ablation, besides all images (0 = all)
    pools: list[int] = Field(default_factory=lambda: [100, 1000, ALL])
    jobs: int = Field(default=1, ge=1)  # seeds run at once, each in its own single-threaded process
    progress: bool = True
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES), min_length=1)  # which methods run
    # an earlier run's output folder whose seed<N>/teacher the students distil from (stage "teacher" off)
    teacher_from: Path | None = None

    @model_validator(mode="after")
    def _teacher_source(self) -> FashionCfg:
        if "teacher" in self.stages and self.teacher_from is not None:
            raise ValueError("teacher_from reuses an earlier teacher: leave 'teacher' out of stages")
        if "student" in self.stages and "teacher" not in self.stages and self.teacher_from is None:
            raise ValueError("the student stage needs a teacher: add 'teacher' to stages or set teacher_from")
        return self

    def lr_distill(self) -> float:
        return self.distill_lr if self.distill_lr is not None else 0.005 * self.distill_batch / 8


def depth(paper_depth: int, paper_layers: int, layers: int) -> int:
    """Prompt depth for a tower of ``layers``: the papers' share of their tower's layers."""
    return max(1, min(layers, round(paper_depth / paper_layers * layers)))


def _layers(config: Path) -> tuple[int, int]:
    raw = json.loads(Path(config).read_text())
    return int(raw["vision_cfg"]["layers"]), int(raw["text_cfg"]["layers"])


def _data(cfg: FashionCfg, **update: Any) -> DataCfg:
    """The papers' augmentation (random resized crop, flip) at a milder crop for 32-pixel images."""
    base = DataCfg(
        kind="fashion_mnist", root=cfg.root, subsample_train=cfg.train_per_class, subsample_test=cfg.test_per_class,
        shots=16, batch_size=8, crop_scale_min=0.5, num_workers=0,
    )  # fmt: skip
    return base.model_copy(update=update)


# ----------------------------------------------------------------------------------------------
# Pre-training


def pretrain_cfg(cfg: FashionCfg) -> ContrastiveCfg:
    return ContrastiveCfg(epochs=cfg.pretrain_epochs, seed=cfg.pretrain_seed)


def cache_path(config: Path, cfg: FashionCfg) -> Path:
    """Where the pre-trained CLIP of ``config`` lives: keyed by the model config, the pre-training
    config + seed, the captions, and the train data it reads."""
    key = json.dumps(
        {"model": json.loads(Path(config).read_text()), "pretrain": pretrain_cfg(cfg).model_dump(mode="json"),
         "captions": CAPTION_SETS[cfg.pretrain_captions], "names": FASHION_MNIST_NAMES,
         "root": str(Path(cfg.root).resolve()), "train_per_class": cfg.train_per_class},
        sort_keys=True,
    )  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (cfg.cache_dir or DEFAULT_CACHE) / f"{Path(config).stem}-{digest}.safetensors"


def _train_pixels(cfg: FashionCfg, size: int, part: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    per_class = cfg.train_per_class if part == "train" else cfg.test_per_class
    images, labels = fashion_mnist_split(cfg.root, part, size, per_class)
    return pixels_of(images), torch.tensor(labels)


def pretrained(
    config: Path,
    bench: Benchmark | None = None,
    cfg: FashionCfg | None = None,
    cache: Path | None = None,
    what: str = "clip",
    progress: Any = None,
) -> Backbone:
    """The tiny CLIP of ``config`` after contrastive pre-training on the train images (both towers),
    loaded from ``cache`` (default :func:`cache_path`) when there, else trained and stored there.
    ``bench`` is accepted for older callers; the pre-training reads the train split itself."""
    from safetensors.torch import load_file, save_file

    cfg = cfg or FashionCfg()
    cache = cache or cache_path(config, cfg)
    torch.manual_seed(cfg.pretrain_seed)
    bb = load_backbone(str(config))
    if cache.is_file():
        bb.model.load_state_dict(load_file(cache))
        bb.model.eval()
        log.info("pre-trained %s CLIP from %s", what, cache)
        return bb
    pixels, labels = _train_pixels(cfg, bb.preprocess.size[0])
    captions = CAPTION_SETS[cfg.pretrain_captions]
    pretrain_contrastive(bb, pixels, labels, FASHION_MNIST_NAMES, captions, pretrain_cfg(cfg), progress, what)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(cache) as tmp:  # a reader never sees a half-written cache; mode follows the umask
        save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, tmp)
    return bb


def pretrain_steps(cfg: FashionCfg) -> int:
    n = 10 * (cfg.train_per_class or 6000)
    return cfg.pretrain_epochs * max(1, n // pretrain_cfg(cfg).batch_size)


# ----------------------------------------------------------------------------------------------
# Methods


def zero_shot(bb: Backbone, bench: Benchmark) -> dict[str, Any]:
    text = PromptedTextEncoder(bb.model, bb.tokenizer)
    image = PromptedImageEncoder(bb.model).eval()
    vectors = encode_class_names(text, bench.class_names, [ZERO_SHOT_TEMPLATE])
    scale = float(bb.model.logit_scale.exp())
    tf = build_transform(bb.preprocess, train=False)
    return evaluate_classifier(lambda x: image(x, normalize=True), vectors, scale, bench, tf)


def _mopd(bb: Backbone, cfg: FashionCfg, seed: int, out: Path, coop: bool) -> dict[str, Any]:
    from training.mopd.config import MoPDRunCfg
    from training.mopd.trainer import train

    data = _data(cfg, batch_size=128)
    sets = [f"backbone.name={cfg.student_config}", "backbone.pretrained=null", "mopd.pool=generic",
            f"mopd.n_ctx={cfg.prompt_tokens}", f"optim.epochs={cfg.prompt_epochs}", f"optim.lr={cfg.prompt_lr}",
            f"loop.seed={seed}", "loop.resume=false", "loop.checkpoint=false", "loop.tensorboard=false",
            "loop.progress=false", f"loop.eval_every={cfg.prompt_epochs}"]  # fmt: skip
    sets += ["mopd.w=1.0", "mopd.w2=0.0"] if coop else [f"mopd.w={cfg.mopd_w}", f"mopd.w2={cfg.mopd_w2}"]
    sets += [f"mopd.top_k={cfg.mopd_top_k}"]
    raw = deep_merge(parse_overrides(sets), {"data": data.model_dump(mode="json")})
    return train(MoPDRunCfg.model_validate(raw), out, backbone=bb).results


def _teacher(teacher_bb: Backbone, cfg: FashionCfg, seed: int, out: Path) -> dict[str, Any]:
    from training.promptsrc import PromptSRCCfg
    from training.teacher import TeacherRunConfig, run_teacher

    vision_layers, text_layers = _layers(cfg.teacher_config)
    prompts = PromptSRCCfg(
        text_tokens=cfg.prompt_tokens, vision_tokens=cfg.prompt_tokens, text_depth=depth(9, 12, text_layers),
        vision_depth=depth(9, 24, vision_layers), gpa_mean=0.75 * cfg.teacher_epochs, zs_templates="promptsrc",
    )  # fmt: skip
    tcfg = TeacherRunConfig(
        backbone=BackboneCfg(name=str(cfg.teacher_config)), data=_data(cfg),
        optim=OptimCfg(epochs=cfg.teacher_epochs, lr=cfg.teacher_lr),
        loop=LoopCfg(seed=seed, progress=False, tensorboard=False, resume=False, checkpoint=False,
                     eval_every=cfg.teacher_epochs),
        promptsrc=prompts, out_dir=out,
    )  # fmt: skip
    return run_teacher(tcfg, backbone=teacher_bb)


def _distill(student_bb: Backbone, cfg: FashionCfg, seed: int, teacher_dir: Path, out: Path, pool: int) -> Any:
    from training.distill import DistillRunConfig, ExportCfg, run_distill
    from training.promptkd import DistillCfg

    vision_layers, _ = _layers(cfg.student_config)
    dcfg = DistillRunConfig(
        student=BackboneCfg(name=str(cfg.student_config)), teacher_dir=teacher_dir,
        data=_data(cfg, batch_size=cfg.distill_batch, subsample_train=pool or cfg.train_per_class),
        optim=OptimCfg(epochs=cfg.distill_epochs, lr=cfg.lr_distill(), warmup_epochs=cfg.distill_warmup_epochs),
        loop=LoopCfg(seed=seed, progress=False, tensorboard=False, resume=False, checkpoint=False),
        distill=DistillCfg(kd_weight=cfg.kd_weight, vision_tokens=cfg.student_tokens or cfg.prompt_tokens,
                           vision_depth=cfg.student_depth or depth(9, 12, vision_layers)),
        export=ExportCfg(onnx=False), out_dir=out,
    )  # fmt: skip
    return run_distill(dcfg, student=student_bb)


def _promptkd(teacher_bb: Backbone, student_bb: Backbone, cfg: FashionCfg, seed: int, out: Path) -> tuple[Any, Any]:
    """PromptSRC teacher, then the student distilled on all unlabeled train images: (teacher, student) results."""
    teacher = _teacher(teacher_bb, cfg, seed, out / "teacher")
    return teacher, _distill(student_bb, cfg, seed, out / "teacher", out / "student", ALL)


# ----------------------------------------------------------------------------------------------
# The experiment


def _weights(cfg: FashionCfg) -> dict[str, float]:
    """Rough cost of each stage (seconds on a quiet core) for the progress bar's ETA."""
    n = 10 * (cfg.train_per_class or 6000)
    per_image = 1.3e-3 * cfg.distill_epochs  # teacher forward + student forward/backward + loading, per epoch
    w = {"zero-shot": 3.0, "CoOp": 6.0, "MoPD": 8.0, "teacher": 12.0}
    w = {k: v for k, v in w.items() if k.lower() in cfg.stages}
    for pool in cfg.pools if "student" in cfg.stages else []:
        w[f"distill{pool}"] = 10.0 + per_image * min(n, 10 * pool if pool else n)
    return w


def reused_teacher(cfg: FashionCfg, seed: int) -> tuple[Path, dict[str, Any]]:
    """The teacher of ``seed`` in the earlier run ``cfg.teacher_from``: its folder and its results."""
    assert cfg.teacher_from is not None
    folder = Path(cfg.teacher_from) / f"seed{seed}" / "teacher"
    results = folder / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"no teacher for seed {seed} under {cfg.teacher_from} ({results} is missing)")
    return folder, json.loads(results.read_text())


def run_fashion(out: str | Path, cfg: FashionCfg | None = None) -> dict[str, Any]:
    """The whole experiment (see module docstring). Every run is single-threaded like the demo;
    ``cfg.jobs`` seeds run at once in separate processes (their results do not depend on it)."""
    cfg = cfg or FashionCfg()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    weights = _weights(cfg)
    pre_cost = 0.6 * pretrain_steps(cfg)  # two CLIPs, seconds per step of both together
    total = pre_cost + sum(weights.values()) * len(cfg.seeds) / min(cfg.jobs, len(cfg.seeds))
    bar = tqdm(total=round(total), unit="s", disable=not cfg.progress, desc="fashion-mnist",
               bar_format="{l_bar}{bar}| {elapsed}<{remaining} (est.)")  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in [*METHODS, *map(pool_name, cfg.pools)]}
    seconds: dict[str, float] = {}
    try:
        steps = pretrain_steps(cfg)
        bb = {}
        for what, config, share in (("teacher", cfg.teacher_config, 0.8), ("student", cfg.student_config, 0.2)):
            bar.set_description(f"pre-training the {what} CLIP")
            bb[what] = pretrained(config, None, cfg, what=what,
                                  progress=lambda k, s=share: bar.update(s * pre_cost * k / steps))  # fmt: skip
        bar.n = round(pre_cost)
        pre = _pretrained_facts(bb, cfg)
        seconds["pretrain"] = time.perf_counter() - t0

        def collect(seed: int, result: dict[str, dict[str, Any]], took: float) -> None:
            for method, r in result.items():
                runs[method].append(r | {"seed": seed})
            seconds[f"seed{seed}"] = took
            log.info("fashion-mnist seed %d done in %.0f s", seed, took)
            _write(out, cfg, runs, pre, seconds | {"total": time.perf_counter() - t0})  # partial results survive

        if cfg.jobs > 1 and len(cfg.seeds) > 1:
            _parallel_seeds(cfg, out, bar, weights, collect)
        else:
            bench = load_benchmark(_data(cfg), image_size=bb["student"].preprocess.size[0])
            for seed in cfg.seeds:
                t = time.perf_counter()
                collect(seed, _one_seed(cfg, seed, out, bb, bench, bar, weights), time.perf_counter() - t)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return _write(out, cfg, runs, pre, seconds | {"total": time.perf_counter() - t0})


def _one_seed(
    cfg: FashionCfg,
    seed: int,
    out: Path,
    bb: dict[str, Backbone],
    bench: Benchmark,
    bar: Any,
    weights: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Every method for one seed: {table row: result}."""
    d = out / f"seed{seed}"
    res: dict[str, dict[str, Any]] = {}

    def stage(name: str) -> None:
        if bar is not None:
            bar.set_description(f"seed {seed}: {name}")

    def done(key: str) -> None:
        if bar is not None:
            bar.update(weights[key])

    if "zero-shot" in cfg.stages:
        stage("zero-shot")
        res["zero-shot (student CLIP)"] = zero_shot(bb["student"], bench)
        res["zero-shot (teacher CLIP)"] = zero_shot(bb["teacher"], bench)
        done("zero-shot")
    if "coop" in cfg.stages:
        stage("CoOp")
        res["CoOp"] = _mopd(bb["student"], cfg, seed, d / "coop", coop=True)
        done("CoOp")
    if "mopd" in cfg.stages:
        stage("MoPD")
        res["MoPD"] = _mopd(bb["student"], cfg, seed, d / "mopd", coop=False)
        done("MoPD")
    teacher_dir = d / "teacher"
    if "teacher" in cfg.stages:
        stage("PromptSRC teacher")
        res["PromptSRC teacher"] = _teacher(bb["teacher"], cfg, seed, teacher_dir)
        done("teacher")
    elif cfg.teacher_from is not None:
        teacher_dir, res["PromptSRC teacher"] = reused_teacher(cfg, seed)
    for pool in sorted(cfg.pools, key=lambda p: p or math.inf) if "student" in cfg.stages else []:
        stage(pool_name(pool))
        folder = d / ("student" if pool == ALL else f"student-{pool}pc")
        student = _distill(bb["student"], cfg, seed, teacher_dir, folder, pool)
        res[pool_name(pool)] = student["last"] | {"best": student.get("best"), "agreement": student["agreement"]}
        if pool == ALL:
            res["PromptKD student"] = res[pool_name(pool)]
        done(f"distill{pool}")
    return res


def _seed_job(cfg: FashionCfg, seed: int, out: Path) -> tuple[dict[str, dict[str, Any]], float]:
    """One seed in a worker process: the cached CLIPs, the data, every method."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    t = time.perf_counter()
    bb = {"teacher": pretrained(cfg.teacher_config, cfg=cfg), "student": pretrained(cfg.student_config, cfg=cfg)}
    bench = load_benchmark(_data(cfg), image_size=bb["student"].preprocess.size[0])
    return _one_seed(cfg, seed, out, bb, bench, None, {}), time.perf_counter() - t


def _parallel_seeds(cfg: FashionCfg, out: Path, bar: Any, weights: dict[str, float], collect: Any) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    per_seed = sum(weights.values()) / min(cfg.jobs, len(cfg.seeds))
    bar.set_description(f"{len(cfg.seeds)} seeds, {cfg.jobs} at a time")
    with ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_seed_job, cfg, seed, out): seed for seed in cfg.seeds}
        for fut in as_completed(futures):
            result, took = fut.result()
            collect(futures[fut], result, took)
            bar.update(per_seed)


def pool_name(pool: int) -> str:
    return "PromptKD, all unlabeled" if pool == ALL else f"PromptKD, {10 * pool:,} unlabeled"


def _pretrained_facts(bb: dict[str, Backbone], cfg: FashionCfg) -> dict[str, Any]:
    """Zero-shot accuracy over all ten classes of each pre-trained CLIP, and image-tower cost."""
    facts: dict[str, Any] = {}
    for what, b in bb.items():
        pixels, labels = _train_pixels(cfg, b.preprocess.size[0], part="t10k")
        facts[what] = {
            "zero_shot_10_class": zero_shot_accuracy(b, pixels, labels, FASHION_MNIST_NAMES, ZERO_SHOT_TEMPLATE),
            "logit_scale": float(b.model.logit_scale.exp()),
            **template_invariance(b),
            **image_tower_cost(b),
        }
    facts["flops_ratio_student_to_teacher"] = facts["student"]["image_flops"] / facts["teacher"]["image_flops"]
    facts["params_ratio_student_to_teacher"] = facts["student"]["image_params"] / facts["teacher"]["image_params"]
    return facts


@torch.no_grad()
def template_invariance(bb: Backbone, templates: list[str] = CAPTIONS) -> dict[str, float]:
    """How much the text tower's class embedding depends on the words around the name: mean cosine
    between one class's embeddings under different templates, and between different classes'
    (template-averaged) embeddings. Near 1 for the first: the tower ignores the context."""
    import torch.nn.functional as F

    emb = torch.stack(
        [F.normalize(bb.model.encode_text(bb.tokenizer([t.format(n) for n in FASHION_MNIST_NAMES])), dim=-1)
         for t in templates]
    )  # fmt: skip  # [T, C, D]
    n_t, n_c, _ = emb.shape
    off_t, off_c = ~torch.eye(n_t, dtype=torch.bool), ~torch.eye(n_c, dtype=torch.bool)
    same = torch.stack([(emb[:, c] @ emb[:, c].t())[off_t].mean() for c in range(n_c)]).mean()
    mean = F.normalize(emb.mean(0), dim=-1)
    return {
        "cos_same_class_across_templates": float(same),
        "cos_across_classes": float((mean @ mean.t())[off_c].mean()),
    }


def image_tower_cost(bb: Backbone) -> dict[str, float]:
    """FLOPs of one image through the (plain) image tower, and its parameter count."""
    from torch.utils.flop_counter import FlopCounterMode

    size = bb.preprocess.size
    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel hides its matmuls from the counter
    try:
        with torch.no_grad(), counter:
            bb.model.encode_image(torch.zeros(1, 3, *size))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return {"image_flops": float(counter.get_total_flops()),
            "image_params": float(sum(p.numel() for p in bb.model.visual.parameters()))}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Claims, table, plots


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Per-seed differences a - b: mean, std, standard error, and ``holds`` = a one-sided paired
    t-test at 95 % (mean > t(0.95, n-1) x SE); None with a single seed (no spread to judge by)."""
    from scipy.stats import t as student_t

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    ms = mean_std(diffs)
    n = len(diffs)
    se = ms["std"] / math.sqrt(n) if n > 1 else None
    critical = float(student_t.ppf(0.95, n - 1)) if n > 1 else None
    holds = None if se is None or critical is None else bool(ms["mean"] > critical * se)
    return {"mean": ms["mean"], "std": ms["std"], "se": se, "t_critical": critical, "n": n, "holds": holds}


def claims(runs: dict[str, list[dict[str, Any]]], pre: dict[str, Any], cfg: FashionCfg) -> list[dict[str, Any]]:
    """The papers' claims, each as a paired per-seed comparison (see :func:`paired`)."""

    def col(method: str, key: str) -> list[float]:
        return [float(r[key]) for r in runs.get(method, [])]

    out: list[dict[str, Any]] = []

    def add(claim: str, what: str, a: list[float], b: list[float]) -> None:
        k = min(len(a), len(b))
        if k:
            out.append({"claim": claim, "measure": what, **paired(a[:k], b[:k])})

    add("CoOp loses novel accuracy against zero-shot", "novel: zero-shot - CoOp",
        col("zero-shot (student CLIP)", "novel"), col("CoOp", "novel"))  # fmt: skip
    add("MoPD recovers novel accuracy over CoOp", "novel: MoPD - CoOp", col("MoPD", "novel"), col("CoOp", "novel"))
    add("the PromptSRC teacher beats zero-shot in HM", "HM: teacher - zero-shot (teacher CLIP)",
        col("PromptSRC teacher", "hm"), col("zero-shot (teacher CLIP)", "hm"))  # fmt: skip
    s, t = col("PromptKD student", "hm"), col("PromptSRC teacher", "hm")
    ratio = pre["flops_ratio_student_to_teacher"]
    add(f"the PromptKD student reaches >= 0.95x its teacher's HM at {ratio:.2f}x its image-tower FLOPs",
        "HM: student - 0.95 x teacher", s, [0.95 * x for x in t[: len(s)]])  # fmt: skip
    pools = sorted(cfg.pools, key=lambda p: p or math.inf)
    for small, big in itertools.pairwise(pools):
        a, b = pool_name(big), pool_name(small)
        add(
            f"the student improves as the unlabeled pool grows ({b} -> {a})",
            f"HM: {a} - {b}",
            col(a, "hm"),
            col(b, "hm"),
        )
    return out


def _write(
    out: Path, cfg: FashionCfg, runs: dict[str, list[dict[str, Any]]], pre: dict[str, Any], seconds: dict[str, float]
) -> dict[str, Any]:
    done = {m: rs for m, rs in runs.items() if rs}
    table = {m: {k: mean_std([r[k] for r in rs]) for k in ("base", "novel", "hm")} for m, rs in done.items()}
    best = [r["best"] for r in runs.get("PromptKD student", []) if r.get("best")]
    if best:
        table["PromptKD student (best base epoch)"] = {
            k: mean_std([b[k] for b in best]) for k in ("base", "novel", "hm")
        }
    per_run = {m: [{k: r[k] for k in ("base", "novel", "hm")} | _extras(r) for r in rs] for m, rs in done.items()}
    judged = claims(done, pre, cfg)
    summary = {"config": cfg.model_dump(mode="json"), "pretrained": pre, "table": table, "claims": judged,
               "runs": per_run, "seconds": seconds, "load_average_at_end": list(os.getloadavg())}  # fmt: skip
    save_json(summary, out / "summary.json")
    n_seeds = max((len(rs) for rs in done.values()), default=0)
    (out / "table.md").write_text(format_table(table, n_seeds))
    (out / "claims.md").write_text(format_claims(judged))
    if table:
        plot_table({m: r for m, r in table.items() if not m.startswith("PromptKD,")}, out / "fashion_mnist.png")
        pools = {m: r for m, r in table.items() if m.startswith("PromptKD,")}
        if pools:
            plot_table(pools, out / "fashion_mnist_pools.png", title="PromptKD student vs unlabeled pool")
    return summary


def _extras(r: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {"seed": r.get("seed")}
    if r.get("agreement"):
        extra["agreement"] = r["agreement"]
    if r.get("best"):
        extra["best"] = {k: r["best"][k] for k in ("base", "novel", "hm", "epoch")}
    return extra


def format_table(table: dict[str, Any], n_seeds: int) -> str:
    lines = [f"| method | base | novel | HM |  (mean ± std over {n_seeds} seeds, top-1 %)", "|---|---|---|---|"]
    for m, r in table.items():
        cells = [f"{r[k]['mean']:.2f} ± {r[k]['std']:.2f}" for k in ("base", "novel", "hm")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_claims(judged: list[dict[str, Any]]) -> str:
    lines = ["| claim | measure (per-seed difference) | mean ± std | verdict (one-sided paired t, 95 %) |",
             "|---|---|---|---|"]  # fmt: skip
    for c in judged:
        verdict = "n/a (one seed)" if c["holds"] is None else ("holds" if c["holds"] else "does not hold")
        lines.append(f"| {c['claim']} | {c['measure']} | {c['mean']:+.2f} ± {c['std']:.2f} (n={c['n']}) | {verdict} |")
    return "\n".join(lines) + "\n"


def plot_table(table: dict[str, Any], path: Path, title: str | None = None) -> Path:
    import numpy as np

    plt = pyplot()
    names = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    x = np.arange(len(names))
    for i, key in enumerate(("base", "novel", "hm")):
        means = [table[n][key]["mean"] for n in names]
        stds = [table[n][key]["std"] for n in names]
        bars = ax.bar(x + (i - 1) * 0.25, means, 0.25, yerr=stds, capsize=3, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right")
    ax.set_title(title or "Fashion-MNIST base-to-novel (tiny CLIPs, mean ± std over seeds)")
    return save_figure(fig, path)
