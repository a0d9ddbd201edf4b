"""Bundle format v1: exact round trip and one precise error per kind of damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.bundle import (
    BundleChecksumError,
    BundleDimensionError,
    BundleMissingFile,
    BundleSchemaError,
    load_bundle,
    save_bundle,
)
from models.towers import build_towers


@pytest.fixture
def bundle_copy(tiny_bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle_dir, dst)
    return dst


def test_round_trip_is_exact(bundle_copy: Path, tmp_path: Path) -> None:
    first = load_bundle(bundle_copy)
    save_bundle(first, tmp_path / "again", extra_files={})
    second = load_bundle(tmp_path / "again", verify=True)
    assert second.manifest.model_dump(exclude={"files"}) == first.manifest.model_dump(exclude={"files"})
    assert first.class_vectors.keys() == second.class_vectors.keys()
    for k in first.class_vectors:
        assert torch.equal(first.class_vectors[k], second.class_vectors[k])
    for name in ("class_vectors.safetensors", "backbones/clip.safetensors"):
        assert second.manifest.files[name] == first.manifest.files[name]


def test_loaded_bundle_rebuilds_the_exporters_encoders(bundle_copy: Path, tiny_config: Path) -> None:
    b = load_bundle(bundle_copy)
    tower, text = build_towers(b)
    assert text is not None
    names = [c.name for c in b.label_set().classes]
    again = text.class_vectors(names)
    assert (again - b.class_vectors["default"]).abs().max().item() <= 1e-6
    assert tower(torch.randn(2, 3, 64, 64)).shape == (2, b.manifest.embed_dim)


def test_corrupted_tensor_file(bundle_copy: Path) -> None:
    path = bundle_copy / "class_vectors.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleChecksumError, match="class_vectors.safetensors is corrupted"):
        load_bundle(bundle_copy)


def test_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "backbones" / "clip.safetensors").unlink()
    with pytest.raises(BundleMissingFile, match=r"backbones/clip.safetensors listed in manifest.json is missing"):
        load_bundle(bundle_copy)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleMissingFile, match="not a bundle"):
        load_bundle(tmp_path)


def test_future_schema_version(bundle_copy: Path) -> None:
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema_version"] = 2
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleSchemaError, match="schema version 2, newer than this reader"):
        load_bundle(bundle_copy)


def test_dimension_mismatch(bundle_copy: Path) -> None:
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["label_sets"][0]["classes"].append({"id": 99, "name": "ghost", "provenance": "zeroshot"})
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleDimensionError, match="class vectors have shape"):
        load_bundle(bundle_copy)


def test_malformed_manifest(bundle_copy: Path) -> None:
    m = json.loads((bundle_copy / "manifest.json").read_text())
    del m["embed_dim"]
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleSchemaError, match="embed_dim"):
        load_bundle(bundle_copy)
