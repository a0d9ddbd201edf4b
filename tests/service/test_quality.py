"""service/quality.py: nearest classes, tie rates equal to a brute-force count, and the flag rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.index import adhoc_rank, normalise
from service.quality import FLAG_RATE, check_new_classes, confusable_pairs, tie_stats

SCALE = 100.0


def _space(seed: int = 0, n: int = 5, per: int = 60, d: int = 24, noise: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """``n`` class vectors and a sample of ``per`` images around each."""
    rng = np.random.default_rng(seed)
    classes = normalise(rng.normal(size=(n, d)))
    sample = normalise(np.repeat(classes, per, axis=0) + noise * rng.normal(size=(n * per, d)))
    return classes, sample


def _check(existing: np.ndarray, new: np.ndarray, sample: np.ndarray | None, names: list[str] | None = None):  # type: ignore[no-untyped-def]
    names = names or [f"new{i}" for i in range(len(new))]
    return check_new_classes(
        names,
        new,
        lambda q, k: adhoc_rank(q, existing, SCALE, k),
        lambda cid: f"c{cid}",
        lambda ids: existing[list(ids)],
        sample,
        SCALE,
    )


def _brute_tie_rate(sample: np.ndarray, union: np.ndarray, a: int, b: int) -> tuple[float, int]:
    """By the definition: images whose top-1 in ``union`` is a or b; of those, |cos_a - cos_b| < ln 2 / s."""
    cos = sample @ union.T
    top = cos.argmax(1)
    either = (top == a) | (top == b)
    ties = either & (np.abs(cos[:, a] - cos[:, b]) < math.log(2) / SCALE)
    return ties.sum() / either.sum(), int(either.sum())


def test_a_duplicate_is_flagged_and_its_tie_rate_is_the_brute_force_count() -> None:
    classes, sample = _space()
    existing, new = classes[:4], classes[1:2].copy()  # class 1 again
    (check,) = _check(existing, new, sample)
    top = check.neighbours[0]
    assert top.class_id == 1 and top.name == "c1" and top.cosine == pytest.approx(1.0, abs=1e-6)
    assert top.tie_rate == 1.0 and top.flagged and check.flagged == [top]
    rate, support = _brute_tie_rate(sample, np.vstack([existing, new]), 1, 4)
    assert top.support == support > 0 and rate == 1.0


def test_a_distinct_class_is_listed_with_its_neighbours_but_not_flagged() -> None:
    classes, sample = _space(1)
    existing, new = classes[:4], classes[4:5]
    (check,) = _check(existing, new, sample)
    cos = (existing @ new[0]).astype(np.float64)
    assert [n.class_id for n in check.neighbours] == list(np.argsort(-cos)[:3])
    np.testing.assert_allclose([n.cosine for n in check.neighbours], np.sort(cos)[::-1][:3], atol=1e-6)
    union = np.vstack([existing, new])
    for n in check.neighbours:
        assert n.class_id is not None
        rate, support = _brute_tie_rate(sample, union, n.class_id, 4)
        assert n.tie_rate == pytest.approx(rate) and n.support == support
        assert not n.flagged
    assert check.flagged == []


def test_a_near_copy_ties_on_most_images_and_is_flagged() -> None:
    classes, sample = _space(2)
    rng = np.random.default_rng(9)
    near = normalise(classes[2] + 0.002 * rng.normal(size=classes.shape[1]))[None]  # cos ~ 0.99999
    (check,) = _check(classes, near, sample)
    top = check.neighbours[0]
    assert top.class_id == 2 and top.tie_rate is not None and top.tie_rate >= FLAG_RATE and top.flagged


def test_two_copies_in_one_request_flag_each_other() -> None:
    classes, sample = _space(3)
    new = np.vstack([classes[4], classes[4]])
    checks = _check(classes[:4], new, sample, ["okapi", "Okapi"])
    assert checks[0].neighbours[0].name == "Okapi" and checks[0].neighbours[0].class_id is None
    assert checks[0].neighbours[0].flagged and checks[1].neighbours[0].name == "okapi"


def test_without_a_sample_only_vectors_closer_than_the_margin_are_flagged() -> None:
    classes, _ = _space(4)
    same, far = classes[0:1], classes[4:5]
    (dup,) = _check(classes[:4], same, None)
    (other,) = _check(classes[:4], far, None)
    assert dup.neighbours[0].flagged and dup.neighbours[0].tie_rate is None
    assert not other.flagged


def test_tie_stats_with_no_support() -> None:
    a, b, best = np.array([0.1, 0.2]), np.array([0.1, 0.1]), np.array([0.9, 0.9])
    assert tie_stats(a, b, best, SCALE) == (None, 0)


def test_report_pairs_equal_the_brute_force_tie_rates() -> None:
    classes, sample = _space(5, n=6, noise=0.6)
    vectors = np.vstack([classes, normalise(classes[0] + 0.01 * classes[1])[None]])  # 7: the last nearly class 0
    ids = np.arange(len(vectors)) + 100
    names = [f"c{i}" for i in range(len(vectors))]

    def search(q: np.ndarray, k: int):  # type: ignore[no-untyped-def]
        r = adhoc_rank(q, vectors, SCALE, k)
        return type(r)(r.ids + 100, r.cosines, r.scores)

    pairs = confusable_pairs(ids, names, vectors, search, sample, SCALE, limit=100, k=len(vectors))
    assert pairs and (pairs[0].a, pairs[0].b) == ("c0", "c6") and pairs[0].flagged
    for p in pairs:
        rate, support = _brute_tie_rate(sample, vectors, p.a_id - 100, p.b_id - 100)
        assert p.tie_rate == pytest.approx(rate) and p.support == support
    assert [p for p in pairs if p.flagged] == [pairs[0]]
    nearest = confusable_pairs(ids, names, vectors, search, None, SCALE)
    assert (nearest[0].a, nearest[0].b) == ("c0", "c6") and nearest[0].tie_rate is None


def test_nearest_new_classes_equal_a_full_sort_across_blocks() -> None:
    """A bulk add ranks its new classes against each other in blocks; the result is the full sort's."""
    from service.quality import nearest_others

    vectors = normalise(np.random.default_rng(3).standard_normal((37, 8)).astype(np.float32))
    ids, cos = nearest_others(vectors, k=4, rows=10)  # 4 blocks, the last one short
    full = vectors @ vectors.T
    np.fill_diagonal(full, -np.inf)
    for i in range(len(vectors)):
        want = np.argsort(-full[i])[:4]
        assert sorted(ids[i].tolist()) == sorted(want.tolist()), i
        np.testing.assert_allclose(np.sort(cos[i]), np.sort(full[i, want]), rtol=1e-5)
    one_ids, _ = nearest_others(vectors[:1], k=4)
    assert one_ids.shape == (1, 0)  # a single new class has no new neighbours
