"""One training loop for every method; evaluation, logging and checkpoints are callbacks.

A *method* is an ``nn.Module`` whose ``forward(images, labels)`` returns a dict with a scalar
``"loss"`` (plus any other scalars to log) and which exposes ``trainable_parameters()``. Frozen
parts (teachers, backbones) keep ``requires_grad=False`` and override ``train()`` to stay in eval.

Conventions (Dassl, algorithms.md §0): SGD, constant warm-up epoch(s) at ``warmup_lr`` then
cosine over ``epochs``, scheduler stepped once per epoch; the train loader drops the last
incomplete batch when the set holds at least one full batch.

Determinism / resume: the loader's shuffling and worker seeds come from a generator seeded with
(seed, epoch); the checkpoint written after each epoch holds the trainable state (parameters
with ``requires_grad`` and the buffers of modules that own one, e.g. BatchNorm statistics),
optimiser, scheduler, grad scaler, all RNG states, callback states and the epoch. Resuming from
it therefore yields bit-identical weights to an uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.staging import staged_file
from training.config import LoopCfg, OptimCfg
from training.precision import choose_precision, log_precision

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY_CSV = "history.csv"


# ----------------------------------------------------------------------------------------------
# Pieces used by the loop


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params: dict[str, nn.Parameter], cfg: OptimCfg) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("the method has no trainable parameters")
    return torch.optim.SGD(list(params.values()), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimCfg) -> torch.optim.lr_scheduler.LRScheduler:
    """Dassl's ConstantWarmupScheduler + CosineAnnealingLR(T_max=epochs), stepped per epoch.

    Epochs ``0..W-1`` run at ``warmup_lr``; epoch ``e >= W`` runs at the cosine value of step
    ``e - W`` with ``T_max = epochs`` (as in Dassl, the cosine does not reach 0 by the last epoch).
    """
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, SequentialLR

    cosine = CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.warmup_epochs == 0:
        return cosine
    warm = ConstantLR(optimizer, factor=cfg.warmup_lr / cfg.lr, total_iters=cfg.warmup_epochs)
    return SequentialLR(optimizer, [warm, cosine], milestones=[cfg.warmup_epochs])


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with ``requires_grad`` plus buffers of the modules owning such parameters."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, mod in module.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        if not any(p.requires_grad for p in own.values()):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        out |= {prefix + k: p.detach().clone() for k, p in own.items() if p.requires_grad}
        out |= {prefix + k: b.detach().clone() for k, b in mod.named_buffers(recurse=False) if b is not None}
    return out


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    _missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"state has keys the model lacks: {unexpected[:5]}")
    absent = set(trainable_state(module)) - set(state)
    if absent:
        raise KeyError(f"state lacks trainable entries: {sorted(absent)[:5]}")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Callbacks


class Callback:
    """Hooks called by :class:`Trainer`. Stateful callbacks round-trip through checkpoints."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Called after each epoch; may add entries to ``metrics`` (they get logged)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called once after the last epoch (also when resuming a finished run)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class EvalCallback(Callback):
    """Runs ``evaluate(method) -> {name: value}`` every ``every`` epochs and on the last one."""

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float]], every: int = 1) -> None:
        self.evaluate, self.every = evaluate, every

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        epoch = int(metrics["epoch"])
        if epoch % self.every == 0 or epoch == trainer.optim_cfg.epochs:
            metrics.update(self.evaluate(trainer.method))


class BestState(Callback):
    """Keeps the trainable state of the epoch with the best ``metric`` (first best on ties)."""

    def __init__(self, metric: str, mode: str = "max") -> None:
        self.metric, self.sign = metric, (1.0 if mode == "max" else -1.0)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            return
        value = self.sign * float(metrics[self.metric])
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, int(metrics["epoch"])
            self.state = trainable_state(trainer.method)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.state = state["best"], state["best_epoch"], state["state"]


