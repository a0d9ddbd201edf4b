"""Calibration samples in bundles: stored by the exporters, bounded, round-tripped, and optional."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from models.bundle import MAX_CALIBRATION, BundleDimensionError, BundleSchemaError, load_bundle, save_bundle
from models.calibration import centroid, draw
from models.preprocess import preprocess_batch
from models.towers import build_image_tower
from models.zeroshot import build_zeroshot_bundle, named_templates
from tests.conftest import CLASS_NAMES, TINY_CONFIG
from training.export import add_calibration


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory: pytest.TempPathFactory, photos: list) -> Path:  # type: ignore[type-arg]
    folder = tmp_path_factory.mktemp("held-out")
    for i, im in enumerate(photos):
        im.save(folder / f"{i}.png")
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("zs") / "b"
    build_zeroshot_bundle(
        str(TINY_CONFIG), None, CLASS_NAMES, named_templates("simple"), out, progress=False, calibration_images=folder
    )
    return out


def test_zeroshot_sample_is_the_towers_embeddings_of_the_held_out_images(calibrated_dir: Path, photos: list) -> None:  # type: ignore[type-arg]
    b = load_bundle(calibrated_dir)
    assert b.manifest.calibration is not None and b.calibration is not None
    assert b.manifest.calibration.count == len(photos) and b.manifest.calibration.dtype == "float16"
    assert "calibration.safetensors" in b.manifest.files
    pixels = torch.from_numpy(preprocess_batch(photos, b.manifest.image_encoder.preprocess.to_config()))
    with torch.no_grad():
        want = build_image_tower(b)(pixels)  # [M, D], normalised
    assert b.calibration.shape == want.shape
    assert torch.allclose(b.calibration, want, atol=2e-3)  # stored as float16
    assert np.allclose(centroid(b.calibration), want.numpy().mean(0), atol=2e-3)


def test_old_bundles_load_without_a_sample(tiny_bundle_dir: Path) -> None:
    b = load_bundle(tiny_bundle_dir)
    assert b.calibration is None and b.manifest.calibration is None
    raw = json.loads((tiny_bundle_dir / "manifest.json").read_text())
    assert "calibration" not in raw or raw["calibration"] is None


def test_round_trip_keeps_the_sample(calibrated_dir: Path, tmp_path: Path) -> None:
    first = load_bundle(calibrated_dir)
    save_bundle(first, tmp_path / "again")
    second = load_bundle(tmp_path / "again")
    assert second.calibration is not None and first.calibration is not None
    assert torch.equal(first.calibration, second.calibration)
    assert second.manifest.calibration == first.manifest.calibration


def test_count_that_disagrees_with_the_tensor_is_refused(calibrated_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "b"
    shutil.copytree(calibrated_dir, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["calibration"]["count"] += 1
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleDimensionError, match="calibration sample has shape"):
        load_bundle(dst)


def test_a_sample_file_missing_from_the_file_list_is_refused(calibrated_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "b"
    shutil.copytree(calibrated_dir, dst)
    m = json.loads((dst / "manifest.json").read_text())
    del m["files"]["calibration.safetensors"]
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleSchemaError, match="does not list it"):
        load_bundle(dst)


def test_over_the_bound_is_refused(calibrated_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "b"
    shutil.copytree(calibrated_dir, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["calibration"]["count"] = MAX_CALIBRATION + 1
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleSchemaError, match="less than or equal to 2000"):
        load_bundle(dst)


def test_draw_is_bounded_seeded_and_uniform() -> None:
    assert draw(10).tolist() == list(range(10))
    a, b = draw(50_000, seed=3), draw(50_000, seed=3)
    assert len(a) == MAX_CALIBRATION and np.array_equal(a, b) and len(set(a.tolist())) == MAX_CALIBRATION
    assert abs(a.mean() - 25_000) < 2_000  # spread over the whole pool, not its head
    with pytest.raises(ValueError, match="within"):
        draw(10, limit=MAX_CALIBRATION + 1)


def test_training_export_embeds_a_bounded_draw_of_the_dataset(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    b = load_bundle(tiny_bundle_dir)
    tower = build_image_tower(b)
    torch.manual_seed(1)
    pixels = torch.randn(2_100, 3, 64, 64)
    add_calibration(b, tower, TensorDataset(pixels, torch.zeros(2_100)), "test images", seed=5)
    assert b.calibration is not None and b.manifest.calibration is not None
    assert b.calibration.shape == (MAX_CALIBRATION, b.manifest.embed_dim)
    picked = draw(2_100, seed=5)
    with torch.no_grad():
        want = tower(pixels[picked[:7]])
    assert torch.allclose(b.calibration[:7], want, atol=1e-5)
    assert b.manifest.calibration.source == f"test images: {MAX_CALIBRATION} of 2100"
    save_bundle(b, tmp_path / "out")
    assert load_bundle(tmp_path / "out").calibration is not None
