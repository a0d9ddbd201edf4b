"""Image encoders behind one interface: ONNX Runtime or torch, each owning its preprocessing.

``preprocess(image bytes) -> [3, H, W]`` (built once from the bundle's manifest) and
``encode(pixels [B, 3, H, W] float32) -> [B, D]`` L2-normalised embeddings. The two backends run
the same exported :class:`models.towers.ImageTower`; a test checks they agree.

Each encoder serves one precision, chosen by the precision gate (models/precision.py): a reduced
precision (ONNX int8; torch fp16 / bf16) is scored against the fp32 tower on the bundle's probe
images at start-up, on this machine, and below the bundle's floor fp32 is served instead, with one
loud log line; ``gate`` holds the decision and the parity measured (``/readyz`` shows it).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from models.bundle import Bundle, BundleError, OnnxSpec
from models.precision import GateResult, gate_torch, judge
from models.precision import probe_pixels as bundle_probes
from service.errors import StartupError
from service.images import ImageLimits, ImagePreprocessor

log = logging.getLogger(__name__)
# JPEGs decode at the smallest DCT scale whose short side keeps this many times the network input
# (bench/preprocess.py measures the choices; 2 keeps the resize's own anti-aliasing input).
JPEG_DRAFT_FACTOR = 2.0


class ImageEncoder(Protocol):
    backend: str
    provider: str
    preprocess: ImagePreprocessor
    gate: GateResult  # the precision served and its parity with fp32 (models/precision.py)

    def encode(self, pixels: np.ndarray) -> np.ndarray: ...


def bundle_preprocessor(
    bundle: Bundle, limits: ImageLimits, jpeg_draft_factor: float = JPEG_DRAFT_FACTOR
) -> ImagePreprocessor:
    """The one place the manifest's preprocessing becomes the encoder's input pipeline."""
    return ImagePreprocessor(bundle.manifest.image_encoder.preprocess.to_config(), limits, jpeg_draft_factor)


def cuda_wanted(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    available = bool(torch.cuda.is_available())
    if device == "cuda" and not available:
        raise StartupError("device 'cuda' was requested but torch sees no CUDA device; use --device auto or cpu")
    return available


ONNX_PRECISIONS = ("fp32", "int8")
TORCH_PRECISIONS = ("fp32", "fp16", "bf16")


def check_precision(backend: str, precision: str) -> None:
    """Raise a start-up error when ``backend`` cannot run ``precision`` at all."""
    offered = ONNX_PRECISIONS if backend == "onnx" else TORCH_PRECISIONS
    if precision not in offered:
        other = "torch" if backend == "onnx" else "onnx"
        raise StartupError(
            f"precision {precision!r} is not offered by the {backend} backend (it runs {', '.join(offered)}); "
            f"use --backend {other} or another --precision"
        )


def probe_pixels(bundle: Bundle) -> tuple[np.ndarray, str]:
    """The bundle's probe images, or a start-up error naming what is wrong with them."""
    try:
        return bundle_probes(bundle)
    except (BundleError, OSError, KeyError) as e:
        raise StartupError(f"bundle {bundle.root}: its probe images cannot be read ({e}); re-export the bundle") from e


def log_gate(gate: GateResult) -> None:
    """The gate's decision: one loud line when a precision was refused, one quiet line otherwise."""
    if gate.refused:
        log.error("PRECISION GATE REFUSED %s, SERVING FP32 INSTEAD: %s", gate.wanted.upper(), gate.summary())
    else:
        log.info("precision gate: serving %s", gate.summary())


def onnx_graph(bundle: Bundle, precision: str) -> OnnxSpec:
    """The bundle's ONNX image tower of ``precision`` (fp32 | int8), or a start-up error saying how to get one."""
    specs = bundle.manifest.image_encoder.onnx
    if not specs:
        raise StartupError(
            f"backend 'onnx' needs an ONNX image encoder, but bundle {bundle.root} has none; re-export the "
            "bundle with --onnx (e.g. promptdistill bundle zeroshot ... --onnx) or start with --backend torch"
        )
    wanted = "dynamic-int8" if precision == "int8" else "none"
    matching = [s for s in specs if s.quantization == wanted]
    if not matching:
        raise StartupError(
            f"onnx_precision {precision!r}: bundle {bundle.root} has no such ONNX graph (it has "
            f"{[s.quantization for s in specs]}); re-export with --int8 or serve fp32"
        )
    return matching[0]


class OnnxImageEncoder:
    """ONNX Runtime session over the bundle's exported image tower."""

    backend = "onnx"

    def __init__(
        self,
        bundle: Bundle,
        preprocess: ImagePreprocessor,
        device: str,
        threads: int | None,
        precision: str = "fp32",
    ) -> None:
        import onnxruntime as ort

        self.preprocess = preprocess
        check_precision("onnx", precision)
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise StartupError(
                f"device 'cuda' requested but ONNX Runtime offers only {available}; install the gpu extra"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.gate = gate_onnx(bundle, precision, options, providers)
        log_gate(self.gate)
        precision = self.gate.serving
        spec = onnx_graph(bundle, precision)
        graph = str(bundle.path(spec.file))
        self.session = ort.InferenceSession(graph, options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_name, self.output_name = spec.input_name, spec.output_name
        self.precision = precision
        log.info(
            "image encoder: ONNX Runtime %s, %s graph %s, with %s (asked for %s)",
            ort.__version__,
            precision,
            spec.file,
            self.provider,
            providers,
        )

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(pixels, dtype=np.float32)})
        return np.asarray(out[0], dtype=np.float32)  # [B, D]


def gate_onnx(bundle: Bundle, precision: str, options: Any, providers: list[str]) -> GateResult:
    """Score the ``precision`` graph against the fp32 graph on the bundle's probe images, here."""
    import onnxruntime as ort

    if precision == "fp32":
        return GateResult("fp32", "fp32")
    pixels, probes = probe_pixels(bundle)
    runs = []
    for which in ("fp32", precision):
        spec = onnx_graph(bundle, which)
        session = ort.InferenceSession(str(bundle.path(spec.file)), options, providers=providers)
        runs.append(np.asarray(session.run([spec.output_name], {spec.input_name: pixels})[0], dtype=np.float32))
    return judge(bundle, precision, runs[0], runs[1], probes)


class TorchImageEncoder:
    """The bundle's :class:`~models.towers.ImageTower` in torch (CUDA when available), fp32 or gated fp16 / bf16."""

    backend = "torch"

    def __init__(self, bundle: Bundle, tower: Any, preprocess: ImagePreprocessor, device: str, precision: str) -> None:
        check_precision("torch", precision)
        self.preprocess = preprocess
        self.device = device
        probes = probe_pixels(bundle) if precision != "fp32" else None
        self.tower, self.gate = gate_torch(bundle, tower, precision, device, probes)  # fp32 goes unless refused
        log_gate(self.gate)
        self.precision = self.gate.serving
        self.provider = f"torch:{device}"
        log.info("image encoder: torch ImageTower on %s, %s", device, self.precision)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
            return self.tower(x).float().cpu().numpy()  # [B, D]
