"""Datasets, splits and samplers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from training.benchmark import digits_benchmark
from training.data import (
    BaseNovelSplit,
    DataError,
    ImageRecord,
    RecordDataset,
    UnlabeledImageFolder,
    class_names_of,
    coop_split_records,
    csv_records,
    few_shot,
    few_shot_indices,
    image_folder_records,
    subsample_classes,
)


def _to_tensor(im):  # type: ignore[no-untyped-def]
    return torch.zeros(1)


def test_split_uses_sorted_label_ids_not_positions() -> None:
    labels = [7, 3, 9, 1, 5, 7, 1]  # first-seen order 7, 3, 9, 1, 5; sorted 1, 3, 5, 7, 9
    split = BaseNovelSplit.from_labels(labels)
    assert split.m == 3  # ceil(5 / 2)
    assert split.ids("base") == (1, 3, 5)
    assert split.ids("new") == (7, 9)
    assert split.relabel("base") == {1: 0, 3: 1, 5: 2}
    assert split.relabel("new") == {7: 0, 9: 1}
    idx, new = split.select(labels, "new")
    assert idx == [0, 2, 5] and new == [0, 1, 0]
    idx, new = split.select(labels, "base")
    assert idx == [1, 3, 4, 6] and new == [1, 0, 2, 0]


def test_subsample_classes_relabels_records() -> None:
    recs = [ImageRecord(Path(f"{i}.png"), y, f"c{y}") for i, y in enumerate([4, 0, 2, 3, 1, 4])]
    novel = subsample_classes(recs, "new")  # ids 0..4 -> base 0,1,2; novel 3,4
    assert [(r.classname, r.label) for r in novel] == [("c4", 1), ("c3", 0), ("c4", 1)]
    assert [r.label for r in subsample_classes(recs, "all")] == [4, 0, 2, 3, 1, 4]


def test_few_shot_seeded_k_per_class() -> None:
    labels = [i % 3 for i in range(60)]
    a, b = few_shot_indices(labels, 4, seed=1), few_shot_indices(labels, 4, seed=1)
    assert a == b and len(a) == 12
    assert sorted(labels[i] for i in a) == [0] * 4 + [1] * 4 + [2] * 4
    assert few_shot_indices(labels, 4, seed=2) != a
    assert few_shot_indices([0, 0, 1], 5, seed=1) == [0, 1, 2]  # fewer than k: keep all
    recs = [ImageRecord(Path(f"{i}"), y, "x") for i, y in enumerate(labels)]
    assert len(few_shot(recs, 2, 3)) == 6


def _write_folder(root: Path, photos, per_class: int = 2) -> None:  # type: ignore[no-untyped-def]
    for ci, name in enumerate(["b_class", "a_class"]):
        d = root / name
        d.mkdir(parents=True)
        for j in range(per_class):
            photos[(ci * per_class + j) % len(photos)].resize((32, 32)).save(d / f"{j}.png")


def test_image_folder_sorted_classes_and_bad_image_skipped(tmp_path: Path, photos, caplog) -> None:  # type: ignore[no-untyped-def]
    _write_folder(tmp_path, photos)
    (tmp_path / "a_class" / "broken.png").write_bytes(b"not an image")
    records, names = image_folder_records(tmp_path)
    assert names == ["a class", "b class"]  # sorted folder names, underscores -> spaces
    assert {r.label for r in records if r.classname == "a class"} == {0}
    ds = RecordDataset(records, _to_tensor, n_classes=2)
    broken = next(i for i, r in enumerate(records) if r.path.name == "broken.png")
    with caplog.at_level(logging.WARNING):
        _, label = ds[broken]  # the next readable record instead; not fatal
    assert label == records[(broken + 1) % len(records)].label
    assert len(ds.unreadable) == 1 and "unreadable" in caplog.text


def test_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        image_folder_records(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        image_folder_records(tmp_path / "nope")
    with pytest.raises(DataError, match="no class sub-folders"):
        image_folder_records(tmp_path / "empty_class")
    with pytest.raises(DataError, match="out of range"):
        RecordDataset([ImageRecord(Path("x.png"), 5, "x")], _to_tensor, n_classes=3)
    with pytest.raises(DataError, match="holds no images"):
        UnlabeledImageFolder(tmp_path, _to_tensor)


def test_coop_split_and_csv(tmp_path: Path, photos) -> None:  # type: ignore[no-untyped-def]
    _write_folder(tmp_path / "images", photos)
    split = {
        "train": [["a_class/0.png", 0, "a class"], ["b_class/0.png", 1, "b class"]],
        "val": [],
        "test": [["a_class/1.png", 0, "a class"], ["b_class/1.png", 1, "b class"]],
    }
    (tmp_path / "split.json").write_text(json.dumps(split))
    parts = coop_split_records(tmp_path / "split.json", tmp_path / "images")
    assert [r.label for r in parts["train"]] == [0, 1]
    assert class_names_of(parts["train"]) == ["a class", "b class"]
    assert parts["test"][1].path == tmp_path / "images" / "b_class" / "1.png"
    (tmp_path / "train.csv").write_text("path,label\nimages/a_class/0.png,0\nimages/b_class/0.png,1\n")
    recs = csv_records(tmp_path / "train.csv", classnames=["a class", "b class"])
    assert [(r.classname, r.label) for r in recs] == [("a class", 0), ("b class", 1)]
    assert recs[0].path.is_file()
    (tmp_path / "bad.csv").write_text("file,y\n")
    with pytest.raises(DataError, match="header"):
        csv_records(tmp_path / "bad.csv")


def test_digits_benchmark_base_novel_datasets() -> None:
    bench = digits_benchmark(32)
    assert bench.class_names[:2] == ["zero", "one"] and bench.n_base == 5
    assert bench.names("new") == ["five", "six", "seven", "eight", "nine"]
    ds = bench.dataset("train", "new", _to_tensor, shots=3, seed=1)
    assert len(ds) == 15 and sorted({ds[i][1] for i in range(15)}) == [0, 1, 2, 3, 4]
    assert len(bench.unlabeled(_to_tensor)) == len(bench.train_items)
    assert bench.rows("new") == slice(5, None)
