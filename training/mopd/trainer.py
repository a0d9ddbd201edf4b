"""Run MoPD end to end: data, model, the shared training loop, evaluation, plots, bundle.

Output folder::

    config.yaml  history.csv  tb/  checkpoint.pt      (shared loop conventions)
    results.json   base / novel / HM (last epoch), zero-shot pool baseline, gate diagnostics
    loss.png  base_novel.png  gate.png
    bundle/        serving bundle (learned soft prompt as the text side)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from models.backbone import Backbone, PreprocessConfig
from models.class_vectors import encode_class_names
from models.prompts import PromptedImageEncoder, PromptedTextEncoder
from training.benchmark import Benchmark
from training.config import DataCfg
from training.data import build_transform
from training.evaluate import plot_base_novel, predict
from training.loop import EvalCallback
from training.mopd.config import MoPDRunCfg
from training.mopd.diagnostics import GateDiagnostics, GateStats, plot_gate
from training.mopd.model import MoPDModel, build_prompt_bank
from training.pools import resolve_pool
from training.protocols import evaluate_classifier
from training.run import Run

log = logging.getLogger(__name__)


@dataclass
class MoPDRun:
    """What a finished run hands back (the combined MoPD -> PromptKD pipeline reuses it)."""

    model: MoPDModel
    backbone: Backbone
    bench: Benchmark
    templates: list[str]
    results: dict[str, Any]


def build_model(
    cfg: MoPDRunCfg, backbone: Backbone, base_names: list[str], image_encoder: PromptedImageEncoder | None = None
) -> tuple[MoPDModel, list[str]]:
    """Pool -> frozen bank over the base names -> MoPD model (seeded)."""
    templates = resolve_pool(cfg.mopd.pool, cfg.mopd.dataset)
    model_cfg = cfg.mopd.model_cfg()
    if model_cfg.top_k > len(templates):
        raise ValueError(f"mopd.top_k={model_cfg.top_k} exceeds the pool size {len(templates)}")
    plain = PromptedTextEncoder(backbone.model, backbone.tokenizer)
    bank = build_prompt_bank(plain, base_names, templates)  # [P, N_base, D]
    torch.manual_seed(cfg.loop.seed)
    model = MoPDModel(backbone, base_names, bank, model_cfg, cfg.mopd.loss_cfg(), image_encoder=image_encoder)
    return model, templates


def train_transform(preprocess: PreprocessConfig, data: DataCfg) -> Any:
    """The papers' train augmentation with the data config's crop scale and flip."""
    return build_transform(preprocess, train=True, min_scale=data.crop_scale_min, hflip=data.hflip)


def evaluate(
    model: MoPDModel, bench: Benchmark, transform: Any, device: torch.device, batch_size: int, templates: list[str]
) -> dict[str, Any]:
    """Base / novel / HM of the student (each subset among its own names) and of the pool's zero-shot
    ensemble, both through THE evaluation (training/protocols.py).

    The student's vectors for all names at once equal per-subset encodings: CoOp encodes each name
    independently of the others."""
    model.eval()
    plain = PromptedTextEncoder(model.text.clip, model.text.tokenizer)
    names = bench.class_names
    res = evaluate_classifier(model.image_features, model.class_vectors(names), model.logit_scale, bench,
                              transform, device, batch_size=batch_size)  # fmt: skip
    zs = evaluate_classifier(model.image_features, encode_class_names(plain, names, templates), model.logit_scale,
                             bench, transform, device, batch_size=batch_size)  # fmt: skip
    model.train()
    res["zeroshot_pool"] = {k: zs[k] for k in ("base", "novel", "hm")}
    return res


@torch.no_grad()
def gate_on(model: MoPDModel, ds: Dataset[Any], device: torch.device, batch_size: int) -> GateStats:
    """The trained gate's choices over a dataset (e.g. base test images)."""
    stats = GateStats(model.n_prompts)
    predict(lambda x: _record(model, stats, x), ds, device=device, batch_size=batch_size)
    return stats


