"""Stage 1: train the PromptSRC teacher, evaluate it, and store it with its class vectors.

Output folder (``out_dir``)::

    teacher.json            backbone reference, PromptSRC config, class names (base then novel), n_base
    teacher.safetensors     "text_prompts" [J, n, w], "image_prompts" [J, n, w], "class_vectors" [N, D]
    backbone.safetensors    the backbone weights, only when it has no weights reference (random init)
    results.json, history.csv, tb/, loss.png, checkpoint.pt, config.yaml
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.backbone import Backbone, load_backbone
from models.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptCfg, VisualPromptCfg
from models.staging import staged_file
from models.towers import needs_embedded_weights
from models.zeroshot import named_templates
from training.benchmark import Benchmark, load_benchmark
from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg, save_config
from training.data import Subset, build_transform
from training.evaluate import accuracy, base_novel_result, per_class_accuracy, plot_history, predict, save_json
from training.loop import Callback, EvalCallback, Trainer, pick_device
from training.promptsrc import GaussianPromptAggregation, PromptSRC, PromptSRCCfg

log = logging.getLogger(__name__)

TEACHER_JSON = "teacher.json"
TEACHER_TENSORS = "teacher.safetensors"
TEACHER_BACKBONE = "backbone.safetensors"


class TeacherRunConfig(Cfg):
    """``promptdistill train teacher``: PromptSRC on the k-shot base classes."""

    backbone: BackboneCfg
    data: DataCfg
    optim: OptimCfg = OptimCfg()
    loop: LoopCfg = LoopCfg()
    promptsrc: PromptSRCCfg = PromptSRCCfg()
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
    model: PromptSRC, bench: Benchmark, transform: Any, device: torch.device, batch_size: int = 100
) -> dict[str, Any]:
    """Base / novel / HM of the prompted teacher, each subset among its own classes."""
    was = model.training
    model.eval()
    vectors = model.class_vectors(bench.class_names).to(device)  # [N, D], the stored class vectors
    out: dict[str, Any] = {}
    subsets: list[tuple[Subset, str]] = [("base", "base"), ("new", "novel")]
    for subset, key in subsets:
        w = vectors[bench.rows(subset)]  # [N_subset, D]

        def logits_fn(x: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
            feats: torch.Tensor = model.image(x, normalize=True)  # [B, D]
            return model.logit_scale * feats.float() @ w.t()

        logits, labels = predict(
            logits_fn, bench.dataset("test", subset, transform), device=device, batch_size=batch_size
        )
        out[key] = accuracy(logits, labels)
        out[f"{key}_per_class"] = per_class_accuracy(logits, labels)
    model.train(was)
    return base_novel_result(out.pop("base"), out.pop("novel"), **out)


def run_teacher(cfg: TeacherRunConfig, backbone: Backbone | None = None) -> dict[str, Any]:
    """Train, GPA-aggregate, evaluate and save the teacher; returns the results dict."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    bb = backbone or load_backbone(cfg.backbone.name, cfg.backbone.pretrained)
    bench = load_benchmark(cfg.data, image_size=bb.preprocess.size[0])
    train_tf = build_transform(bb.preprocess, train=True, min_scale=cfg.data.crop_scale_min, hflip=cfg.data.hflip)
    train_ds = bench.dataset("train", "base", train_tf, cfg.data.shots, cfg.loop.seed)
    torch.manual_seed(cfg.loop.seed)  # prompt initialisation
    model = PromptSRC(bb, bench.names("base"), cfg.promptsrc, named_templates(cfg.promptsrc.zs_templates))
    test_tf = build_transform(bb.preprocess, train=False)
    device = pick_device(cfg.loop.device)

    def base_acc(m: Any) -> dict[str, float]:
        ds = bench.dataset("test", "base", test_tf)
        m.eval()
        logits, labels = predict(m.logits, ds, device=device, batch_size=cfg.data.test_batch_size)
        m.train()
        return {"base_acc": accuracy(logits, labels)}

    callbacks: list[Callback] = [
        GaussianPromptAggregation(cfg.optim.epochs, cfg.promptsrc.gpa_mean, cfg.promptsrc.gpa_std)
    ]
    if cfg.loop.eval_every <= cfg.optim.epochs:
        callbacks.insert(0, EvalCallback(base_acc, cfg.loop.eval_every))
    trainer = Trainer(
        model,
        train_ds,
        cfg.optim,
        cfg.loop,
        out,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        callbacks=callbacks,
    )
    state = trainer.fit()
    results = evaluate_teacher(model, bench, test_tf, device, cfg.data.test_batch_size)
    results |= {
        "n_train_images": len(train_ds),  # type: ignore[arg-type]
        "class_names": bench.class_names,
        "n_base": bench.n_base,
        "seed": cfg.loop.seed,
    }
    save_teacher(out, model, bb, bench.class_names, bench.n_base)
    save_json(results, out / "results.json")
    plot_history(state.history, out / "loss.png", title="PromptSRC teacher")
    log.info("teacher: base %.2f novel %.2f HM %.2f -> %s", results["base"], results["novel"], results["hm"], out)
    return results


