"""The CPU and GPU flavours must never be installed together."""

from __future__ import annotations

import pytest

from models import runtime_check


def test_both_flavours_installed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_check, "_installed", lambda dist: dist in {"onnxruntime", "onnxruntime-gpu"})
    with pytest.raises(RuntimeError, match="pip uninstall -y onnxruntime onnxruntime-gpu"):
        runtime_check.check_flavour()


def test_one_flavour_passes() -> None:
    runtime_check.check_flavour()  # this environment has the CPU flavour only
    assert runtime_check._installed("onnxruntime") and not runtime_check._installed("onnxruntime-gpu")