def _record(model: MoPDModel, stats: GateStats, x: torch.Tensor) -> torch.Tensor:
    weights, indices = model.gate(model.image_features(x))
    stats.update(weights, indices)
    return torch.as_tensor(weights)


def train(
    cfg: MoPDRunCfg, out: Path, backbone: Backbone | None = None, image_encoder: PromptedImageEncoder | None = None
) -> MoPDRun:
    """Train and evaluate (no export).

    ``backbone`` overrides ``cfg.backbone`` (tests, pipelines); ``image_encoder`` replaces its plain
    frozen image tower (e.g. a stored PromptSRC teacher's prompted tower).
    """
    run = Run.start(cfg, out, backbone or cfg.backbone, cfg.data, cfg.loop)
    bench, bb, device = run.bench, run.backbone, run.device
    train_ds = bench.dataset("train", "base", run.transform(train=True), cfg.data.shots, cfg.loop.seed)
    test_tf = run.transform(train=False)
    model, templates = build_model(cfg, bb, bench.names("base"), image_encoder)
    model.gate_stats = GateStats(model.n_prompts)
    diagnostics = GateDiagnostics(model.gate_stats)

    def base_acc(m: Any) -> dict[str, float]:
        m.eval()
        r = evaluate_classifier(m.image_features, m.class_vectors(bench.class_names), m.logit_scale, bench, test_tf,
                                device, subsets=("base",), batch_size=cfg.data.test_batch_size)  # fmt: skip
        m.train()
        return {"base_acc": r["base"]}

    state = run.trainer(model, train_ds, cfg.optim, [EvalCallback(base_acc, cfg.loop.eval_every), diagnostics]).fit()
    model.gate_stats = None
    results = evaluate(model, bench, test_tf, device, cfg.data.test_batch_size, templates)
    train_gate = diagnostics.history[-1] if diagnostics.history else None
    test_gate = gate_on(model, bench.dataset("test", "base", test_tf), device, cfg.data.test_batch_size)
    results |= {
        "method": "mopd",
        "seed": cfg.loop.seed,
        "n_train_images": len(train_ds),  # type: ignore[arg-type]
        "class_names": bench.class_names,
        "n_base": bench.n_base,
        "loss_weights": cfg.mopd.loss_cfg().__dict__,
        "top_k": model.cfg.top_k,
        "epochs": cfg.optim.epochs,
        "gate": {"test_base": test_gate.summary(templates), "train_last_epoch": train_gate, "templates": templates},
    }
    run.finish(results, state.history, "MoPD")
    plot_base_novel({"zero-shot (pool)": results["zeroshot_pool"], "MoPD": results}, out / "base_novel.png")
    plot_gate(results["gate"]["test_base"], diagnostics.history, out / "gate.png", title="gate on base test images")
    log.info("MoPD: base %.2f novel %.2f HM %.2f -> %s", results["base"], results["novel"], results["hm"], out)
    return MoPDRun(model, bb, bench, templates, results)


def run_mopd(cfg: MoPDRunCfg, out_dir: str | Path | None = None, backbone: Backbone | None = None) -> MoPDRun:
    """``promptdistill train mopd``: train, evaluate, plot, and (``export.bundle``) write ``out/bundle``."""
    out = Path(out_dir or cfg.out_dir or "runs/mopd")
    run = train(cfg, out, backbone)
    if cfg.export.bundle:
        from training.mopd.export import export_mopd

        facts = {k: run.results[k] for k in ("base", "novel", "hm", "seed", "top_k", "epochs", "loss_weights")}
        images = run.bench.unlabeled(build_transform(run.backbone.preprocess, train=False))
        export_mopd(run.model, run.backbone, run.bench.class_names, run.bench.n_base, out / "bundle",
                    onnx=cfg.export.onnx, extra={"mopd": facts, "pool": run.templates}, calibration=images)  # fmt: skip
        log.info("bundle ready: promptdistill serve --bundle %s", out / "bundle")
    return run
