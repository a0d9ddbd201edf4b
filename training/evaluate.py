"""Metrics, result files and plots for base-to-novel evaluation (algorithms.md §0, §1.5).

Accuracy is top-1 in percent. Base test images are classified among base classes only, novel
among novel only (callers pass the logits restricted to the subset's rows). HM = 2BN/(B+N).
Averages over datasets use the HM of the averaged base and novel accuracies, as the papers do.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training.precision import choose_precision

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset[Any],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 100,
    num_workers: int = 0,
    amp: bool = False,
    desc: str = "predicting",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``logits_fn`` over a dataset in order; returns (logits [M, C] float32 CPU, labels [M]).

    A progress bar with an ETA shows on a terminal (not in logs); ``amp`` follows the training
    loop's per-device precision (training/precision.py)."""
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    autocast = choose_precision(device, amp).autocast
    outs, labels = [], []
    bar = tqdm(total=len(dataset), desc=desc, unit="img", disable=None, leave=False)  # type: ignore[arg-type]
    for images, ys in loader:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            outs.append(logits_fn(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(ys))
        bar.update(len(images))
    bar.close()
    return torch.cat(outs), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return float((logits.argmax(dim=-1) == labels).float().mean().item() * 100.0)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None) -> list[float | None]:
    """Top-1 accuracy (percent) per class id; ``None`` for classes without test images."""
    n = n_classes if n_classes is not None else int(logits.shape[-1])
    pred = logits.argmax(dim=-1)
    out: list[float | None] = []
    for c in range(n):
        mask = labels == c
        out.append(float((pred[mask] == c).float().mean().item() * 100.0) if mask.any() else None)
    return out


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def base_novel_result(base: float, novel: float, **extra: Any) -> dict[str, Any]:
    """``{"base", "novel", "hm", ...extra}``."""
    return {"base": base, "novel": novel, "hm": harmonic_mean(base, novel), **extra}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample std (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def summarize_seeds(
    results: Sequence[Mapping[str, Any]], keys: Iterable[str] = ("base", "novel", "hm", "accuracy")
) -> dict[str, Any]:
    """Mean/std over seeds of each numeric key present in every result (base/novel/HM, or the
    all-class ``accuracy`` of the cross-dataset protocol); HM also recomputed from the mean B and N."""
    out: dict[str, Any] = {k: mean_std([float(r[k]) for r in results]) for k in keys if all(k in r for r in results)}
    if "base" in out and "novel" in out:
        out["hm_of_means"] = harmonic_mean(out["base"]["mean"], out["novel"]["mean"])
    return out


def average_over_datasets(per_dataset: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The papers' "Average" row: mean base, mean novel, HM of those two means."""
    base = float(np.mean([v["base"] for v in per_dataset.values()]))
    novel = float(np.mean([v["novel"] for v in per_dataset.values()]))
    return base_novel_result(base, novel)


def save_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default))
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic | torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: no display needed)


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (training runs headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write as PNG (100 dpi) and close a matplotlib figure; returns the path."""
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    pyplot().close(fig)
    return out


def plot_history(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Loss curves (every ``train/*`` column) and, on a second axis, any ``*acc*`` columns per epoch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [h["epoch"] for h in history]
    for key in sorted({k for h in history for k in h if k.startswith("train/")}):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-3)
    acc_keys = sorted({k for h in history for k in h if "acc" in k})
    if acc_keys:
        ax2 = ax.twinx()
        for key in acc_keys:
            ax2.plot(epochs, [h.get(key, np.nan) for h in history], linestyle="--", label=key)
        ax2.set_ylabel("accuracy (%)")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "training")
    return save_figure(fig, path)


def plot_base_novel(results: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Grouped bars of base / novel / HM for each named result (e.g. teacher, student)."""
    plt = pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(names) + 2), 4))
    width = 0.25
    x = np.arange(len(names))
    for i, key in enumerate(("base", "novel", "hm")):
        vals = [results[n][key] for n in names]
        bars = ax.bar(x + (i - 1) * width, vals, width, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, names)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.set_title(title or "base-to-novel")
    return save_figure(fig, path)
