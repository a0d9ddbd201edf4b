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
    assert all(r["service_flat_recall_at_1"] == 1.0 for r in ls)  # so does the service's exact snapshot
    http = json.loads((tmp_path / "labelsets.json").read_text())["http"]
    assert http["errors"] == 0 and all(s["n"] > 0 for s in http["sets"].values())
    text = render(tmp_path)
    assert "QUICK SMOKE RUN" in text and "| 10,000 |" in text and "No result yet" in text  # http/payoff absent


def test_peers_harness_records_why_peers_are_missing_and_measures_ours(tmp_path: Path) -> None:
    """Without the peers' virtualenv (and no install allowed) nothing is faked: the reason is recorded."""
    args = ["peers", "--quick", "--out", str(tmp_path), "--no-install", "--peers-venv", str(tmp_path / "none")]
    assert main(args) == 0
    doc = json.loads((tmp_path / "peers.json").read_text())
    assert "installing was not allowed" in doc["peers_unavailable"]
    assert set(doc["systems"]) == {"ours"} and [lv["concurrency"] for lv in doc["systems"]["ours"]] == [1, 4, 16]
    assert all(lv["ok"] > 0 and not lv["errors"] for lv in doc["systems"]["ours"])
    for lv in doc["systems"]["ours"]:  # steady-state windows: answers inside the measured 2 s only
        assert lv["window_s"] == {"warm_up": 0.5, "measured": 2.0}
        assert lv["throughput_rps"] == pytest.approx(lv["ok"] / 2.0)
    assert doc["in_process"]["images_per_s"] > 0 and doc["ours_c1_over_in_process"] > 0
    paired = doc["c1_paired"]  # the c=1 figures come from back-to-back pairs
    assert len(paired["rounds"]) == len(paired["p50_ratios"]) >= 1
    assert doc["ours_c1_over_in_process"] == paired["throughput_ratio_median"]
    assert doc["ours_c1_p50_over_in_process"] == paired["p50_ratio_median"] > 0
    assert doc["systems"]["ours"][-1]["admission_after"]["capacity"] >= 1
    assert doc["in_process"]["encode_b1_ms"] > 0 and doc["commit"]["sha"]  # the run names its commit
    text = render(tmp_path)
    assert "Peers not measured" in text and "GPU" in text and "Not measured" in text
    assert "back-to-back pairs" in text and f"commit `{doc['commit']['sha'][:7]}`" in text


def test_gpu_bench_refuses_without_cuda_and_writes_nothing(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the GPU benchmark would run for real")
    assert main(["gpu", "--quick", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "gpu.json").exists()


def test_towers_quick_run_serves_an_older_commit_beside_this_one_and_renders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20's figures run against this checkout and an export of an older commit (same bundle, public API)."""
    monkeypatch.setenv("BENCH_TOWERS_PARTS", "refresh,disconnect,lines")
    assert main(["towers", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "towers.json").read_text())
    for who in ("old", "new"):
        refresh = doc["refresh"][who]
        assert refresh["big_add"]["status"] == 201 and len(refresh["classify_b_status"]) == 12
        assert set(refresh["classify_b_status"]) == {200}  # every classify on b answered, whichever worker
        gone = doc["disconnect"][who]
        assert gone["batches_for_one_answered_request"] >= 1  # the counter read from /metrics moves
        assert gone["batches_before_disconnect"] >= 0 and gone["batches_after_disconnect"] >= 0
        assert doc["lines"][who]["total"] == sum(doc["lines"][who][d] for d in ("service", "models", "bench")) > 0
    text = render(tmp_path)
    assert "One engine, two towers" in text and "Lines of Python" in text and "Text-encoder batches" in text


def test_lifecycle_quick_run_reloads_migrates_through_kills_and_round_trips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness runs end to end; the counts it reports are the lifecycle's promises (never timings).
    Left out here: the rolling upgrade (3 replicas moved one by one: minutes even at --quick) and the
    ViT-B/32 text side (a bundle of hundreds of MB); ``python -m bench lifecycle`` runs them."""
    monkeypatch.setenv("BENCH_LIFECYCLE_PARTS", "reload,migrate,roundtrip,rates")
    monkeypatch.setenv("BENCH_LIFECYCLE_RATES", "tiny")
    assert main(["lifecycle", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "lifecycle.json").read_text())
    assert doc["reload"]["swap_outcome"] == "swapped" and doc["reload"]["failed_requests"] == 0
    assert doc["reload"]["readyz_not_200"] == 0
    assert doc["migrate"]["classes_lost"] == 0 and doc["migrate"]["complete"]
    assert doc["roundtrip"]["identical"]
    tiny = doc["rates"]["tiny"]
    assert tiny["served"] == tiny["names"] == 500 and tiny["names_per_s"] > 0 and "ViT-B-32" not in doc["rates"]
