"""``bench gpu``'s service section: ``promptdistill serve`` on the GPU under HTTP load, and class adds.

The bundle is PromptKD-shaped (random weights): the student image tower (ViT-B/16, depth-9 visual
prompts, projector into the teacher's space) and the teacher's ViT-L/14 text side with depth-9 text
prompts, 100 ImageNet class names, written by the project's exporter (probe images included).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchCfg, real_photos

log = logging.getLogger(__name__)
NOT_HERE = "not on this machine"
SET_NAMES = 100


def class_names(n: int) -> list[str]:
    """``n`` distinct class names: ImageNet's 1,000, then the same with a qualifier each."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    base = list(dict.fromkeys(IMAGENET_CLASSNAMES))
    words = ("toy", "drawing", "sculpture", "photo", "painting", "cartoon", "plush", "origami", "tattoo", "model")
    names = base + [f"{w} {b}" for w in words for b in base]
    return names[:n]


def build_bundle(plan: Any, out: Path) -> tuple[Path, Any]:
    """Write the PromptKD-shaped bundle; returns it and the text encoder (on the plan's device)."""
    import torch

    from bench.gpu import embed_dim
    from models.backbone import load_backbone
    from models.class_vectors import encode_class_names
    from models.heads import Projector, ProjectorCfg
    from models.prompts import PromptedImageEncoder, PromptedTextEncoder, TextPromptCfg, VisualPromptCfg
    from training.export import ImageParts, TextParts, assemble_bundle, label_set, write_bundle

    torch.manual_seed(0)
    student, teacher = load_backbone(plan.student), load_backbone(plan.teacher)
    encoder = PromptedImageEncoder(student.model, VisualPromptCfg(n_tokens=4, depth=plan.depth))
    projector = Projector(ProjectorCfg(encoder.output_dim, embed_dim(plan.teacher))).eval()
    text_cfg = TextPromptCfg(n_tokens=4, depth=plan.depth, init="a photo of a")
    text = PromptedTextEncoder(teacher.model, teacher.tokenizer, text_cfg).to(plan.device).eval()
    names = class_names(SET_NAMES)
    vectors = encode_class_names(text, names, ["{}."]).cpu()
    bundle = assemble_bundle(
        ImageParts(student, encoder, projector),
        {"default": vectors},
        [label_set("default", names)],
        text=TextParts(teacher, text, ["{}."]),
        producer={"method": "bench-gpu (random weights)"},
    )
    write_bundle(bundle, out)
    return out, text


class BusySampler:
    """GPU utilisation (NVML: share of time a kernel ran) sampled in a thread, averaged over a window."""

    def __init__(self, cuda: bool) -> None:
        self.samples: list[tuple[float, float]] = []
        self.how = NOT_HERE
        self._stop = threading.Event()
        self._read: Callable[[], float] | None = None
        if cuda:
            self._read, self.how = _utilisation_reader()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._read is not None and not self._stop.wait(0.1):
            try:
                self.samples.append((time.time(), self._read()))
            except Exception:  # noqa: BLE001 - a failed sample is skipped
                continue

    def mean(self, start: float, end: float) -> float | str:
        inside = [u for t, u in self.samples if start <= t <= end]
        return round(float(np.mean(inside)) / 100.0, 3) if inside else self.how

    def stop(self) -> None:
        self._stop.set()


def _utilisation_reader() -> tuple[Callable[[], float] | None, str]:
    try:
        import torch

        torch.cuda.utilization(0)
        return (lambda: float(torch.cuda.utilization(0))), "torch.cuda.utilization (NVML)"
    except Exception:  # noqa: BLE001 - no pynvml: fall back to nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None, NOT_HERE

    def smi() -> float:
        q = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        return float(subprocess.run(q, capture_output=True, text=True, timeout=5).stdout.split()[0])

    return smi, "nvidia-smi utilization.gpu"


def jpeg_payloads() -> list[bytes]:
    """One real photo per request, JPEG q90 as base64 JSON (what a client sends)."""
    out = []
    for photo in real_photos(mirror=False):
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=90)
        out.append(json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()], "top_k": 5}).encode())
    return out


def text_bare(text: Any, plan: Any, clock: Any) -> dict[str, Any]:
    """The project's class-vector function on the text tower alone (no service): names/s."""
    from models.class_vectors import encode_class_names

    out: dict[str, Any] = {}
    for n in plan.names:
        if clock.left() < 10:
            out[f"bare_{n}"] = "skipped: time box"
            continue
        names = class_names(n)
        encode_class_names(text, names[:64], ["{}."])  # warm-up
        t0 = time.perf_counter()
        encode_class_names(text, names, ["{}."])
        _sync(plan)
        seconds = time.perf_counter() - t0
        out[f"bare_{n}"] = {"names": n, "seconds": seconds, "names_per_s": n / seconds}
    return out


