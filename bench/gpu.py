"""``python -m bench gpu``: the GPU check, sized to fit one short GPU loan (about 8 minutes of work).

Sections, each time-boxed and written to ``gpu.json`` as soon as it ends (a run cut short still
leaves what it measured):

* ``machine``: GPU name, driver, torch / CUDA / cuDNN versions, the packages the check found.
* ``towers``: the student tower (ViT-B/16 + depth-9 visual prompts + the PromptKD projector) and
  the teacher tower (ViT-L/14 + depth-9 prompts), random weights, through the project's own
  :class:`models.towers.ImageTower`, in fp32, fp16 and bf16 (the precision gate's casts,
  models/precision.py), batch 1 to 256, eager and replayed as a CUDA graph (``torch.compile`` for the
  student's fp16 tower where time is left): images/s and latency per batch (CUDA events), and each
  reduced precision's cosine vs fp32 on the probe images.
* ``service``: ``promptdistill serve --backend torch --device cuda --precision fp16`` on a PromptKD-
  shaped bundle (that student, ViT-L/14 text side), loaded over HTTP with real JPEGs at c = 1/16/64
  from several client processes (bench/gpu_load.py): images/s, p50/p99, GPU busy fraction (NVML
  utilisation sampled during the window), the ratio to the bare student tower of the same run, and
  what the service's own precision gate measured (``/readyz``); then class adds of 1k and 10k names
  through its ViT-L/14 text side over HTTP, and the bare text tower on the same names (names/s).
* ``faiss``: CPU FAISS exact (and IVF) top-5 over 100k and 1M class vectors beside the GPU encoder;
  numpy exact search where FAISS is not installed.
* ``onnxruntime``: the CUDA / TensorRT execution providers where the installed ONNX Runtime has
  them (bench/gpu_ort.py); FAISS GPU where the FAISS build has it. Missing ones are reported as
  "not on this machine", never estimated.

Without CUDA it writes nothing and exits with status 2. ``--cpu-dry-run`` runs the same code on
the CPU with tiny models and sizes (``gpu_dryrun.json``; its numbers mean nothing): the check is
tested before a GPU is ever lent. ``GPU_CHECK_SCALE`` (default 1) scales every section's time box
for a shorter or longer loan.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import TINY_CONFIG, BenchCfg, real_photos, write_result

log = logging.getLogger(__name__)
NOT_HERE = "not on this machine"


@dataclass(frozen=True)
class Plan:
    """What one run measures: the real GPU sizes, or tiny ones for the CPU dry run."""

    device: str
    student: str
    teacher: str
    depth: int  # visual and text prompt depth (PromptKD: 9)
    batches: tuple[int, ...]
    levels: tuple[int, ...]  # HTTP concurrency
    window: tuple[float, float]  # warm-up, measured seconds per level
    names: tuple[int, ...]  # class adds
    faiss_sizes: tuple[int, ...]
    budget_s: dict[str, float]  # per section

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


GPU_PLAN = Plan(
    device="cuda",
    student="ViT-B-16-quickgelu",
    teacher="ViT-L-14-quickgelu",
    depth=9,
    batches=(1, 8, 32, 64, 128, 256),
    levels=(1, 16, 64),
    window=(2.0, 8.0),
    names=(1_000, 10_000),
    faiss_sizes=(100_000, 1_000_000),
    budget_s={"towers": 160.0, "service": 170.0, "faiss": 40.0, "onnxruntime": 20.0},
)
DRY_PLAN = Plan(
    device="cpu",
    student=str(TINY_CONFIG),
    teacher=str(TINY_CONFIG),
    depth=2,
    batches=(1, 4),
    levels=(1, 2),
    window=(0.5, 1.5),
    names=(20, 60),
    faiss_sizes=(1_000, 5_000),
    budget_s={"towers": 90.0, "service": 120.0, "faiss": 20.0, "onnxruntime": 10.0},
)


class Clock:
    """A section's time box."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Recorder:
    """The result document, rewritten after every step so that a killed run keeps what it measured."""

    def __init__(self, cfg: BenchCfg, name: str, payload: dict[str, Any]) -> None:
        self.cfg, self.name, self.payload = cfg, name, payload

    def save(self) -> None:
        write_result(self.name, self.payload, self.cfg)

    def section(self, name: str, budget_s: float, fn: Callable[[Clock, dict[str, Any]], None]) -> None:
        out: dict[str, Any] = {"budget_s": budget_s}
        self.payload[name] = out
        t0 = time.monotonic()
        try:
            fn(Clock(budget_s), out)
        except Exception as e:  # one broken section must not lose the others' figures
            log.exception("section %s failed", name)
            out["error"] = f"{type(e).__name__}: {e}"
        out["seconds"] = round(time.monotonic() - t0, 1)
        self.save()


