"""Image encoders behind one interface: ONNX Runtime or torch, each owning its preprocessing.

``preprocess(image bytes) -> [3, H, W]`` (built once from the bundle's manifest) and
``encode(pixels [B, 3, H, W] float32) -> [B, D]`` L2-normalised embeddings. The two backends run
the same exported :class:`models.towers.ImageTower`; a test checks they agree.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from models.bundle import Bundle, OnnxSpec
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
        spec = onnx_graph(bundle, precision)
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


class TorchImageEncoder:
    """The bundle's :class:`~models.towers.ImageTower` in torch (CUDA when available)."""

    backend = "torch"

    def __init__(self, tower: Any, preprocess: ImagePreprocessor, device: str) -> None:
        self.preprocess = preprocess
        self.tower = tower
        self.device = device
        self.provider = f"torch:{device}"
        log.info("image encoder: torch ImageTower on %s", device)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
            return self.tower(x).float().cpu().numpy()  # [B, D]
