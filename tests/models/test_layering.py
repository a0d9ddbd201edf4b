"""models/ stays shared: importing all of it pulls in neither training/ nor service/."""

from __future__ import annotations

import subprocess
import sys

import pytest

from models import _compat


@pytest.mark.slow  # a fresh interpreter imports every models/ module (torch, open_clip, onnx)
def test_models_does_not_import_training_or_service() -> None:
    code = (
        "import pkgutil, importlib, sys, models\n"
        "for m in pkgutil.iter_modules(models.__path__): importlib.import_module('models.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('training', 'service'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_torchvision_shim_is_a_noop_where_nms_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compat, "_TORCHVISION_SHIM", None)
    monkeypatch.setattr(_compat, "_has_nms", lambda: True)
    _compat.ensure_torchvision_importable()
    assert _compat._TORCHVISION_SHIM is None


@pytest.mark.slow  # a fresh interpreter importing torch, torchvision and open_clip
def test_open_clip_and_torchvision_import_after_models() -> None:
    res = subprocess.run(
        [sys.executable, "-c", "import models, torchvision, open_clip"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
