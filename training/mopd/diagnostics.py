"""Gate diagnostics: which hard prompts the gate picks, how often, and with what weight.

Per template p over a set of images:
- ``selected``: share of images whose top-k contains p (sums to k over the pool);
- ``mean_weight``: mean mixture weight of p when it is selected;
- ``mass``: share of the total mixture mass on p (sums to 1 over the pool).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from training.evaluate import pyplot, save_figure
from training.loop import Callback

if TYPE_CHECKING:
    from training.loop import Trainer


class GateStats:
    """Running counts of the gate's choices (feed it ``(weights [B, k], indices [B, k])``)."""

    def __init__(self, n_prompts: int) -> None:
        self.n_prompts = n_prompts
        self.reset()

    def reset(self) -> None:
        self.count = np.zeros(self.n_prompts, dtype=np.float64)  # times selected
        self.weight = np.zeros(self.n_prompts, dtype=np.float64)  # summed mixture weight
        self.images = 0

    def update(self, weights: torch.Tensor, indices: torch.Tensor) -> None:
        idx = indices.detach().reshape(-1).cpu().numpy()
        w = weights.detach().float().reshape(-1).cpu().numpy()
        np.add.at(self.count, idx, 1.0)
        np.add.at(self.weight, idx, w)
        self.images += int(indices.shape[0])

    def selected(self) -> np.ndarray:
        return self.count / max(self.images, 1)

    def mass(self) -> np.ndarray:
        return self.weight / max(self.images, 1)

    def mean_weight(self) -> np.ndarray:
        return np.divide(self.weight, self.count, out=np.zeros_like(self.weight), where=self.count > 0)

    def summary(self, templates: Sequence[str]) -> dict[str, Any]:
        """JSON-ready per-template table plus the number of images seen."""
        columns = zip(templates, self.selected(), self.mean_weight(), self.mass(), strict=True)
        rows = [
            {"index": i, "template": t, "selected": float(s), "mean_weight": float(mw), "mass": float(m)}
            for i, (t, s, mw, m) in enumerate(columns)
        ]
        return {"images": self.images, "templates": rows}


class GateDiagnostics(Callback):
    """Reads the model's training-time :class:`GateStats` each epoch; keeps a per-epoch history.

    Adds ``gate/mass_entropy`` (nats; log P = uniform, 0 = one template takes everything) and
    ``gate/top_mass`` (the largest single-template mass) to the epoch metrics.
    """

    def __init__(self, stats: GateStats) -> None:
        self.stats = stats
        self.history: list[dict[str, list[float]]] = []  # per epoch: {"selected": [P], "mass": [P], ...}

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        mass = self.stats.mass()
        selected, mean_weight = self.stats.selected().tolist(), self.stats.mean_weight().tolist()
        self.history.append({"selected": selected, "mass": mass.tolist(), "mean_weight": mean_weight})
        p = mass[mass > 0] / max(mass.sum(), 1e-12)
        metrics["gate/mass_entropy"] = float(-(p * np.log(p)).sum())
        metrics["gate/top_mass"] = float(mass.max()) if mass.size else 0.0
        self.stats.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


def plot_gate(
    summary: dict[str, Any], history: Sequence[dict[str, list[float]]], path: str | Path, title: str = ""
) -> Path:
    """Bars of selection frequency and mean weight per template, and the mass per epoch as a heatmap."""
    plt = pyplot()

    rows = summary["templates"]
    labels = [f"{r['index']}: {r['template'][:38]}" for r in rows]
    n = len(rows)
    fig, axes = plt.subplots(1, 2 if history else 1, figsize=(13 if history else 7, max(3.0, 0.32 * n + 1.5)))
    ax = axes[0] if history else axes
    y = np.arange(n)
    ax.barh(y - 0.2, [r["selected"] for r in rows], 0.4, label="selected (share of images)")
    ax.barh(y + 0.2, [r["mean_weight"] for r in rows], 0.4, label="mean weight when selected")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "gate selection")
    if history:
        grid = np.array([h["mass"] for h in history]).T  # [P, epochs]
        im = axes[1].imshow(grid, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("template index")
        axes[1].set_xticks(range(grid.shape[1]), [str(i + 1) for i in range(grid.shape[1])], fontsize=6)
        axes[1].set_title("mixture mass per epoch (training)")
        fig.colorbar(im, ax=axes[1])
    return save_figure(fig, path)
