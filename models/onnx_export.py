"""Export an :class:`~models.towers.ImageTower` to ONNX and prove it matches torch before keeping it."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from models.bundle import OnnxSpec
from models.staging import STAGING_PREFIX, follow_umask
from models.towers import ImageTower

log = logging.getLogger(__name__)

OPSET = 18
DEFAULT_TOLERANCE = 1e-4


class OnnxParityError(RuntimeError):
    """The exported graph disagrees with torch beyond the tolerance; nothing was written."""


# The dynamo exporter's graph passes log every rewrite at INFO (hundreds of lines for a ViT).
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Exporter loggers at WARNING for the duration (their INFO lines say nothing to act on)."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_image_tower(
    tower: ImageTower,
    out_dir: Path,
    sample_pixels: torch.Tensor,
    *,
    name: str = "image_encoder.onnx",
    tolerance: float = DEFAULT_TOLERANCE,
) -> OnnxSpec:
    """Export ``tower`` (dynamic batch axis) into ``out_dir/name`` after a parity check.

    Args:
        tower: the image tower, any device; exported from a CPU copy in eval mode.
        out_dir: bundle folder.
        sample_pixels: preprocessed images [B, 3, H, W] (real photos preferred) for the check.
        name: file name of the graph; weights go to ``name + ".data"``.
        tolerance: maximum absolute difference of the normalised embeddings.

    Raises:
        OnnxParityError: max |onnx - torch| > tolerance.
    """
    import onnxruntime as ort

    tower = tower.cpu().eval()
    pixels = sample_pixels.detach().float().cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Staged next to the destination: a rename out of $TMPDIR fails across filesystems (EXDEV).
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=out_dir) as tmp:
        tmp_path = Path(tmp) / name
        with warnings.catch_warnings(), torch.no_grad(), quiet_exporter():
            warnings.simplefilter("ignore")  # exporter deprecation chatter, not actionable here
            torch.onnx.export(
                tower,
                (pixels[:2].expand(2, -1, -1, -1).contiguous(),),  # batch 1 would be specialised
                str(tmp_path),
                input_names=["pixels"],
                output_names=["embedding"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                opset_version=OPSET,
                dynamo=True,
                external_data=True,
                verbose=False,
            )
        session = ort.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])
        got = session.run(["embedding"], {"pixels": pixels.numpy()})[0]
        with torch.no_grad():
            want = tower(pixels).numpy()
        diff = float(np.abs(got - want).max())
        if not diff <= tolerance:
            raise OnnxParityError(f"ONNX image tower differs from torch by {diff:.2e} (> {tolerance:.0e}); not written")
        data_name = None
        for produced in sorted(Path(tmp).iterdir(), key=lambda p: p.name == name):  # graph last
            follow_umask(produced)
            produced.replace(out_dir / produced.name)
            if produced.name != name:
                data_name = produced.name
    log.info("exported %s (max |onnx - torch| = %.2e on %d images)", out_dir / name, diff, len(pixels))
    return OnnxSpec(file=name, data_file=data_name, opset=OPSET, max_abs_diff=diff)


INT8_NAME = "image_encoder.int8.onnx"
DEFAULT_MIN_COSINE = 0.99


def quantize_image_tower(
    onnx_path: Path,
    out_path: Path,
    sample_pixels: torch.Tensor,
    class_vectors: torch.Tensor | None = None,
    *,
    per_channel: bool = False,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> OnnxSpec:
    """Dynamically quantise an exported fp32 image tower to int8 weights and check it against fp32.

    ONNX Runtime's ``quantize_dynamic`` stores MatMul/Gemm/Conv weights as int8 and quantises
    activations on the fly, so no calibration set is needed. The result is compared with the fp32
    graph (itself parity-checked against torch) on ``sample_pixels``; the figures go into
    ``OnnxSpec.parity``: ``cosine_mean``/``cosine_min`` (per image, int8 vs fp32 embedding) and,
    given ``class_vectors``, ``top1_agreement`` (fraction of images whose arg-max class is the same)
    plus ``top1_classes`` (distinct fp32 arg-max classes: agreement over 1 class says little),
    ``top1_margin_median`` (fp32 top-1 minus top-2 cosine) and ``score_shift_median`` (|int8 - fp32|
    cosine per image and class): with random weights the margins are tiny and flips are expected.
    ``max_abs_diff`` is measured against the fp32 graph.

    Args:
        onnx_path: the fp32 graph written by :func:`export_image_tower` (its ``.data`` file beside it).
        out_path: where to write the int8 graph (a single file; int8 weights fit in the protobuf).
        sample_pixels: preprocessed real photos [B, 3, H, W].
        class_vectors: [N, D] normalised class vectors for the top-1 agreement check.
        per_channel: per-output-channel weight scales (slower to quantise, rarely needed).
        min_cosine: refuse the graph if any image's int8-vs-fp32 cosine is lower.

    Raises:
        OnnxParityError: the smallest cosine is below ``min_cosine``; nothing was written.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path = Path(out_path)
    pixels = sample_pixels.detach().float().cpu().numpy()  # [B, 3, H, W]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=out_path.parent) as tmp:
        tmp_path = Path(tmp) / out_path.name
        quantize_dynamic(str(onnx_path), str(tmp_path), weight_type=QuantType.QInt8, per_channel=per_channel)
        want = _run(Path(onnx_path), pixels)  # [B, D]
        got = _run(tmp_path, pixels)  # [B, D]
        parity = int8_parity(want, got, None if class_vectors is None else class_vectors.detach().float().cpu().numpy())
        if not parity["cosine_min"] >= min_cosine:
            raise OnnxParityError(
                f"int8 image tower: min cosine vs fp32 {parity['cosine_min']:.4f} < {min_cosine}; not written"
            )
        follow_umask(tmp_path)
        tmp_path.replace(out_path)
    diff = float(np.abs(got - want).max())
    log.info("quantised %s -> %s (%s)", onnx_path, out_path, ", ".join(f"{k}={v:.4g}" for k, v in parity.items()))
    return OnnxSpec(
        file=out_path.name, data_file=None, opset=OPSET, max_abs_diff=diff, quantization="dynamic-int8", parity=parity
    )


