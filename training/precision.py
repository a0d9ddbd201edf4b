"""Training precision, chosen once per device (``loop.amp`` asks for mixed precision where it pays).

* CUDA: fp16 autocast with a gradient scaler (fp16's narrow range needs loss scaling).
* CPU with native bf16 (AVX512-BF16 or AMX): bf16 autocast, no scaler.
* any other CPU: fp32. Without native bf16 the autocast matmuls fall back to reference kernels,
  several times slower than fp32 in the forward and tens of times slower in the backward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """What the loop runs under: ``autocast`` dtype (None = plain fp32) and whether to scale losses."""

    autocast: torch.dtype | None
    grad_scaler: bool
    reason: str

    @property
    def name(self) -> str:
        return "fp32" if self.autocast is None else str(self.autocast).removeprefix("torch.")


def cpu_has_native_bf16() -> bool:
    """True where the CPU executes bf16 matmuls natively (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def choose_precision(device: torch.device, amp: bool) -> Precision:
    """The precision for ``device`` when ``amp`` is requested (fp32 when it is not)."""
    if not amp:
        return Precision(None, False, "loop.amp is off")
    if device.type == "cuda":
        return Precision(torch.float16, True, "CUDA: fp16 autocast with a gradient scaler")
    if device.type == "cpu" and cpu_has_native_bf16():
        return Precision(torch.bfloat16, False, "this CPU has native bf16 (AVX512-BF16/AMX)")
    if device.type == "cpu":
        return Precision(None, False, "this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 would be slower")
    return Precision(None, False, f"no mixed precision rule for device {device.type!r}")


def log_precision(device: torch.device, precision: Precision) -> None:
    log.info("training precision on %s: %s (%s)", device, precision.name, precision.reason)