class MetricsLogger(Callback):
    """Appends each epoch's metrics to ``history.csv`` and TensorBoard (``tb/``)."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.out_dir, self.tensorboard = out_dir, tensorboard
        self._writer: Any = None

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        write_history_row(self.out_dir / HISTORY_CSV, metrics)
        if self.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out_dir / "tb"))
            for k, v in metrics.items():
                if k != "epoch":
                    self._writer.add_scalar(k, v, int(metrics["epoch"]))
            self._writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_history_row(path: Path, row: dict[str, float]) -> None:
    """Append ``row`` to a CSV, rewriting the header when new columns appear."""
    rows = read_history(path) if path.exists() else []
    rows.append(dict(row))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def read_history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Trains ``method`` on ``dataset``; see the module docstring for the contract."""

    def __init__(
        self,
        method: nn.Module,
        dataset: Dataset[Any],
        optim_cfg: OptimCfg,
        loop_cfg: LoopCfg,
        out_dir: str | Path,
        *,
        batch_size: int = 8,
        num_workers: int = 0,
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.device = pick_device(loop_cfg.device)
        self.method = method.to(self.device)
        self.dataset, self.optim_cfg, self.cfg = dataset, optim_cfg, loop_cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.batch_size, self.num_workers = batch_size, num_workers
        params = method.trainable_parameters()  # type: ignore[operator]
        self.optimizer = build_optimizer(params, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg)
        self.precision = choose_precision(self.device, loop_cfg.amp)
        log_precision(self.device, self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.grad_scaler)
        self.callbacks = [*(callbacks or []), MetricsLogger(self.out_dir, loop_cfg.tensorboard)]
        self.state = TrainState()

    def loader(self, epoch: int) -> DataLoader[Any]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=self.num_workers,
            drop_last=len(self.dataset) >= self.batch_size,  # type: ignore[arg-type]
            pin_memory=self.device.type == "cuda",
        )

    def fit(self) -> TrainState:
        """Train the remaining epochs (resuming when a checkpoint exists and ``resume`` is on)."""
        ckpt = self.out_dir / CHECKPOINT
        if self.cfg.resume and ckpt.exists():
            self.load_checkpoint(ckpt)
            log.info("resumed from %s at epoch %d", ckpt, self.state.epoch)
        else:
            seed_everything(self.cfg.seed)
        while self.state.epoch < self.optim_cfg.epochs:
            metrics = self.train_epoch(self.state.epoch)
            self.state.epoch += 1
            metrics["epoch"] = self.state.epoch
            for cb in self.callbacks:
                cb.on_epoch_end(self, metrics)
            self.state.history.append(metrics)
            log.info("epoch %d/%d %s", self.state.epoch, self.optim_cfg.epochs, _fmt(metrics))
            if self.cfg.checkpoint:
                self.save_checkpoint(ckpt)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.state

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.method.train()
        sums: dict[str, float] = {}
        n = 0
        lr = self.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        loader = self.loader(epoch)
        total = len(loader) if self.cfg.max_steps_per_epoch is None else min(len(loader), self.cfg.max_steps_per_epoch)
        # The bar is fed by hand: handed the loader, some tqdm classes call iter() on it eagerly
        # and the loop's own iteration then starts a second set of workers (tqdm#1598).
        bar = tqdm(
            total=total, desc=f"epoch {epoch + 1}/{self.optim_cfg.epochs}", disable=not self.cfg.progress, leave=False
        )
        for images, labels in loader:
            out = self.step(images, labels)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}")
            if n >= total:
                break
        bar.close()
        self.scheduler.step()
        metrics = {f"train/{k}": v / max(n, 1) for k, v in sums.items()}
        metrics |= {"lr": float(lr), "epoch_seconds": time.perf_counter() - t0}
        return metrics

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimiser step; returns the method's scalars as floats."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        autocast = self.precision.autocast
        with torch.autocast(self.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = self.method(images, labels)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.state.step}; lower optim.lr or disable amp"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.step += 1
        return {k: float(v.detach()) for k, v in out.items() if v.ndim == 0}

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        payload = {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "history": self.state.history,
            "model": trainable_state(self.method),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "callbacks": {key: cb.state_dict() for key, cb in self._keyed_callbacks()},
        }
        with staged_file(path) as tmp:  # next to path: a crash mid-save keeps the previous checkpoint
            torch.save(payload, tmp)

    def _keyed_callbacks(self) -> list[tuple[str, Callback]]:
        """Callbacks keyed by class name and occurrence ("BestState#0"), stable across runs."""
        seen: dict[str, int] = {}
        out = []
        for cb in self.callbacks:
            name = type(cb).__name__
            out.append((f"{name}#{seen.get(name, 0)}", cb))
            seen[name] = seen.get(name, 0) + 1
        return out

    def load_checkpoint(self, path: Path) -> None:
        payload = torch.load(path, map_location="cpu", weights_only=False)  # our own file
        load_trainable_state(self.method, payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        for key, cb in self._keyed_callbacks():
            if key in payload["callbacks"]:
                cb.load_state_dict(payload["callbacks"][key])
        self.state = TrainState(payload["epoch"], payload["step"], payload["history"])


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch")
