"""Class vectors from examples: parity with a direct numpy reading of the method, and its purpose."""

from __future__ import annotations

import numpy as np
import pytest

from models.prototypes import Gap, centroid, class_vector, combine, image_prototype


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def two_cones(seed: int = 0, n_classes: int = 6, dim: int = 32, per_class: int = 40) -> dict[str, np.ndarray]:
    """Synthetic CLIP-like geometry: class directions shared by both modalities, each modality offset
    by its own constant direction (the modality gap), images noisier than texts."""
    rng = np.random.default_rng(seed)
    classes = rng.standard_normal((n_classes, dim))
    text_offset, image_offset = 3.0 * rng.standard_normal(dim), 3.0 * rng.standard_normal(dim)
    texts = unit(classes + text_offset)  # [C, D]
    labels = np.repeat(np.arange(n_classes), per_class)
    images = unit(classes[labels] + image_offset + 0.8 * rng.standard_normal((len(labels), dim)))  # [C*P, D]
    return {"texts": texts, "images": images, "labels": labels}


def test_prototype_equals_liang_shift_of_every_example_then_mean() -> None:
    rng = np.random.default_rng(1)
    texts, calib, examples = (unit(rng.standard_normal((n, 16))) for n in (10, 50, 7))
    gap = Gap.between(texts, calib, standardise=False)
    assert gap.mode == "centroid"
    # Liang et al. 2022: shift each image embedding by the centroid difference, then the class mean
    shifted = examples - (calib.mean(0) - texts.mean(0))  # [K, D]
    want = shifted.mean(0) / np.linalg.norm(shifted.mean(0))
    got = image_prototype(examples, gap)
    assert got.dtype == np.float32 and got.shape == (16,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got), 1.0, atol=1e-6)


def test_without_an_image_centroid_the_prototype_is_the_plain_normalised_mean() -> None:
    rng = np.random.default_rng(2)
    texts, examples = unit(rng.standard_normal((5, 8))), rng.standard_normal((4, 8))
    gap = Gap.between(texts, None)
    assert gap.mode == "none" and not gap.shift.any()
    mean = unit(examples).mean(0)
    np.testing.assert_allclose(image_prototype(examples, gap), mean / np.linalg.norm(mean), atol=1e-6)
    assert Gap.from_centroids(centroid(texts), None).mode == "none"


def test_combine_is_the_normalised_weighted_sum_of_both_unit_parts() -> None:
    rng = np.random.default_rng(3)
    t, p = rng.standard_normal(8) * 3, rng.standard_normal(8) * 0.1
    want = 0.25 * t / np.linalg.norm(t) + 0.75 * p / np.linalg.norm(p)
    np.testing.assert_allclose(combine(t, p, 0.25), want / np.linalg.norm(want), atol=1e-6)
    np.testing.assert_allclose(combine(t, p, 1.0), t / np.linalg.norm(t), atol=1e-6)
    with pytest.raises(ValueError, match="text_weight"):
        combine(t, p, 1.5)


def test_class_vector_covers_name_examples_and_both() -> None:
    rng = np.random.default_rng(4)
    texts, calib, ex = (
        unit(rng.standard_normal((6, 8))),
        unit(rng.standard_normal((30, 8))),
        rng.standard_normal((3, 8)),
    )
    gap = Gap.between(texts, calib)
    np.testing.assert_allclose(class_vector(texts[0] * 2, None, gap), texts[0], atol=1e-6)
    np.testing.assert_allclose(class_vector(None, ex, gap), image_prototype(ex, gap), atol=1e-7)
    np.testing.assert_allclose(class_vector(texts[0], ex, gap), combine(texts[0], image_prototype(ex, gap)), atol=1e-7)
    with pytest.raises(ValueError, match="name"):
        class_vector(None, None, gap)
    with pytest.raises(ValueError, match="non-empty"):
        centroid(np.zeros((0, 8)))


def test_gap_corrected_prototypes_rank_fairly_against_text_vectors_where_the_plain_mean_does_not() -> None:
    """Half the classes by name, half by 5 examples: with the plain mean every image goes to an example
    class (its cone); moved across the gap, named classes keep their images."""
    data = two_cones()
    texts, images, labels = data["texts"], data["images"], data["labels"]
    named, by_example = [0, 1, 2], [3, 4, 5]
    gap = Gap.between(texts, images)  # in-domain image sample: all images (labels unused)
    few = {c: images[labels == c][:5] for c in by_example}

    def accuracy(plain: bool) -> tuple[float, float]:
        g = Gap.between(texts, None) if plain else gap
        vectors = np.stack([texts[c] for c in named] + [image_prototype(few[c], g) for c in by_example])
        order = named + by_example
        pred = np.asarray(order)[(images @ vectors.T).argmax(1)]
        is_named = np.isin(labels, named)
        return float((pred == labels)[is_named].mean()), float((pred == labels)[~is_named].mean())

    named_plain, examples_plain = accuracy(plain=True)
    named_gap, examples_gap = accuracy(plain=False)
    assert named_plain < 0.2  # the plain mean swallows the named classes' images
    assert named_gap > 0.8 and examples_gap > 0.8 and examples_plain > 0.8


