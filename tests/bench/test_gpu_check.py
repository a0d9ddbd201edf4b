"""The GPU check runs end to end before a GPU is ever lent: ``--cpu-dry-run`` is the same code on the CPU.

Its numbers mean nothing and are not checked; the test proves every section runs against the
current models/ and service/ code (the project's towers in three precisions, the real server with
the precision gate under the multi-process load generator, class adds over HTTP, search), that the
result never poses as a GPU result, and that the report renders it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.gpu import DRY_PLAN, section

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"


@pytest.mark.slow
def test_cpu_dry_run_runs_every_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpu", "--cpu-dry-run", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "gpu.json").exists(), "a CPU run must never write the GPU result file"
    doc = json.loads((tmp_path / "gpu_dryrun.json").read_text())
    assert doc["dry_run"] is True and doc["machine"]["cuda_runtime"] is None
    for name in ("machine", "towers", "service", "faiss", "onnxruntime"):
        assert "error" not in doc[name], (name, doc[name].get("error"))
    for tower in ("student", "teacher"):
        rec = doc["towers"][tower]
        assert rec["fp32"]["b1"]["eager"]["images_per_s"] > 0
        for precision in ("fp16", "bf16"):
            parity = rec[precision]["parity_vs_fp32"]
            assert parity["n_images"] >= 2 and -1.0 <= parity["cosine_min"] <= 1.0 + 1e-6
    assert doc["towers"]["student"]["projector_dim"] == 64  # into the teacher's space
    service = doc["service"]
    assert service["server_exit_code"] == 0
    # the server's own precision gate decided (fp16 served, or fp32 after a refusal: the CPU's kernels say which)
    assert service["readyz"]["precision"].startswith(("fp16 (cosine_min", "fp32 (fp16 refused"))
    levels = service["levels"]
    assert [lv["concurrency"] for lv in levels] == list(DRY_PLAN.levels)
    assert all(lv["ok"] > 0 and not lv["errors"] for lv in levels), levels
    assert all(lv["gpu_busy"] == "not on this machine" for lv in levels)
    for n in DRY_PLAN.names:
        assert service["text"][f"http_{n}"]["names"] == n and "problem" not in service["text"][f"http_{n}"]
        assert service["text"][f"bare_{n}"]["names"] == n
    for n in DRY_PLAN.faiss_sizes:
        assert {"numpy_b1", "faiss_flat_b64"} <= set(doc["faiss"][f"n{n}"])
    assert doc["onnxruntime"]["onnxruntime_cuda"] == "not on this machine"
    printed = capsys.readouterr().out
    assert "DRY RUN ON CPU" in printed and "serve c=1" in printed
    rendered = "\n".join(section(doc))
    assert "DRY RUN ON CPU" in rendered and "student fp16" in rendered
    assert "Not measured yet" in "\n".join(section(None))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_refuses_without_cuda_and_writes_nothing(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the check would run for real")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "no CUDA device" in done.stderr and not out.exists()
