"""Export an :class:`~models.towers.ImageTower` to ONNX and prove it matches torch before keeping it."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from models.bundle import OnnxSpec
from models.towers import ImageTower

log = logging.getLogger(__name__)

OPSET = 18
DEFAULT_TOLERANCE = 1e-4


class OnnxParityError(RuntimeError):
    """The exported graph disagrees with torch beyond the tolerance; nothing was written."""


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
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / name
        with warnings.catch_warnings(), torch.no_grad():
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
        out_dir.mkdir(parents=True, exist_ok=True)
        data_name = None
        for produced in Path(tmp).iterdir():
            produced.replace(out_dir / produced.name)
            if produced.name != name:
                data_name = produced.name
    log.info("exported %s (max |onnx - torch| = %.2e on %d images)", out_dir / name, diff, len(pixels))
    return OnnxSpec(file=name, data_file=data_name, opset=OPSET, max_abs_diff=diff)
