"""``bench gpu``'s ONNX Runtime section: the CUDA and TensorRT execution providers, where they exist.

With I/O binding (inputs copied to the device once, outputs kept there), fp32 and fp16 graphs of a
ViT-B/32 zero-shot bundle (random weights): checks that the provider really runs (not a silent CPU
fallback) and that its embeddings agree with the CPU provider (cosine). The GPU machines this
project borrows ship the CPU build of ONNX Runtime: there the section says "not on this machine".
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NOT_HERE = "not on this machine"
BATCHES = (1, 8, 16, 32, 64)
ARCH = "ViT-B-32"


def _time(fn: Callable[[], Any], sync: Callable[[], None], iters: int) -> dict[str, float]:
    for _ in range(3):
        fn()
    sync()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return {"median_ms": float(np.median(samples)), "min_ms": float(np.min(samples)), "n": iters}


def fp16_graph(src: Path, dst: Path) -> Path:
    """The fp32 ONNX graph converted to fp16 (inputs/outputs stay fp32, so callers do not change)."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst), save_as_external_data=True)
    return dst


def ort_bound(path: Path, provider: str, pixels: np.ndarray, iters: int) -> tuple[dict[str, float], np.ndarray]:
    """Timing with I/O binding on device 0, and the embeddings (for parity)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[provider, "CPUExecutionProvider"])
    used = session.get_providers()[0]
    if used != provider:
        raise RuntimeError(f"{provider} requested but ONNX Runtime runs {used}")
    x = ort.OrtValue.ortvalue_from_numpy(pixels, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input(session.get_inputs()[0].name, x)
    binding.bind_output(session.get_outputs()[0].name, "cuda", 0)
    timing = _time(lambda: session.run_with_iobinding(binding), binding.synchronize_outputs, iters)
    return timing, binding.copy_outputs_to_cpu()[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def bench_onnx(onnx_path: Path, tmp: Path, pixels: np.ndarray, providers: list[str], iters: int) -> dict[str, Any]:
    import onnxruntime as ort

    cpu = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = cpu.run(None, {cpu.get_inputs()[0].name: pixels[:8]})[0]
    graphs = {"fp32": onnx_path}
    try:
        graphs["fp16"] = fp16_graph(onnx_path, tmp / "image_fp16.onnx")
    except ImportError as e:
        log.warning("no fp16 graph (%s): pip install onnxconverter-common", e)
    out: dict[str, Any] = {}
    for provider in providers:
        for precision, path in graphs.items():
            rec: dict[str, Any] = {}
            for b in BATCHES:
                timing, emb = ort_bound(path, provider, np.ascontiguousarray(pixels[:b]), iters)
                rec[f"b{b}"] = {**timing, "images_per_s": b * 1000.0 / timing["median_ms"]}
                if b == 8:
                    rec["cosine_min_vs_cpu_fp32"] = _cosine(emb, ref)
            out[f"{provider}:{precision}"] = rec
    return out


def onnxruntime_section(plan: Any) -> Callable[[Any, dict[str, Any]], None]:
    def run(clock: Any, out: dict[str, Any]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            out["onnxruntime"] = NOT_HERE
            return
        available = ort.get_available_providers()
        wanted = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p in available]
        out["providers"] = available
        out["onnxruntime_cuda"] = "measured" if "CUDAExecutionProvider" in wanted else NOT_HERE
        out["tensorrt"] = "measured" if "TensorrtExecutionProvider" in wanted else NOT_HERE
        if not plan.cuda or not wanted:
            return
        from bench.common import real_photos
        from bench.http_load import build_bundle
        from models.bundle import load_bundle
        from models.preprocess import preprocess_batch

        with tempfile.TemporaryDirectory(prefix="pd-bench-gpu-ort-") as tmp_name:
            tmp = Path(tmp_name)
            bundle = load_bundle(build_bundle(ARCH, tmp / "bundle"))
            photos = real_photos()
            pre = bundle.manifest.image_encoder.preprocess.to_config()
            pixels = preprocess_batch([photos[i % len(photos)] for i in range(max(BATCHES))], pre)
            onnx_path = tmp / "bundle" / bundle.manifest.image_encoder.onnx[0].file
            out["arch"] = ARCH
            out["results"] = bench_onnx(onnx_path, tmp, pixels, wanted, 20)

    return run