def save_teacher(out: Path, model: PromptSRC, backbone: Backbone, class_names: list[str], n_base: int) -> None:
    """Write the teacher folder (see module docstring); class vectors for all names, base first."""
    model = model.cpu().eval()
    vectors = model.class_vectors(class_names)
    assert model.text.prompts is not None and model.image.prompts is not None
    # Staged next to each file (same filesystem), modes follow the umask; the JSON, which
    # load_teacher reads first, is written last.
    with staged_file(out / TEACHER_TENSORS) as tmp:
        save_file(
            {
                "text_prompts": model.text.prompts.detach().float().contiguous(),
                "image_prompts": model.image.prompts.detach().float().contiguous(),
                "class_vectors": vectors.contiguous(),
            },
            tmp,
        )
    embedded = needs_embedded_weights(backbone)
    if embedded:
        with staged_file(out / TEACHER_BACKBONE) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in backbone.model.state_dict().items()}, tmp)
    info = {
        "backbone": {
            "name": backbone.spec.name,
            "pretrained": backbone.spec.pretrained,
            "open_clip_config": backbone.spec.model_config,
        },
        "embedded_weights": TEACHER_BACKBONE if embedded else None,
        "promptsrc": json.loads(model.cfg.model_dump_json()),
        "class_names": class_names,
        "n_base": n_base,
        "logit_scale": model.logit_scale,
    }
    with staged_file(out / TEACHER_JSON) as tmp:
        tmp.write_text(json.dumps(info, indent=2))


def load_teacher(folder: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """Rebuild a stored teacher (frozen, eval mode)."""
    folder = Path(folder)
    if not (folder / TEACHER_JSON).is_file():
        raise FileNotFoundError(f"{folder} holds no {TEACHER_JSON}; run `promptdistill train teacher` first")
    info = json.loads((folder / TEACHER_JSON).read_text())
    ref = info["backbone"]
    weights = str(folder / info["embedded_weights"]) if info["embedded_weights"] else ref["pretrained"]
    bb = load_backbone(ref["name"], weights, device=device, model_config=ref["open_clip_config"] or None)
    tensors = load_file(folder / TEACHER_TENSORS)
    psrc = PromptSRCCfg.model_validate(info["promptsrc"])
    text = PromptedTextEncoder(bb.model, bb.tokenizer, TextPromptCfg(psrc.text_tokens, psrc.text_depth, psrc.ctx_init))
    image = PromptedImageEncoder(bb.model, VisualPromptCfg(psrc.vision_tokens, psrc.vision_depth))
    with torch.no_grad():
        assert text.prompts is not None and image.prompts is not None
        text.prompts.copy_(tensors["text_prompts"])
        image.prompts.copy_(tensors["image_prompts"])
    for m in (text, image):
        m.to(device).eval().requires_grad_(False)
    return Teacher(
        bb,
        text,
        image,
        tensors["class_vectors"].to(device),
        list(info["class_names"]),
        int(info["n_base"]),
        float(info["logit_scale"]),
        info,
    )
