"""Loading a backbone and exporting ONNX log what matters, not open_clip's or the exporter's narration."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from models.backbone import load_backbone
from models.onnx_export import export_image_tower
from models.prompts import PromptedImageEncoder, VisualPromptCfg
from models.towers import ImageTower


def test_backbone_load_has_no_false_random_init_warning(tiny_config: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        load_backbone(str(tiny_config))
    assert not [r for r in caplog.records if "open_clip" in r.pathname], caplog.text


def test_onnx_export_logs_one_line(tiny_config: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bb = load_backbone(str(tiny_config))
    tower = ImageTower(PromptedImageEncoder(bb.model, VisualPromptCfg(n_tokens=2, depth=2)))
    with caplog.at_level(logging.INFO):
        export_image_tower(tower, tmp_path, torch.randn(3, 3, 64, 64))
    assert [r.name for r in caplog.records] == ["models.onnx_export"], caplog.text
    assert logging.getLogger("onnx_ir").level == logging.NOTSET  # levels restored afterwards
