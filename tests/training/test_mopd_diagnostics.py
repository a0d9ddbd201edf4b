"""Gate diagnostics: frequency / mean weight / mass arithmetic, per-epoch history, plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from training.mopd.diagnostics import GateDiagnostics, GateStats, plot_gate


def test_stats_arithmetic_and_epoch_history(tmp_path: Path) -> None:
    stats = GateStats(4)
    # image 1 picks (0: 0.75, 2: 0.25); image 2 picks (2: 0.5, 3: 0.5)
    stats.update(torch.tensor([[0.75, 0.25], [0.5, 0.5]]), torch.tensor([[0, 2], [2, 3]]))
    assert stats.selected().tolist() == [0.5, 0.0, 1.0, 0.5]
    assert stats.mean_weight().tolist() == [0.75, 0.0, 0.375, 0.5]
    assert stats.mass().tolist() == [0.375, 0.0, 0.375, 0.25]
    summary = stats.summary(["a {}.", "b {}.", "c {}.", "d {}."])
    assert summary["images"] == 2 and summary["templates"][2] == {
        "index": 2, "template": "c {}.", "selected": 1.0, "mean_weight": 0.375, "mass": 0.375,
    }  # fmt: skip

    diag = GateDiagnostics(stats)
    metrics: dict[str, float] = {"epoch": 1}
    diag.on_epoch_end(None, metrics)  # type: ignore[arg-type]
    want = -sum(p * math.log(p) for p in (0.375, 0.375, 0.25))
    assert metrics["gate/mass_entropy"] == pytest.approx(want) and metrics["gate/top_mass"] == 0.375
    assert stats.images == 0  # reset for the next epoch
    state: dict[str, Any] = diag.state_dict()
    restored = GateDiagnostics(GateStats(4))
    restored.load_state_dict(state)
    assert restored.history == diag.history and len(restored.history) == 1
    out = plot_gate(summary, restored.history, tmp_path / "gate.png")
    assert out.stat().st_size > 1000
