"""Refuse to run with both the CPU and GPU flavours installed (they share import packages)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

CONFLICTS = (("onnxruntime", "onnxruntime-gpu"), ("faiss-cpu", "faiss-gpu"))


def _installed(dist: str) -> bool:
    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


def check_flavour() -> None:
    """Raise with the fix when both packages of a CPU/GPU pair are installed."""
    for cpu, gpu in CONFLICTS:
        if _installed(cpu) and _installed(gpu):
            raise RuntimeError(
                f"both {cpu} and {gpu} are installed; they overwrite each other's files. "
                f"Keep one flavour: pip uninstall -y {cpu} {gpu} && pip install 'promptdistill[cpu]' (or [gpu])"
            )