def cuda_status() -> tuple[bool, str]:
    """Whether torch sees a CUDA device, and what it found."""
    import torch

    ok = bool(torch.cuda.is_available())
    return ok, f"torch {torch.__version__}, CUDA {torch.version.cuda}, torch.cuda.is_available()={ok}"


def machine_section(plan: Plan) -> dict[str, Any]:
    import torch

    from bench.common import _pkg

    out: dict[str, Any] = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    cudnn: Any = torch.backends.cudnn
    out["cudnn"] = cudnn.version() if cudnn.is_available() else None
    if plan.cuda:
        p = torch.cuda.get_device_properties(0)
        out |= {"gpu": p.name, "gpu_mem_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count}
        out["capability"] = f"{p.major}.{p.minor}"
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
        try:
            cmd = ["nvidia-smi", query, "--format=csv,noheader"]
            smi = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            out["driver"] = out["nvidia_smi"].split(", ")[1] if ", " in out["nvidia_smi"] else None
        except (OSError, subprocess.TimeoutExpired) as e:
            out["nvidia_smi"] = f"{NOT_HERE} ({e})"
    names = ("open_clip_torch", "timm", "onnxruntime", "onnxruntime-gpu", "faiss-cpu", "faiss-gpu", "fastapi")
    out["packages"] = {n: _pkg(n) or NOT_HERE for n in (*names, "uvicorn", "pydantic", "numpy", "tensorrt")}
    try:
        import onnxruntime as ort

        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        out["onnxruntime_providers"] = NOT_HERE
    return out


# --- towers -------------------------------------------------------------------------------------


def build_tower(arch: str, depth: int, projector_dim: int | None, device: str) -> tuple[Any, Any]:
    """The project's ImageTower (random weights, seeded): prompted ViT (+ projector) -> normalised embedding."""
    import torch

    from models.backbone import load_backbone
    from models.heads import Projector, ProjectorCfg
    from models.prompts import PromptedImageEncoder, VisualPromptCfg
    from models.towers import ImageTower

    torch.manual_seed(0)
    bb = load_backbone(arch)
    encoder = PromptedImageEncoder(bb.model, VisualPromptCfg(n_tokens=4, depth=depth))
    projector = Projector(ProjectorCfg(encoder.output_dim, projector_dim)) if projector_dim else None
    tower = ImageTower(encoder, projector).to(device).eval()
    tower.requires_grad_(False)
    return tower, bb


def probe_images(preprocess: Any) -> np.ndarray:
    """The precision gate's default probes: the sample photos and their mirror images [B, 3, H, W]."""
    from models.preprocess import preprocess_batch
    from models.samples import sample_photos

    pixels = preprocess_batch(sample_photos(), preprocess)
    return np.ascontiguousarray(np.concatenate([pixels, pixels[..., ::-1]]), dtype=np.float32)


def time_calls(fn: Callable[[], Any], cuda: bool, iters: int, max_s: float, warmup: int = 3) -> dict[str, float]:
    """Median / p90 milliseconds per call after warm-up (CUDA events on the GPU, wall clock on the CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    samples: list[float] = []
    deadline = time.monotonic() + max_s
    for _ in range(iters):
        if cuda:
            event: Any = torch.cuda.Event
            start, end = event(enable_timing=True), event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000.0)
        if time.monotonic() > deadline:
            break
    return {"median_ms": float(np.median(samples)), "p90_ms": float(np.percentile(samples, 90)), "n": len(samples)}


def graph_replay(module: Any, x: Any) -> Callable[[], Any]:
    """``module(x)`` captured once as a CUDA graph; the returned call replays it (same input buffer)."""
    import torch

    stream: Any = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            module(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(x)
    return graph.replay


def tower_runs(
    name: str, tower: Any, pixels: np.ndarray, probes: np.ndarray, plan: Plan, clock: Clock
) -> dict[str, Any]:
    """One tower in fp32 / fp16 / bf16, eager and CUDA-graph replay, every batch the time box allows."""
    import torch

    from models.precision import measure, reduced

    rec: dict[str, Any] = {}
    with torch.inference_mode():
        ref = tower(torch.from_numpy(probes).to(plan.device)).float().cpu().numpy()
    for precision in ("fp16", "bf16", "fp32"):  # the serving precision first: a time box cuts fp32 short
        module = tower if precision == "fp32" else reduced(tower, precision)
        cell: dict[str, Any] = {}
        if precision != "fp32":
            with torch.inference_mode():
                got = module(torch.from_numpy(probes).to(plan.device)).float().cpu().numpy()
            cell["parity_vs_fp32"] = measure(ref, got).as_dict()
        for b in plan.batches:
            if clock.left() < 5:
                cell[f"b{b}"] = "skipped: time box"
                continue
            x = torch.from_numpy(np.resize(pixels, (b, *pixels.shape[1:]))).to(plan.device)
            with torch.inference_mode():
                row = {"eager": time_calls(partial(module, x), plan.cuda, 20, min(4.0, clock.left() / 4))}
                if plan.cuda:
                    row["cuda_graph"] = time_calls(graph_replay(module, x), True, 20, min(4.0, clock.left() / 4))
            for mode in list(row):
                row[mode]["images_per_s"] = b * 1000.0 / row[mode]["median_ms"]
            cell[f"b{b}"] = row
            log.info("%s %s b%d: %s", name, precision, b, {m: round(v["images_per_s"]) for m, v in row.items()})
        rec[precision] = cell
        del module
        if plan.cuda:
            torch.cuda.empty_cache()
    return rec


def best(cell: dict[str, Any]) -> tuple[float, str]:
    """Highest images/s over batches and modes of one tower x precision, and where."""
    rows = {b: row for b, row in cell.items() if b.startswith("b") and isinstance(row, dict)}
    found = [(modes[m]["images_per_s"], f"{b} {m}") for b, modes in rows.items() for m in modes]
    return max(found) if found else (float("nan"), "none")


def compiled_student(tower: Any, pixels: np.ndarray, batch: int, plan: Plan, clock: Clock) -> dict[str, Any]:
    """``torch.compile(mode="reduce-overhead")`` of the fp16 student at one batch (compile time reported)."""
    import torch

    from models.precision import reduced

    if not plan.cuda:
        return {"skipped": "CUDA graphs / torch.compile are measured on the GPU only"}
    if clock.left() < 45:
        return {"skipped": f"time box ({clock.left():.0f} s left, compiling takes about a minute)"}
    try:
        module = torch.compile(reduced(tower, "fp16"), mode="reduce-overhead", dynamic=False)
        x = torch.from_numpy(np.resize(pixels, (batch, *pixels.shape[1:]))).to(plan.device)
        t0 = time.monotonic()
        with torch.inference_mode():
            module(x)
            compile_s = time.monotonic() - t0
            timing = time_calls(lambda: module(x), True, 30, 6.0)
    except Exception as e:  # inductor failures are a finding, not the end of the check
        log.exception("torch.compile failed")
        return {"batch": batch, "error": f"{type(e).__name__}: {e}"}
    return {"batch": batch, "compile_s": compile_s, **timing, "images_per_s": batch * 1000.0 / timing["median_ms"]}


def embed_dim(arch: str) -> int:
    """An open_clip architecture's embedding dimension (a name or a model-config JSON path)."""
    import json

    if arch.endswith(".json"):
        return int(json.loads(Path(arch).read_text())["embed_dim"])
    import open_clip

    return int(open_clip.get_model_config(arch)["embed_dim"])


def towers_section(plan: Plan, rec: Recorder) -> Callable[[Clock, dict[str, Any]], None]:
    def run(clock: Clock, out: dict[str, Any]) -> None:
        import torch

        from models.preprocess import preprocess_batch

        photos = real_photos()
        kept = None
        for name, arch in (("student", plan.student), ("teacher", plan.teacher)):
            projector = embed_dim(plan.teacher) if name == "student" else None  # PromptKD: student -> teacher space
            tower, bb = build_tower(arch, plan.depth, projector, plan.device)
            pixels = preprocess_batch(photos, bb.preprocess)  # [P, 3, H, W] real photos
            share = clock.left() * (0.4 if name == "student" else 0.8)  # what is left at the end: torch.compile
            out[name] = {"arch": arch, "prompt_depth": plan.depth, "projector_dim": projector}
            out[name]["params_m"] = _params_m(tower)
            out[name] |= tower_runs(name, tower, pixels, probe_images(bb.preprocess), plan, Clock(share))
            rec.save()
            if name == "student":
                kept = (tower, pixels)
            del tower, bb
            if plan.cuda:
                torch.cuda.empty_cache()
        assert kept is not None
        fp16_best = best(out["student"]["fp16"])
        b = int(fp16_best[1].split()[0][1:]) if fp16_best[1] != "none" else max(plan.batches)
        out["student"]["compiled_fp16"] = compiled_student(*kept, b, plan, clock)
        del kept
        s16, t16 = best(out["student"]["fp16"])[0], best(out["teacher"]["fp16"])[0]
        out["summary"] = {"student_fp16_best_images_per_s": s16, "teacher_fp16_best_images_per_s": t16}
        out["summary"]["student_over_teacher_fp16"] = s16 / t16 if t16 else float("nan")

    return run


def _params_m(module: Any) -> float:
    return round(sum(int(p.numel()) for p in module.parameters()) / 1e6, 1)


# --- FAISS ----------------------------------------------------------------------------------------


def faiss_section(plan: Plan) -> Callable[[Clock, dict[str, Any]], None]:
    """Exact top-5 over ``n`` normalised class vectors: CPU FAISS (all cores) and numpy, batch 1/16/64."""

    def run(clock: Clock, out: dict[str, Any]) -> None:
        faiss: Any
        try:
            import faiss
        except ImportError:
            faiss = None
        out["faiss"] = getattr(faiss, "__version__", "?") if faiss is not None else NOT_HERE
        gpu = faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        out["faiss_gpu"] = "measured" if gpu else NOT_HERE
        resources = faiss.StandardGpuResources() if gpu else None
        if faiss is not None:
            out["faiss_threads"] = faiss.omp_get_max_threads()
        d = embed_dim(plan.teacher)  # class vectors live in the teacher's space
        rng = np.random.default_rng(0)
        for n in plan.faiss_sizes:
            if clock.left() < 10:
                out[f"n{n}"] = "skipped: time box"
                continue
            x = rng.standard_normal((n, d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            index = None
            if faiss is not None:
                index = faiss.IndexFlatIP(d)
                index.add(x)
            on_gpu = faiss.index_cpu_to_gpu(resources, 0, index) if resources is not None else None
            out[f"n{n}"] = row = {"d": d, **search_timings(x, index, rng, on_gpu)}
            log.info("search n=%d: %s", n, {k: round(v["median_ms"], 2) for k, v in row.items() if k != "d"})

    return run


def search_timings(x: np.ndarray, index: Any, rng: np.random.Generator, on_gpu: Any = None) -> dict[str, Any]:
    """Top-5 of 1 / 16 / 64 queries over vectors ``x`` [n, d]: numpy exact, and the FAISS index (CPU, GPU) if any."""
    row: dict[str, Any] = {}
    for b in (1, 16, 64):
        q = np.ascontiguousarray(x[rng.integers(0, len(x), b)])  # [b, d]

        def numpy_top5(q: np.ndarray = q) -> np.ndarray:
            return np.argpartition(-(x @ q.T), 5, axis=0)[:5]  # [5, b]

        row[f"numpy_b{b}"] = time_calls(numpy_top5, False, 10, 2.0, warmup=1)
        if index is not None:
            row[f"faiss_flat_b{b}"] = time_calls(partial(index.search, q, 5), False, 10, 2.0, warmup=1)
        if on_gpu is not None:  # FAISS GPU builds only; its answer must be the CPU index's
            row[f"faiss_gpu_flat_b{b}"] = time_calls(partial(on_gpu.search, q, 5), False, 10, 2.0, warmup=1)
            same = on_gpu.search(q, 5)[1] == index.search(q, 5)[1]  # [b, 5]
            row[f"faiss_gpu_flat_b{b}"]["top5_identical_vs_cpu"] = float(same.all(axis=1).mean())
    return row


# --- entry point ----------------------------------------------------------------------------------


def run(cfg: BenchCfg, dry_run: bool = False) -> int:
    ok, found = cuda_status()
    if not ok and not dry_run:
        log.error(
            "no CUDA here (%s): nothing measured, nothing written. Run scripts/gpu-check.sh (or `python -m bench "
            "gpu`) on a CUDA machine; --cpu-dry-run tries the check on the CPU.",
            found,
        )
        return 2
    from bench.gpu_ort import onnxruntime_section
    from bench.gpu_service import service_section

    plan = DRY_PLAN if dry_run else GPU_PLAN
    scale = float(os.environ.get("GPU_CHECK_SCALE", "1"))  # < 1: a shorter loan; every section's box shrinks
    plan = replace(plan, budget_s={k: v * scale for k, v in plan.budget_s.items()})
    name = "gpu_dryrun" if dry_run else "gpu"
    rec = Recorder(cfg, name, {"dry_run": dry_run, "devices": found, "plan": plan.__dict__})
    rec.section("machine", 30.0, lambda clock, out: out.update(machine_section(plan)))
    rec.section("towers", plan.budget_s["towers"], towers_section(plan, rec))
    rec.section("service", plan.budget_s["service"], service_section(plan, rec, cfg))
    rec.section("faiss", plan.budget_s["faiss"], faiss_section(plan))
    rec.section("onnxruntime", plan.budget_s["onnxruntime"], onnxruntime_section(plan))
    for line in summary(rec.payload):
        print(line)
    return 0


def summary(doc: dict[str, Any]) -> list[str]:
    """The short table printed last (and rendered into BENCHMARKS.md)."""
    m = doc.get("machine", {})
    dry = " -- DRY RUN ON CPU, numbers mean nothing" if doc.get("dry_run") else ""
    lines = [
        f"GPU check on {m.get('gpu', 'CPU')}, driver {m.get('driver')}, torch {m.get('torch')}, "
        f"CUDA {m.get('cuda_runtime')}{dry}"
    ]
    towers = doc.get("towers", {})
    for name in ("student", "teacher"):
        for p in ("fp32", "fp16", "bf16"):
            cell = towers.get(name, {}).get(p)
            if isinstance(cell, dict):
                ips, where = best(cell)
                cos = cell.get("parity_vs_fp32", {}).get("cosine_min")
                parity = f", cosine_min vs fp32 {cos:.5f}" if cos is not None else ""
                lines.append(f"  {name} {p}: best {ips:,.0f} img/s ({where}){parity}")
        compiled = towers.get(name, {}).get("compiled_fp16", {})
        if "images_per_s" in compiled:
            lines.append(f"  {name} fp16 torch.compile b{compiled['batch']}: {compiled['images_per_s']:,.0f} img/s")
    ratio = towers.get("summary", {}).get("student_over_teacher_fp16")
    if ratio is not None:
        lines.append(f"  student / teacher fp16 images/s: {ratio:.2f}x")
    gate = doc.get("service", {}).get("readyz", {})
    if isinstance(gate, dict) and "precision" in gate:
        lines.append(f"  service precision gate: {gate['precision']}")
    for lv in doc.get("service", {}).get("levels", []):
        if "images_per_s" in lv:
            ratio = lv.get("ratio_vs_bare_best")
            lines.append(
                f"  serve c={lv['concurrency']}: {lv['images_per_s']:,.0f} img/s, p50 {lv['p50_ms']:.1f} ms, "
                f"p99 {lv['p99_ms']:.1f} ms, GPU busy {lv.get('gpu_busy')}, "
                f"{f'{ratio:.2f}' if isinstance(ratio, float) else '?'}x the bare student fp16 best"
            )
    for key, v in doc.get("service", {}).get("text", {}).items():
        if isinstance(v, dict) and "names_per_s" in v:
            lines.append(f"  text {key}: {v['names']} names, {v['names_per_s']:,.0f} names/s")
    for key in ("machine", "towers", "service", "faiss", "onnxruntime"):
        if "error" in doc.get(key, {}):
            lines.append(f"  {key} FAILED: {doc[key]['error']}")
    return lines


def section(doc: dict[str, Any] | None) -> list[str]:
    """BENCHMARKS.md's GPU section."""
    out = ["## GPU: towers fp32/fp16/bf16, the service on CUDA, text adds, FAISS beside the GPU", ""]
    if doc is None:
        return [
            *out,
            "**Not measured yet**: no GPU has been lent to the runs behind this file, and no GPU figure is "
            "estimated from CPU runs. On a CUDA machine (an H100/H200 loan: torch 2.11 CUDA 13, no FastAPI, "
            "open_clip or FAISS installed), `scripts/gpu-check.sh prepare` here downloads the wheels it needs "
            "into `.whl/` (about 25 MB, FAISS included), then `scripts/gpu-check.sh` there installs them and "
            "runs `python -m bench gpu` (about 8 minutes, written to `$OUT/gpu.json` section by section), and "
            "`python -m bench report` renders it here. Without CUDA `python -m bench gpu` exits with status 2 "
            "and writes nothing; `python -m bench gpu --cpu-dry-run` runs the same check on the CPU with tiny "
            "models (numbers meaningless).",
            "",
        ]
    return [*out, *(f"    {line}" for line in summary(doc)), ""]
