"""Offline MoPD experiments on real images (scikit-learn digits) with a briefly pre-trained tiny CLIP.

``python -m training.mopd.experiment --out DIR`` (about 2-4 minutes on 2 CPU cores):

1. A tiny CLIP (models/configs/tiny-clip.json) is pre-trained CLIP-style on the digits' train
   split, as in the PromptKD demo (training/demo.py), standing in for web-scale pre-training.
2. ``mopd``: MoPD with the generic 12-template pool on the 16-shot base digits (zero..four);
   base / novel / HM against the pool's zero-shot ensemble on the same frozen CLIP and against
   ``coop`` (the same student trained with CE only: w = 1, w2 = 0).
3. ``noisy_pool``: the same, but the first half of the pool is noise (its class rows shifted
   cyclically, so each noisy template names the wrong digit); reports the share of the trained
   gate's mixture mass on the clean half over the base test images (0 at step 0).

Writes ``DIR/summary.json`` and each run's usual outputs under ``DIR/mopd`` and ``DIR/noisy_pool``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from models.backbone import Backbone, load_backbone
from models.prompts import PromptedTextEncoder
from models.staging import staged_file
from training.benchmark import Benchmark, digits_benchmark
from training.config import load_config
from training.data import build_transform
from training.evaluate import save_json
from training.loop import Trainer, pick_device
from training.mopd.config import MoPDRunCfg
from training.mopd.model import MoPDModel, build_prompt_bank
from training.mopd.trainer import gate_on, train, train_transform
from training.pools import GENERIC_POOL

log = logging.getLogger(__name__)
TINY = Path(__file__).resolve().parents[2] / "models" / "configs" / "tiny-clip.json"


def pretrained_tiny_clip(cache: Path, seed: int = 1, epochs: int = 6) -> tuple[Backbone, Benchmark]:
    """The PromptKD demo's CLIP-style pre-training (reused, not copied) of a tiny random CLIP.

    The weights are cached in ``cache`` (a safetensors file) and reused by later runs.
    """
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    bb = load_backbone(str(TINY))
    bench = digits_benchmark(bb.preprocess.size[0])
    if cache.is_file():
        bb.model.load_state_dict(load_file(cache))
        return bb, bench
    demo: Any = importlib.import_module("training.demo")  # a CLI-level module; keep it out of type checking
    demo.pretrain_clip(bb, bench, demo.DemoCfg(seed=seed, pretrain_epochs=epochs, progress=False), "tiny CLIP")
    with staged_file(cache) as tmp:  # a reader never sees a half-written cache; mode follows the umask
        save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, tmp)
    return bb, bench


def run_cfg(out: Path, epochs: int, lr: float, extra: list[str] | None = None) -> MoPDRunCfg:
    return load_config(MoPDRunCfg, None, [*(extra or []),
        f"backbone.name={TINY}", "backbone.pretrained=null", "data.kind=digits", "data.batch_size=16",
        "data.crop_scale_min=0.6", "data.hflip=false",  # digits: big crops and no mirroring, as in the demo
        f"optim.epochs={epochs}", f"optim.lr={lr}", "loop.progress=false", "loop.resume=false", f"out_dir={out}",
    ])  # fmt: skip


def noisy_pool(bb: Backbone, bench: Benchmark, cfg: MoPDRunCfg, out: Path) -> dict[str, Any]:
    """MoPD whose first half of the pool names the wrong class; returns gate mass on the clean half."""
    names = bench.names("base")
    bank = build_prompt_bank(PromptedTextEncoder(bb.model, bb.tokenizer), names, GENERIC_POOL)  # [12, 5, D]
    half = len(GENERIC_POOL) // 2
    shifts = [1 + p % (len(names) - 1) for p in range(half)]
    scrambled = torch.stack([bank[p].roll(s, dims=0) for p, s in zip(range(half), shifts, strict=True)])
    bank = torch.cat([scrambled, bank[half:]])
    torch.manual_seed(cfg.loop.seed)
    model = MoPDModel(bb, names, bank, cfg.mopd.model_cfg(), cfg.mopd.loss_cfg())
    train_tf = train_transform(bb.preprocess, cfg.data)
    ds = bench.dataset("train", "base", train_tf, cfg.data.shots, cfg.loop.seed)
    Trainer(model, ds, cfg.optim, cfg.loop, out, batch_size=cfg.data.batch_size).fit()
    test = bench.dataset("test", "base", build_transform(bb.preprocess, train=False))
    stats = gate_on(model, test, pick_device(cfg.loop.device), 100)
    clean = float(stats.mass()[half:].sum())
    log.info("noisy pool: %.1f%% of the gate's mass on the clean templates", 100 * clean)
    return {"clean_mass": clean, "per_template": stats.summary(GENERIC_POOL)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mopd-experiment")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--pretrain-epochs", type=int, default=6)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    t0 = time.perf_counter()
    cache = out / f"pretrained-{args.pretrain_epochs}ep.safetensors"
    bb, bench = pretrained_tiny_clip(cache, epochs=args.pretrain_epochs)
    run = train(run_cfg(out / "mopd", args.epochs, args.lr), out / "mopd", backbone=bb)
    coop_cfg = run_cfg(out / "coop", args.epochs, args.lr, ["mopd.w=1.0", "mopd.w2=0.0"])  # CE only = CoOp
    coop = train(coop_cfg, out / "coop", backbone=bb)
    summary: dict[str, Any] = {
        "mopd": {k: run.results[k] for k in ("base", "novel", "hm")},
        "coop": {k: coop.results[k] for k in ("base", "novel", "hm")},
        "zeroshot_pool": run.results["zeroshot_pool"],
        "noisy_pool": noisy_pool(bb, bench, run_cfg(out / "noisy_pool", args.epochs, args.lr), out / "noisy_pool"),
        "epochs": args.epochs,
        "lr": args.lr,
        "pretrain_epochs": args.pretrain_epochs,
        "seconds": time.perf_counter() - t0,
    }
    save_json(summary, out / "summary.json")
    log.info("summary: %s", {k: v for k, v in summary.items() if k != "noisy_pool"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
