"""The documented paper-scale configs at their real model sizes, end to end (issue 24.3).

Unchanged configs (training/configs/promptkd/teacher.yaml, _distill.yaml, MoPD's defaults)
except: random weights (``pretrained none``), a tiny synthetic CoOp-split dataset (4 classes,
2 train + 1 test image each), one epoch, and a step cap (``loop.max_steps_per_epoch=1``).

PromptSRC on ViT-L/14 (depth 9, 60 templates) -> teacher bundle -> PromptKD distillation of
ViT-B/16 (depth-9 prompts + projector) -> bundle with ONNX -> ``serve`` -> classify -> a runtime
class added through the ViT-L/14 text side. Then MoPD at ViT-B/16 -> bundle with ONNX -> the
same serving checks. Each stage's wall time, CPU time and peak memory go to
``paper_scale.json`` (``$PAPER_SCALE_REPORT`` names another path) and to the test log.
"""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.bundle import Bundle, load_bundle
from models.towers import build_image_tower
from promptdistill.cli import main
from service.client import Client
from tests.reliability.conftest import start_server, stop_server

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs" / "promptkd"
CLASSES = ["apple_pie", "ankle_boot", "bee", "cat"]  # base: the first two (ceil(4/2))
NAMES = [c.replace("_", " ") for c in CLASSES]


def _dataset(root: Path) -> Path:
    """A CoOp split (split_zhou_*.json layout) of random-colour photos and its dataset config."""
    rng = np.random.default_rng(0)
    split: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        for part, count in (("train", 2), ("test", 1)):
            for k in range(count):
                rel = f"{name}/{part}{k}.png"
                (root / "images" / name).mkdir(parents=True, exist_ok=True)
                pixels = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "images" / rel)
                split[part].append([rel, label, name])
    (root / "split.json").write_text(json.dumps(split))
    config = root / "dataset.yaml"
    config.write_text(f"data:\n  kind: coop_split\n  root: {root / 'images'}\n  split_file: {root / 'split.json'}\n")
    return config