def int8_parity(fp32: np.ndarray, int8: np.ndarray, class_vectors: np.ndarray | None = None) -> dict[str, float]:
    """Cosine per image and (given class vectors [N, D]) top-1 agreement of two embedding sets [B, D].

    The export-time report of the int8 graph: the precision gate's measures (models/precision.py)
    plus the figures that explain a low agreement.
    """
    from models.precision import measure

    parity = measure(fp32, int8, None if class_vectors is None else {"set": class_vectors})
    out = {"cosine_mean": parity.cosine_mean, "cosine_min": parity.cosine_min, "n_images": float(parity.n_images)}
    if class_vectors is not None:
        s_fp32, s_int8 = fp32 @ class_vectors.T, int8 @ class_vectors.T  # [B, N] cosine scores
        top_fp32 = s_fp32.argmax(1)  # [B]
        out["top1_agreement"] = parity.top1_agreement["set"]
        out["top1_classes"] = float(len(set(top_fp32.tolist())))
        out["n_classes"] = float(len(class_vectors))
        if s_fp32.shape[1] > 1:
            # Why agreement can be low: a flip needs |score shift| > the fp32 top-1/top-2 gap.
            top2 = np.sort(s_fp32, axis=1)[:, -2:]  # [B, 2]
            out["top1_margin_median"] = float(np.median(top2[:, 1] - top2[:, 0]))
            out["score_shift_median"] = float(np.median(np.abs(s_int8 - s_fp32)))
    return out


def _run(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["embedding"], {"pixels": pixels})[0])
