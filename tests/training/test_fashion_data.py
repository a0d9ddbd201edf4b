"""The Fashion-MNIST reader on tiny IDX files written here (the real files are only needed by the
experiment, docs/experiments.md), and the seeded per-class subsample every method shares."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from training.benchmark import load_benchmark
from training.config import DataCfg
from training.data import DataError
from training.variants import FASHION_MNIST_NAMES


def _idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _write(root: Path, n_per_class: int) -> None:
    rng = np.random.default_rng(0)
    for part in ("train", "t10k"):
        labels = np.repeat(np.arange(10), n_per_class)
        images = rng.integers(0, 255, size=(len(labels), 28, 28))
        images[:, 0, 0] = labels  # the label is readable back from the pixels
        _idx(root / f"{part}-images-idx3-ubyte.gz", images)
        _idx(root / f"{part}-labels-idx1-ubyte.gz", labels)


def test_reader_labels_names_and_subsample(tmp_path: Path) -> None:
    _write(tmp_path, 6)
    bench = load_benchmark(DataCfg(kind="fashion_mnist", root=tmp_path, subsample_train=4), image_size=28)
    assert bench.class_names == FASHION_MNIST_NAMES and bench.n_base == 5
    assert bench.names("new") == ["sandal", "shirt", "sneaker", "bag", "ankle boot"]
    assert len(bench.train_items) == 40 and len(bench.test_items) == 60
    assert np.bincount(bench.train_labels).tolist() == [4] * 10
    for im, y in zip(bench.train_items, bench.train_labels, strict=True):
        assert np.asarray(im.convert("L"))[0, 0] == y  # type: ignore[union-attr]
    again = load_benchmark(DataCfg(kind="fashion_mnist", root=tmp_path, subsample_train=4), image_size=28)
    assert [np.asarray(a).tobytes() for a in again.train_items] == [np.asarray(b).tobytes() for b in bench.train_items]


def test_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_benchmark(DataCfg(kind="fashion_mnist", root=tmp_path), image_size=28)
