"""The run skeleton every trainer shares (PromptSRC teacher, PromptKD distillation, MoPD).

One order, written once: the run folder and its ``config.yaml``; the data, read and checked
*before* any model is built (a wrong path fails in seconds, not after a ViT-L/14 has loaded);
the backbone; the device; the :class:`~training.loop.Trainer` with the method's callbacks; and at
the end ``results.json`` and ``loss.png``. A trainer supplies only what differs: its model, its
training set, its evaluation and its bundle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from models.backbone import Backbone, configured_image_size, load_backbone
from training.benchmark import Benchmark, load_benchmark
from training.config import BackboneCfg, Cfg, DataCfg, LoopCfg, OptimCfg, save_config
from training.data import build_transform
from training.evaluate import plot_history, save_json
from training.loop import Callback, Trainer, pick_device

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
DEFAULT_IMAGE_SIZE = 224  # in-memory sources are rendered at the backbone's input size


@dataclass
class Run:
    """One training run's folder, data, backbone and device (see the module docstring)."""

    out: Path
    data: DataCfg
    loop: LoopCfg
    bench: Benchmark
    backbone: Backbone
    device: torch.device

    @classmethod
    def start(cls, cfg: Cfg, out: str | Path, backbone: BackboneCfg | Backbone, data: DataCfg, loop: LoopCfg) -> Run:
        """Folder + config, then data, then the backbone (``backbone`` may be a live one: tests, pipelines)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / CONFIG_FILE)
        if isinstance(backbone, Backbone):
            size = backbone.preprocess.size[0]
        else:
            size = configured_image_size(backbone.name) or DEFAULT_IMAGE_SIZE
        bench = load_benchmark(data, image_size=size)  # raises DataError before any model is built
        bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone.name, backbone.pretrained)
        if bb.preprocess.size[0] != size:  # only the built model knew its input size (hf-hub:, local-dir:)
            bench = load_benchmark(data, image_size=bb.preprocess.size[0])
        log.info("data: %d classes (%d base); backbone %s", len(bench.class_names), bench.n_base, bb.spec.name)
        return cls(out, data, loop, bench, bb, pick_device(loop.device))

    def transform(self, train: bool) -> Any:
        """The papers' train augmentation (with the data config's crop scale and flip) or the test transform."""
        if not train:
            return build_transform(self.backbone.preprocess, train=False)
        return build_transform(
            self.backbone.preprocess, train=True, min_scale=self.data.crop_scale_min, hflip=self.data.hflip
        )

    def trainer(self, method: nn.Module, dataset: Dataset[Any], optim: OptimCfg, callbacks: list[Callback]) -> Trainer:
        """The shared loop over ``dataset`` with the data config's batch size and workers."""
        return Trainer(method, dataset, optim, self.loop, self.out, batch_size=self.data.batch_size,
                       num_workers=self.data.num_workers, callbacks=callbacks)  # fmt: skip

    def finish(self, results: dict[str, Any], history: list[dict[str, float]], title: str) -> None:
        """``results.json`` and the loss curves (``loss.png``)."""
        save_json(results, self.out / RESULTS_FILE)
        plot_history(history, self.out / "loss.png", title=title)
