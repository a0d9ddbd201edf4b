"""The shared run skeleton: data is read and checked before any model is built."""

from __future__ import annotations

from pathlib import Path

import pytest

import training.run
from training.config import load_config
from training.data import DataError
from training.distill import DistillRunConfig, run_distill
from training.mopd.config import MoPDRunCfg
from training.mopd.trainer import train
from training.teacher import TeacherRunConfig, run_teacher


def _no_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was built before the data was checked")


@pytest.mark.parametrize("method", ["teacher", "distill", "mopd"])
def test_bad_data_fails_before_any_model_is_built(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_config: Path
) -> None:
    monkeypatch.setattr(training.run, "load_backbone", _no_model)
    data = ["data.kind=image_folder", f"data.root={tmp_path / 'missing'}", f"out_dir={tmp_path / 'run'}"]
    with pytest.raises(DataError, match="does not exist"):
        if method == "teacher":
            run_teacher(load_config(TeacherRunConfig, None, [f"backbone.name={tiny_config}", *data]))
        elif method == "distill":  # nor the teacher: its folder does not exist either
            sets = [f"student.name={tiny_config}", f"teacher_dir={tmp_path / 'no-teacher'}", *data]
            run_distill(load_config(DistillRunConfig, None, sets))
        else:
            cfg = load_config(MoPDRunCfg, None, [f"backbone.name={tiny_config}", *data])
            train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").is_file()  # what was asked for is on record
