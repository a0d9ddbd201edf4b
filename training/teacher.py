"""Stage 1: train the PromptSRC teacher, evaluate it, and store it as a bundle.

Output folder (``out_dir``)::

    bundle/         THE teacher: a models.bundle folder (prompted image + text towers, class vectors
                    for all names with provenance ``promptsrc:base`` / ``promptsrc:novel``, logit
                    scale, ``extra.n_base``); servable and evaluable like any bundle
    results.json, history.csv, tb/, loss.png, checkpoint.pt, config.yaml

Distillation (``teacher_dir``) takes the bundle folder or this run folder. The pre-bundle format
(``teacher.json`` + ``teacher.safetensors``) is no longer read: convert such a folder once with
``promptdistill convert legacy-teacher DIR --out DIR/bundle`` (training/convert.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from models.backbone import Backbone
from models.bundle import MANIFEST, Bundle, load_bundle
from models.class_vectors import encode_class_names
from models.prompts import PromptedImageEncoder, PromptedTextEncoder
from models.towers import build_image_tower, build_text_side, load_bundle_backbone
from models.zeroshot import named_templates
from training.benchmark import Benchmark
from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg
from training.data import Subset
from training.export import ImageParts, TextParts, assemble_bundle, label_set, write_bundle
from training.loop import Callback, EvalCallback
from training.promptsrc import LEARNED_TEMPLATES, GaussianPromptAggregation, PromptSRC, PromptSRCCfg
from training.protocols import EvalProtocol, evaluate_classifier, headline
from training.run import Run

log = logging.getLogger(__name__)

LEGACY_TEACHER_JSON = "teacher.json"
BUNDLE_DIR = "bundle"


class TeacherRunConfig(Cfg):
    """``promptdistill train teacher``: PromptSRC on the k-shot base classes."""

    backbone: BackboneCfg
    data: DataCfg
    optim: OptimCfg = OptimCfg()
    loop: LoopCfg = LoopCfg()
    promptsrc: PromptSRCCfg = PromptSRCCfg()
    # "base": the base-to-novel teacher (k shots of the base classes); "all": k shots of every
    # class, the cross-dataset / domain-generalisation source teacher (PromptSRC's ImageNet run)
    classes: Literal["base", "all"] = "base"
    out_dir: Path


@dataclass
class Teacher:
    """A stored teacher, rebuilt: what distillation and export need."""

    backbone: Backbone
    text_encoder: PromptedTextEncoder
    image_encoder: PromptedImageEncoder
    class_vectors: torch.Tensor  # [N, D], base rows then novel rows
    class_names: list[str]
    n_base: int
    logit_scale: float
    info: dict[str, Any]


def evaluate_teacher(
    model: PromptSRC,
    bench: Benchmark,
    transform: Any,
    device: torch.device,
    batch_size: int = 100,
    subsets: tuple[Subset, ...] | None = None,
    trained_on: Literal["base", "all"] = "base",
) -> dict[str, Any]:
    """The prompted teacher through THE evaluation (base/novel/HM, or all-class when trained on all)."""
    was = model.training
    model.eval()
    vectors = model.class_vectors(bench.class_names)  # [N, D], the stored class vectors
    protocol: EvalProtocol = "base2novel" if trained_on == "base" else "all"
    out = evaluate_classifier(
        lambda x: model.image(x, normalize=True), vectors, model.logit_scale, bench, transform, device,
        protocol=protocol, subsets=subsets, batch_size=batch_size,
    )  # fmt: skip
    model.train(was)
    return out


def run_teacher(cfg: TeacherRunConfig, backbone: Backbone | None = None) -> dict[str, Any]:
    """Train, GPA-aggregate, evaluate and save the teacher; returns the results dict."""
    run = Run.start(cfg, cfg.out_dir, backbone or cfg.backbone, cfg.data, cfg.loop)
    bench, bb = run.bench, run.backbone
    train_ds = bench.dataset("train", cfg.classes, run.transform(train=True), cfg.data.shots, cfg.loop.seed)
    torch.manual_seed(cfg.loop.seed)  # prompt initialisation
    model = PromptSRC(bb, bench.names(cfg.classes), cfg.promptsrc, named_templates(cfg.promptsrc.zs_templates))
    test_tf = run.transform(train=False)
    seen: Subset = cfg.classes

    def base_acc(m: Any) -> dict[str, float]:
        r = evaluate_teacher(m, bench, test_tf, run.device, cfg.data.test_batch_size, (seen,), cfg.classes)
        return {"base_acc" if seen == "base" else "acc": r["base" if seen == "base" else "accuracy"]}

    callbacks: list[Callback] = [
        GaussianPromptAggregation(cfg.optim.epochs, cfg.promptsrc.gpa_mean, cfg.promptsrc.gpa_std)
    ]
    if cfg.loop.eval_every <= cfg.optim.epochs:
        callbacks.insert(0, EvalCallback(base_acc, cfg.loop.eval_every))
    state = run.trainer(model, train_ds, cfg.optim, callbacks).fit()
    results = evaluate_teacher(model, bench, test_tf, run.device, cfg.data.test_batch_size, trained_on=cfg.classes)
    n_base = bench.n_base if cfg.classes == "base" else len(bench.class_names)
    results |= {
        "n_train_images": len(train_ds),  # type: ignore[arg-type]
        "class_names": bench.class_names,
        "n_base": n_base,
        "trained_on": cfg.classes,
        "seed": cfg.loop.seed,
    }
    write_bundle(teacher_bundle(model, bb, bench.class_names, n_base, results), run.out / BUNDLE_DIR)
    results["bundle"] = str(run.out / BUNDLE_DIR)
    run.finish(results, state.history, "PromptSRC teacher")
    log.info("teacher: %s -> %s", headline(results), run.out / BUNDLE_DIR)
    return results


def teacher_bundle(
    model: PromptSRC,
    backbone: Backbone,
    class_names: list[str],
    n_base: int,
    results: dict[str, Any] | None = None,
) -> Bundle:
    """The trained PromptSRC teacher as a bundle (see :func:`prompted_teacher_bundle`)."""
    model = model.cpu().eval()
    metrics = {k: results[k] for k in ("base", "novel", "hm", "accuracy") if results and k in results}
    return prompted_teacher_bundle(
        backbone, model.image, model.text, class_names, n_base, model.logit_scale,
        producer={"method": "promptsrc"}, extra={"promptsrc": model.cfg.model_dump(), "metrics": metrics},
    )  # fmt: skip


def prompted_teacher_bundle(
    backbone: Backbone,
    image: PromptedImageEncoder,
    text: PromptedTextEncoder,
    class_names: list[str],
    n_base: int,
    logit_scale: float,
    producer: dict[str, str],
    extra: dict[str, Any],
    embed_weights: bool | None = None,
) -> Bundle:
    """A teacher bundle: one backbone for both towers, class vectors for all names (base rows first,
    provenance ``promptsrc:base`` / ``promptsrc:novel``), ``extra.role = teacher``, ``extra.n_base``."""
    if not 0 <= n_base <= len(class_names):
        raise ValueError(f"n_base={n_base} for {len(class_names)} classes")
    vectors = encode_class_names(text, class_names, LEARNED_TEMPLATES)
    provenance = ["promptsrc:base"] * n_base + ["promptsrc:novel"] * (len(class_names) - n_base)
    return assemble_bundle(
        ImageParts(backbone, image, None, key="teacher"),
        {"default": vectors},
        [label_set("default", class_names, provenance)],
        text=TextParts(backbone, text, list(LEARNED_TEMPLATES), key="teacher"),
        logit_scale=logit_scale,
        producer={**producer, "role": "teacher"},
        extra={"role": "teacher", "n_base": n_base, **extra},
        embed_weights=embed_weights,
    )


def teacher_bundle_dir(path: str | Path) -> Path:
    """A teacher bundle folder, given it or the ``train teacher`` run folder that holds it."""
    path = Path(path)
    for candidate in (path, path / BUNDLE_DIR):
        if (candidate / MANIFEST).is_file():
            return candidate
    if (path / LEGACY_TEACHER_JSON).is_file():
        raise FileNotFoundError(
            f"{path} holds a pre-bundle teacher ({LEGACY_TEACHER_JSON}); convert it once with "
            f"`promptdistill convert legacy-teacher {path} --out {path / BUNDLE_DIR}` or re-run `train teacher`"
        )
    raise FileNotFoundError(f"{path} is not a teacher bundle (no {MANIFEST}); run `promptdistill train teacher` first")


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """Rebuild a teacher bundle (frozen, eval mode): towers, class vectors, base/novel split."""
    bundle = load_bundle(teacher_bundle_dir(path))
    m = bundle.manifest
    if m.text_encoder is None:
        raise ValueError(f"bundle {bundle.root} has no text side; a PromptKD teacher needs one")
    if m.image_encoder.projector is not None:  # the teacher's image features must live in its text space as-is
        raise ValueError(f"bundle {bundle.root} has a projector (a distilled student), not a teacher's image tower")
    image_bb = load_bundle_backbone(bundle, m.image_encoder.backbone, device)
    text_bb = image_bb if m.text_encoder.backbone == m.image_encoder.backbone else None
    tower = build_image_tower(bundle, device, image_bb)
    text = build_text_side(bundle, device, text_bb)
    classes = bundle.label_set("default").classes
    n_base = int(m.extra.get("n_base", sum(c.provenance.endswith(":base") for c in classes)))
    return Teacher(
        image_bb,
        text.encoder,
        tower.encoder,
        bundle.class_vectors["default"].to(device),
        [c.name for c in classes],
        n_base,
        float(m.logit_scale),
        {"bundle": str(bundle.root), **m.extra},
    )
