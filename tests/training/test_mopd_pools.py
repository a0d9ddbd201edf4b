"""Hard-prompt pools: sizes, exact official strings, name aliases, user files, ablation pools."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.class_vectors import validate_templates
from training.mopd.defaults import CUSTOM_DEFAULTS, DATASET_DEFAULTS, defaults_for
from training.pools import (
    DATASET_POOLS,
    GENERIC_POOL,
    MIXED_POOL,
    NONSENSE_POOL,
    load_pool_file,
    pool_for_dataset,
    resolve_pool,
)

BENCHMARKS = [
    "ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
    "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101",
]  # fmt: skip


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_has_twelve_distinct_valid_templates(name: str) -> None:
    pool = pool_for_dataset(name)
    assert len(pool) == 12 and len(set(pool)) == 12
    validate_templates(pool)
    assert (pool[0].startswith("a photo") and pool[1].startswith("a picture")) or "satellite" in pool[0]


def test_exact_strings_from_the_official_pool() -> None:
    flowers = pool_for_dataset("Flowers102")
    assert flowers[:4] == [
        "a photo of a {}, a type of flower.",
        "a picture of a {}, a type of flower.",
        "an image of a {}, a type of flower.",
        "a photo of a flower, classified as {}.",
    ]
    assert flowers[-1] == "an image of a flower, labeled as {}."
    assert pool_for_dataset("DescribableTextures")[0] == "a photo of {}, a type of texture."
    assert pool_for_dataset("eurosat")[4] == "a centered satellite photo, categorized as {}."
    assert pool_for_dataset("ucf_101")[5] == "a photo of a person doing, labeled as {}."
    assert pool_for_dataset("food-101")[3] == "a photo of food, classified as {}."
    assert GENERIC_POOL[3] == "a photo, classified as {}."
    assert pool_for_dataset("sun397") == pool_for_dataset("imagenet") == GENERIC_POOL


def test_custom_dataset_gets_generic_pool_and_defaults() -> None:
    assert pool_for_dataset("my-warehouse-parts") == GENERIC_POOL
    assert resolve_pool("dataset", "my-warehouse-parts") == GENERIC_POOL
    assert resolve_pool("dataset", "oxford_flowers") == DATASET_POOLS["oxford_flowers"]
    assert defaults_for("my-warehouse-parts") == CUSTOM_DEFAULTS
    assert len(DATASET_DEFAULTS) == 11
    f = defaults_for("Food101")
    assert (f.w, f.w2, f.top_k, f.epochs) == (0.5, 0.1, 2, 25)
    inet = defaults_for("imagenet")
    assert (inet.w, inet.w2, inet.top_k, inet.epochs) == (0.8, 0.0005, 3, 25)


def test_ablation_pools() -> None:
    assert len(MIXED_POOL) == 35 and len(NONSENSE_POOL) == 12
    validate_templates(MIXED_POOL)
    validate_templates(NONSENSE_POOL)
    assert resolve_pool("mixed") == MIXED_POOL and resolve_pool("nonsense") == NONSENSE_POOL
    assert resolve_pool("mixed") is not MIXED_POOL  # callers get a copy


def test_user_pool_files(tmp_path: Path) -> None:
    txt = tmp_path / "pool.txt"
    txt.write_text("# my pool\na sketch of a {}.\n\n  a {} on a shelf.  \n")
    assert load_pool_file(txt) == ["a sketch of a {}.", "a {} on a shelf."]
    assert resolve_pool(str(txt)) == ["a sketch of a {}.", "a {} on a shelf."]
    js = tmp_path / "pool.json"
    js.write_text('["a {}.", "one {} here."]')
    assert resolve_pool(str(js)) == ["a {}.", "one {} here."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\nno placeholder here\n")
    with pytest.raises(ValueError, match="exactly one"):
        load_pool_file(bad)
    two = tmp_path / "two.txt"
    two.write_text("{} and {}\n")
    with pytest.raises(ValueError, match="exactly one"):
        load_pool_file(two)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no templates"):
        load_pool_file(empty)
    with pytest.raises(ValueError, match="unknown prompt pool"):
        resolve_pool("no/such/file.txt")
