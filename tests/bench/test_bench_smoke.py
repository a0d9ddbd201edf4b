"""The benchmarks still run end to end (``--quick``: minimal sizes; their numbers are not checked).

Speed goals are reported in BENCHMARKS.md, never asserted here: this only proves that
``python -m bench`` works against the current models/ and service/ code and that its result files
render into a report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.report import render

pytestmark = pytest.mark.slow


def test_labelsets_and_encoders_quick_run_and_render(tmp_path: Path) -> None:
    assert main(["labelsets", "--quick", "--out", str(tmp_path)]) == 0
    assert main(["encoders", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("labelsets", "encoders"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["config"]["quick"] is True and doc["machine"]["logical_cpus"] >= 1
    enc = json.loads((tmp_path / "encoders.json").read_text())["results"][0]
    parity = enc["int8_parity_vs_fp32"]  # a figure that depends on the CPU's int8 kernels: reported, not judged
    assert enc["arch"] == "tiny" and -1.0 <= parity["cosine_min"] <= parity["cosine_mean"] <= 1.0 + 1e-6
    assert enc["sizes"]["int8_bytes"] < enc["sizes"]["fp32_bytes"]
    ls = json.loads((tmp_path / "labelsets.json").read_text())["results"]
    assert [r["n_classes"] for r in ls] == [1_000, 10_000]
    assert all(r["flat_recall_at_1_vs_numpy"] == 1.0 for r in ls)  # exact search agrees with numpy
    text = render(tmp_path)
    assert "QUICK SMOKE RUN" in text and "| 10,000 |" in text and "No result yet" in text  # http/payoff absent
