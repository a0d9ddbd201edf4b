"""Import-time compatibility shims, applied in one place before open_clip is imported.

PyPI has no CPU build of torchvision: the 0.28.0 wheel is a CUDA build whose C extension cannot
load next to the CPU torch, and ``import torchvision`` (hence ``import open_clip``) then fails
with ``operator torchvision::nms does not exist`` (pytorch/vision#9085). torchvision only needs
the op *schemas* to exist at import; open_clip never calls nms. Defining the two schemas is a
no-op wherever a matching torchvision extension is installed, because the op is then found.
"""

from __future__ import annotations

import torch

_TORCHVISION_SHIM: torch.library.Library | None = None


def ensure_torchvision_importable() -> None:
    """Define the ``torchvision::nms``/``qnms`` schemas when the C extension did not register them."""
    global _TORCHVISION_SHIM
    if _TORCHVISION_SHIM is not None or _has_nms():
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SHIM = lib


def _has_nms() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup is the probe
    except (AttributeError, RuntimeError):
        return False
    return True


ensure_torchvision_importable()
