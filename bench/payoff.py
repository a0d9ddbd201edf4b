"""The PromptKD payoff: serve-time image-tower throughput of the student vs the teacher.

Student = ViT-B/16 + deep visual prompts (4 tokens, depth 9) + projector 512 -> 768, exactly the
tower the distill export ships; teacher = ViT-L/14 + deep visual prompts (4 tokens, depth 9), the
PromptSRC tower it was distilled from. Random weights (none exist offline; speed does not depend on
the values), torch eager on CPU, batch 1 and 8. ViT-L/14 needs about 1 s per image on 2 cores, so
the iteration counts are small. The student is also timed through ONNX Runtime (fp32 and dynamic
int8), which is how the service runs it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchCfg, ort_session, real_photos, save_figure, set_threads, time_call, write_result

log = logging.getLogger(__name__)

STUDENT, TEACHER = "ViT-B-16", "ViT-L-14"
PROMPT_TOKENS, PROMPT_DEPTH = 4, 9


def _tower(arch: str, projector_to: int | None) -> Any:
    import torch

    import models  # noqa: F401  (torchvision shim before open_clip)
    from models.backbone import load_backbone
    from models.heads import Projector, ProjectorCfg
    from models.prompts import PromptedImageEncoder, VisualPromptCfg
    from models.towers import ImageTower

    torch.manual_seed(0)
    backbone = load_backbone(arch)
    encoder = PromptedImageEncoder(backbone.model, VisualPromptCfg(n_tokens=PROMPT_TOKENS, depth=PROMPT_DEPTH))
    projector = Projector(ProjectorCfg(encoder.output_dim, projector_to)) if projector_to else None
    return ImageTower(encoder, projector).eval(), backbone.preprocess


def _time_torch(tower: Any, pixels: Any, batch: int, iters: int, cfg: BenchCfg) -> dict[str, float]:
    import torch

    x = pixels[:batch].contiguous()

    def fwd() -> None:
        with torch.inference_mode():
            tower(x)

    t = time_call(fwd, iters=iters, warmup=1, max_seconds=cfg.max_seconds)
    return {**t.summary(), "images_per_s": batch * 1000.0 / t.median_ms}


def _time_ort(session: Any, pixels: np.ndarray, batch: int, iters: int, cfg: BenchCfg) -> dict[str, float]:
    x = pixels[:batch]
    t = time_call(lambda: session.run(["embedding"], {"pixels": x}), iters=iters, warmup=1, max_seconds=cfg.max_seconds)
    return {**t.summary(), "images_per_s": batch * 1000.0 / t.median_ms}


def run(cfg: BenchCfg) -> dict[str, Any]:
    import torch

    from models.onnx_export import export_image_tower, quantize_image_tower
    from models.preprocess import preprocess_batch

    set_threads(cfg.threads)
    teacher, pre = _tower(TEACHER, None)
    student, pre_s = _tower(STUDENT, projector_to=teacher.encoder.output_dim)
    photos = real_photos(mirror=False)
    pixels = torch.from_numpy(preprocess_batch(photos[:8], pre))  # both towers take 224x224
    assert pre_s.size == pre.size
    batches = (1,) if cfg.quick else (1, 8)
    res: dict[str, Any] = {"student": {}, "teacher": {}}
    for b in batches:
        res["student"][f"torch_eager@b{b}"] = _time_torch(student, pixels, b, 2 if cfg.quick else 10, cfg)
        res["teacher"][f"torch_eager@b{b}"] = _time_torch(teacher, pixels, b, 1 if cfg.quick else 4, cfg)
        log.info(
            "b%d: student %.1f img/s, teacher %.2f img/s",
            b,
            res["student"][f"torch_eager@b{b}"]["images_per_s"],
            res["teacher"][f"torch_eager@b{b}"]["images_per_s"],
        )
    if not cfg.quick:
        with tempfile.TemporaryDirectory(prefix="pd-bench-kd-") as tmp:
            spec = export_image_tower(student, Path(tmp), pixels[:4])
            quantize_image_tower(Path(tmp) / spec.file, Path(tmp) / "int8.onnx", pixels, min_cosine=-1.0)
            for name, file in (("ort_fp32", spec.file), ("ort_int8", "int8.onnx")):
                session = ort_session(Path(tmp) / file, cfg.threads)
                for b in batches:
                    res["student"][f"{name}@b{b}"] = _time_ort(session, pixels.numpy(), b, 10, cfg)
    speed = {who: {b: res[who][f"torch_eager@b{b}"]["images_per_s"] for b in batches} for who in res}
    ratios = {f"b{b}": speed["student"][b] / speed["teacher"][b] for b in batches}
    payload = {
        "goal": "student >= 3.5x teacher serve-time throughput",
        "student": f"{STUDENT} + visual prompts {PROMPT_TOKENS}x depth {PROMPT_DEPTH} + projector -> 768",
        "teacher": f"{TEACHER} + visual prompts {PROMPT_TOKENS}x depth {PROMPT_DEPTH}",
        "weights": "random init (seed 0)",
        "params": {
            "student": sum(p.numel() for p in student.parameters()),
            "teacher": sum(p.numel() for p in teacher.parameters()),
        },
        "student_over_teacher_torch": ratios,
        "results": res,
    }
    write_result("payoff", payload, cfg)
    _plot(res, cfg)
    return payload


def _plot(res: dict[str, Any], cfg: BenchCfg) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, vals = [], []
    for who in ("teacher", "student"):
        for key, rec in res[who].items():
            labels.append(f"{who}\n{key}")
            vals.append(rec["images_per_s"])
    ax.bar(range(len(vals)), vals, color=["tab:red" if lab.startswith("teacher") else "tab:blue" for lab in labels])
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_ylabel("images / s")
    ax.set_title(f"serve-time image tower: student {STUDENT} vs teacher {TEACHER} ({cfg.threads} threads)")
    return save_figure(fig, "payoff", cfg)