def text_http(url: str, plan: Any, clock: Any) -> dict[str, Any]:
    """Label sets of 1k / 10k names created over HTTP (1,000 names a request, the request limit)."""
    from service.client import Client, ServiceClientError

    out: dict[str, Any] = {}
    with Client(url, timeout_s=600.0) as client:
        for n in plan.names:
            names, set_name = class_names(n), f"bench-{n}"
            done, problem = 0, None
            t0 = time.perf_counter()
            for start in range(0, n, 1000):
                if clock.left() < 5:
                    problem = "stopped: time box"
                    break
                chunk = names[start : start + 1000]
                try:
                    if start == 0:
                        client.create_label_set(set_name, chunk)
                    else:
                        client.add_classes(chunk, set_name)
                except ServiceClientError as e:
                    problem = f"HTTP {e.status}: {e.detail[:300]}"
                    break
                done += len(chunk)
            seconds = time.perf_counter() - t0
            out[f"http_{n}"] = {"names": done, "seconds": seconds, "names_per_s": done / seconds if done else 0.0}
            if problem:
                out[f"http_{n}"]["problem"] = problem
    return out


def _sync(plan: Any) -> None:
    if plan.cuda:
        import torch

        torch.cuda.synchronize()


def service_section(plan: Any, rec: Any, cfg: BenchCfg) -> Callable[[Any, dict[str, Any]], None]:
    def run(clock: Any, out: dict[str, Any]) -> None:
        import httpx2

        from bench.gpu import best
        from bench.gpu_load import load_window
        from bench.harness import ServerProcess

        with tempfile.TemporaryDirectory(prefix="pd-bench-gpu-") as tmp_name:
            tmp = Path(tmp_name)
            t0 = time.monotonic()
            bundle, text = build_bundle(plan, tmp / "bundle")
            out["bundle_build_s"] = round(time.monotonic() - t0, 1)
            out["text"] = text_bare(text, plan, clock)
            del text
            rec.save()
            env = {
                "PROMPTDISTILL_BACKEND": "torch",
                "PROMPTDISTILL_DEVICE": plan.device,
                "PROMPTDISTILL_PRECISION": "fp16",
                "PROMPTDISTILL_MAX_BATCH_SIZE": "64",
                "PROMPTDISTILL_DECODE_WORKERS": "12" if plan.cuda else "2",
                "PROMPTDISTILL_MAX_LABELS_PER_REQUEST": "1000",
            }
            out["server_env"] = env
            server_log = tmp / "server.log"
            server = ServerProcess.serve(
                bundle, tmp / "state", env=env, threads=4 if plan.cuda else 1, log=server_log
            ).start()
            busy = BusySampler(plan.cuda)
            try:
                server.wait_ready(timeout_s=max(30.0, clock.left() - 30))
                ready = httpx2.get(server.url + "/readyz", timeout=30.0)  # the checks' body: not in the client's API
                out["readyz"] = ready.json().get("checks", {}) if ready.status_code == 200 else ready.text[:500]
                payloads = jpeg_payloads()
                bare = rec.payload.get("towers", {}).get("student", {}).get("fp16", {})
                bare_best = best(bare)[0] if isinstance(bare, dict) else float("nan")
                out["levels"] = []
                for c in plan.levels:
                    if clock.left() < sum(plan.window) + 15:
                        out["levels"].append({"concurrency": c, "skipped": "time box"})
                        continue
                    warm_s, measure_s = plan.window
                    level = load_window(server.port, c, payloads, warm_s, measure_s, processes=min(8, c))
                    level["gpu_busy"] = busy.mean(*level["window_epoch"])
                    level["ratio_vs_bare_best"] = level["images_per_s"] / bare_best if bare_best else None
                    out["levels"].append(level)
                    log.info("serve c=%d: %.0f img/s p50 %.1f ms p99 %.1f ms busy %s", c, level["images_per_s"],
                             level["p50_ms"], level["p99_ms"], level["gpu_busy"])  # fmt: skip
                    rec.save()
                out["gpu_busy_source"] = busy.how
                out["text"] |= text_http(server.url, plan, clock)
            finally:
                busy.stop()
                out["server_exit_code"] = server.stop()
                out["server_log_tail"] = server_log.read_text(errors="replace")[-3000:]
                shutil.copyfile(server_log, cfg.out_dir / "gpu_server.log")

    return run
