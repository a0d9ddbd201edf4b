"""MoPD run configuration: the method part plus the shared backbone / data / optim / loop parts.

Defaults follow algorithms.md §2.4: ViT-B/16 (OpenAI), 16 shots per base class, batch 128, SGD
lr 0.002 with one constant warm-up epoch then cosine, and the per-dataset (w, w2, k, epochs) row
of ``mopd.dataset`` (custom datasets: w 0.8, w2 0.1, k 2, 25 epochs). Anything set in the config
file or with ``--set`` wins over those defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg, deep_merge
from training.mopd.defaults import defaults_for
from training.mopd.loss import MoPDLossCfg
from training.mopd.model import MoPDModelCfg


class MoPDCfg(Cfg):
    """The method: pool, loss weights, student prompt. ``None`` = the dataset's §2.4 default."""

    dataset: str = "custom"  # benchmark name (any spelling) selects the pool and the defaults
    pool: str = "dataset"  # dataset | generic | mixed | nonsense | a benchmark name | a file (one template per line)
    w: float | None = Field(default=None, ge=0, le=1)  # CE weight; MPD gets 1 - w
    w2: float | None = Field(default=None, ge=0)  # MPS weight
    top_k: int | None = Field(default=None, ge=1)  # teachers kept per image
    temperature: float = Field(default=1.0, gt=0)
    n_ctx: int = Field(default=4, ge=1)
    ctx_init: str | None = "a photo of a"  # None: random N(0, 0.02) context
    logit_scale: float | None = Field(default=None, gt=0)  # None: the backbone's (100 for OpenAI CLIP)

    def model_cfg(self) -> MoPDModelCfg:
        k = self.top_k if self.top_k is not None else defaults_for(self.dataset).top_k
        return MoPDModelCfg(n_ctx=self.n_ctx, ctx_init=self.ctx_init, top_k=k, logit_scale=self.logit_scale)

    def loss_cfg(self) -> MoPDLossCfg:
        d = defaults_for(self.dataset)
        return MoPDLossCfg(
            w=self.w if self.w is not None else d.w,
            w2=self.w2 if self.w2 is not None else d.w2,
            temperature=self.temperature,
        )


class MoPDExportCfg(Cfg):
    bundle: bool = True  # write a serving bundle (learned prompt text side) into out_dir/bundle
    onnx: bool = False  # also export the image tower to ONNX (parity-checked)


DEFAULT_BACKBONE = {"name": "ViT-B-16-quickgelu", "pretrained": "openai"}  # the papers' student


class MoPDRunCfg(Cfg):
    """``promptdistill train mopd`` config file (YAML/JSON) schema."""

    backbone: BackboneCfg = BackboneCfg(**DEFAULT_BACKBONE)
    data: DataCfg
    optim: OptimCfg
    loop: LoopCfg = Field(default_factory=lambda: LoopCfg.model_validate({}))
    mopd: MoPDCfg = Field(default_factory=MoPDCfg)
    export: MoPDExportCfg = Field(default_factory=MoPDExportCfg)
    out_dir: Path | None = None  # --out wins

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """Fill MoPD's batch size, shots, lr and per-dataset epochs under whatever the user set."""
        if not isinstance(data, dict):
            return data
        dataset = _dataset_of(data.get("mopd"))
        base = {
            "data": {"shots": 16, "batch_size": 128},
            "optim": {"lr": 0.002, "epochs": defaults_for(dataset).epochs, "warmup_epochs": 1, "warmup_lr": 1e-5},
        }
        return deep_merge(base, with_default_backbone(data, "backbone", DEFAULT_BACKBONE))


def with_default_backbone(data: dict[str, Any], key: str, default: dict[str, str]) -> dict[str, Any]:
    """``--set backbone.pretrained=none`` alone keeps the default architecture (it would otherwise
    replace the whole default entry and fail for want of a name); a given name keeps its own weights."""
    given = data.get(key)
    if isinstance(given, dict) and "name" not in given:
        return {**data, key: {**default, **given}}
    return data


def _dataset_of(mopd: Any) -> str:
    """``mopd.dataset`` from a raw dict or an already-built MoPDCfg (before validation)."""
    if isinstance(mopd, MoPDCfg):
        return mopd.dataset
    return str((mopd or {}).get("dataset", "custom"))
