"""The precision gate: a reduced-precision image tower is served only if it matches fp32 on probe images.

Every reduced-precision tower (ONNX dynamic int8 today; torch fp16 / bf16; TensorRT tomorrow) is
scored against the fp32 tower on the same probe images, on the machine that will serve it (how
close int8 or fp16 comes depends on that machine's kernels):

* ``cosine`` per image between the reduced and the fp32 embedding (``cosine_min``, ``cosine_mean``);
* ``top1_agreement`` per shipped label set: the fraction of probes whose arg-max class is fp32's.

The probe images are stored in the bundle at export (``probes.safetensors``, preprocessed pixels
[B, 3, H, W]: the shipped sample photos and their mirror images, the images the int8 exporter
checks); a bundle written before probes existed is scored on the same sample photos, preprocessed
now. Each precision's floor comes from the bundle (``ImageEncoderSpec.parity_floors``), else
:class:`~models.bundle.ParityFloor`'s defaults. Below the floor the caller serves fp32 instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.bundle import PROBES, Bundle, BundleDimensionError, ParityFloor, ProbeSpec

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PROBE_SOURCE = "sample photos + mirror images"


@dataclass(frozen=True)
class Parity:
    """How close a reduced-precision tower's embeddings [B, D] come to fp32's on the same images."""

    cosine_mean: float
    cosine_min: float
    n_images: int
    top1_agreement: dict[str, float] = field(default_factory=dict)  # label set -> fraction of images

    def as_dict(self) -> dict[str, float]:
        out = {"cosine_mean": self.cosine_mean, "cosine_min": self.cosine_min, "n_images": float(self.n_images)}
        return out | {f"top1_agreement:{k}": v for k, v in self.top1_agreement.items()}


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine per row of two embedding sets [B, D] -> [B]."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))


def top1_agreement(ref: np.ndarray, got: np.ndarray, class_vectors: np.ndarray) -> float:
    """Fraction of images [B, D] whose arg-max over class vectors [N, D] is the same in both sets."""
    c = np.asarray(class_vectors, np.float64)
    return float((np.argmax(ref @ c.T, 1) == np.argmax(got @ c.T, 1)).mean())


def measure(ref: np.ndarray, got: np.ndarray, label_sets: Mapping[str, np.ndarray] | None = None) -> Parity:
    """Parity of ``got`` with ``ref`` (both [B, D]); top-1 agreement for each label set [N, D] given."""
    cos = cosines(ref, got)
    agreement = {name: top1_agreement(ref, got, vectors) for name, vectors in (label_sets or {}).items()}
    return Parity(float(cos.mean()), float(cos.min()), len(cos), agreement)


def floor_for(bundle: Bundle, precision: str) -> ParityFloor:
    """The bundle's floor for ``precision``, else the defaults."""
    return bundle.manifest.image_encoder.parity_floors.get(precision, ParityFloor())


def shortfall(parity: Parity, floor: ParityFloor) -> str | None:
    """What falls below the floor (None: nothing; NaN always falls below)."""
    if not parity.cosine_min >= floor.cosine_min:
        return f"cosine_min {parity.cosine_min:.6f} < floor {floor.cosine_min:g}"
    if floor.top1_agreement is not None:
        for name, agreement in parity.top1_agreement.items():
            if not agreement >= floor.top1_agreement:
                return f"top-1 agreement on {name!r} {agreement:.4f} < floor {floor.top1_agreement:g}"
    return None


@dataclass(frozen=True)
class GateResult:
    """What the gate decided for one requested precision."""

    wanted: str
    serving: str  # ``wanted``, or "fp32" when it was refused
    probes: str = ""  # which images were scored (none for fp32)
    parity: Parity | None = None  # None when fp32 was asked for (nothing to compare)
    floor: ParityFloor | None = None
    refused: str | None = None  # why ``wanted`` was refused

    def summary(self) -> str:
        """One line for /readyz and the logs."""
        if self.parity is None:
            return f"{self.serving} (reference precision, not gated)"
        p, f = self.parity, self.floor or ParityFloor()
        top1 = ", ".join(f"top-1 {k} {v:.3f}" for k, v in p.top1_agreement.items())
        measured = f"cosine_min {p.cosine_min:.6f}, cosine_mean {p.cosine_mean:.6f}{', ' + top1 if top1 else ''}"
        where = f"vs fp32 on {p.n_images} {self.probes}; floor cosine_min {f.cosine_min:g}" + (
            f", top-1 {f.top1_agreement:g}" if f.top1_agreement is not None else ""
        )
        if self.refused:
            return f"{self.serving} ({self.wanted} refused: {self.refused}; {measured}; {where})"
        return f"{self.serving} ({measured}; {where})"


def label_set_vectors(bundle: Bundle) -> dict[str, np.ndarray]:
    """Every shipped label set's class vectors [N, D] (float32)."""
    return {name: v.detach().float().cpu().numpy() for name, v in bundle.class_vectors.items()}


