"""Typed, validated run configs: one pydantic model per component, composed per command.

A run config is loaded from YAML or JSON and any field can be overridden on the command line
with dotted paths, e.g. ``--set optim.lr=0.01 --set data.root=/data/dtd``. Values are parsed
as YAML scalars (``1e-3``, ``true``, ``null``, ``[1, 2]``). Unknown keys are errors.

Components (each constructor takes only its own part):
``BackboneCfg`` (which CLIP), ``DataCfg`` (where images come from), ``OptimCfg`` (SGD + cosine
with a constant warm-up epoch, Dassl conventions), ``LoopCfg`` (seed, device, precision, logs).
Method configs (``PromptSRCCfg``, ``DistillCfg``, MoPD's) live next to their methods and are
composed into run configs with the generic :func:`load_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

C = TypeVar("C", bound=BaseModel)


class Cfg(BaseModel):
    """Base for all config parts: unknown keys are errors; assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneCfg(Cfg):
    name: str  # open_clip arch name, model-config JSON path, local-dir:, hf-hub:
    pretrained: str | None = None  # tag ("openai"), local weights file, or None (random init)


class DataCfg(Cfg):
    """Where labeled / unlabeled images come from.

    kind:
      * ``image_folder``: ``root/train/<class>/*`` and ``root/test/<class>/*``;
      * ``coop_split``: ``split_file`` (CoOp JSON) with image paths relative to ``root``;
      * ``csv``: ``train_csv`` / ``test_csv`` (``path,label[,classname]``) relative to ``root``;
      * ``digits``: scikit-learn's digits, upscaled (offline demo and tests);
      * ``imagenet_variant``: a test-only ImageNet variant (``variant``: v2 | sketch | a | r) read
        as CoOp's readers do, class names from ImageNet's ``classnames_file`` (training/variants.py);
      * ``fashion_mnist``: the IDX files of Debian's dataset-fashion-mnist under ``root``.
    """

    kind: Literal["image_folder", "coop_split", "csv", "digits", "imagenet_variant", "fashion_mnist"] = "image_folder"
    variant: Literal["v2", "sketch", "a", "r"] | None = None  # imagenet_variant only
    root: Path | None = None
    split_file: Path | None = None
    train_csv: Path | None = None
    test_csv: Path | None = None
    # CSV: one class name per line in label-id order; image_folder: "<folder> <class name>" lines
    classnames_file: Path | None = None
    unlabeled_root: Path | None = None  # distillation: extra unlabeled image folder (all of it is used)
    # distillation: a service's capture folder (service/capture.py): its training part joins the unlabeled
    # images; its held-out tenth (models/captures.py) is never read; the list is fixed at the run's start
    capture_dir: Path | None = None
    shots: int = Field(default=16, ge=0)  # labeled images per class for prompt tuning; 0 = all
    batch_size: int = Field(default=8, ge=1)
    test_batch_size: int = Field(default=100, ge=1)
    num_workers: int = Field(default=0, ge=0)
    crop_scale_min: float = Field(default=0.08, gt=0, le=1)  # RandomResizedCrop scale=(min, 1) for training
    hflip: bool = True  # random horizontal flip for training (the papers' default)
    check_images: bool = False  # open every image once up front and drop unreadable ones
    digits_test_fraction: float = Field(default=0.3, gt=0, lt=1)  # digits only: held-out share per class
    # fashion_mnist only: keep this many images per class (seeded, first N of a fixed shuffle); None = all
    subsample_train: int | None = Field(default=None, ge=1)
    subsample_test: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _paths_for_kind(self) -> DataCfg:
        need = {
            "image_folder": ["root"],
            "coop_split": ["root", "split_file"],
            "csv": ["train_csv", "test_csv"],
            "digits": [],
            "imagenet_variant": ["root", "classnames_file", "variant"],
            "fashion_mnist": ["root"],
        }
        missing = [k for k in need[self.kind] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"data.kind={self.kind!r} needs data.{', data.'.join(missing)}")
        return self


class OptimCfg(Cfg):
    """SGD with cosine decay after constant warm-up epochs (Dassl defaults, stepped per epoch)."""

    lr: float = Field(default=0.005, gt=0)
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    epochs: int = Field(default=20, ge=1)
    warmup_epochs: int = Field(default=1, ge=0)
    warmup_lr: float = Field(default=1e-5, gt=0)  # constant lr during warm-up ("constant" warm-up type)


class LoopCfg(Cfg):
    seed: int = 1
    device: str = "auto"  # "auto" = cuda when available, else cpu
    amp: bool = False  # mixed precision where the device has it (training/precision.py): fp16 + scaler on
    # CUDA, bf16 on CPUs with native bf16, fp32 on other CPUs; the choice and its reason are logged
    progress: bool = True  # tqdm bars
    tensorboard: bool = True
    eval_every: int = Field(default=1, ge=1)  # epochs between evaluations
    checkpoint: bool = True  # save a resumable checkpoint after every epoch
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists
    max_steps_per_epoch: int | None = Field(default=None, ge=1)  # cap (smoke tests / quick looks)


# The fields of ``DataCfg`` that say *which* data a run sees. A dataset file given with
# ``--data-config`` contributes only these; how a method samples and loads that data (shots, batch
# sizes, augmentation) stays the method config's, so e.g. _distill.yaml's ``shots: 0`` can never
# replace teacher.yaml's 16 shots.
DATASET_FIELDS = frozenset(
    {
        "kind",
        "variant",
        "root",
        "split_file",
        "train_csv",
        "test_csv",
        "classnames_file",
        "unlabeled_root",
        "capture_dir",
        "digits_test_fraction",
        "subsample_train",
        "subsample_test",
    }
)


def dataset_fields(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a ``data`` section into (dataset fields, method fields such as shots / batch size)."""
    return (
        {k: v for k, v in data.items() if k in DATASET_FIELDS},
        {k: v for k, v in data.items() if k not in DATASET_FIELDS},
    )


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["optim.lr=0.01", "data.root=/x"]`` -> nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    out: dict[str, Any] = dict(data)
    base = out.pop("_base_", None)  # optional inheritance: "_base_: ../common.yaml"
    if base:
        out = deep_merge(read_config_file(path.parent / base), out)
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build ``cls`` from a YAML/JSON file (optional) plus dotted overrides; errors name the field."""
    data = read_config_file(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ValueError(f"invalid config{where}:\n{e}") from e


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (what actually ran) as YAML."""
    Path(path).write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
