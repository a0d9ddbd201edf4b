"""A quality check on every class added, and a set's most confusable pairs.

For each new class: its nearest classes (the set's and the other new ones) by class-vector cosine,
and for each of them how often the two *tie* on in-domain images (the bundle's calibration sample,
models/calibration.py):

* a **tie** on an image: one of the two is the image's top-1 class (in the set with the new classes),
  and the model prefers it to the other by less than 2 : 1 — their softmax odds
  ``exp(logit_scale * (cos_a - cos_b))`` are below ``TIE_ODDS``, i.e. ``|cos_a - cos_b| < ln 2 / logit_scale``.
  The margin is the bundle's own temperature, not a number tuned per model;
* the **tie rate** of a pair: ties / images either of the two wins (its *support*);
* a pair is **flagged** (a likely duplicate or confusion) when it ties on at least ``FLAG_RATE`` of
  its support (and the support has at least ``MIN_SUPPORT`` images): on most in-domain images
  where either answers, the model cannot tell the two apart. Independently of any sample, two
  vectors closer than the margin (``|a - b| < ln 2 / logit_scale``, so ``|cos_a - cos_b|`` is below
  it for *every* image) are flagged: such a pair ties everywhere. Bundles without a calibration
  sample get only this second rule, and the cosines.

Pure numpy over arrays; the caller supplies the searches (FAISS for big sets) and runs it off the
event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import SimilarClasses
from service.index import Ranked, Snapshot

TIE_ODDS = 2.0  # a tie: the model prefers one of the two by less than these odds
FLAG_RATE = 0.5  # flagged: ties on at least this share of the images either wins
MIN_SUPPORT = 5  # ... of at least this many images
NEIGHBOURS = 3  # nearest classes listed per new class
TOLERANCE = 1e-5  # float error between two computations of one cosine
Search = Callable[[np.ndarray, int], Ranked]  # queries [Q, D], k -> the set's top-k per query


@dataclass(frozen=True)
class Neighbour:
    name: str
    class_id: int | None  # None: another class of the same request
    cosine: float  # of the two class vectors
    tie_rate: float | None  # None: no calibration sample, or no image either wins
    support: int  # calibration images either of the two wins
    flagged: bool


@dataclass(frozen=True)
class ClassCheck:
    name: str
    neighbours: list[Neighbour]

    @property
    def flagged(self) -> list[Neighbour]:
        return [n for n in self.neighbours if n.flagged]


def margin(logit_scale: float) -> float:
    """Cosine difference below which the model prefers one class by less than ``TIE_ODDS``."""
    return math.log(TIE_ODDS) / logit_scale


def tie_stats(a: np.ndarray, b: np.ndarray, best: np.ndarray, logit_scale: float) -> tuple[float | None, int]:
    """Tie rate and support of a pair from its cosines on the sample ``a``, ``b`` [M] and the sample's
    top-1 cosine ``best`` [M] in the set that holds both."""
    either = np.maximum(a, b) >= best - TOLERANCE  # one of the two is the top-1
    support = int(either.sum())
    if support == 0:
        return None, 0
    ties = either & (np.abs(a - b) < margin(logit_scale))
    return float(ties.sum() / support), support


def flag(cosine: float, tie_rate: float | None, support: int, logit_scale: float) -> bool:
    """The decision rule of the module docstring."""
    everywhere = math.sqrt(max(0.0, 2.0 - 2.0 * cosine)) < margin(logit_scale)  # |a - b| for unit vectors
    return everywhere or (tie_rate is not None and support >= MIN_SUPPORT and tie_rate >= FLAG_RATE)


def check_new_classes(
    names: Sequence[str],
    vectors: np.ndarray,
    search: Search | None,
    label: Callable[[int], str],
    existing: Callable[[Sequence[int]], np.ndarray],
    sample: np.ndarray | None,
    logit_scale: float,
    k: int = NEIGHBOURS,
) -> list[ClassCheck]:
    """Per new class (``names``, ``vectors`` [m, D] normalised) its ``k`` nearest classes, flagged or not.

    ``search`` ranks queries against the set's current classes (None: the set is empty); ``label`` and
    ``existing`` give a class id's name and the vectors [n, D] of class ids. ``sample`` [M, D]: the
    calibration sample, or None.
    """
    m = len(names)
    ex_ids, ex_cos = _existing_neighbours(vectors, search, k)  # [m, k'] each
    new_ids, new_cos = nearest_others(vectors, k)  # [m, k''] each: the nearest other new classes
    wanted = sorted({int(c) for c in ex_ids.ravel() if c >= 0})
    other_vectors = dict(zip(wanted, existing(wanted), strict=True)) if sample is not None and wanted else {}
    best = None
    if sample is not None:  # the sample's top-1 cosine in the set with the new classes: [M]
        best = (sample @ vectors.T).max(1)
        if search is not None:
            best = np.maximum(best, search(sample, 1).cosines[:, 0])
    checks = []
    for i in range(m):
        # (cosine, class id or None, row among the new classes or -1), nearest first
        cands: list[tuple[float, int | None, int]] = [
            (float(c), int(j), -1) for j, c in zip(ex_ids[i], ex_cos[i], strict=True) if j >= 0
        ]
        cands += [(float(c), None, int(j)) for j, c in zip(new_ids[i], new_cos[i], strict=True)]
        out = []
        for cos, cid, j in sorted(cands, key=lambda t: -t[0])[:k]:
            rate, support = None, 0
            if sample is not None and best is not None:
                other = vectors[j] if cid is None else other_vectors[cid]
                rate, support = tie_stats(sample @ vectors[i], sample @ other, best, logit_scale)
            name = names[j] if cid is None else label(cid)
            out.append(Neighbour(name, cid, cos, rate, support, flag(cos, rate, support, logit_scale)))
        checks.append(ClassCheck(names[i], out))
    return checks


def nearest_others(vectors: np.ndarray, k: int, rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest among the other rows (unit vectors; new classes, sample images): ids and
    cosines [m, min(k, m - 1)], in the rows' dtype.
    Blocks of ``rows`` bound the memory (a 5,000-name add would need a 5,000 x 5,000 matrix) and
    argpartition keeps it linear in m per row (sorting every pair made a bulk add quadratic in Python)."""
    m = len(vectors)
    kk = min(k, m - 1)
    if kk <= 0:
        return np.zeros((m, 0), np.int64), np.zeros((m, 0), np.float32)
    ids, cos = np.zeros((m, kk), np.int64), np.zeros((m, kk), vectors.dtype)
    for start in range(0, m, rows):
        block = vectors[start : start + rows] @ vectors.T  # [b, m]
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf  # not itself
        top = np.argpartition(-block, kk - 1, axis=1)[:, :kk]
        ids[start : start + rows], cos[start : start + rows] = top, np.take_along_axis(block, top, axis=1)
    return ids, cos