def judge(bundle: Bundle, precision: str, ref: np.ndarray, got: np.ndarray, probes: str) -> GateResult:
    """Measure ``got`` (the ``precision`` tower's embeddings of the probes) against ``ref`` (fp32's)."""
    parity = measure(ref, got, label_set_vectors(bundle))
    floor = floor_for(bundle, precision)
    refused = shortfall(parity, floor)
    return GateResult(precision, "fp32" if refused else precision, probes, parity, floor, refused)


# --- probe images -------------------------------------------------------------------------------


def sample_probe_pixels(bundle: Bundle) -> np.ndarray:
    """The shipped sample photos and their mirror images, preprocessed as the bundle says [B, 3, H, W]."""
    from models.preprocess import preprocess_batch
    from models.samples import sample_photos

    pixels = preprocess_batch(sample_photos(), bundle.manifest.image_encoder.preprocess.to_config())
    return np.ascontiguousarray(np.concatenate([pixels, pixels[..., ::-1]]), dtype=np.float32)


def probe_pixels(bundle: Bundle) -> tuple[np.ndarray, str]:
    """The bundle's stored probes (else the sample photos, preprocessed now) and a description of them."""
    spec = bundle.manifest.image_encoder.probes
    if spec is None or bundle.root is None:
        return sample_probe_pixels(bundle), f"{PROBE_SOURCE} (the bundle stores no probes)"
    pixels = load_file(bundle.path(spec.file))["pixels"].float().numpy()
    size = tuple(bundle.manifest.image_encoder.preprocess.size)
    if pixels.ndim != 4 or pixels.shape[0] != spec.n_images or pixels.shape[1] != 3 or pixels.shape[2:] != size:
        raise BundleDimensionError(
            f"{spec.file}: probe pixels have shape {tuple(pixels.shape)}, manifest says {spec.n_images} x 3 x {size}"
        )
    return pixels, f"stored probe images ({spec.source})"


def add_probes(
    bundle: Bundle, out: Path, pixels: torch.Tensor | np.ndarray | None = None, source: str = PROBE_SOURCE
) -> dict[str, Path]:
    """Write probe images into ``out`` (a bundle's staging folder) and record them in the manifest.

    ``pixels`` [B, 3, H, W] preprocessed (default: the sample photos and their mirror images), and
    where they came from. Returns the file to checksum, as ``save_bundle``'s ``exports`` hook expects.
    """
    if pixels is None:
        pixels = sample_probe_pixels(bundle)
    tensor = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).contiguous()  # [B, 3, H, W]
    save_file({"pixels": tensor}, out / PROBES)
    spec = ProbeSpec(file=PROBES, n_images=int(tensor.shape[0]), source=source)
    enc = bundle.manifest.image_encoder.model_copy(update={"probes": spec})
    bundle.manifest = bundle.manifest.model_copy(update={"image_encoder": enc})
    return {PROBES: out / PROBES}


def set_floor(bundle: Bundle, precision: str, floor: ParityFloor) -> None:
    """Record ``floor`` for ``precision`` in the (in-memory) manifest; saved with the bundle."""
    enc = bundle.manifest.image_encoder
    floors = {**enc.parity_floors, precision: floor}
    bundle.manifest = bundle.manifest.model_copy(
        update={"image_encoder": enc.model_copy(update={"parity_floors": floors})}
    )


# --- torch towers -------------------------------------------------------------------------------


class ReducedPrecision(nn.Module):
    """A tower whose weights and activations are ``dtype``; takes and returns float32 (callers don't change)."""

    def __init__(self, tower: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.tower = tower.to(dtype)
        self.dtype = dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] float32 -> [B, D] float32
        return self.tower(pixels.to(self.dtype)).float()


def reduced(tower: nn.Module, precision: str) -> nn.Module:
    """A ``precision`` copy of an fp32 torch tower (the fp32 one is left as it is)."""
    if precision not in TORCH_DTYPES:
        raise ValueError(f"torch towers run fp32, {', '.join(TORCH_DTYPES)}; not {precision!r}")
    return ReducedPrecision(copy.deepcopy(tower), TORCH_DTYPES[precision]).eval()


def embed(tower: Callable[[torch.Tensor], torch.Tensor], pixels: np.ndarray, device: str | torch.device) -> np.ndarray:
    """Embeddings [B, D] float32 of ``pixels`` [B, 3, H, W] through a torch tower on ``device``."""
    with torch.inference_mode():
        return tower(torch.from_numpy(np.ascontiguousarray(pixels)).to(device)).float().cpu().numpy()


def gate_torch(
    bundle: Bundle,
    tower: nn.Module,
    precision: str,
    device: str | torch.device,
    probes: tuple[np.ndarray, str] | None = None,
) -> tuple[nn.Module, GateResult]:
    """The tower to serve for ``precision``: its reduced copy if it passes the floor, else ``tower`` (fp32).

    ``probes``: the images and their description (default: :func:`probe_pixels` of the bundle).
    """
    if precision == "fp32":
        return tower, GateResult("fp32", "fp32")
    pixels, source = probes or probe_pixels(bundle)
    candidate = reduced(tower, precision)
    result = judge(bundle, precision, embed(tower, pixels, device), embed(candidate, pixels, device), source)
    return (tower if result.refused else candidate), result