class Report:
    """Per-stage wall time, CPU time (this process + finished children) and peak RSS."""

    def __init__(self, path: Path) -> None:
        self.path, self.stages, self.facts = path, {}, {}  # type: ignore[var-annotated]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cpu0, wall0 = _cpu_s(), time.perf_counter()
        yield
        entry = {"wall_s": round(time.perf_counter() - wall0, 1), "cpu_s": round(_cpu_s() - cpu0, 1)}
        entry["peak_rss_gib_so_far"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        self.stages[name] = entry
        log.warning("paper-scale %s: %s", name, entry)
        self.write()

    def write(self) -> None:
        load = os.getloadavg()
        body = {"stages": self.stages, **self.facts, "loadavg_at_end": [round(v, 1) for v in load]}
        self.path.write_text(json.dumps(body, indent=2))


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    path = Path(os.environ.get("PAPER_SCALE_REPORT") or tmp_path_factory.mktemp("report") / "paper_scale.json")
    return Report(path)


def _sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


CAP = ("optim.epochs=1", "loop.max_steps_per_epoch=1", "loop.progress=false", "loop.tensorboard=false")


def _step_seconds(run: Path) -> float:
    rows = (run / "history.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    return float(last[header.index("epoch_seconds")])


def _onnx_parity(bundle: Bundle, pixels: np.ndarray) -> float:
    import onnxruntime as ort

    spec = bundle.manifest.image_encoder.onnx[0]
    session = ort.InferenceSession(str(bundle.path(spec.file)), providers=["CPUExecutionProvider"])
    got = session.run([spec.output_name], {spec.input_name: pixels})[0]
    with torch.no_grad():
        want = build_image_tower(bundle)(torch.from_numpy(pixels)).numpy()
    return float(np.abs(got - want).max())


def _photo_bytes(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((48, 48, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(bundle: Bundle, n: int = 2) -> np.ndarray:
    h, w = bundle.manifest.image_encoder.preprocess.size
    return np.random.default_rng(1).standard_normal((n, 3, h, w)).astype(np.float32)  # [n, 3, H, W]


def _serve_and_add(bundle_dir: Path, work: Path, report: Report, key: str) -> dict[str, Any]:
    """serve -> classify -> add "brick_wall" through the text side -> classify; returns memory figures."""
    work.mkdir(parents=True, exist_ok=True)
    with report.stage(f"{key}: serve start-up"):
        server = start_server(bundle_dir, work)
    try:
        with Client(server.url, timeout_s=300) as client:
            first = client.classify_bytes([_photo_bytes(7)], top_k=len(NAMES))
            added = client.add_classes(["brick_wall"])
            after = client.classify_bytes([_photo_bytes(7)], top_k=len(NAMES) + 1)
        status = _proc_status(server.proc.pid)
    finally:
        stop_server(server)
    assert {p["label"] for p in first["results"][0]["predictions"]} == set(NAMES), first
    assert [c["name"] for c in added["classes"]] == ["brick wall"]  # spelled as training spells names
    assert {p["label"] for p in after["results"][0]["predictions"]} == {*NAMES, "brick wall"}, after
    return {"serve_peak_rss_gib": status["VmHWM"], "serve_rss_after_requests_gib": status["VmRSS"]}


def _proc_status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = round(int(value.split()[0]) / 2**20, 2)  # kB -> GiB
    return out


def test_promptkd_paper_configs_end_to_end(tmp_path: Path, report: Report) -> None:
    data = _dataset(tmp_path / "data")
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    with report.stage("promptkd: teacher (PromptSRC ViT-L/14, depth 9, 60 templates)"):
        args = ["--config", str(CONFIGS / "teacher.yaml"), "--data-config", str(data)]
        assert (
            main(["train", "teacher", *args, *_sets("backbone.pretrained=none", *CAP), "--out", str(teacher_dir)]) == 0
        )
    report.facts["teacher_step_s"] = _step_seconds(teacher_dir)
    teacher = load_bundle(teacher_dir / "bundle")
    m = teacher.manifest
    assert m.backbones["teacher"].name == "ViT-L-14-quickgelu" and m.embed_dim == 768
    assert (m.image_encoder.prompts.depth, m.image_encoder.prompts.n_tokens) == (9, 4)
    assert m.text_encoder is not None and (m.text_encoder.prompts.depth, m.text_encoder.prompts.n_tokens) == (9, 4)
    assert teacher.prompts["image"].shape == (9, 4, 1024) and teacher.prompts["text"].shape == (9, 4, 768)
    assert teacher.class_vectors["default"].shape == (4, 768)

    with report.stage("promptkd: distill ViT-B/16 (depth 9 + projector) with ONNX"):
        args = ["--config", str(CONFIGS / "_distill.yaml"), "--data-config", str(data), "--onnx"]
        sets = _sets("student.pretrained=none", f"teacher_dir={teacher_dir}", *CAP)
        assert main(["train", "distill", *args, *sets, "--out", str(student_dir)]) == 0
    report.facts["student_step_s"] = _step_seconds(student_dir)
    bundle = load_bundle(student_dir / "bundle")
    m = bundle.manifest
    assert m.backbones["student"].name == "ViT-B-16-quickgelu"
    assert (m.image_encoder.prompts.depth, m.image_encoder.prompts.n_tokens) == (9, 4)
    assert bundle.prompts["image"].shape == (9, 4, 768)
    assert m.image_encoder.projector is not None and (m.image_encoder.projector.in_dim, m.embed_dim) == (512, 768)
    assert bundle.class_vectors["default"].shape == (4, 768)
    assert torch.allclose(bundle.class_vectors["default"], teacher.class_vectors["default"], atol=1e-6)
    text_ref = m.backbones["teacher"]
    assert text_ref.name == "ViT-L-14-quickgelu" and text_ref.towers == "text" and text_ref.weights_file
    assert not any(k.startswith("visual.") for k in load_file(bundle.path(text_ref.weights_file)))
    assert [c.name for c in bundle.label_set().classes] == NAMES
    with report.stage("promptkd: ONNX parity (torch tower vs the bundle's graph)"):
        diff = _onnx_parity(bundle, _pixels(bundle))
    assert diff <= 1e-4, diff
    report.facts["promptkd_bundle_mib"] = round(sum(p.stat().st_size for p in bundle.root.rglob("*")) / 2**20)  # type: ignore[union-attr]
    report.facts["promptkd_serve"] = _serve_and_add(student_dir / "bundle", tmp_path / "serve", report, "promptkd")
    report.write()


def test_mopd_paper_config_end_to_end(tmp_path: Path, report: Report) -> None:
    data = _dataset(tmp_path / "data")
    out = tmp_path / "mopd"
    with report.stage("mopd: train ViT-B/16 (12-template pool) with ONNX"):
        sets = _sets(
            "backbone.pretrained=none", "data.kind=coop_split", f"data.root={data.parent / 'images'}",
            f"data.split_file={data.parent / 'split.json'}", "export.onnx=true", *CAP,
        )  # fmt: skip
        assert main(["train", "mopd", *sets, "--out", str(out)]) == 0
    report.facts["mopd_step_s"] = _step_seconds(out)
    bundle = load_bundle(out / "bundle")
    m = bundle.manifest
    assert m.backbones["clip"].name == "ViT-B-16-quickgelu" and m.embed_dim == 512
    assert m.text_encoder is not None and (m.text_encoder.prompts.n_tokens, m.text_encoder.prompts.depth) == (4, 1)
    assert bundle.class_vectors["default"].shape == (4, 512)
    with report.stage("mopd: ONNX parity"):
        diff = _onnx_parity(bundle, _pixels(bundle))
    assert diff <= 1e-4, diff
    report.facts["mopd_serve"] = _serve_and_add(out / "bundle", tmp_path / "serve", report, "mopd")
    report.write()
