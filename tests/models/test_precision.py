"""The precision gate (models/precision.py): parity measured on stored probes, floors decide.

How close fp16 / bf16 / int8 come to fp32 depends on the machine's kernels, so no test asserts a
measured figure: each checks that the gate reports what an independent computation of the same
towers on the same probes gives, and that a floor above the measured parity refuses while one
below serves. The noisy tower's parity is set by the test (its noise), not by a kernel.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import precision
from models.bundle import Bundle, ParityFloor, load_bundle
from models.precision import GateResult, Parity, gate_torch, measure, probe_pixels, sample_probe_pixels, set_floor
from models.towers import ImageTower, build_image_tower


class Noisy(nn.Module):
    """A stand-in for a reduced-precision tower whose error is known: fp32 output + a fixed perturbation."""

    def __init__(self, tower: nn.Module, scale: float) -> None:
        super().__init__()
        self.tower, self.scale = tower, scale

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixels)  # [B, D]
        g = torch.Generator().manual_seed(7)
        return out + self.scale * torch.randn(out.shape, generator=g).to(out.device)


@pytest.fixture
def bundle(tiny_bundle_dir: Path) -> Bundle:
    return load_bundle(tiny_bundle_dir)


@pytest.fixture
def tower(bundle: Bundle) -> ImageTower:
    return build_image_tower(bundle)


def _embed(tower: nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return tower(torch.from_numpy(pixels)).float().numpy()


def _same_parity(got: Parity | None, want: Parity) -> None:
    assert got is not None
    assert got.n_images == want.n_images and got.top1_agreement.keys() == want.top1_agreement.keys()
    assert got.cosine_min == pytest.approx(want.cosine_min, abs=1e-6)
    assert got.cosine_mean == pytest.approx(want.cosine_mean, abs=1e-6)
    for k, v in want.top1_agreement.items():
        assert got.top1_agreement[k] == pytest.approx(v), k


def test_measure_figures() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 8)).astype(np.float32)
    classes = {"eye": np.eye(8, dtype=np.float32), "one": np.eye(8, dtype=np.float32)[:1]}
    same = measure(a, a * 3.0, classes)  # scaling changes no cosine and no arg-max
    assert same.cosine_min == pytest.approx(1.0) and same.cosine_mean == pytest.approx(1.0)
    assert same.top1_agreement == {"eye": 1.0, "one": 1.0} and same.n_images == 4
    b = a.copy()
    b[0] = -b[0]  # one image flips: cosine -1, another arg-max over eye(8); over one class nothing can flip
    flipped = measure(a, b, classes)
    assert flipped.cosine_min == pytest.approx(-1.0) and flipped.cosine_mean == pytest.approx(0.5)
    assert flipped.top1_agreement == {"eye": 0.75, "one": 1.0}
    assert flipped.as_dict()["top1_agreement:eye"] == 0.75 and flipped.as_dict()["n_images"] == 4.0


def test_shortfall_checks_cosine_then_each_label_set() -> None:
    p = Parity(cosine_mean=0.999, cosine_min=0.995, n_images=4, top1_agreement={"a": 1.0, "b": 0.5})
    assert precision.shortfall(p, ParityFloor(cosine_min=0.99)) is None
    assert "cosine_min" in str(precision.shortfall(p, ParityFloor(cosine_min=0.996)))
    assert "'b'" in str(precision.shortfall(p, ParityFloor(cosine_min=0.99, top1_agreement=0.75)))
    nan = Parity(cosine_mean=float("nan"), cosine_min=float("nan"), n_images=4)
    assert precision.shortfall(nan, ParityFloor(cosine_min=-1.0)) is not None, "NaN must never pass"


def test_probes_are_stored_at_export_and_read_back(bundle: Bundle, tiny_bundle_dir: Path) -> None:
    spec = bundle.manifest.image_encoder.probes
    assert spec is not None and spec.file in bundle.manifest.files  # checksummed like every bundle file
    pixels, source = probe_pixels(bundle)
    assert "stored probe images" in source and pixels.shape[0] == spec.n_images
    # the exporter's check images: the sample photos and their mirror images, preprocessed
    np.testing.assert_allclose(pixels, sample_probe_pixels(bundle), atol=1e-6)


def test_a_bundle_without_probes_is_scored_on_the_sample_photos(bundle: Bundle) -> None:
    enc = bundle.manifest.image_encoder.model_copy(update={"probes": None})
    old = Bundle(bundle.manifest.model_copy(update={"image_encoder": enc}), bundle.class_vectors, root=bundle.root)
    pixels, source = probe_pixels(old)
    assert "stores no probes" in source
    np.testing.assert_allclose(pixels, sample_probe_pixels(bundle), atol=1e-6)


def test_a_noisy_tower_below_its_floor_is_refused_and_fp32_served(
    bundle: Bundle, tower: ImageTower, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision, "reduced", lambda t, p: Noisy(copy.deepcopy(t), 0.05))
    pixels, _ = probe_pixels(bundle)
    vectors = {k: v.float().numpy() for k, v in bundle.class_vectors.items()}
    want = measure(_embed(tower, pixels), _embed(Noisy(tower, 0.05), pixels), vectors)  # computed here
    assert want.cosine_min < 1.0 - 1e-4  # the noise is what the test says it is

    set_floor(bundle, "fp16", ParityFloor(cosine_min=want.cosine_min + 1e-3))
    served, result = gate_torch(bundle, tower, "fp16", "cpu")
    assert served is tower and (result.wanted, result.serving) == ("fp16", "fp32")
    _same_parity(result.parity, want)
    assert result.refused is not None and "cosine_min" in result.refused
    assert result.summary().startswith("fp32 (fp16 refused: cosine_min")

    set_floor(bundle, "fp16", ParityFloor(cosine_min=want.cosine_min - 1e-3))
    served, result = gate_torch(bundle, tower, "fp16", "cpu")
    assert isinstance(served, Noisy) and result.serving == "fp16" and result.refused is None
    _same_parity(result.parity, want)

    # the top-1 floor: above the lowest agreement measured refuses, at it serves
    lowest = min(want.top1_agreement.values())
    floor = ParityFloor(cosine_min=-1.0, top1_agreement=lowest)
    set_floor(bundle, "fp16", floor)
    assert gate_torch(bundle, tower, "fp16", "cpu")[1].serving == "fp16"
    if lowest < 1.0:
        set_floor(bundle, "fp16", floor.model_copy(update={"top1_agreement": min(1.0, lowest + 1e-3)}))
        assert "top-1 agreement" in str(gate_torch(bundle, tower, "fp16", "cpu")[1].refused)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_an_honest_reduced_tower_is_served_with_the_parity_it_has(bundle: Bundle, tower: ImageTower, name: str) -> None:
    pixels, _ = probe_pixels(bundle)
    dtype = precision.TORCH_DTYPES[name]
    half = copy.deepcopy(tower).to(dtype)
    with torch.inference_mode():
        got = half(torch.from_numpy(pixels).to(dtype)).float().numpy()
    vectors = {k: v.float().numpy() for k, v in bundle.class_vectors.items()}
    want = measure(_embed(tower, pixels), got, vectors)

    set_floor(bundle, name, ParityFloor(cosine_min=want.cosine_min - 1e-3))
    served, result = gate_torch(bundle, tower, name, "cpu")
    assert result.serving == name and served is not tower
    assert {p.dtype for p in served.parameters()} == {dtype}  # really runs in the reduced precision
    assert {p.dtype for p in tower.parameters()} == {torch.float32}  # the fp32 tower is left as it was
    _same_parity(result.parity, want)
    np.testing.assert_allclose(_embed(served, pixels), got, atol=1e-6)  # takes and returns float32

    set_floor(bundle, name, ParityFloor(cosine_min=want.cosine_min + 1e-3))
    served, result = gate_torch(bundle, tower, name, "cpu")
    assert served is tower and result.serving == "fp32" and result.refused


def test_fp32_is_not_gated(bundle: Bundle, tower: ImageTower) -> None:
    served, result = gate_torch(bundle, tower, "fp32", "cpu")
    assert served is tower and result == GateResult("fp32", "fp32") and "not gated" in result.summary()
    with pytest.raises(ValueError, match="torch towers run"):
        precision.reduced(tower, "int8")
