"""The two silent deviations of issue 14: a dataset file must not change a method's settings, and
class names reach the prompts with spaces (as every official prompt learner writes them)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from training.benchmark import load_benchmark
from training.cli import _overrides, _train_distill, _train_teacher
from training.config import DataCfg, load_config
from training.data import DataError, coop_split_records
from training.distill import DistillRunConfig
from training.teacher import TeacherRunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs" / "promptkd"


def _args(func, config: str, data_config: str | None, sets: list[str] | None = None) -> argparse.Namespace:  # type: ignore[no-untyped-def]
    return argparse.Namespace(
        func=func, config=config, data_config=data_config, overrides=sets or [], out=None, device=None
    )


@pytest.mark.parametrize("dataset", ["dtd", "imagenet", "oxford_pets"])
def test_teacher_keeps_its_16_shots_with_a_dataset_file(dataset: str) -> None:
    args = _args(_train_teacher, str(CONFIGS / "teacher.yaml"), str(CONFIGS / f"{dataset}.yaml"))
    cfg = load_config(TeacherRunConfig, args.config, _overrides(args))
    ds = load_config(DistillRunConfig, CONFIGS / f"{dataset}.yaml")
    assert cfg.data.shots == 16  # teacher.yaml's, not _distill.yaml's 0 (the whole base split)
    assert cfg.data.batch_size == 8 and ds.data.shots == 0
    # ... while the dataset itself comes from the dataset file
    assert (cfg.data.kind, cfg.data.root, cfg.data.split_file) == (ds.data.kind, ds.data.root, ds.data.split_file)
    assert cfg.data.classnames_file == ds.data.classnames_file
    assert str(cfg.out_dir) == f"runs/teacher/{dataset}"


def test_explicit_overrides_still_win_over_both_files() -> None:
    args = _args(_train_teacher, str(CONFIGS / "teacher.yaml"), str(CONFIGS / "dtd.yaml"), ["data.shots=4"])
    cfg = load_config(TeacherRunConfig, args.config, _overrides(args))
    assert cfg.data.shots == 4


def test_distill_config_file_keeps_shots_0() -> None:
    args = _args(_train_distill, str(CONFIGS / "dtd.yaml"), None)
    assert load_config(DistillRunConfig, args.config, _overrides(args)).data.shots == 0


def _photo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)


def test_coop_split_names_have_spaces(tmp_path: Path) -> None:
    rows = [
        ["a/1.jpg", 0, "american_bulldog"],
        ["b/1.jpg", 1, "outdoor apartment_building"],
        ["c/1.jpg", 2, "Apply_Eye_Makeup"],
    ]
    for rel, _, _ in rows:
        _photo(tmp_path / "img" / rel)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": rows, "val": [], "test": rows}))
    assert [r.classname for r in coop_split_records(split, tmp_path / "img")["train"]] == [
        "american bulldog",
        "outdoor apartment building",
        "Apply Eye Makeup",
    ]
    bench = load_benchmark(DataCfg(kind="coop_split", root=tmp_path / "img", split_file=split))
    assert bench.class_names == ["american bulldog", "outdoor apartment building", "Apply Eye Makeup"]


def test_image_folder_rename_of_folders_with_underscores(tmp_path: Path) -> None:
    for part in ("train", "test"):
        for folder in ("ankle_boot", "n01440764", "t_shirt"):
            _photo(tmp_path / part / folder / "0.png")
    names = tmp_path / "classnames.txt"
    names.write_text("ankle_boot ankle boot\nn01440764 tench\nt_shirt T-shirt_top\n")
    bench = load_benchmark(DataCfg(kind="image_folder", root=tmp_path, classnames_file=names))
    assert bench.class_names == ["ankle boot", "tench", "T-shirt top"]  # folders sorted, names cleaned
    names.write_text("ankle_boot ankle boot\nn01440764 tench\n")
    with pytest.raises(DataError, match="t_shirt"):
        load_benchmark(DataCfg(kind="image_folder", root=tmp_path, classnames_file=names))


def test_service_spells_runtime_names_as_training_does(tmp_path: Path) -> None:
    from service.errors import DuplicateClass
    from service.names import clean_names

    split = tmp_path / "split.json"
    _photo(tmp_path / "img" / "a.jpg")
    split.write_text(json.dumps({"train": [["a.jpg", 0, "brick_wall"]], "val": [], "test": []}))
    trained = coop_split_records(split, tmp_path / "img")["train"][0].classname
    assert clean_names(["brick_wall", " Brick_Wall "], 10, 100) == [trained, "Brick Wall"]
    with pytest.raises(DuplicateClass):  # one class, however it is spelled
        clean_names(["brick wall", "brick_wall"], 10, 100)
