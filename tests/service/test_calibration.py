"""service/calibration.py: quantile parity with numpy, which sample rows count, caching per version."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.calibration import (
    MAX_WORK,
    MIN_ROWS,
    MIN_SAMPLE,
    Calibrator,
    NoCalibrationSample,
    check_unknown_policy,
    set_scores,
    threshold,
)
from service.errors import InvalidInput
from service.index import adhoc_rank, normalise


@pytest.mark.parametrize("n", [1, 2, 7, 100, 2000])
@pytest.mark.parametrize("acceptance", [0.05, 0.5, 0.9, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_threshold_is_numpys_quantile_and_the_highest_that_accepts_the_rate(
    n: int, acceptance: float, weighted: bool
) -> None:
    rng = np.random.default_rng(n)
    scores = rng.normal(size=n)
    w = rng.uniform(0.0, 1.0, size=n) if weighted else np.ones(n)
    t = threshold(scores, acceptance, w if weighted else None)
    assert t == np.quantile(scores, 1 - acceptance, method="inverted_cdf", weights=w if weighted else None)
    total = w.sum()
    assert w[scores >= t].sum() >= acceptance * total - 1e-9  # accepts at least the rate
    assert w[scores > t].sum() < acceptance * total + 1e-9  # the next score up would accept less


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01])
def test_threshold_refuses_rates_outside_0_1(bad: float) -> None:
    with pytest.raises(InvalidInput, match="acceptance"):
        threshold(np.arange(5.0), bad)


def _space(seed: int = 0, m: int = 400, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A sample of images around 4 class directions (100 each) and those 4 class vectors."""
    rng = np.random.default_rng(seed)
    classes = normalise(rng.normal(size=(4, d)))
    sample = normalise(np.repeat(classes, m // 4, axis=0) + 0.3 * rng.normal(size=(m, d)))
    return sample, classes


def _brute_membership(sample: np.ndarray, set_vectors: np.ndarray, vocab: np.ndarray, scale: float) -> np.ndarray:
    """By the definition: softmax over the set's classes + the vocabulary classes the set lacks."""
    lacks = (vocab @ set_vectors.T).max(1) < 1 - 1e-5
    union = np.vstack([set_vectors, vocab[lacks]]).astype(np.float64)
    logits = scale * sample.astype(np.float64) @ union.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p[:, : len(set_vectors)].sum(1) / p.sum(1)


@pytest.mark.parametrize("scale", [10.0, 100.0])
def test_each_image_weighs_the_probability_that_its_class_is_in_the_set(scale: float) -> None:
    sample, vocab = _space()
    cal = Calibrator(sample, vocab, logit_scale=scale)
    novel = normalise(np.random.default_rng(7).normal(size=(1, vocab.shape[1])))
    for set_vectors in (vocab[:2], np.vstack([vocab[:1], novel]), vocab):
        got = cal.scores_for(lambda q, v=set_vectors: adhoc_rank(q, v, scale, 1))  # type: ignore[misc]
        want = _brute_membership(sample, set_vectors, vocab, scale)
        np.testing.assert_allclose(got.weights, want, atol=2e-5)  # float32 cosines x the logit scale
        np.testing.assert_allclose(got.scores, (sample @ set_vectors.T).max(1), atol=1e-6)
    full = cal.scores_for(lambda q: adhoc_rank(q, vocab, scale, 1))
    assert full.rows == len(sample)  # a set with the whole vocabulary weighs every image 1
    assert np.allclose(
        Calibrator(sample, None, scale).scores_for(lambda q: adhoc_rank(q, vocab[:1], scale, 1)).weights, 1
    )


def test_softmax_scores_are_the_rankings_top1_probability() -> None:
    sample, vocab = _space(1)
    ranked = adhoc_rank(sample, vocab, 50.0, 1)
    got = set_scores(ranked, np.ones(len(sample)), "softmax")
    logits = 50.0 * sample @ vocab.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(got.scores, (p / p.sum(1, keepdims=True)).max(1), atol=1e-5)


def test_point_is_computed_once_per_key_and_shared_by_concurrent_requests() -> None:
    sample, vocab = _space(2)
    cal = Calibrator(sample, vocab, logit_scale=100.0, inline_work=0)  # always in the pool
    calls: list[int] = []

    def search(s: np.ndarray, k: int) -> object:
        calls.append(k) if len(s) == len(sample) else None  # the sample's searches (not the vocabulary's)
        return adhoc_rank(s, vocab[: 2 + k], 100.0, 1)

    async def run() -> list[float]:
        with ThreadPoolExecutor(2) as pool:
            first = await asyncio.gather(
                *[cal.point(("set", "s", 1), lambda s: search(s, 0), 2, a, pool) for a in (0.95, 0.5, 0.95)]  # type: ignore[arg-type, return-value]
            )
            again = await cal.point(("set", "s", 1), lambda s: search(s, 0), 2, 0.9, pool)  # type: ignore[arg-type, return-value]
            other = await cal.point(("set", "s", 2), lambda s: search(s, 1), 3, 0.95, pool)  # type: ignore[arg-type, return-value]
        return [p.threshold for p in (*first, again, other)]

    t95, t50, t95b, t90, t95v2 = asyncio.run(run())
    assert calls == [0, 1]  # version 1 once (three concurrent requests, then a cached one), version 2 once
    assert t95 == t95b and t50 > t95 and t90 >= t95
    w = _brute_membership(sample, vocab[:2], vocab, 100.0)
    want = np.quantile((sample @ vocab[:2].T).max(1), 0.05, method="inverted_cdf", weights=w)
    assert t95 == pytest.approx(want, abs=1e-6)
    assert t95v2 != t95


def test_too_few_claimed_rows_and_no_sample_are_422s() -> None:
    sample, vocab = _space(3, m=4 * (MIN_ROWS - 1))
    cal = Calibrator(sample, vocab, logit_scale=100.0)
    with pytest.raises(NoCalibrationSample, match="at least 20"):  # about 19 images are of class 0
        asyncio.run(cal.point("k", lambda s: adhoc_rank(s, vocab[:1], 100.0, 1), 1, 0.95))
    assert asyncio.run(cal.point("k2", lambda s: adhoc_rank(s, vocab[:2], 100.0, 1), 2, 0.95)).rows >= MIN_ROWS
    none = Calibrator(None, None, 100.0)
    with pytest.raises(NoCalibrationSample) as err:
        none.require()
    assert err.value.status == 422 and err.value.code == "no_calibration_sample"


@pytest.mark.parametrize(
    ("unknown", "acceptance", "raw", "message"),
    [
        (None, 0.9, None, "applies to unknown='calibrated' only"),
        ("sometimes", None, None, "not a policy"),
        ("calibrated", None, 0.2, "not both"),
        ("calibrated", 0.0, None, "within"),
        ("calibrated", 1.5, None, "within"),
    ],
)
def test_inconsistent_unknown_policies_are_refused(
    unknown: str | None, acceptance: float | None, raw: float | None, message: str
) -> None:
    sample, vocab = _space()
    with pytest.raises(InvalidInput, match=message):
        check_unknown_policy(unknown, acceptance, raw, Calibrator(sample, vocab, 100.0))


def test_a_consistent_policy_passes_only_with_a_sample() -> None:
    sample, vocab = _space()
    check_unknown_policy("calibrated", 0.9, None, Calibrator(sample, vocab, 100.0))
    check_unknown_policy(None, None, 0.3, Calibrator(None, None, 100.0))
    with pytest.raises(NoCalibrationSample):
        check_unknown_policy("calibrated", None, None, Calibrator(None, None, 100.0))


def test_the_centroid_is_the_samples_mean() -> None:
    sample, vocab = _space(6)
    np.testing.assert_allclose(Calibrator(sample, vocab, 100.0).centroid, sample.mean(0), atol=1e-6)  # type: ignore[arg-type]
    assert Calibrator(None, None, 100.0).centroid is None


def test_huge_sets_search_a_bounded_uniform_part_of_the_sample() -> None:
    sample, vocab = _space(8, m=800)
    cal = Calibrator(sample, vocab, 100.0)
    d = sample.shape[1]
    assert cal.rows_within(4) == 800  # small set: every image
    rows = cal.rows_within(MAX_WORK // (d * 300))  # 300 rows' worth of work
    assert rows == 300
    assert cal.rows_within(10**12) == MIN_SAMPLE  # never fewer than MIN_SAMPLE
    seen: list[int] = []

    def search(q: np.ndarray) -> object:
        seen.append(len(q))
        return adhoc_rank(q, vocab[:2], 100.0, 1)

    part = cal.scores_for(search, rows=300)  # type: ignore[arg-type]
    assert seen[0] == 300 and part.sample_size == 300
    full = cal.scores_for(lambda q: adhoc_rank(q, vocab[:2], 100.0, 1))
    picked = np.random.default_rng(0).permutation(800)[:300]  # the documented draw
    np.testing.assert_allclose(part.scores, full.scores[picked], atol=1e-7)
    np.testing.assert_allclose(part.weights, full.weights[picked], atol=1e-7)