def _existing_neighbours(vectors: np.ndarray, search: Search | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    if search is None or len(vectors) == 0:
        return np.zeros((len(vectors), 0), np.int64), np.zeros((len(vectors), 0), np.float32)
    ranked = search(vectors, k)
    valid = ranked.ids >= 0  # IVF may return fewer
    return np.where(valid, ranked.ids, -1), np.where(valid, ranked.cosines, -np.inf)


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    a_id: int
    b_id: int
    cosine: float
    tie_rate: float | None
    support: int
    flagged: bool


def confusable_pairs(
    ids: np.ndarray,
    names: Sequence[str],
    vectors: np.ndarray,
    search: Search,
    sample: np.ndarray | None,
    logit_scale: float,
    limit: int = 20,
    k: int = 8,
) -> list[Pair]:
    """A set's most confusable pairs, most first.

    With a sample: every pair that ties on some sample image, ranked by tie rate (pairs with enough
    support first), then cosine; ties are counted from each image's top-``k`` (a tie among more than
    ``k`` classes within the margin counts its first ``k``). Without: each class's nearest neighbour
    by vector cosine, ranked by cosine.
    """
    row = {int(c): r for r, c in enumerate(ids)}
    if sample is None:
        ranked = search(vectors, 2)  # each class's own row first, then its nearest other class
        found = {}
        for r in range(len(ids)):
            for c, cos in zip(ranked.ids[r], ranked.cosines[r], strict=True):
                if int(c) != int(ids[r]) and c >= 0:
                    key = tuple(sorted((int(ids[r]), int(c))))
                    found[key] = float(cos)
                    break
        pairs = [_pair(a, b, names, row, cos, None, 0, logit_scale) for (a, b), cos in found.items()]
        return sorted(pairs, key=lambda p: -p.cosine)[:limit]
    ranked = search(sample, min(k, len(ids)))  # [M, k]
    wins = Counter(int(c) for c in ranked.ids[:, 0])  # images each class wins
    ties: Counter[tuple[int, int]] = Counter()  # per pair: images one wins and the other is within the margin
    close = ranked.cosines[:, :1] - ranked.cosines < margin(logit_scale)  # [M, k]
    for i, j in zip(*np.nonzero(close[:, 1:]), strict=True):
        a, b = int(ranked.ids[i, 0]), int(ranked.ids[i, j + 1])
        ties[(min(a, b), max(a, b))] += 1
    pairs = []
    for (a, b), n in ties.items():
        support = wins[a] + wins[b]
        cos = float(vectors[row[a]] @ vectors[row[b]])
        pairs.append(_pair(a, b, names, row, cos, n / support, support, logit_scale))
    return sorted(pairs, key=lambda p: (-(p.tie_rate or 0.0) * (p.support >= MIN_SUPPORT), -p.cosine))[:limit]


def _pair(
    a: int, b: int, names: Sequence[str], row: dict[int, int], cos: float, rate: float | None, n: int, scale: float
) -> Pair:
    return Pair(names[row[a]], names[row[b]], a, b, cos, rate, n, flag(cos, rate, n, scale))


class QualityGate:
    """The check on a write path: runs :func:`check_new_classes` off the event loop against the set's
    current snapshot, and refuses flagged classes when asked (``if_similar='error'``: 409, nothing stored).

    The sample part (tie rates) costs one search of the sample against the set; above ``max_sample_work``
    multiply-adds on an exact set it is left out (tie rates null, the vector rule still applies).
    """

    def __init__(self, sample: np.ndarray | None, logit_scale: float, max_sample_work: int = 20_000_000_000) -> None:
        self.sample = sample
        self.logit_scale = logit_scale
        self.max_sample_work = max_sample_work

    async def check(
        self, snap: Snapshot | None, names: Sequence[str], vectors: np.ndarray, if_similar: str = "warn"
    ) -> list[ClassCheck]:
        checks = await asyncio.to_thread(self._check, snap, names, vectors)
        if if_similar == "error":
            refuse_similar(checks)
        return checks

    def _check(self, snap: Snapshot | None, names: Sequence[str], vectors: np.ndarray) -> list[ClassCheck]:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if snap is None or len(snap) == 0:
            return check_new_classes(names, vectors, None, str, _no_rows, self.sample, self.logit_scale)
        scale = self.logit_scale
        by_id = {int(c): r for r, c in enumerate(snap.ids)}
        sample = self.sample
        if sample is not None and not snap.approximate and sample.size * len(snap) > self.max_sample_work:
            sample = None
        return check_new_classes(
            names,
            vectors,
            lambda q, k: snap.search(q, k, scale),
            lambda cid: snap.names[by_id[cid]],
            lambda ids: snap.vectors[[by_id[c] for c in ids]],
            sample,
            scale,
        )


def _no_rows(ids: Sequence[int]) -> np.ndarray:
    raise AssertionError("an empty set has no classes to look up")


def refuse_similar(checks: list[ClassCheck]) -> None:
    """409 (``SimilarClasses``, the pairs in its ``pairs`` member) when any new class is flagged."""
    pairs = [
        {"name": c.name, "similar_to": n.name, "class_id": n.class_id, "cosine": n.cosine, "tie_rate": n.tie_rate}
        for c in checks
        for n in c.flagged
    ]
    if pairs:
        shown = ", ".join(f"{p['name']!r} ~ {p['similar_to']!r}" for p in pairs[:5])
        raise SimilarClasses(
            f"likely duplicates or confusions: {shown}; nothing was added (send if_similar='warn' to add anyway)",
            extensions={"pairs": pairs},
        )
