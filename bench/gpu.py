"""``python -m bench gpu``: the GPU paths, checked and timed on a CUDA machine (batch 1-64).

* ONNX Runtime, CUDA execution provider, fp32 and fp16 graphs, with I/O binding (inputs copied to
  the device once, outputs kept there): checks the provider really runs (not a silent CPU fallback)
  and that fp16/fp32 embeddings agree with the CPU provider (cosine).
* ONNX Runtime TensorRT execution provider, where the build offers it.
* torch on cuda: the same open_clip image tower, fp32 and fp16 autocast.
* FAISS GPU: exact inner-product top-k over 100k / 1M class vectors (d = 512) vs the CPU index.

Without CUDA (no torch CUDA device and no CUDA provider in ONNX Runtime) it writes nothing and
exits with status 2 and a message: GPU figures are never estimated from CPU runs.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchCfg, write_result

log = logging.getLogger(__name__)

BATCHES = (1, 8, 16, 32, 64)
ARCH = "ViT-B-32"


def cuda_status() -> tuple[bool, str]:
    """Whether this machine can run the GPU benchmark, and what it found."""
    import onnxruntime as ort
    import torch

    providers = ort.get_available_providers()
    found = f"torch.cuda.is_available()={torch.cuda.is_available()}, onnxruntime providers={providers}"
    return torch.cuda.is_available() and "CUDAExecutionProvider" in providers, found


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


def bench_onnx(onnx_path: Path, tmp: Path, pixels: np.ndarray, iters: int) -> dict[str, Any]:
    import onnxruntime as ort

    cpu = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = cpu.run(None, {cpu.get_inputs()[0].name: pixels[:8]})[0]
    graphs = {"fp32": onnx_path}
    try:
        graphs["fp16"] = fp16_graph(onnx_path, tmp / "image_fp16.onnx")
    except ImportError as e:
        log.warning("no fp16 graph (%s): pip install onnxconverter-common", e)
    providers = ["CUDAExecutionProvider"]
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        providers.append("TensorrtExecutionProvider")
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
            log.info("%s %s: %s", provider, precision, {k: v for k, v in rec.items() if k.startswith("b")})
    return out


def bench_torch(bundle_dir: Path, pixels: np.ndarray, iters: int) -> dict[str, Any]:
    import torch

    from models.bundle import load_bundle
    from models.towers import build_towers

    tower, _ = build_towers(load_bundle(bundle_dir), "cuda")
    tower.eval()
    out: dict[str, Any] = {}
    for precision in ("fp32", "fp16_autocast"):
        rec = {}
        for b in BATCHES:
            x = torch.from_numpy(np.ascontiguousarray(pixels[:b])).cuda()

            def call(x: Any = x, half: bool = precision != "fp32") -> Any:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
                    return tower(x)

            timing = _time(call, torch.cuda.synchronize, iters)
            rec[f"b{b}"] = {**timing, "images_per_s": b * 1000.0 / timing["median_ms"]}
        out[precision] = rec
    return out


def bench_faiss(iters: int) -> dict[str, Any]:
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return {"skipped": "this FAISS build has no GPU support (faiss-gpu 1.15.1 needs a CUDA 12 runtime)"}
    res = faiss.StandardGpuResources()
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for n in (100_000, 1_000_000):
        x = rng.standard_normal((n, 512), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        cpu = faiss.IndexFlatIP(512)
        cpu.add(x)
        gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
        for b in BATCHES:
            q = np.ascontiguousarray(x[:b])

            def search(q: np.ndarray = q, index: Any = gpu) -> Any:
                return index.search(q, 5)

            timing = _time(search, lambda: None, iters)
            agree = float((gpu.search(q, 5)[1] == cpu.search(q, 5)[1]).all(axis=1).mean())
            out[f"n{n}_b{b}"] = {**timing, "top5_identical_vs_cpu": agree}
    return out


def run(cfg: BenchCfg) -> int:
    ok, found = cuda_status()
    if not ok:
        log.error("no CUDA here (%s): nothing measured, nothing written. Run `python -m bench gpu` on a "
                  "CUDA machine with the gpu flavour installed (make install FLAVOUR=gpu).", found)  # fmt: skip
        return 2
    from bench.common import real_photos
    from bench.http_load import build_bundle
    from models.bundle import load_bundle
    from models.preprocess import preprocess_batch

    iters = 5 if cfg.quick else 30
    with tempfile.TemporaryDirectory(prefix="pd-bench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        bundle_dir = build_bundle(ARCH, tmp / "bundle")
        bundle = load_bundle(bundle_dir)
        photos = real_photos()
        pre = bundle.manifest.image_encoder.preprocess.to_config()
        pixels = preprocess_batch([photos[i % len(photos)] for i in range(max(BATCHES))], pre)  # [64, 3, H, W]
        onnx_path = bundle_dir / bundle.manifest.image_encoder.onnx[0].file
        payload = {
            "arch": ARCH,
            "devices": found,
            "onnxruntime": bench_onnx(onnx_path, tmp, pixels, iters),
            "torch_cuda": bench_torch(bundle_dir, pixels, iters),
            "faiss_gpu": bench_faiss(iters),
        }
    write_result("gpu", payload, cfg)
    return 0
