"""Shared benchmark plumbing: timing, machine description, real photos, result files."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

import models  # noqa: F401  (torchvision shim before any benchmark imports open_clip)

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "models" / "configs" / "tiny-clip.json"
MEASURED_PATHS = ("service", "models")  # the code every benchmark measures (plus its own module in bench/)

# scikit-image photographs that ship in the wheel (no download); grey ones are replicated to RGB.
_SKIMAGE_PHOTOS = (
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "clock",
    "brick",
    "grass",
    "gravel",
)


@dataclass(frozen=True)
class BenchCfg:
    """Knobs every benchmark shares."""

    threads: int = 2  # torch / ONNX Runtime / FAISS intra-op threads
    quick: bool = False  # smoke run: minimal iterations, small sizes; numbers are not meaningful
    max_seconds: float = 20.0  # time budget per timed measurement (after warm-up)
    out_dir: Path = RESULTS


@dataclass
class Timing:
    """Wall-clock samples of one measured call, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    def summary(self) -> dict[str, float]:
        s = self.samples_ms
        return {
            "n": len(s),
            "median_ms": self.median_ms,
            "mean_ms": float(np.mean(s)),
            "min_ms": float(np.min(s)),
            "p95_ms": self.percentile(95),
        }


def time_call(fn: Callable[[], Any], *, iters: int, warmup: int = 1, max_seconds: float = 20.0) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then up to ``iters`` times or until ``max_seconds`` pass."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    deadline = time.perf_counter() + max_seconds
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        timing.samples_ms.append((time.perf_counter() - t0) * 1000.0)
        if time.perf_counter() > deadline:
            break
    return timing


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including the load average (other work disturbs timings)."""
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    pkgs = ("torch", "onnxruntime", "onnxruntime-gpu", "faiss-cpu", "faiss-gpu", "numpy", "open_clip_torch")
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "packages": {p: v for p in pkgs if (v := _pkg(p))},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def git_commit() -> dict[str, Any] | None:
    """The checkout a run measured: HEAD, and whether the measured code had uncommitted changes."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--", *MEASURED_PATHS, "bench/*.py"))  # code, not results
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"sha": head, "dirty": dirty}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def photo_jpegs(n: int | None = None, size: tuple[int, int] | None = None, mirror: bool = True) -> list[bytes]:
    """The first ``n`` real photos (all: None) as JPEG (quality 90), resized to ``size`` (None: as shipped)."""
    import io

    out = []
    for photo in real_photos(mirror=mirror)[:n]:
        buf = io.BytesIO()
        (photo.convert("RGB") if size is None else photo.convert("RGB").resize(size)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def real_photos(mirror: bool = True) -> list[Any]:
    """Real photographs shipped in scikit-learn / scikit-image (PIL RGB), plus their mirror images."""
    from PIL import Image, ImageOps

    from models.samples import sample_photos

    photos = [p.convert("RGB") for p in sample_photos()]
    try:
        from skimage import data
    except ImportError:
        log.warning("scikit-image missing: only %d photos", len(photos))
    else:
        for name in _SKIMAGE_PHOTOS:
            arr = np.asarray(getattr(data, name)())
            photos.append(Image.fromarray(arr).convert("RGB"))
        left, _right, _disparity = getattr(data, "stereo_motorcycle")()  # noqa: B009 - untyped in skimage
        photos.append(Image.fromarray(np.asarray(left)).convert("RGB"))
    if mirror:
        photos += [ImageOps.mirror(p) for p in photos]
    return photos


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def part_run() -> dict[str, Any]:
    """Which code ran one part of a benchmark whose parts run separately, when, and how loaded the
    machine was as it started (the renderer prints it beside the part's figures)."""
    sha = str((git_commit() or {}).get("sha", ""))[:7]
    return {
        "commit": sha,
        "time_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_1m_start": round(os.getloadavg()[0], 2),
    }


def with_part_run(part: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """A kept part from a file written before parts named their own run: the file's commit and time."""
    if "ran" in part:
        return part
    sha = str((doc.get("commit") or {}).get("sha", ""))[:7]
    return {**part, "ran": {"commit": sha, "time_utc": doc["machine"]["time_utc"], "load_1m_start": None}}


def write_result(name: str, payload: dict[str, Any], cfg: BenchCfg) -> Path:
    """``<out_dir>/<name>.json`` with the machine description and the config attached."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "commit": git_commit(),
        "machine": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        **payload,
    }
    path = cfg.out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    log.info("wrote %s", path)
    return path


def save_figure(fig: Any, name: str, cfg: BenchCfg) -> Path:
    path = cfg.out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log.info("wrote %s", path)
    return path
