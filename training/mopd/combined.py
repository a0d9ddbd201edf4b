"""Experiment (beyond both papers): PromptKD distillation from a MoPD-tuned teacher text prompt.

PromptKD's class vectors normally come from a PromptSRC teacher. Here MoPD replaces PromptSRC on
the teacher's text side: a CoOp prompt on the *teacher* backbone (e.g. ViT-L/14) is trained with
the gated hard-prompt mixture on the k-shot base classes; its class vectors for every class name
(base then novel) and the teacher's image tower then drive PromptKD's unchanged student stage
(training/distill.py). The image tower is the plain frozen teacher tower, or, with
``teacher_image_from``, the prompted image tower of a stored PromptSRC teacher.

Output folder: ``teacher_mopd/`` (the MoPD stage: results, gate diagnostics, plots, its own
bundle), ``student/`` (the PromptKD stage: results, plots, the serving bundle), and a top-level
``results.json`` + ``base_novel.png`` comparing zero-shot pool, MoPD teacher and student.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from models.backbone import load_backbone
from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg, deep_merge, save_config
from training.distill import DistillRunConfig, ExportCfg, run_distill
from training.evaluate import plot_base_novel, save_json
from training.mopd.config import (
    DEFAULT_BACKBONE,
    MoPDCfg,
    MoPDExportCfg,
    MoPDRunCfg,
    _dataset_of,
    with_default_backbone,
)
from training.mopd.defaults import defaults_for
from training.mopd.export import export_mopd
from training.mopd.trainer import train
from training.promptkd import DistillCfg
from training.teacher import load_teacher

log = logging.getLogger(__name__)


class CombinedRunCfg(Cfg):
    """``promptdistill train mopd-promptkd``: MoPD on the teacher, then the PromptKD student."""

    teacher: BackboneCfg = BackboneCfg(name="ViT-L-14-quickgelu", pretrained="openai")
    student: BackboneCfg = BackboneCfg(name="ViT-B-16-quickgelu", pretrained="openai")
    teacher_image_from: Path | None = None  # a `train teacher` folder: use its prompted image tower
    data: DataCfg  # one data source for both stages; data.batch_size is the distillation batch
    mopd: MoPDCfg = Field(default_factory=MoPDCfg)
    mopd_optim: OptimCfg  # MoPD defaults: lr 0.002, per-dataset epochs
    mopd_batch_size: int = Field(default=128, ge=1)
    distill: DistillCfg = Field(default_factory=lambda: DistillCfg.model_validate({}))
    distill_optim: OptimCfg = Field(default_factory=lambda: OptimCfg.model_validate({}))  # PromptKD: 0.005, 20 ep
    loop: LoopCfg = Field(default_factory=lambda: LoopCfg.model_validate({}))
    export: ExportCfg = Field(default_factory=lambda: ExportCfg.model_validate({}))
    out_dir: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _mopd_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        dataset = _dataset_of(data.get("mopd"))
        base = {"mopd_optim": {"lr": 0.002, "epochs": defaults_for(dataset).epochs}}
        data = with_default_backbone(data, "teacher", {"name": "ViT-L-14-quickgelu", "pretrained": "openai"})
        return deep_merge(base, with_default_backbone(data, "student", DEFAULT_BACKBONE))

    def mopd_run_cfg(self) -> MoPDRunCfg:
        data = self.data.model_copy(update={"batch_size": self.mopd_batch_size})
        return MoPDRunCfg(
            backbone=self.teacher, data=data, optim=self.mopd_optim, loop=self.loop, mopd=self.mopd,
            export=MoPDExportCfg(bundle=True, onnx=False),
        )  # fmt: skip

    def distill_run_cfg(self, teacher_dir: Path, out: Path) -> DistillRunConfig:
        return DistillRunConfig(
            student=self.student, teacher_dir=teacher_dir, data=self.data, optim=self.distill_optim,
            loop=self.loop, distill=self.distill, export=self.export, out_dir=out,
        )  # fmt: skip


def run_combined(cfg: CombinedRunCfg) -> dict[str, Any]:
    """Both stages; returns {"teacher_mopd": MoPD results, "student": PromptKD results}.

    The MoPD stage ends with its bundle (``teacher_mopd/bundle``); the student stage reads its
    teacher from that bundle, as it reads any teacher."""
    out = Path(cfg.out_dir or "runs/mopd-promptkd")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    image_encoder = None
    if cfg.teacher_image_from is not None:
        stored = load_teacher(cfg.teacher_image_from)
        backbone, image_encoder = stored.backbone, stored.image_encoder
    else:
        backbone = load_backbone(cfg.teacher.name, cfg.teacher.pretrained)
    run = train(cfg.mopd_run_cfg(), out / "teacher_mopd", backbone, image_encoder=image_encoder)
    bench = run.bench
    export_mopd(run.model, run.backbone, bench.class_names, bench.n_base, out / "teacher_mopd" / "bundle",
                extra={"mopd": _slim(run.results), "pool": run.templates})  # fmt: skip
    mopd_results = run.results
    del run, backbone, image_encoder  # the student stage loads the teacher from its bundle
    student_results = run_distill(cfg.distill_run_cfg(out / "teacher_mopd", out / "student"))
    results = {"teacher_mopd": _slim(mopd_results), "student": student_results}
    save_json(results, out / "results.json")
    bars = {"zero-shot pool (teacher)": mopd_results["zeroshot_pool"], "MoPD teacher": mopd_results}
    bars["PromptKD student (last)"] = student_results["last"]
    plot_base_novel(bars, out / "base_novel.png", title="MoPD teacher -> PromptKD student")
    return results


def _slim(results: dict[str, Any]) -> dict[str, Any]:
    return {k: results[k] for k in ("base", "novel", "hm", "zeroshot_pool", "top_k", "epochs", "loss_weights")}