def test_scale_shrinks_the_class_offset_from_the_image_centroid() -> None:
    rng = np.random.default_rng(5)
    texts, calib, examples = (unit(rng.standard_normal((n, 16))) for n in (10, 40, 6))
    gap = Gap.between(texts, calib, standardise=False)
    mean = examples.mean(0)
    want = texts.mean(0) + 0.5 * (mean - calib.mean(0))
    np.testing.assert_allclose(image_prototype(examples, gap, 0.5), want / np.linalg.norm(want), atol=1e-6)
    np.testing.assert_allclose(image_prototype(examples, gap, 1.0), image_prototype(examples, gap), atol=1e-7)
    plain = Gap.between(texts, None)  # no image centroid: the scale has nothing to scale
    np.testing.assert_allclose(image_prototype(examples, plain, 0.5), mean / np.linalg.norm(mean), atol=1e-6)


def test_standardised_prototype_has_the_text_vectors_score_statistics_over_the_sample() -> None:
    """The Z-norm folded into the vector: over the in-domain sample, the prototype's cosines have the
    shipped text vectors' median mean and median spread; the vector stays a unit one."""
    data = two_cones(seed=6)
    texts, images, labels = data["texts"], data["images"], data["labels"]
    gap = Gap.between(texts, images)
    assert gap.mode == "standardised" and gap.target is not None and gap.cohort is not None
    scores = images @ texts.T  # [M, C]: the target read directly
    assert gap.target.mean == pytest.approx(float(np.median(scores.mean(0))), abs=1e-9)
    assert gap.target.std == pytest.approx(float(np.median(scores.std(0))), abs=1e-9)
    for c in range(3):
        p = image_prototype(images[labels == c][:5], gap)
        assert np.linalg.norm(p) == pytest.approx(1.0, abs=1e-6)
        s = images @ p.astype(np.float64)
        assert float(s.mean()) == pytest.approx(gap.target.mean, abs=2e-3)
        assert float(s.std()) == pytest.approx(gap.target.std, rel=0.05)
        unshifted = image_prototype(images[labels == c][:5], Gap.between(texts, images, standardise=False))
        assert float(unshifted @ p) < 0.9999  # not Liang et al.'s shift alone


def test_standardised_prototypes_keep_the_named_classes_where_the_centroid_shift_does_not() -> None:
    """Text vectors with a weaker class signal than the images (as in CLIP's tiny students): the shifted
    prototypes win the named classes' images; standardised, the named classes keep their by-name accuracy
    (mean over seeds), and the example classes stay well above chance."""
    drops: dict[str, list[float]] = {"standardised": [], "centroid": []}
    example_acc = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        classes = rng.standard_normal((6, 32))
        text_offset, image_offset = 3.0 * rng.standard_normal(32), 3.0 * rng.standard_normal(32)
        texts = unit(0.4 * classes + text_offset)  # the class signal weaker in texts than in images
        labels = np.repeat(np.arange(6), 60)
        images = unit(1.5 * classes[labels] + image_offset + rng.standard_normal((len(labels), 32)))
        named, by_example = [0, 1, 2], [3, 4, 5]
        is_named = np.isin(labels, named)

        def accuracy(
            vectors: np.ndarray, of: np.ndarray, images: np.ndarray = images, labels: np.ndarray = labels
        ) -> float:
            pred = np.asarray([0, 1, 2, 3, 4, 5])[(images @ vectors.T).argmax(1)]  # rows: named, then by_example
            return 100.0 * float((pred == labels)[of].mean())

        by_name = accuracy(texts, is_named)
        for mode, gap in (
            ("standardised", Gap.between(texts, images)),
            ("centroid", Gap.between(texts, images, False)),
        ):
            protos = [image_prototype(images[labels == c][:5], gap) for c in by_example]
            mixed = np.stack([texts[c] for c in named] + protos)
            drops[mode].append(by_name - accuracy(mixed, is_named))
            if mode == "standardised":
                example_acc.append(accuracy(mixed, ~is_named))
    assert np.mean(drops["standardised"]) <= 2.0
    assert np.mean(drops["centroid"]) >= np.mean(drops["standardised"]) + 3.0
    assert np.mean(example_acc) > 60.0  # chance: 100 / 6
